# The classic conflicts one by one, between two instances A and B syncing
# tables through the real broker: each case opens a transaction on both, so
# that neither saw the other's change, and commits A's first.
#
#   concurrent update of one row       the later commit (B's) wins everywhere
#   delete on A, then update on B      the update is later: the row lives
#   update on B, then delete on A      the delete is later: the row is gone
#   insert of the same key on both     the later insert (B's) wins
#
# Each case checks both tables and the conflicts each instance recorded.
# Then the other policies on the same concurrent update: keep_local keeps
# each side's row, apply_remote takes the other's (neither converges, as
# documented), error sets the remote change aside as a dead letter.  Last,
# an instance with track_commit_timestamp off refuses to apply a
# last_write_wins table, and says why; it still publishes a snapshot.  And a
# tombstone's key does not depend on the deleting session's settings.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my %node;
for my $name (qw(A B))
{
	my $node = kb_node($name);
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION kafka_bridge');
	ok(kb_wait_slot($node), "$name: the publisher created its slot");
	$node{$name} = $node;
}

for my $policy (qw(last_write_wins keep_local apply_remote error))
{
	for my $name (qw(A B))
	{
		$node{$name}->safe_psql('postgres', qq{
			CREATE TABLE cases_$policy (id int PRIMARY KEY, v text);
			SELECT kafka_bridge.sync('cases_$policy', topic => 'regress_cases_$policy',
			                         conflict_policy => '$policy');
		});
	}
}
for my $name (qw(A B))
{
	ok($node{$name}->poll_query_until('postgres',
			"SELECT state = 'connected' FROM kafka_bridge.status WHERE worker = 'applier'"),
		"$name: the applier is connected");
}

# Run sql_a on A and sql_b on B, each in a transaction open while the other
# runs, and commit A's first.
sub concurrently
{
	my ($sql_a, $sql_b) = @_;
	my $a = $node{A}->background_psql('postgres');
	my $b = $node{B}->background_psql('postgres');
	$a->query_safe('BEGIN');
	$a->query_safe($sql_a);
	$b->query_safe('BEGIN');
	$b->query_safe($sql_b);
	$a->query_safe('COMMIT');
	$b->query_safe('COMMIT');
	$a->quit;
	$b->quit;
}

sub row_of
{
	my ($name, $table, $id) = @_;
	my $v = $node{$name}->safe_psql('postgres', "SELECT coalesce((SELECT v FROM $table WHERE id = $id), '<none>')");
	return $v;
}

# wait until each instance has the expected value of a row
sub wait_rows
{
	my ($table, $id, %want) = @_;
	for my $name (sort keys %want)
	{
		my $want = $want{$name};
		$node{$name}->poll_query_until('postgres',
			"SELECT coalesce((SELECT v FROM $table WHERE id = $id), '<none>') = '$want'")
		  or diag("$name: $table row $id is " . row_of($name, $table, $id) . ", not $want");
	}
	return join(' ', map { "$_=" . row_of($_, $table, $id) } sort keys %want);
}

sub conflicts_of
{
	my ($name, $table, $id) = @_;
	return $node{$name}->safe_psql('postgres',
		"SELECT string_agg(kind || ' ' || resolution, ', ' ORDER BY id) FROM kafka_bridge.conflicts "
		  . "WHERE table_name = '$table'::regclass AND key = '[\"$id\"]'");
}

# a row both have, written by A
sub seed_row
{
	my ($table, $id) = @_;
	$node{A}->safe_psql('postgres', "INSERT INTO $table VALUES ($id, 'base')");
	wait_rows($table, $id, A => 'base', B => 'base');
}

# ---- last_write_wins ----

my $t = 'cases_last_write_wins';

seed_row($t, 1);
concurrently("UPDATE $t SET v = 'A' WHERE id = 1", "UPDATE $t SET v = 'B' WHERE id = 1");
is(wait_rows($t, 1, A => 'B', B => 'B'), 'A=B B=B', 'concurrent update: the later commit wins on both');
is(conflicts_of('A', $t, 1), 'update_origin_differs applied_remote', 'concurrent update: A applied the newer remote row');
is(conflicts_of('B', $t, 1), 'update_origin_differs kept_local', 'concurrent update: B kept its newer row');

seed_row($t, 2);
concurrently("DELETE FROM $t WHERE id = 2", "UPDATE $t SET v = 'B' WHERE id = 2");
is(wait_rows($t, 2, A => 'B', B => 'B'), 'A=B B=B', 'delete on A, later update on B: the row lives on both');
is(conflicts_of('A', $t, 2), 'update_deleted applied_remote', 'delete then update: A brought the row back');
is(conflicts_of('B', $t, 2), 'delete_origin_differs kept_local', 'delete then update: B ignored the older delete');

seed_row($t, 3);
{
	# B's update commits first this time: A's delete is the later change
	my $b = $node{B}->background_psql('postgres');
	my $a = $node{A}->background_psql('postgres');
	$b->query_safe('BEGIN');
	$b->query_safe("UPDATE $t SET v = 'B' WHERE id = 3");
	$a->query_safe('BEGIN');
	$a->query_safe("DELETE FROM $t WHERE id = 3");
	$b->query_safe('COMMIT');
	$a->query_safe('COMMIT');
	$a->quit;
	$b->quit;
}
is(wait_rows($t, 3, A => '<none>', B => '<none>'), 'A=<none> B=<none>',
	'update on B, later delete on A: the row is gone on both');
is(conflicts_of('A', $t, 3), 'update_deleted kept_local', 'update then delete: A kept the row deleted (its tombstone is newer)');
is(conflicts_of('B', $t, 3), 'delete_origin_differs applied_remote', 'update then delete: B applied the newer delete');
is($node{B}->safe_psql('postgres',
		"SELECT origin FROM kafka_bridge.tombstones WHERE relid = '$t'::regclass AND key = '[\"3\"]'"),
	'A', "B: the delete's tombstone names A");

concurrently("INSERT INTO $t VALUES (4, 'A')", "INSERT INTO $t VALUES (4, 'B')");
is(wait_rows($t, 4, A => 'B', B => 'B'), 'A=B B=B', 'insert of one key on both: the later insert wins on both');
is(conflicts_of('A', $t, 4), 'update_origin_differs applied_remote', 'same insert: A applied the newer row');
is(conflicts_of('B', $t, 4), 'update_origin_differs kept_local', 'same insert: B kept its newer row');

is($node{A}->safe_psql('postgres', "SELECT count(*) FROM kafka_bridge.dead_letters")
	  + $node{B}->safe_psql('postgres', "SELECT count(*) FROM kafka_bridge.dead_letters"),
	0, 'last_write_wins set nothing aside');

# ---- the other policies, on a concurrent update ----

$t = 'cases_keep_local';
seed_row($t, 1);
concurrently("UPDATE $t SET v = 'A' WHERE id = 1", "UPDATE $t SET v = 'B' WHERE id = 1");
$node{$_}->poll_query_until('postgres', "SELECT count(*) = 1 FROM kafka_bridge.conflicts WHERE table_name = '$t'::regclass")
  for qw(A B);
is(row_of('A', $t, 1) . ' ' . row_of('B', $t, 1), 'A B', 'keep_local: each instance keeps its own row');
is(conflicts_of('A', $t, 1) . ' / ' . conflicts_of('B', $t, 1),
	'update_origin_differs kept_local / update_origin_differs kept_local', 'keep_local: both recorded the conflict');

$t = 'cases_apply_remote';
seed_row($t, 1);
concurrently("UPDATE $t SET v = 'A' WHERE id = 1", "UPDATE $t SET v = 'B' WHERE id = 1");
is(wait_rows($t, 1, A => 'B', B => 'A'), 'A=B B=A', 'apply_remote: each instance takes the other\'s row, unchecked');
is($node{A}->safe_psql('postgres', "SELECT count(*) FROM kafka_bridge.conflicts WHERE table_name = '$t'::regclass"),
	0, 'apply_remote: no conflict is looked for');
is($node{A}->safe_psql('postgres', "SELECT count(*) FROM pg_trigger WHERE tgrelid = '$t'::regclass"),
	0, 'apply_remote: no tombstone trigger on the table');

$t = 'cases_error';
seed_row($t, 1);
concurrently("UPDATE $t SET v = 'A' WHERE id = 1", "UPDATE $t SET v = 'B' WHERE id = 1");
for my $name (qw(A B))
{
	ok($node{$name}->poll_query_until('postgres',
			"SELECT count(*) = 1 FROM kafka_bridge.dead_letters WHERE topic = 'regress_cases_error'"),
		"error: $name set the conflicting remote change aside");
	like($node{$name}->safe_psql('postgres',
			"SELECT reason FROM kafka_bridge.dead_letters WHERE topic = 'regress_cases_error'"),
		qr/^conflict: the row with key \["1"\] was written by instance "$name" at .* \(conflict_policy is error\)$/,
		"error: the dead letter of $name says which version it met");
	is(conflicts_of($name, $t, 1), 'update_origin_differs dead_letter', "error: $name recorded the conflict");
}
is(row_of('A', $t, 1) . ' ' . row_of('B', $t, 1), 'A B', 'error: each row stays as its instance wrote it');

# applying the dead letter by hand meets the same conflict while A's row stands
my $replay = $node{A}->safe_psql('postgres', qq{
	SELECT kafka_bridge.apply_event(table_name, convert_from(key, 'UTF8'), convert_from(value, 'UTF8'),
	                                headers->>'origin', (headers->>'commit_time')::timestamptz)
	  FROM kafka_bridge.dead_letters WHERE topic = 'regress_cases_error'});
like($replay, qr/^rejected: conflict/, 'apply_event() of the dead letter meets the same conflict while A\'s row stands');

# ---- pruning: tombstones and conflicts older than their retention go ----

my $recent = $node{A}->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.conflicts');
$node{A}->safe_psql('postgres', q{
	INSERT INTO kafka_bridge.tombstones (relid, key, commit_time, origin, recorded_at)
	VALUES ('cases_keep_local', '["999"]', now() - interval '8 days', 'Z', now() - interval '8 days');
	INSERT INTO kafka_bridge.conflicts (table_name, key, kind, policy, resolution, detected_at)
	VALUES ('cases_keep_local', '["999"]', 'update_origin_differs', 'keep_local', 'kept_local',
	        now() - interval '31 days');
});
# the applier prunes when it starts, then once a minute
$node{A}->restart;
ok($node{A}->poll_query_until('postgres', q{
	SELECT NOT EXISTS (SELECT FROM kafka_bridge.tombstones WHERE key = '["999"]')
	   AND NOT EXISTS (SELECT FROM kafka_bridge.conflicts WHERE key = '["999"]')}),
	'A: the applier pruned a tombstone older than 7 days and a conflict older than 30 days');
is($node{A}->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.conflicts'), $recent,
	'A: the recent conflicts stay');

# ---- track_commit_timestamp off: the applier refuses, and says why ----

my $c = kb_node('C', conf => "track_commit_timestamp = off\n");
$c->start;
$c->safe_psql('postgres', 'CREATE EXTENSION kafka_bridge; CREATE TABLE cases_off (id int PRIMARY KEY, v text)');
my ($ret, $stdout, $stderr) = $c->psql('postgres', "SELECT kafka_bridge.subscribe('cases_off', topic => 'regress_cases_last_write_wins', event_prefix => 'CASES_LAST_WRITE_WINS')");
like($stderr, qr/WARNING:  topic "regress_cases_last_write_wins" is not applied to table "cases_off" while track_commit_timestamp is off/,
	'subscribe() warns that last_write_wins needs track_commit_timestamp');
ok($c->poll_query_until('postgres',
		"SELECT last_error LIKE '%conflict_policy last_write_wins needs track_commit_timestamp, which is off%' "
		  . "FROM kafka_bridge.status WHERE worker = 'applier'"),
	'C: the applier refuses the table, and its status says what to do');
is($c->safe_psql('postgres', 'SELECT count(*) FROM cases_off'), 0, 'C: nothing applied');
$c->safe_psql('postgres', "SELECT kafka_bridge.subscribe('cases_off', topic => 'regress_cases_last_write_wins', event_prefix => 'CASES_LAST_WRITE_WINS', conflict_policy => 'apply_remote')");
ok($c->poll_query_until('postgres', "SELECT count(*) > 0 FROM cases_off"),
	'C: with apply_remote it applies the topic');

# a snapshot needs no commit timestamps: its records then carry the Unix
# epoch, older than any change
$c->safe_psql('postgres', q{
	CREATE TABLE snap_off (id int PRIMARY KEY, v text);
	INSERT INTO snap_off SELECT g, 'v' || g FROM generate_series(1, 100) g;
	SELECT kafka_bridge.publish('snap_off', topic => 'regress_cases_snap_off')});
ok($c->poll_query_until('postgres', "SELECT state = 'done' AND rows_done = 100 FROM kafka_bridge.snapshots"),
	'C: with track_commit_timestamp off, a snapshot publishes the rows');
my @snap = kafka_scan('regress_cases_snap_off');
is(scalar(grep { ($_->{headers}{commit_time} // '') eq '1970-01-01T00:00:00+00:00' } @snap), 100,
	'C: each snapshot record carries the Unix epoch as its commit time');
$c->stop;

# a tombstone's key is the same whatever the settings of the session that
# deleted the row (the applier compares it with keys it makes itself)
$node{B}->safe_psql('postgres', q{
	CREATE TABLE keyed_by_time (at timestamptz PRIMARY KEY, v text);
	SELECT kafka_bridge.sync('keyed_by_time', topic => 'regress_cases_keyed_by_time');
	INSERT INTO keyed_by_time VALUES ('2026-03-01 12:00:00+00', 'x');
});
$node{B}->safe_psql('postgres', q{
	SET TimeZone = 'Asia/Tokyo';
	SET DateStyle = 'SQL, DMY';
	DELETE FROM keyed_by_time;
});
is($node{B}->safe_psql('postgres',
		"SELECT key FROM kafka_bridge.tombstones WHERE relid = 'keyed_by_time'::regclass"),
	'["2026-03-01 12:00:00+00"]',
	'B: a timestamptz key deleted in a session in Tokyo with DateStyle SQL is kept in ISO form in UTC');

$node{$_}->stop for qw(A B);
done_testing();
