# Transactions larger than logical_decoding_work_mem (64kB here), with
# kafka_bridge.stream_large_transactions on (the default): PostgreSQL
# streams their changes to the publisher before the commit, which keeps
# their records in a spool (src/spool.c) until the commit produces them or
# the abort drops them.  Checked here: what reaches Kafka is what a
# decoded-at-commit transaction would give (rows, deletes, truncates,
# kafka_bridge.send() records, both formats, the commit's LSN and time in
# headers and envelopes, seq numbering), savepoints rolled back after
# their changes were streamed leave nothing, an aborted streamed
# transaction leaves nothing, PostgreSQL did stream (not spill), and
# temp_file_limit (1MB here, the spool takes some 3MB) does not stop the
# publisher, the spools are counted in pg_stat_database and logged over
# log_temp_files, the status shows an open streamed transaction's progress.
# Then, with the setting off, a large transaction is spilled by PostgreSQL
# and published whole after its commit; a streamed transaction cut short
# by a crash leaves neither records nor its file; a temp_tablespaces
# entry that cannot be used sends the spool to the database's pgsql_tmp;
# a spool that cannot be written stops the publisher, which publishes the
# transaction once started again; and a small streamed transaction is kept
# in memory, without a file.
use strict;
use warnings;

use File::Path qw(rmtree);
use Time::HiRes qw(usleep);
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $node = kb_node('streamed',
	conf => "logical_decoding_work_mem = 64kB\ntemp_file_limit = 1MB\nlog_temp_files = 0\n");
$node->start;
$node->safe_psql('postgres', q{
	CREATE EXTENSION kafka_bridge;
	CREATE TABLE big (id int PRIMARY KEY, v text);
	CREATE TABLE flat_rows (id int PRIMARY KEY, v text);
	CREATE TABLE wiped (id int PRIMARY KEY);
	INSERT INTO wiped SELECT generate_series(1, 10);
	SELECT kafka_bridge.publish('big', topic => 'regress_streamed');
	SELECT kafka_bridge.publish('flat_rows', topic => 'regress_streamed_flat', format => 'flat');
	SELECT kafka_bridge.publish('wiped', topic => 'regress_streamed_wiped');
});
ok(kb_wait_slot($node), 'slot created');
# publish() snapshots wiped's 10 rows once the slot is there; the
# transaction below truncates the table, and a snapshot taken after it
# would find it empty
is(scalar(kafka_wait_records('regress_streamed_wiped', 10, 60)), 10, 'the snapshot of wiped is published');

# 1. a committed transaction of some 3 MB of changes, with savepoints:
#    rows 1-5000, a send() and rows 100001-105000 in a savepoint rolled
#    back, a savepoint released, updates, deletes, a truncate, a send()
#    that commits, flat rows then their table truncated
$node->safe_psql('postgres', q{
	BEGIN;
	INSERT INTO big SELECT g, repeat('a', 200) FROM generate_series(1, 5000) g;
	SAVEPOINT s1;
	SELECT kafka_bridge.send('regress_streamed_app', 'ghost', 'rolled back'::text);
	INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(100001, 105000) g;
	SAVEPOINT s1b;
	INSERT INTO big SELECT g, repeat('y', 200) FROM generate_series(105001, 106000) g;
	RELEASE s1b;
	ROLLBACK TO s1;
	SAVEPOINT s2;
	INSERT INTO big SELECT g, repeat('b', 200) FROM generate_series(5001, 8000) g;
	RELEASE s2;
	UPDATE big SET v = repeat('c', 200) WHERE id <= 2000;
	DELETE FROM big WHERE id > 7000;
	TRUNCATE wiped;
	SELECT kafka_bridge.send('regress_streamed_app', 'kept', 'committed'::text);
	INSERT INTO flat_rows SELECT g, 'flat ' || g FROM generate_series(1, 3000) g;
	TRUNCATE flat_rows;
	COMMIT;
});
my $commit_lsn = $node->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');

# what the transaction should give on topic regress_streamed: 8,000
# inserts, 2,000 updates, 1,000 deletes each followed by a tombstone
my $expected = 8000 + 2000 + 1000 * 2;
my @records = kafka_wait_records('regress_streamed', $expected, 120);
is(scalar(@records), $expected, "the topic holds the transaction's $expected records");

my $json = JSON::PP->new;
my (%kinds, %ids, %lsn, %time, $seq_ok, $meta_ok);
$seq_ok = 1;
$meta_ok = 1;
my $prev_seq = 0;
for my $r (@records)
{
	my $h = $r->{headers};
	$kinds{ $h->{event} }++;
	$lsn{ $h->{lsn} }++;
	$time{ $h->{commit_time} }++;
	# numbered from 1 in order, a tombstone sharing its DELETE's number
	my $want = defined $r->{value} ? $prev_seq + 1 : $prev_seq;
	$seq_ok = 0 if $h->{seq} != $want;
	$prev_seq = $h->{seq};
	next unless defined $r->{value};
	my $v = $json->decode($r->{value});
	$ids{ $v->{row}{id} }++;
	$meta_ok = 0
	  unless $v->{lsn} eq $h->{lsn}
	  && $v->{origin} eq 'streamed'
	  && defined $v->{commit_time}
	  && $v->{table} eq 'public.big';
}
is_deeply(\%kinds, { 'BIG-PUT' => 10000, 'BIG-DELETE' => 2000 },
	'inserts and updates as PUT, deletes as DELETE and tombstone');
is(scalar(grep { $_ > 100000 } keys %ids), 0,
	'no record of the rows a rolled-back savepoint wrote after they were streamed');
is(scalar(keys %ids), 8000, 'a record for each of the 8,000 rows written and not rolled back');
is(scalar(keys %lsn), 1, 'every record carries one LSN, the commit\'s');
is(scalar(keys %time), 1, 'and one commit time');
ok($seq_ok, 'seq numbers the records 1, 2, ... in order, tombstones sharing their DELETE\'s');
ok($meta_ok, 'every envelope carries the commit LSN, origin and commit time in its fields');
my ($the_lsn) = keys %lsn;
ok($node->safe_psql('postgres', "SELECT '$the_lsn'::pg_lsn < '$commit_lsn'::pg_lsn"),
	"the LSN ($the_lsn) is the commit's, before the end of WAL then ($commit_lsn)");

my @flat = kafka_wait_records('regress_streamed_flat', 3001, 60);
is(scalar(@flat), 3001, 'the flat table\'s 3,000 rows and its truncate');
my @flat_puts = grep { $_->{key} eq 'FLAT_ROWS-PUT' } @flat;
is(scalar(grep { $json->decode($_->{value})->{v} =~ /^flat \d+$/ } @flat_puts),
	3000, 'keyed FLAT_ROWS-PUT, valued the row alone');
# a flat TRUNCATE has a null value but is no tombstone: it takes a number
# of its own, or an applier takes it for a replay of the PUT before it
my @flat_truncates = grep { $_->{key} eq 'FLAT_ROWS-TRUNCATE' } @flat;
is(join(',', map { $_->{value} // 'null' } @flat_truncates), 'null', 'then the truncate, once, valued null');
my ($last_put_seq) = sort { $b <=> $a } map { $_->{headers}{seq} } @flat_puts;
is($flat_truncates[0]{headers}{seq}, $last_put_seq + 1,
	'the truncate replayed from the spool is numbered after the last PUT, not with it');

# publish() snapshotted the table's 10 rows first
my @wiped = kafka_wait_records('regress_streamed_wiped', 11, 60);
is(join(',', grep { !/PUT/ } map { $_->{headers}{event} } @wiped), 'WIPED-TRUNCATE',
	'the truncate, once');
is($wiped[-1]{headers}{event}, 'WIPED-TRUNCATE', 'after the snapshot\'s rows');

my @app = kafka_wait_records('regress_streamed_app', 1, 60);
is(join(',', map { $_->{key} } @app), 'kept',
	'the send() that committed, not the one in the rolled-back savepoint');

# 2. an aborted transaction of the same size leaves nothing
$node->safe_psql('postgres', q{
	BEGIN;
	INSERT INTO big SELECT g, repeat('z', 200) FROM generate_series(200001, 210000) g;
	SELECT kafka_bridge.send('regress_streamed_app', 'aborted', 'never'::text);
	ROLLBACK;
});
# then a small one, to know when the publisher is past the abort
$node->safe_psql('postgres', "INSERT INTO big VALUES (300000, 'after')");
@records = kafka_wait_records('regress_streamed', $expected + 1, 60);
is(scalar(@records), $expected + 1, 'after the aborted transaction, only the next one\'s row');
is($json->decode($records[-1]{value})->{row}{id}, 300000, 'which is the row 300000');
is(scalar(kafka_records('regress_streamed_app')), 1, 'and no send() record of the aborted one');

# PostgreSQL streamed these transactions to the plugin, and spilled none
my ($streamed, $spilled) = split /\|/, $node->safe_psql('postgres',
	"SELECT stream_txns, spill_txns FROM pg_stat_replication_slots WHERE slot_name LIKE 'kafka_bridge_%'");
cmp_ok($streamed, '>=', 2, "PostgreSQL streamed the transactions ($streamed)");
is($spilled, 0, 'and spilled none to disk');

# their spools, larger than temp_file_limit, are counted as temporary files
# when they close, and logged over log_temp_files
ok($node->poll_query_until('postgres',
		"SELECT temp_files >= 2 AND temp_bytes > 2 * 1024 * 1024 FROM pg_stat_database WHERE datname = 'postgres'"),
	'pg_stat_database counts the spools in temp_files and temp_bytes');
like(slurp_file($node->logfile),
	qr{LOG:  temporary file: path "[^"]*/pgsql_tmp/pgsql_tmp\d+\.kb_spool\.\d+", size [1-9]\d{6,}},
	'and log_temp_files logs them');

# 3. while a streamed transaction is open, kafka_bridge.status shows how
#    many of its records the publisher keeps so far, and the broker checks
#    (every second here) leave that shown; after its rollback, the status
#    shows again what it showed before
my $open = $node->background_psql('postgres');
$open->query_safe(q{BEGIN});
$open->query_safe(q{INSERT INTO big SELECT g, repeat('o', 200) FROM generate_series(600001, 605000) g});
my $keeping = q{SELECT activity FROM kafka_bridge.status WHERE worker = 'publisher'};
# the spool files the publisher holds open (unlinked as soon as made)
sub spool_files
{
	my $pid = $node->safe_psql('postgres',
		"SELECT pid FROM kafka_bridge.status WHERE worker = 'publisher'");
	return grep { /kb_spool/ } map { readlink($_) // '' } glob("/proc/$pid/fd/*");
}
ok($node->poll_query_until('postgres',
		"SELECT ($keeping) ~ '^keeping the records of transaction [0-9]+ until its end: [1-9][0-9]* so far\$'"),
	'the status shows the open transaction\'s records kept so far');
sleep 3;
like($node->safe_psql('postgres', $keeping), qr/^keeping the records of transaction/,
	'and still does after three broker checks');
my @open_spools = spool_files();
is(scalar(@open_spools), 1, 'the publisher holds its spool open');
like($open_spools[0] // '', qr{/pgsql_tmp/pgsql_tmp\d+\.kb_spool\.\d+ \(deleted\)$},
	'a file of pgsql_tmp, unlinked once made');
$open->query_safe(q{ROLLBACK});
ok($node->poll_query_until('postgres', "SELECT ($keeping) !~ '^keeping'"),
	'the rollback ends it');
is(scalar(spool_files()), 0, 'and closes its spool');
like($node->safe_psql('postgres', $keeping), qr/^connected to Kafka brokers /,
	'and the status shows the brokers again');
$open->quit;

# 4. streaming off: PostgreSQL spills a large transaction, and the
#    publisher decodes it after the commit, rolled-back savepoint and all
$node->append_conf('postgresql.conf', "kafka_bridge.stream_large_transactions = off\n");
$node->restart;
ok($node->poll_query_until('postgres',
		"SELECT state = 'connected' FROM kafka_bridge.status WHERE worker = 'publisher'"),
	'the publisher runs again, streaming off');
my $streamed_before = $node->safe_psql('postgres',
	"SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name LIKE 'kafka_bridge_%'");
$node->safe_psql('postgres', q{
	BEGIN;
	INSERT INTO big SELECT g, repeat('s', 200) FROM generate_series(400001, 405000) g;
	SAVEPOINT s3;
	INSERT INTO big SELECT g, repeat('r', 200) FROM generate_series(500001, 501000) g;
	ROLLBACK TO s3;
	SELECT kafka_bridge.send('regress_streamed_app', 'spilled', 'committed'::text);
	COMMIT;
});
@records = kafka_wait_records('regress_streamed', $expected + 1 + 5000, 60);
my @spilled = @records[ $expected + 1 .. $#records ];
is(scalar(@spilled), 5000, 'the spilled transaction\'s 5,000 rows');
is(scalar(grep { $json->decode($_->{value})->{row}{id} > 500000 } @spilled), 0,
	'none of its rolled-back savepoint');
my %spilled_lsn = map { $_->{headers}{lsn} => 1 } @spilled;
is(scalar(keys %spilled_lsn), 1, 'all with its commit\'s LSN');
@app = kafka_wait_records('regress_streamed_app', 2, 60);
is(join(',', map { $_->{key} } @app), 'kept,spilled', 'and its send()');
my ($streamed_now, $spilled_now) = split /\|/, $node->safe_psql('postgres',
	"SELECT stream_txns, spill_txns FROM pg_stat_replication_slots WHERE slot_name LIKE 'kafka_bridge_%'");
cmp_ok($spilled_now, '>=', 1, "PostgreSQL spilled it ($spilled_now)");
is($streamed_now, $streamed_before, 'and streamed nothing more');

# 5. a streamed transaction cut short by a crash (its backend killed: the
#    server restarts): the publisher streams what the WAL holds of it
#    again, and drops it once the WAL shows it no longer runs
$node->append_conf('postgresql.conf', "kafka_bridge.stream_large_transactions = on\n");
$node->restart;
my $doomed = $node->background_psql('postgres');
$doomed->query_safe(q{BEGIN});
$doomed->query_safe(q{INSERT INTO big SELECT g, repeat('d', 200) FROM generate_series(700001, 705000) g});
ok($node->poll_query_until('postgres', "SELECT ($keeping) ~ '^keeping the records'"),
	'a transaction is streamed');
# its pid, from another session (a pid read back empty would make kill
# signal this script's own process group)
my $doomed_pid = $node->safe_psql('postgres',
	"SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction' AND backend_type = 'client backend'");
die "no pid for the open transaction: '$doomed_pid'" unless $doomed_pid =~ /^\d+$/;
kill 'KILL', $doomed_pid;
eval { $doomed->quit };
ok($node->poll_query_until('postgres',
		"SELECT state = 'connected' FROM kafka_bridge.status WHERE worker = 'publisher'"),
	'the publisher runs again after the crash');
# a checkpoint logs the transactions running (not that one), then a row
# that shows when decoding is past it
$node->safe_psql('postgres', q{CHECKPOINT});
$node->safe_psql('postgres', q{INSERT INTO big VALUES (800000, 'after the crash')});
@records = kafka_wait_records('regress_streamed', $expected + 1 + 5000 + 1, 120);
is($json->decode($records[-1]{value})->{row}{id}, 800000, 'the next transaction is published');
is(scalar(grep { defined $_->{value} && $json->decode($_->{value})->{row}{id} > 700000 && $json->decode($_->{value})->{row}{id} < 800000 } @records),
	0, 'nothing of the one cut short');
ok($node->poll_query_until('postgres', "SELECT ($keeping) !~ '^keeping'"),
	'and the publisher no longer keeps its records');

# 6. a temp_tablespaces entry that cannot be used (its directory is gone):
#    the spool goes to the database's own pgsql_tmp, as PostgreSQL's
#    temporary files do, and the transaction is published
my $broken = PostgreSQL::Test::Utils::tempdir();
$node->safe_psql('postgres', "CREATE TABLESPACE broken_tmp LOCATION '$broken'");
rmtree($_) for glob("$broken/PG_*");
# (set at start: a reload outside a transaction leaves the next one with
# no temp_tablespaces at all, PostgreSQL's assign hook clearing the list)
$node->safe_psql('postgres', "ALTER SYSTEM SET temp_tablespaces = 'broken_tmp'");
$node->restart;
$open = $node->background_psql('postgres');
$open->query_safe(q{BEGIN});
$open->query_safe(q{INSERT INTO big SELECT g, repeat('t', 200) FROM generate_series(900001, 905000) g});
ok($node->poll_query_until('postgres', "SELECT ($keeping) ~ '^keeping the records'"),
	'with temp_tablespaces unusable, a transaction is streamed');
# its spool gets a file once past its first megabyte in memory
for (my $t = 0; $t < 300 && !(@open_spools = spool_files()); $t++)
{
	usleep(100_000);
}
like($open_spools[0] // '', qr{/base/pgsql_tmp/pgsql_tmp\d+\.kb_spool\.\d+ \(deleted\)$},
	'into a spool in the database\'s own pgsql_tmp');
$open->query_safe(q{COMMIT});
$open->quit;
@records = kafka_wait_records('regress_streamed', $expected + 1 + 5000 + 1 + 5000, 120);
is(scalar(grep { defined $_->{value} && $json->decode($_->{value})->{row}{id} > 900000 } @records),
	5000, 'and its 5,000 rows are published');
$node->safe_psql('postgres', "ALTER SYSTEM RESET temp_tablespaces");
$node->reload;

# 7. a spool the publisher cannot write (its file size limit lowered to
#    1 MB, so that the writer thread's pwrite fails with EFBIG): the
#    publisher stops with the error, and started again (in a process
#    without that limit) it publishes the transaction whole, once
my $pub_pid = $node->safe_psql('postgres',
	"SELECT pid FROM kafka_bridge.status WHERE worker = 'publisher'");
die "no pid for the publisher: '$pub_pid'" unless $pub_pid =~ /^\d+$/;
system('prlimit', "--pid=$pub_pid", '--fsize=1048576:') == 0
  or die "prlimit failed: $?";
my $log_offset = -s $node->logfile;
$node->safe_psql('postgres',
	q{INSERT INTO big SELECT g, repeat('f', 200) FROM generate_series(1000001, 1020000) g});
ok(eval {
		$node->wait_for_log(
			qr/(?:ERROR|FATAL):  could not write to the spool of a streamed transaction, file "[^"]*kb_spool[^"]*": File too large/,
			$log_offset);
	},
	'a spool write that fails stops the publisher with the error');
# (other sessions' lines may come between the error and its hint)
like(slurp_file($node->logfile, $log_offset),
	qr/HINT:  The publisher starts again and decodes the transaction again: make room where the file is, or name another tablespace in temp_tablespaces\./,
	'and a hint');
ok($node->poll_query_until('postgres',
		"SELECT pid <> $pub_pid AND state = 'connected' FROM kafka_bridge.status WHERE worker = 'publisher'"),
	'the publisher runs again in a new process');
my $before_limit = $expected + 1 + 5000 + 1 + 5000;
@records = kafka_wait_records('regress_streamed', $before_limit + 20000, 120);
my @limited = grep { defined $_->{value} && $json->decode($_->{value})->{row}{id} > 1000000 } @records;
my %limited_ids = map { $json->decode($_->{value})->{row}{id} => 1 } @limited;
is(scalar(keys %limited_ids), 20000, 'then it publishes each of the transaction\'s 20,000 rows');
is(scalar(@limited), 20000, 'once');

# 8. a streamed transaction smaller than the spool's first buffer (1 MB)
#    is kept in memory, without a file, rolled-back savepoint and all
$open = $node->background_psql('postgres');
$open->query_safe(q{BEGIN});
$open->query_safe(q{INSERT INTO big SELECT g, repeat('m', 200) FROM generate_series(2000001, 2000600) g});
$open->query_safe(q{SAVEPOINT s});
$open->query_safe(q{INSERT INTO big SELECT g, repeat('r', 200) FROM generate_series(2100001, 2100400) g});
$open->query_safe(q{ROLLBACK TO SAVEPOINT s});
$open->query_safe(q{INSERT INTO big SELECT g, repeat('m', 200) FROM generate_series(2000601, 2000700) g});
ok($node->poll_query_until('postgres', "SELECT ($keeping) ~ '^keeping the records'"),
	'a small transaction is streamed');
is(scalar(spool_files()), 0, 'and kept in memory: no spool file');
$open->query_safe(q{COMMIT});
$open->quit;
@records = kafka_wait_records('regress_streamed', $before_limit + 20000 + 700, 120);
my @small = grep { defined $_->{value} && $json->decode($_->{value})->{row}{id} > 2000000 } @records;
is(join(',', scalar(@small), scalar(grep { $json->decode($_->{value})->{row}{id} > 2100000 } @small)),
	'700,0', 'its 700 rows are published, none of its rolled-back savepoint');

# the slot moves past everything, and the spool files are gone
my $end = $node->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
ok($node->poll_query_until('postgres',
		"SELECT confirmed_flush_lsn >= '$end' FROM pg_replication_slots WHERE slot_name LIKE 'kafka_bridge_%'"),
	'the slot is confirmed past the last row');
my $tmp = $node->data_dir . '/base/pgsql_tmp';
my @left = -d $tmp ? glob("$tmp/*") : ();
is(scalar(@left), 0, 'no spool file is left behind');
is(scalar(spool_files()), 0, 'and the publisher holds none open');

$node->stop;
done_testing();
