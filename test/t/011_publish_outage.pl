# A broker outage delays publishing, it never drops: the broker is stopped
# for 30 s in the middle of a stream of writes; PostgreSQL keeps taking
# writes, the status shows the error and the lag, and once the broker is
# back every row reaches the topic.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use KafkaBridgeTest;

my $node = kb_node('outage');
$node->start;
$node->safe_psql('postgres', q{
	CREATE EXTENSION kafka_bridge;
	CREATE TABLE item (id int PRIMARY KEY, note text);
});
ok(kb_wait_slot($node), 'slot created');
$node->safe_psql('postgres', "SELECT kafka_bridge.publish('item', topic => 'regress_outage_item')");
ok(kb_wait_state($node, 'connected'), 'connected');

my $next = 1;
# one transaction of 10 rows
sub write_batch
{
	my $first = $next;
	$next += 10;
	$node->safe_psql('postgres',
		"INSERT INTO item SELECT g, 'row ' || g FROM generate_series($first, $first + 9) g");
}

write_batch() for 1 .. 50;
kafka_stop();
my $stopped_at = time;
my $saw_error = 0;
my $max_lag = 0;
while (time - $stopped_at < 30)
{
	write_batch();
	my ($state, $lag) = split /\|/, $node->safe_psql('postgres',
		'SELECT state, publish_lag_bytes FROM kafka_bridge.status WHERE worker = \'publisher\'');
	$saw_error ||= ($state eq 'error');
	$max_lag = $lag if $lag > $max_lag;
	usleep(100_000);
}
my $written = $next - 1;
ok($saw_error, 'status shows the error while the broker is down');
ok($max_lag > 0, "status shows the publish lag while the broker is down (up to $max_lag bytes)");
is($node->safe_psql('postgres', 'SELECT count(*) FROM item'), $written,
	"PostgreSQL took all $written rows during the outage");

kafka_start();
write_batch() for 1 .. 10;
$written = $next - 1;

my @r = kafka_wait_records('regress_outage_item', $written, 180);
my %keys = map { $_->{key} => 1 } @r;
is(scalar(keys %keys), $written, "every one of the $written rows reached the topic");
note('records: ' . scalar(@r) . ', duplicates: ' . (scalar(@r) - scalar(keys %keys)));
ok(kb_wait_state($node, 'connected'), 'status is back to connected');

# a broker that takes connections and answers nothing (SIGSTOP) while the
# publisher creates a topic for a new table's first record: a fast
# shutdown does not wait out the request (11 s)
$node->safe_psql('postgres', q{
	CREATE TABLE late (id int PRIMARY KEY);
	SELECT kafka_bridge.publish('late', topic => 'regress_outage_late');
});
kafka_pause();
$node->safe_psql('postgres', 'INSERT INTO late VALUES (1)');
sleep 2;	# the publisher is waiting for CreateTopics
my $t0 = [ Time::HiRes::gettimeofday() ];
$node->stop('fast');
my $took = Time::HiRes::tv_interval($t0);
kafka_resume();
cmp_ok($took, '<', 5, "a fast shutdown while a topic is being created took $took s");
$node->start;

# a fast shutdown while the broker is away and records wait in the
# producer: the publisher stops its producing thread and destroys
# librdkafka's handle at exit, promptly and without a crash
kafka_stop();
write_batch() for 1 .. 5;
sleep 1;
$t0 = [ Time::HiRes::gettimeofday() ];
$node->stop('fast');
$took = Time::HiRes::tv_interval($t0);
cmp_ok($took, '<', 15, "a fast shutdown with the broker away and records queued took $took s");
unlike(slurp_file($node->logfile), qr/was terminated by signal|exited with exit code [^01]/,
	'no worker crashed on its way out');
kafka_start();
done_testing();
