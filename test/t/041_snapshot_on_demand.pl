# kafka_bridge.snapshot() re-publishes a published table while another
# session keeps updating it: the snapshot completes, no UPDATE waits a
# second for its locks (each statement's duration is measured by the
# writer), B, which syncs the table, ends with A's rows, and the topic got
# every row again from the snapshot.  A snapshot interrupted by a restart of
# the server resumes where it stood.  A broker outage in the middle of a
# snapshot never keeps the table locked; a writer's transaction left open
# does not have the chunk's lock requests hold back the other writers.  A
# key of columns whose operators live in two schemas, and an operator of
# the same name as the key's earlier in search_path; a float key under
# extra_float_digits = 0.
# The servers run with
# default_transaction_isolation = 'repeatable read', which the workers
# override.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use List::Util;
use Time::HiRes qw(usleep);
use KafkaBridgeTest;

my $topic = 'regress_resnap_item';
my $rows = 100_000;

my %node;
for my $name (qw(A B))
{
	# repeatable read by default: the workers run read committed all the same
	my $node = kb_node($name,
		conf => "track_commit_timestamp = on\ndefault_transaction_isolation = 'repeatable read'\n");
	$node->start;
	$node->safe_psql('postgres', q{
		CREATE EXTENSION kafka_bridge;
		CREATE TABLE item (id int PRIMARY KEY, v bigint NOT NULL);
	});
	ok(kb_wait_slot($node), "$name: slot created");
	$node{$name} = $node;
}
my ($a, $b) = @node{qw(A B)};

$a->safe_psql('postgres', qq{
	INSERT INTO item SELECT g, 0 FROM generate_series(1, $rows) g;
	CREATE TABLE writer_stats (updates int, longest_ms float8);
	-- update random rows, one transaction each, until the snapshot has been
	-- done for after_done updates; record the longest UPDATE
	CREATE PROCEDURE regress_updater(after_done int) LANGUAGE plpgsql AS \$\$
	DECLARE
	  t0 timestamptz; longest float8 := 0; n int := 0; after int := 0;
	BEGIN
	  LOOP
	    n := n + 1;
	    t0 := clock_timestamp();
	    UPDATE item SET v = v + 1 WHERE id = 1 + floor(random() * $rows)::int;
	    longest := greatest(longest, extract(epoch FROM clock_timestamp() - t0) * 1000);
	    COMMIT;
	    IF (SELECT state FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass) = 'done' THEN
	      after := after + 1;
	    END IF;
	    EXIT WHEN after >= after_done;
	  END LOOP;
	  INSERT INTO writer_stats VALUES (n, longest);
	  COMMIT;
	END \$\$;
	SELECT kafka_bridge.publish('item', topic => '$topic');
});
ok($a->poll_query_until('postgres', "SELECT state = 'done' FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass"),
	'A: the first snapshot is done');
$b->safe_psql('postgres', "SELECT kafka_bridge.sync('item', topic => '$topic')");
ok($b->poll_query_until('postgres', "SELECT count(*) = $rows FROM item"), 'B: got the rows');
my $before = scalar(kafka_scan($topic));

# snapshot() while the updater runs; it returns at once
my $writer = $a->background_psql('postgres', on_error_stop => 1);
$writer->query_until(qr/start/, "\\echo start\nCALL regress_updater(500);\n");
usleep(200_000);
$a->safe_psql('postgres', "SELECT kafka_bridge.snapshot('item')");
like($a->safe_psql('postgres', "SELECT state || ' ' || rows_done || ' ' || (rows_estimated > 0) FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass"),
	qr/^(pending|running) \d+ true$/, 'A: snapshot() starts a snapshot, with an estimate of the rows');
ok($a->poll_query_until('postgres', "SELECT state = 'done' FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass"),
	'A: the snapshot completes under write load');
ok($a->poll_query_until('postgres', 'SELECT count(*) = 1 FROM writer_stats'), 'A: the updater finished');
$writer->quit;
my ($updates, $longest) = split /\|/, $a->safe_psql('postgres', 'SELECT updates, longest_ms FROM writer_stats');
note "updater: $updates updates, the longest took $longest ms";
cmp_ok($updates, '>', 500, 'the updater kept updating during the snapshot');
cmp_ok($longest, '<', 1000, "no UPDATE was blocked a second (longest $longest ms)");

kb_converge($a, $b, 'item', 'B holds the same rows as A');

# the snapshot records published since, by row id
sub snapshot_ids
{
	my ($records, $from) = @_;
	my %ids;
	for my $r (@$records[ $from .. $#$records ])
	{
		next unless defined $r->{value} && $r->{value} =~ /"snapshot":true/;
		my ($id) = $r->{value} =~ /"row":\{"id":(\d+)/;
		$ids{$id}++;
	}
	return \%ids;
}
my @records = kafka_scan($topic);
my %ids = %{ snapshot_ids(\@records, $before) };
is(scalar(keys %ids), $rows, "the snapshot published every one of the $rows rows again");

# ---- a snapshot interrupted by a restart resumes from snapshot_upto ----

# small chunks, so that the restart comes in the middle
$a->safe_psql('postgres', "ALTER SYSTEM SET kafka_bridge.snapshot_chunk_rows = 500; SELECT pg_reload_conf()");
$a->safe_psql('postgres', "SELECT kafka_bridge.snapshot('item')");
ok($a->poll_query_until('postgres', "SELECT state = 'running' AND rows_done > 0 FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass"),
	'A: the third snapshot is running');
$a->stop('immediate');
$a->start;
my $upto = $a->safe_psql('postgres', "SELECT state || ' ' || done_up_to_key::text FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass");
note "after the restart: $upto";
ok($a->poll_query_until('postgres', "SELECT state = 'done' FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass"),
	'A: the snapshot resumes after a crash and completes');
my @after = kafka_scan($topic);
my %third = %{ snapshot_ids(\@after, scalar(@records)) };
is(scalar(keys %third), $rows, 'the interrupted snapshot still published every row');
kb_converge($a, $b, 'item', 'B still holds the same rows as A');

# ---- odd shapes: a text key, a dropped column, a table without a key ----
# Chunks read the table's columns by name (not its dropped ones), stop at
# snapshot_chunk_time (1 ms here) and resume after the last key read.
$a->safe_psql('postgres', q{
	ALTER SYSTEM SET kafka_bridge.snapshot_chunk_rows = 100000;
	ALTER SYSTEM SET kafka_bridge.snapshot_chunk_time = 1;
	SELECT pg_reload_conf();
	CREATE TABLE odd (k text PRIMARY KEY, gone int, n int, t text);
	ALTER TABLE odd DROP COLUMN gone;
	ALTER TABLE odd ADD COLUMN late date;
	INSERT INTO odd SELECT 'k' || g, g, repeat('x', g % 7), date '2026-01-01' + g
	  FROM generate_series(1, 30000) g;
	CREATE TABLE loose (a int, b text);
	ALTER TABLE loose REPLICA IDENTITY FULL;
	INSERT INTO loose SELECT g % 100, 'b' || g FROM generate_series(1, 1200) g;
	-- a key whose columns' ordering operators are in two schemas
	CREATE SCHEMA ext;
	CREATE EXTENSION citext SCHEMA ext;
	CREATE TABLE mixed (tenant int, name ext.citext, n int, PRIMARY KEY (tenant, name));
	INSERT INTO mixed SELECT g % 3, CASE WHEN g % 2 = 0 THEN 'N' ELSE 'n' END || g, g
	  FROM generate_series(1, 15000) g;
	SELECT kafka_bridge.publish('odd', topic => 'regress_odd');
	SELECT kafka_bridge.publish('loose', topic => 'regress_loose');
	SELECT kafka_bridge.publish('mixed', topic => 'regress_mixed');
});
ok($a->poll_query_until('postgres', "SELECT bool_and(state = 'done') FROM kafka_bridge.snapshots WHERE table_name IN ('odd'::regclass, 'loose'::regclass, 'mixed'::regclass)"),
	'A: the snapshots of odd, loose and mixed are done');
like($a->safe_psql('postgres', q{SELECT string_agg(rows_done::text, ' ' ORDER BY table_name::text)
	FROM kafka_bridge.snapshots WHERE table_name IN ('odd'::regclass, 'loose'::regclass)}),
	qr/^1200 30000$/, 'A: rows_done counts every row of each');
# what the topics hold, compared with the tables by PostgreSQL itself
for my $table (qw(odd loose mixed))
{
	my $file = $a->basedir . "/$table.rows";
	open(my $fh, '>', $file) or die "cannot write $file: $!";
	for my $r (kafka_scan("regress_$table"))
	{
		my ($row) = $r->{value} =~ /"row":(\{.*\})\}$/;
		print $fh "$row\n" if defined $row;
	}
	close $fh;
	is($a->safe_psql('postgres', qq{
		CREATE TEMP TABLE got (row jsonb);
		COPY got FROM '$file';
		SELECT (SELECT count(*) FROM got) || ' '
		    || (SELECT count(*) FROM (SELECT row FROM got EXCEPT ALL SELECT to_jsonb(x) FROM $table x) d) || ' '
		    || (SELECT count(*) FROM (SELECT to_jsonb(x) FROM $table x EXCEPT ALL SELECT row FROM got) d)}),
		{ odd => '30000 0 0', loose => '1200 0 0', mixed => '15000 0 0' }->{$table},
		"$table: the topic holds each row once, as the table holds it (records, extra, missing)");
}

# ---- a broker outage in the middle of a snapshot ----
# The first chunk (50,000 rows) cannot fit in librdkafka's queue (10,000
# records) and the producer's ring while the broker is away: it ends at
# snapshot_chunk_time with the rows it produced, and no chunk starts while
# the queue is full, so the table is never locked for the outage.
$a->safe_psql('postgres', q{
	ALTER SYSTEM RESET kafka_bridge.snapshot_chunk_rows;
	ALTER SYSTEM RESET kafka_bridge.snapshot_chunk_time;
	SELECT pg_reload_conf();
});
my $outage_from = scalar(kafka_scan($topic));
kafka_stop();
$a->safe_psql('postgres', "SELECT kafka_bridge.snapshot('item')");
sleep 3;
my @waits = map {
	my $t0 = [ Time::HiRes::gettimeofday() ];
	my ($rc, $out, $err) = $a->psql('postgres',
		"SET lock_timeout = '3s'; UPDATE item SET v = v + 1 WHERE id = $_");
	$rc == 0 ? Time::HiRes::tv_interval($t0) * 1000 : 1e9;
	} 1 .. 20;
my $slowest = List::Util::max(@waits);
cmp_ok($slowest, '<', 1000, "broker away: 20 UPDATEs during the snapshot, none waited a second (slowest $slowest ms)");
like($a->safe_psql('postgres', "SELECT state || ' ' || (rows_done > 0) FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass"),
	qr/^running true$/, 'broker away: the snapshot stands at the rows produced so far');
kafka_start();
ok($a->poll_query_until('postgres', "SELECT state = 'done' FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass"),
	'the broker back: the snapshot completes');
my %fourth = %{ snapshot_ids([ kafka_scan($topic) ], $outage_from) };
is(scalar(keys %fourth), $rows, 'the snapshot through the outage published every row');
kb_converge($a, $b, 'item', 'B holds the same rows as A after the outage');

# ---- a writer's transaction left open ----
# The chunk cannot get its lock; while its request waits (100 ms), new
# writers queue behind it.  It tries again a second later, not at once:
# the other writers are held back about a tenth of the time (an UPDATE
# that took over 50 ms counts as held back), not all of it.
my $holder = $a->background_psql('postgres', on_error_stop => 1);
$holder->query_safe('BEGIN; UPDATE item SET v = v + 1 WHERE id = 2;');
$a->safe_psql('postgres', "SELECT kafka_bridge.snapshot('item')");
my ($updates_open, $held_ms) = split /\|/, $a->safe_psql('postgres', q{
	DO $$
	DECLARE
	  t0 timestamptz; took float8; n int := 0; held float8 := 0;
	  until_ts timestamptz := clock_timestamp() + interval '4 s';
	BEGIN
	  WHILE clock_timestamp() < until_ts LOOP
	    t0 := clock_timestamp();
	    UPDATE item SET v = v + 1 WHERE id = 3;
	    took := extract(epoch FROM clock_timestamp() - t0) * 1000;
	    IF took > 50 THEN held := held + took; END IF;
	    n := n + 1;
	    COMMIT;
	  END LOOP;
	  PERFORM set_config('regress.result', n || '|' || round(held::numeric), false);
	END $$;
	SELECT current_setting('regress.result');});
note "an open writer: $updates_open UPDATEs in 4 s, held back $held_ms ms in all";
cmp_ok($held_ms, '<', 1000, "an open writer's transaction: the chunk's tries held other writers back $held_ms ms of 4 s");
$holder->query_safe('COMMIT;');
$holder->quit;
ok($a->poll_query_until('postgres', "SELECT state = 'done' FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass"),
	'the writer done: the snapshot completes');

# ---- a float key under extra_float_digits = 0 ----
# Six keys just below 2 all print as "2" with 15 digits: a chunk of one
# row that wrote its last key that way would have the next one start
# above 2, past the other five.  snapshot_upto is written with the text
# settings fixed.
$a->safe_psql('postgres', q{
	ALTER SYSTEM SET extra_float_digits = 0;
	ALTER SYSTEM SET kafka_bridge.snapshot_chunk_rows = 1;
	SELECT pg_reload_conf();
	CREATE TABLE floaty (k float8 PRIMARY KEY);
	INSERT INTO floaty SELECT 2 - g * 2.220446049250313e-16 FROM generate_series(0, 5) g;
});
sleep 2;	# the worker has taken the reload
$a->safe_psql('postgres', "SELECT kafka_bridge.publish('floaty', topic => 'regress_floaty')");
ok($a->poll_query_until('postgres', "SELECT state = 'done' FROM kafka_bridge.snapshots WHERE table_name = 'floaty'::regclass"),
	'extra_float_digits = 0: the snapshot of floaty is done');
is(scalar(kafka_scan('regress_floaty')), 6, 'floaty: each of the 6 rows published, in chunks of one row');
$a->safe_psql('postgres', 'ALTER SYSTEM RESET extra_float_digits; SELECT pg_reload_conf()');

# ---- an operator of the same name earlier in search_path ----
# The chunk's key comparison names its operators with their schema, and
# the workers' search_path is empty: evil.> is never what runs.
$a->safe_psql('postgres', q{
	CREATE SCHEMA evil;
	CREATE FUNCTION evil.gt(int, int) RETURNS bool LANGUAGE plpgsql AS
	  $$ BEGIN RAISE EXCEPTION 'hijacked: evil.> ran as %', current_user; END $$;
	CREATE OPERATOR evil.> (leftarg = int, rightarg = int, function = evil.gt);
	CREATE TABLE public.guarded (id int PRIMARY KEY);
	INSERT INTO public.guarded SELECT generate_series(1, 1000);
	ALTER SYSTEM SET search_path = evil, pg_catalog;
	ALTER SYSTEM SET kafka_bridge.snapshot_chunk_rows = 10;
	SELECT pg_reload_conf();
});
# the worker has taken the reload (it wakes on the signal) before publish()
sleep 2;
$a->safe_psql('postgres', "SELECT kafka_bridge.publish('public.guarded', topic => 'regress_guarded')");
ok($a->poll_query_until('postgres', "SELECT state = 'done' FROM kafka_bridge.snapshots WHERE table_name = 'public.guarded'::regclass"),
	'search_path with evil first: the snapshot of guarded is done, in 100 chunks');
is(scalar(kafka_scan('regress_guarded')), 1000, 'guarded: every row published');
unlike(slurp_file($a->logfile), qr/(ERROR:  |snapshot: )hijacked/, 'evil.> never ran');

$_->stop for ($a, $b);
done_testing();
