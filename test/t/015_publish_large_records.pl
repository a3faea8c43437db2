# Records of every size reach Kafka whole and in commit order: rows from a
# few bytes to several megabytes, in one transaction and in many, go
# through the publisher's producing thread (src/producer_thread.c), whose
# 4 MB ring wraps around many times here and which copies a record larger
# than a quarter of it to a block of its own.
use strict;
use warnings;

use Digest::MD5 qw(md5_hex);
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $topic = 'regress_large';
kafka_create_topic($topic, 1, 'max.message.bytes=16000000');

my $node = kb_node('large',
	conf => "kafka_bridge.producer_options = 'message.max.bytes=16000000'\n");
$node->start;
$node->safe_psql('postgres', qq{
	CREATE EXTENSION kafka_bridge;
	CREATE TABLE blobs (id int PRIMARY KEY, v text);
	-- n characters that compress badly (hex digits of md5s)
	CREATE FUNCTION hex_text(n int) RETURNS text LANGUAGE sql AS
	  \$\$ SELECT left(string_agg(md5(g::text || ':' || n), ''), n)
	       FROM generate_series(0, n / 32) g \$\$;
	SELECT kafka_bridge.publish('blobs', topic => '$topic');
});
ok(kb_wait_slot($node), 'slot created');

# one transaction mixing sizes around the ring's quarter (1 MB) and above
# the ring itself (4 MB)
my @sizes = (10, 300_000, 1_048_000, 1_049_000, 1_500_000, 20, 3_000_000, 5_000_000, 50);
my $id = 0;
$node->safe_psql('postgres', 'BEGIN; '
	  . join('', map { $id++; "INSERT INTO blobs VALUES ($id, hex_text($_)); " } @sizes)
	  . 'COMMIT;');
# then 20,000 transactions of one small row (10 MB in all: the ring wraps),
# with a large row now and then
$node->safe_psql('postgres', qq{
	DO \$\$ BEGIN
	  FOR i IN 1 .. 20000 LOOP
	    INSERT INTO blobs VALUES ($id + i, hex_text(CASE WHEN i % 5000 = 0 THEN 2000000 ELSE 500 END));
	    COMMIT;
	  END LOOP;
	END \$\$;
});
$id += 20000;

my @records = kafka_wait_records($topic, $id, 180);
is(scalar(@records), $id, "the topic holds one record per row ($id)");

# every row whole: the same length and md5 as in the table, in commit order
my %expected = map { my ($i, $len, $md5) = split /\|/; $i => "$len:$md5" }
  split /\n/, $node->safe_psql('postgres', 'SELECT id, length(v), md5(v) FROM blobs');
my $json = JSON::PP->new;
my ($whole, $in_order, $previous) = (0, 1, 0);
for my $r (@records)
{
	my $row = $json->decode($r->{value})->{row};
	$whole++ if length($row->{v}) . ':' . md5_hex($row->{v}) eq $expected{ $row->{id} };
	$in_order = 0 if $row->{id} != $previous + 1;
	$previous = $row->{id};
}
is($whole, $id, 'every record carries its row whole');
ok($in_order, 'records are in commit order, each row once');

# and the slot moves past them all once they are acknowledged
my $end = $node->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
ok($node->poll_query_until('postgres',
		"SELECT confirmed_flush_lsn >= '$end' FROM pg_replication_slots WHERE slot_name LIKE 'kafka_bridge_%'"),
	'the slot is confirmed past the last row');
my $st = kb_status($node);
is("$st->{state} $st->{last_error}", 'connected ', 'the publisher is connected, with no error');

# more topics than the publisher keeps handles for (32): a handle given up
# is destroyed only once no record in the ring names it, and a topic is
# created once, not each time it gets a handle again.  Rows of 40 tables,
# each with its own topic, interleaved in one transaction, then in many.
my $ntables = 40;
$node->safe_psql('postgres', join('', map {
	"CREATE TABLE many_$_ (id int PRIMARY KEY, v text);"
	  . "SELECT kafka_bridge.publish('many_$_', topic => 'regress_many_$_');"
} 1 .. $ntables));
$node->safe_psql('postgres', qq{
	DO \$\$ BEGIN
	  FOR i IN 1 .. 10 LOOP
	    FOR t IN 1 .. $ntables LOOP
	      EXECUTE format('INSERT INTO many_%s VALUES (%s, hex_text(2000))', t, i);
	    END LOOP;
	  END LOOP;
	  COMMIT;
	  FOR i IN 11 .. 30 LOOP
	    FOR t IN 1 .. $ntables LOOP
	      EXECUTE format('INSERT INTO many_%s VALUES (%s, hex_text(2000))', t, i);
	      COMMIT;
	    END LOOP;
	  END LOOP;
	END \$\$;
});
my $complete = 0;
for my $t (1 .. $ntables)
{
	my @r = kafka_wait_records("regress_many_$t", 30, 60);
	my @ids = map { $json->decode($_->{value})->{row}{id} } @r;
	$complete++ if join(',', @ids) eq join(',', 1 .. 30);
}
is($complete, $ntables, "each of $ntables topics holds its 30 rows, in order");
$st = kb_status($node);
is("$st->{state} $st->{last_error}", 'connected ', 'the publisher is still connected, with no error');

$node->stop;
done_testing();
