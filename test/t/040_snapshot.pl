# Publishing a table that already holds rows, with a writer running
# throughout: A holds 200k rows and keeps inserting, updating and deleting
# while publish() snapshots them; B, empty, syncs the table.  B ends with
# A's rows, and the topic holds no row version twice (the hand-over
# between the snapshot and the stream neither misses nor repeats one).
# The topic kafka_bridge created has the configured partitions and
# cleanup.policy=compact.  Then A and B make 10k changes through the topic,
# and a third instance C rebuilds the table from the topic alone; before
# that, C subscribes another table with start_position 'end', is restarted
# before any record comes, and gets only the changes made after subscribe().
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use KafkaBridgeTest;

my $topic = 'regress_snap_item';
my $rows = 200_000;
my $conf = "track_commit_timestamp = on\nkafka_bridge.topic_partitions = 3\n";

my %node;
for my $name (qw(A B C))
{
	my $node = kb_node($name, conf => $conf);
	$node->start;
	$node->safe_psql('postgres', q{
		CREATE EXTENSION kafka_bridge;
		CREATE TABLE item (id int PRIMARY KEY, v bigint NOT NULL, payload text);
	});
	ok(kb_wait_slot($node), "$name: slot created");
	$node{$name} = $node;
}
my ($a, $b, $c) = @node{qw(A B C)};

# A's rows, and a writer: every write gives the row a new v from a
# sequence, so no two versions of a row are alike; it keeps going until
# the snapshot is done and then for 300 more transactions, and records the
# longest statement (a statement that waits for the snapshot's lock).
$a->safe_psql('postgres', qq{
	CREATE SEQUENCE item_v;
	CREATE SEQUENCE item_new_id START 1000001;
	INSERT INTO item SELECT g, nextval('item_v'), md5(g::text) FROM generate_series(1, $rows) g;
	ANALYZE item;
	CREATE TABLE writer_stats (transactions int, longest_ms float8);
	CREATE PROCEDURE regress_writer(after_done int) LANGUAGE plpgsql AS \$\$
	DECLARE
	  t0 timestamptz; longest float8 := 0; n int := 0; after int := 0; dice float8; k int;
	BEGIN
	  LOOP
	    n := n + 1;
	    dice := random();
	    k := 1 + floor(random() * $rows)::int;
	    t0 := clock_timestamp();
	    IF dice < 0.5 THEN
	      UPDATE item SET v = nextval('item_v') WHERE id = k;
	    ELSIF dice < 0.65 THEN
	      INSERT INTO item VALUES (nextval('item_new_id'), nextval('item_v'), 'new');
	    ELSIF dice < 0.8 THEN
	      INSERT INTO item VALUES (k, nextval('item_v'), 'again') ON CONFLICT (id) DO NOTHING;
	    ELSIF dice < 0.9 THEN
	      UPDATE item SET id = id + 2000000, v = nextval('item_v') WHERE id = k;
	    ELSE
	      DELETE FROM item WHERE id = k;
	    END IF;
	    longest := greatest(longest, extract(epoch FROM clock_timestamp() - t0) * 1000);
	    COMMIT;
	    IF (SELECT state FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass) = 'done' THEN
	      after := after + 1;
	    END IF;
	    EXIT WHEN after >= after_done;
	    PERFORM pg_sleep(0.001);
	  END LOOP;
	  INSERT INTO writer_stats VALUES (n, longest);
	  COMMIT;
	END \$\$;
});

# the writer starts before publish() (the table is not published yet)
my $writer = $a->background_psql('postgres', on_error_stop => 1);
$writer->query_until(qr/start/, "\\echo start\nCALL regress_writer(300);\n");
usleep(300_000);

$a->safe_psql('postgres', "SELECT kafka_bridge.publish('item', topic => '$topic')");
like($a->safe_psql('postgres', "SELECT state FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass"),
	qr/^(pending|running|finishing)$/, 'A: publish() of a table with rows starts a snapshot');
$b->safe_psql('postgres', "SELECT kafka_bridge.sync('item', topic => '$topic')");

# progress shows in kafka_bridge.status while it runs, then it is done
ok($a->poll_query_until('postgres',
		"SELECT (SELECT activity ~ '^snapshot of table \"item\": [0-9]+ of about [0-9]+ rows' FROM kafka_bridge.status WHERE worker = 'publisher')"
		  . " OR (SELECT state = 'done' FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass)"),
	'A: kafka_bridge.status shows the snapshot progress');
ok($a->poll_query_until('postgres',
		"SELECT state = 'done' AND done_at IS NOT NULL FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass"),
	'A: the snapshot is done');
my ($done_rows) = $a->safe_psql('postgres',
	"SELECT rows_done FROM kafka_bridge.snapshots WHERE table_name = 'item'::regclass");
cmp_ok($done_rows, '>=', $rows * 0.9, "A: the snapshot published $done_rows rows");
like($a->safe_psql('postgres', "SELECT activity FROM kafka_bridge.status WHERE worker = 'publisher'"),
	qr/snapshot of table "item" done: \d+ rows|connected|decoding|Kafka/, 'A: the status says the snapshot is done (or is back to publishing)');

ok($a->poll_query_until('postgres', 'SELECT count(*) = 1 FROM writer_stats'), 'A: the writer finished');
$writer->quit;
my ($transactions, $longest) = split /\|/, $a->safe_psql('postgres', 'SELECT transactions, longest_ms FROM writer_stats');
note "writer: $transactions transactions, longest statement $longest ms";
cmp_ok($longest, '<', 1000, "no write waited a second for the snapshot (longest $longest ms)");

kb_converge($a, $b, 'item', 'B holds the same rows as A (md5 of the rows in key order)');

# every record A published is acknowledged
my $lsn = $a->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
ok($a->poll_query_until('postgres', qq{
		SELECT confirmed_flush_lsn >= '$lsn' FROM pg_replication_slots WHERE slot_name LIKE 'kafka_bridge_%'}),
	'A: the publisher is past everything written');

# ---- no row version twice in the topic ----

my @records = kafka_scan($topic);
my (%versions, $snapshot_puts, $stream_puts, $deletes, $tombstones, @dups, %positions, @position_dups);
for my $r (@records)
{
	if (!defined $r->{value}) { $tombstones++; next; }
	if ($r->{headers}{event} eq 'ITEM-DELETE') { $deletes++; next; }
	if ($r->{value} =~ /"snapshot":true/) { $snapshot_puts++ } else { $stream_puts++ }
	my ($id, $v) = $r->{value} =~ /"row":\{"id":(\d+),"v":(\d+)/
	  or die "unexpected record value $r->{value}";
	my $version = "$id/$v";
	push @dups, "$version at offsets $versions{$version} and $r->{partition}:$r->{offset}"
	  if exists $versions{$version};
	$versions{$version} = "$r->{partition}:$r->{offset}";
	my $pos = "$r->{headers}{origin} $r->{headers}{lsn} $r->{headers}{seq}";
	push @position_dups, $pos if $positions{$pos}++;
}
note sprintf("topic %s: %d records: %d PUTs from the snapshot, %d from the stream, %d DELETEs, %d tombstones",
	$topic, scalar(@records), $snapshot_puts // 0, $stream_puts // 0, $deletes // 0, $tombstones // 0);
cmp_ok($snapshot_puts // 0, '>=', $rows * 0.9, 'the snapshot published the rows as PUT events');
cmp_ok($stream_puts // 0, '>', 0, 'the stream published the writes during and after the snapshot');
is(scalar(@dups), 0, 'no row version was published twice') or diag(join("\n", @dups[0 .. ($#dups < 9 ? $#dups : 9)]));
is(scalar(@position_dups), 0, 'no two PUTs share an (origin, lsn, seq) position')
  or diag(join("\n", @position_dups[0 .. ($#position_dups < 9 ? $#position_dups : 9)]));

# ---- the topic as kafka_bridge created it ----

my $bootstrap = kafka_bootstrap();
my $meta = `kcat -L -b '$bootstrap' -t '$topic' 2>&1`;
like($meta, qr/topic "$topic" with 3 partitions/, 'the topic has kafka_bridge.topic_partitions (3) partitions');
my ($libs) = glob("$ENV{KAFKA_BRIDGE_CACHE}/kafka-*/libs");
my $configs = `java -cp '$libs/*' kafka.admin.ConfigCommand --bootstrap-server '$bootstrap' --entity-type topics --entity-name '$topic' --describe 2>&1`;
like($configs, qr/cleanup\.policy=compact\b/, 'the topic was created with cleanup.policy=compact')
  or diag($configs);
ok($a->log_contains(qr/kafka_bridge created topic "$topic" \(partitions 3/), "A's log says it created the topic");

# ---- 10k changes through the topic, then C rebuilds from it alone ----

$a->safe_psql('postgres', "SELECT kafka_bridge.sync('item', topic => '$topic')");
ok($a->poll_query_until('postgres', "SELECT state = 'connected' FROM kafka_bridge.status WHERE worker = 'applier'"),
	'A: the applier is connected');
my %work = (A => [ 3_000_001, 3_005_000 ], B => [ 4_000_001, 4_005_000 ]);
for my $name (qw(A B))
{
	my ($lo, $hi) = @{ $work{$name} };
	$node{$name}->safe_psql('postgres', qq{
		DO \$\$
		BEGIN
		  FOR k IN $lo .. $hi LOOP
		    IF k % 4 = 0 THEN
		      UPDATE item SET payload = 'changed by $name' WHERE id = k - $lo + 1 + @{[ $name eq 'A' ? 0 : 100000 ]};
		    ELSIF k % 4 = 1 THEN
		      DELETE FROM item WHERE id = k - $lo + 50001 + @{[ $name eq 'A' ? 0 : 100000 ]};
		    ELSE
		      INSERT INTO item VALUES (k, k, 'inserted by $name');
		    END IF;
		  END LOOP;
		END \$\$;
	});
}
kb_converge($a, $b, 'item', 'A and B converge after 10k changes');

# C: a table subscribed from the end gets only what comes after subscribe(),
# even when C restarts before the first record
$c->safe_psql('postgres', q{CREATE TABLE item_late (id int PRIMARY KEY, v bigint NOT NULL, payload text)});
$c->safe_psql('postgres', "SELECT kafka_bridge.subscribe('item_late', topic => '$topic', event_prefix => 'ITEM', start_position => 'end')");
is($c->safe_psql('postgres', "SELECT start_position FROM kafka_bridge.subscribed_tables WHERE table_name = 'item_late'::regclass"),
	'end', "C: the subscription says start_position 'end'");
my $ends = $c->safe_psql('postgres', "SELECT count(*) || ' ' || sum(next_offset) FROM kafka_bridge.apply_progress WHERE topic = '$topic'");
my @records_now = kafka_scan($topic);
is($ends, '3 ' . scalar(@records_now), "C: subscribe() stored the end of the 3 partitions at once ($ends)");
$c->stop;
$a->safe_psql('postgres', q{UPDATE item SET payload = 'late' WHERE id IN (SELECT id FROM item ORDER BY id LIMIT 5)});
$c->start;
ok($c->poll_query_until('postgres', q{SELECT count(*) = 5 FROM item_late WHERE payload = 'late'}),
	'C: the changes made after subscribe() arrive, across a restart');
my $lsn2 = $a->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
$a->poll_query_until('postgres', qq{
	SELECT confirmed_flush_lsn >= '$lsn2' FROM pg_replication_slots WHERE slot_name LIKE 'kafka_bridge_%'});
ok($c->poll_query_until('postgres', "SELECT sum(lag) = 0 FROM kafka_bridge.subscription_status WHERE topic = '$topic'"),
	'C: caught up with the topic');
is($c->safe_psql('postgres', 'SELECT count(*) FROM item_late'), '5', 'C: nothing from before subscribe() was applied');

# then C rebuilds the table from the beginning of the topic
$c->safe_psql('postgres', "SELECT kafka_bridge.unsubscribe('item_late')");
$c->safe_psql('postgres', "SELECT kafka_bridge.subscribe('item', topic => '$topic')");
kb_converge($a, $c, 'item', 'C, subscribed from the beginning, holds the same rows as A');

# a table with an inheritance child: its snapshot has its own rows only
# (the child's changes are not published with it either)
$a->safe_psql('postgres', q{
	CREATE TABLE parent_rows (id int PRIMARY KEY, v text);
	CREATE TABLE child_rows (extra int) INHERITS (parent_rows);
	INSERT INTO parent_rows SELECT g, 'parent' FROM generate_series(1, 5) g;
	INSERT INTO child_rows SELECT g, 'child', 0 FROM generate_series(6, 8) g;
	SELECT kafka_bridge.publish('parent_rows', topic => 'regress_snapshot_parent');
});
ok($a->poll_query_until('postgres',
		"SELECT state = 'done' FROM kafka_bridge.snapshots WHERE table_name = 'parent_rows'::regclass"),
	'A: the snapshot of a table with an inheritance child is done');
is($a->safe_psql('postgres',
		"SELECT rows_done FROM kafka_bridge.snapshots WHERE table_name = 'parent_rows'::regclass"),
	'5', 'A: with the table\'s own 5 rows');
is(join(',', sort map { $_->{key} } kafka_scan('regress_snapshot_parent')),
	'{"id":1},{"id":2},{"id":3},{"id":4},{"id":5}', 'A: the topic holds them, none of the child\'s');

$_->stop for ($a, $b, $c);
done_testing();
