# A record the broker refuses for good (larger than the topic's
# max.message.bytes) is not dropped: the publisher's status names the topic
# and the broker's reason, the slot stays before the refused transaction,
# and once the topic takes larger records the row is published, after the
# rows committed before it and before those committed after it.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use KafkaBridgeTest;

my $topic = 'regress_rejected';
kafka_create_topic($topic, 1, 'max.message.bytes=1024');

my $node = kb_node('rejected');
$node->start;
$node->safe_psql('postgres', qq{
	CREATE EXTENSION kafka_bridge;
	CREATE TABLE big (id int PRIMARY KEY, v text);
	SELECT kafka_bridge.publish('big', topic => '$topic');
});
ok(kb_wait_slot($node), 'slot created');
$node->safe_psql('postgres', "INSERT INTO big VALUES (1, 'small')");
my @r = kafka_wait_records($topic, 1);
is(scalar(@r), 1, 'a small row is published');

# 6,400 bytes of hex digits, which lz4 hardly shrinks: the broker refuses
# the batch
my $log_offset = -s $node->logfile;
$node->safe_psql('postgres', "INSERT INTO big SELECT 2, string_agg(md5(g::text), '') FROM generate_series(1, 200) g");
my $after_big = $node->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
$node->safe_psql('postgres', "INSERT INTO big VALUES (3, 'after')");
ok( $node->poll_query_until('postgres', qq{
		SELECT last_error LIKE '%delivery to topic "$topic" partition 0 failed:%'
		  FROM kafka_bridge.status WHERE worker = 'publisher'}),
	'the status names the topic the broker refused the record for');
note 'last_error: ' . kb_status($node)->{last_error};
is($node->safe_psql('postgres', "SELECT confirmed_flush_lsn < '$after_big' FROM pg_replication_slots WHERE slot_name LIKE 'kafka_bridge_%'"),
	't', 'the slot is not confirmed past the refused row');

# refused again and again: each time the publisher waits twice as long
# before it publishes again (1 s, 2 s, 4 s), though the steps that produce
# the row again succeed in between
ok(eval { $node->wait_for_log(qr/restarts publishing in 4000 ms/, $log_offset); 1 },
	'each refusal in a row doubles the wait before publishing again');

# the topic takes larger records: the publisher, retrying, gets through
kafka_alter_topic($topic, 'max.message.bytes=1000000');
# the ids in the order they first appear (a record may come twice: at
# least once)
my @ids;
for (my $waited = 0; $waited < 1200 && @ids < 3; $waited++)
{
	usleep(100_000) if $waited;
	my %seen;
	@ids = grep { !$seen{$_}++ } map { /"row":\{"id":(\d+)/ ? $1 : () }
	  map { $_->{value} // '' } kafka_records($topic);
}
is("@ids", '1 2 3', 'then the refused row is published, in commit order');
ok($node->poll_query_until('postgres', qq{
		SELECT confirmed_flush_lsn >= '$after_big' FROM pg_replication_slots WHERE slot_name LIKE 'kafka_bridge_%'}),
	'and the slot moves past it');

$node->stop;
done_testing();
