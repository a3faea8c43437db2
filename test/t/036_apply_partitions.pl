# Syncing through a topic of several partitions: A and B sync a table
# through a 4-partition topic while both write (inserts, updates, key
# changes that move a row to another partition, deletes) on their own
# keys, and B is restarted in the middle.  Both end with the same rows; the
# applier tracks each partition (four rows in subscription_status, no lag);
# each row's changes arrived in order; nothing echoed.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $topic = 'regress_parts_client';
kafka_create_topic($topic, 4);

my %node;
for my $name (qw(A B))
{
	my $node = kb_node($name, conf => "track_commit_timestamp = on\n");
	$node->start;
	$node->safe_psql('postgres', q{
		CREATE EXTENSION kafka_bridge;
		CREATE TABLE client (id int PRIMARY KEY, name text NOT NULL, version int NOT NULL DEFAULT 0);
		-- transactions of 10 statements on the keys from lo to hi: inserts,
		-- updates bumping version, key changes to hi + the old key, deletes
		CREATE PROCEDURE regress_work(lo int, hi int) LANGUAGE plpgsql AS $$
		BEGIN
		  FOR k IN lo .. hi LOOP
		    INSERT INTO client VALUES (k, 'client ' || k);
		    IF k % 10 = 0 THEN COMMIT; END IF;
		  END LOOP;
		  COMMIT;
		  FOR r IN 1 .. 3 LOOP
		    FOR k IN lo .. hi LOOP
		      IF k % 3 = r % 3 THEN
		        UPDATE client SET version = version + 1, name = name || '+' WHERE id = k;
		      END IF;
		      IF k % 10 = 0 THEN COMMIT; END IF;
		    END LOOP;
		  END LOOP;
		  UPDATE client SET id = id + (hi - lo + 1) WHERE id BETWEEN lo AND hi AND id % 7 = 0;
		  COMMIT;
		  DELETE FROM client WHERE id BETWEEN lo AND hi AND id % 11 = 0;
		  COMMIT;
		END $$;
	});
	ok(kb_wait_slot($node), "$name: slot created");
	$node->safe_psql('postgres', "SELECT kafka_bridge.sync('client', topic => '$topic')");
	$node{$name} = $node;
}

# both write at once; B is restarted while it applies A's changes
my %writer;
my %range = (A => [ 1, 3000 ], B => [ 100001, 103000 ]);
for my $name (qw(A B))
{
	$writer{$name} = $node{$name}->background_psql('postgres', on_error_stop => 1);
	$writer{$name}->query_until(qr/start/, "\\echo start\nCALL regress_work($range{$name}[0], $range{$name}[1]);\n");
}
$writer{B}->quit;
ok($node{B}->poll_query_until('postgres', "SELECT count(*) > 1000 FROM client WHERE id < 100000"),
	"B: applying A's changes is under way");
$node{B}->restart;
$writer{A}->quit;
$node{B}->safe_psql('postgres', "CALL regress_work(200001, 201000)");

my $expected = $node{A}->safe_psql('postgres', 'SELECT count(*) FROM client WHERE id < 100000')
  + $node{B}->safe_psql('postgres', 'SELECT count(*) FROM client WHERE id > 100000');
my ($md5_a, $md5_b) = ('', '');
ok($node{A}->poll_query_until('postgres', "SELECT count(*) = $expected FROM client")
	  && $node{B}->poll_query_until('postgres', "SELECT count(*) = $expected FROM client"),
	"A and B both have the $expected rows");
is(kb_md5($node{B}, 'client'), kb_md5($node{A}, 'client'), 'A and B hold the same rows (md5)');
is($node{A}->safe_psql('postgres', q{
		SELECT count(*) FROM client WHERE version <> 1 OR name !~ '^client [0-9]+\\+$'}),
	'0', 'every row went through its one update, then kept it: its changes arrived in order');

for my $name (qw(A B))
{
	my $lsn = $node{$name}->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
	$node{$name}->poll_query_until('postgres', qq{
		SELECT confirmed_flush_lsn >= '$lsn' FROM pg_replication_slots
		WHERE slot_name = 'kafka_bridge_' || (SELECT oid FROM pg_database WHERE datname = current_database())});
}
my @records = kafka_records($topic);
my %partitions = map { $_->{partition} => 1 } @records;
is(scalar(keys %partitions), 4, 'the records went to the 4 partitions');
my @wrong = grep {
	my ($id) = ($_->{key} // '') =~ /(\d+)/;
	!defined $id || ($_->{headers}{origin} // '') ne ($id < 100000 ? 'A' : 'B')
} @records;
is(scalar(@wrong), 0, 'no record was echoed: each comes from the owner of its key');
for my $name (qw(A B))
{
	ok($node{$name}->poll_query_until('postgres', qq{
			SELECT count(*) = 4 AND sum(next_offset) = @{[ scalar(@records) ]} AND sum(lag) = 0
			FROM kafka_bridge.subscription_status WHERE topic = '$topic'}),
		"$name: subscription_status has the 4 partitions, all consumed");
	is($node{$name}->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.dead_letters'), '0',
		"$name: no dead letters");
}

$node{$_}->stop for qw(A B);
done_testing();
