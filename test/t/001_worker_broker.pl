# The worker against the real Kafka broker: status sees it, sees it go away
# (naming the unreachable address), sees it come back; the worker is
# restarted after a crash and after SIGTERM.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $port = kafka_port();
my $node = kb_node('worker');
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION kafka_bridge');

ok(kb_wait_state($node, 'connected'), 'the worker connects to the real broker');
my $st = kb_status($node);
like($st->{brokers}, qr/\@127\.0\.0\.1:$port\b/, 'status lists the broker it is connected to');
ok($st->{pid} > 0, 'status shows the worker pid');

ok( $node->poll_query_until('postgres',
		"SELECT backend_type || ': ' || query FROM pg_stat_activity WHERE pid = $st->{pid}",
		"kafka_bridge publisher: connected to Kafka brokers 1\@127.0.0.1:$port"),
	'pg_stat_activity shows what the worker does');

# the broker goes away
my $log_offset = -s $node->logfile;
kafka_stop();
ok(kb_wait_state($node, 'error'), 'status turns to error when the broker stops');
$st = kb_status($node);
like($st->{last_error}, qr/127\.0\.0\.1:$port/, 'the error names the unreachable address');
is($st->{brokers}, '', 'no broker is listed while it is down');
$node->wait_for_log(qr/kafka_bridge publisher for database "postgres" cannot reach Kafka/, $log_offset);
pass('the server log says the broker is unreachable');

# and comes back
kafka_start();
ok(kb_wait_state($node, 'connected'), 'status turns back to connected when the broker returns');
my $err_at = $node->safe_psql('postgres',
	"SELECT last_error_at IS NOT NULL FROM kafka_bridge.status WHERE worker = 'publisher'");
is($err_at, 't', 'the last error and its time stay visible after recovery');

# SIGTERM: the worker stops cleanly and the launcher starts a new one
my $old_pid = kb_status($node)->{pid};
$log_offset = -s $node->logfile;
$node->safe_psql('postgres', "SELECT pg_terminate_backend($old_pid)");
ok( $node->poll_query_until('postgres',
		"SELECT pid IS NOT NULL AND pid <> $old_pid AND state = 'connected' FROM kafka_bridge.status WHERE worker = 'publisher'"),
	'a terminated worker is restarted by the launcher');
ok(!$node->log_contains(qr/server process .* was terminated by signal/, $log_offset),
	'SIGTERM is a clean exit, not a crash');

# kill -9: the postmaster resets and the worker comes back
$old_pid = kb_status($node)->{pid};
kill 'KILL', $old_pid;
ok( $node->poll_query_until('postgres',
		"SELECT pid IS NOT NULL AND pid <> $old_pid AND state = 'connected' FROM kafka_bridge.status WHERE worker = 'publisher'"),
	'a crashed worker is restarted');

# a clean shutdown stops the launcher and the worker
$log_offset = -s $node->logfile;
$node->stop('fast');
ok(!$node->log_contains(qr/kafka_bridge.*(terminated by signal|exited with exit code [^01])/, $log_offset),
	'no kafka_bridge process crashed on shutdown');

done_testing();
