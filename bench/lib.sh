# bench/lib.sh - what the benchmarks share: run as postgres in a copy of the
# tree when started as root, a real Kafka broker, one PostgreSQL instance
# with kafka_bridge serving database "bench", cleanup at exit.
#
# A benchmark sets BENCH (its file name) and sources this file with its own
# arguments; afterwards WORK, BOOTSTRAP, RESULTS_DIR and PGHOST / PGPORT /
# PGDATABASE are set, and say, sql, now, published, start_instance and
# warm_broker are defined, and KCAT_PRODUCER holds kcat's producer options.  BENCH_PG_SETTINGS, set before sourcing, holds extra
# postgresql.conf lines for every instance; start_instance starts more
# instances (bench/apply runs two).  KB_BENCH_KEEP=1 keeps the instances'
# data directories and logs (WORK) for a look afterwards.  KB_BENCH_CASES,
# where a benchmark has several cases, names the ones to run (all by
# default); the results file then holds only those.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
PGBIN=$("${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}" --bindir)
export PATH="$PGBIN:$PATH"
export KAFKA_BRIDGE_CACHE=${KAFKA_BRIDGE_CACHE:-/var/cache/kafka_bridge}

if [ "$(id -u)" = 0 ]; then
	# PostgreSQL will not run as root: run as postgres in a copy of the tree
	make -s -C "$REPO" >/dev/null && make -s -C "$REPO" install >/dev/null
	"$REPO/scripts/kafka" fetch >/dev/null
	COPY=$(mktemp -d /tmp/kafka_bridge-bench.XXXXXX)
	tar -C "$REPO" --exclude=.git --exclude='*.o' -cf - . | tar -C "$COPY" -xf -
	chown -R postgres: "$COPY"
	set +e
	runuser -u postgres -- env PATH="$PATH" KAFKA_BRIDGE_CACHE="$KAFKA_BRIDGE_CACHE" HOME="$COPY" \
		KB_BENCH_PROFILE="${KB_BENCH_PROFILE:-}" KB_BENCH_KEEP="${KB_BENCH_KEEP:-}" KB_BENCH_CASES="${KB_BENCH_CASES:-}" "$COPY/bench/$BENCH" "$@"
	rc=$?
	set -e
	mkdir -p "$REPO/bench/results"
	cp "$COPY/bench/results/$BENCH.json" "$REPO/bench/results/" 2>/dev/null || true
	rm -rf "$COPY"
	exit $rc
fi
RESULTS_DIR=$REPO/bench/results
mkdir -p "$RESULTS_DIR"

WORK=$(mktemp -d /tmp/kafka_bridge-bench-run.XXXXXX)
export WORK
export KAFKA_BRIDGE_KAFKA_DIR=$WORK/kafka
PGDATA=$WORK/pg
PGPORT=$((20000 + RANDOM % 10000))
export PGHOST=$WORK PGPORT PGDATABASE=bench

INSTANCES=()	# data directories of the instances started, stopped at exit

cleanup() {
	local dir
	for dir in "${INSTANCES[@]}"; do
		pg_ctl -D "$dir" -m immediate stop >/dev/null 2>&1 || true
	done
	"$REPO/scripts/kafka" stop --wipe >/dev/null 2>&1 || true
	if [ -n "${KB_BENCH_KEEP:-}" ]; then say "kept the instances' data and logs in $WORK"
	else rm -rf "$WORK"; fi
}
trap cleanup EXIT

say() { printf '%s\n' "$*" >&2; }
# selected CASE: true when KB_BENCH_CASES is empty or names CASE
selected() { [ -z "${KB_BENCH_CASES:-}" ] || [[ " $KB_BENCH_CASES " == *" $1 "* ]]; }
sql() { psql -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
now() { date +%s.%N; }
# wait_for SQL: return once the boolean SQL is true, polled every 10 ms from
# one session (a psql started 20 times a second, with its backend, takes a
# few percent of the machine from the pipeline it times: the kcat pipelines
# pay nothing alike)
wait_for() {
	sql "DO \$kb\$ BEGIN WHILE NOT coalesce(($1), false) LOOP PERFORM pg_sleep(0.01); END LOOP; END \$kb\$"
}
# settle: let the machine finish the writes a previous step left behind
# (PostgreSQL's dirty buffers, the broker's log in the page cache) before
# the next pipeline is timed, so that no pipeline pays the kernel's
# writeback of another's data; every pipeline starts from the same state
settle() { sql "CHECKPOINT"; sync; }
# records acknowledged so far, over every worker
published() { sql "SELECT coalesce(sum(events_published), 0) FROM kafka_bridge.worker_status()"; }

BOOTSTRAP=$("$REPO/scripts/kafka" start --port 29092 | tail -n 1)
say "broker: $BOOTSTRAP"

# start_instance DATADIR PORT INSTANCE_ID: a PostgreSQL instance listening
# on PORT (socket in WORK, log in DATADIR.log) with kafka_bridge serving
# database "bench" under INSTANCE_ID, once its publisher holds its slot
start_instance() {
	local dir=$1 port=$2 id=$3
	initdb -D "$dir" -A trust -N >/dev/null
	{
		echo "port = $port"
		echo "unix_socket_directories = '$WORK'"
		echo "listen_addresses = ''"
		echo "shared_preload_libraries = 'kafka_bridge'"
		echo "wal_level = logical"
		echo "max_wal_size = 4GB"
		echo "output_plugin_libraries = 'pgoutput, test_decoding, wal2json, kafka_bridge'"
		echo "kafka_bridge.bootstrap_servers = '$BOOTSTRAP'"
		echo "kafka_bridge.databases = 'bench'"
		echo "kafka_bridge.instance_id = '$id'"
		echo "kafka_bridge.producer_options = 'linger.ms=5'"
		if [ -n "${BENCH_PG_SETTINGS:-}" ]; then printf '%s\n' "$BENCH_PG_SETTINGS"; fi
	} >>"$dir/postgresql.conf"
	INSTANCES+=("$dir")
	pg_ctl -D "$dir" -l "$dir.log" -w start >/dev/null
	PGPORT=$port createdb bench
	PGPORT=$port sql "CREATE EXTENSION kafka_bridge"
	until [ "$(PGPORT=$port sql "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'kafka_bridge_%'")" -ge 1 ]; do sleep 0.2; done
}

# The producer settings kafka_bridge runs with here (its defaults plus
# linger.ms=5, see start_instance), for the kcat pipelines it is compared
# with: the same guarantees, the same compression, the same bound on the
# records in flight.
KCAT_PRODUCER=(-X acks=all -X enable.idempotence=true -X linger.ms=5 -X compression.type=lz4
	-X queue.buffering.max.messages=10000)

# Create a topic of one partition, with the given configs (name=value).
# A pipeline that produces to a topic that does not exist yet waits a
# second or so for it to be created and get a leader: benchmarks create
# their topics beforehand, so that no pipeline's rate includes that.
create_topic() {	# topic [config...]
	local topic=$1 configs=() c
	shift
	for c in "$@"; do configs+=(--config "$c"); done
	java -cp "$KAFKA_BRIDGE_CACHE/kafka-3.9.1/libs/*" org.apache.kafka.tools.TopicCommand \
		--bootstrap-server "$BOOTSTRAP" --create --if-not-exists --topic "$topic" --partitions 1 \
		--replication-factor 1 "${configs[@]}" >/dev/null 2>&1 ||
		{ say "could not create topic $topic"; return 1; }
}

# A fresh broker runs its first large load slower, while the JVM compiles
# its hot paths: whichever pipeline a benchmark measured first would pay
# for that.  Warm it up first with both kinds of records: 500,000 keyed
# records with five headers to a compacted topic (kafka_bridge's), and
# 500,000 plain ones to a topic of the broker's default (kcat's).
warm_broker() {
	say "[warm-up] 1,000,000 records through the broker"
	create_topic bench_warmup_compact cleanup.policy=compact
	awk 'BEGIN { pad = sprintf("%200s", ""); for (i = 1; i <= 500000; i++) printf "{\"id\":%d}\t%d%s\n", i, i, pad }' |
		kcat -P -b "$BOOTSTRAP" -t bench_warmup_compact -K "$(printf '\t')" -q "${KCAT_PRODUCER[@]}" \
			-H event=WARMUP-PUT -H origin=bench -H lsn=0/1 -H seq=1 -H commit_time=2026-01-01T00:00:00+00:00
	awk 'BEGIN { pad = sprintf("%240s", ""); for (i = 1; i <= 500000; i++) print i pad }' |
		kcat -P -b "$BOOTSTRAP" -t bench_warmup -q "${KCAT_PRODUCER[@]}"
}

start_instance "$PGDATA" "$PGPORT" bench
