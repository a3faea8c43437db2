# test/lib/KafkaBridgeTest.pm - helpers shared by the TAP tests: PostgreSQL
# nodes configured for kafka_bridge, and control of the real Kafka broker
# that scripts/test started with scripts/kafka.
package KafkaBridgeTest;

use strict;
use warnings;

use Exporter 'import';
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

our @EXPORT = qw(kb_node kafka_bootstrap kafka_port kafka_stop kafka_start
  kb_wait_state kb_status);

sub _env
{
	my ($name) = @_;
	return $ENV{$name}
	  // BAIL_OUT("$name is not set: run the TAP tests with scripts/test tap");
}

sub kafka_bootstrap { return _env('KB_KAFKA_BOOTSTRAP'); }
sub kafka_port      { return _env('KB_KAFKA_PORT'); }

# Stop the broker, keeping its data (an outage, not a wipe).
sub kafka_stop
{
	my $script = _env('KB_KAFKA_SCRIPT');
	system($script, 'stop') == 0 or die "scripts/kafka stop failed";
	note "Kafka broker stopped";
}

# Start the broker again on the same data and port.
sub kafka_start
{
	my $script = _env('KB_KAFKA_SCRIPT');
	my $out = `$script start --port @{[kafka_port()]}`;
	die "scripts/kafka start failed" if $? != 0;
	note "Kafka broker started again: $out";
}

# A node whose kafka_bridge worker serves database "postgres" and talks to
# the real broker.  %opts: preload => 0 to leave shared_preload_libraries
# unset; conf => extra postgresql.conf lines.
sub kb_node
{
	my ($name, %opts) = @_;
	my $node = PostgreSQL::Test::Cluster->new($name);
	my $bootstrap = kafka_bootstrap();
	my $preload = ($opts{preload} // 1) ? 'kafka_bridge' : '';

	$node->init(allows_streaming => 'logical');
	$node->append_conf('postgresql.conf', qq{
shared_preload_libraries = '$preload'
wal_level = logical
max_worker_processes = 16
restart_after_crash = on
output_plugin_libraries = 'pgoutput, test_decoding, kafka_bridge'
kafka_bridge.bootstrap_servers = '$bootstrap'
kafka_bridge.databases = 'postgres'
kafka_bridge.instance_id = '$name'
kafka_bridge.worker_restart_delay = 1s
kafka_bridge.probe_interval = 1s
} . ($opts{conf} // ''));
	return $node;
}

# Row of kafka_bridge.status for a database, as a hash.
sub kb_status
{
	my ($node, $dbname) = @_;
	$dbname //= 'postgres';
	my $row = $node->safe_psql('postgres',
		"SELECT coalesce(pid, 0), state, coalesce(brokers, ''), coalesce(last_error, '') "
		  . "FROM kafka_bridge.status WHERE database = '$dbname'");
	my ($pid, $state, $brokers, $error) = split /\|/, $row, 4;
	return { pid => $pid, state => $state, brokers => $brokers, last_error => $error };
}

# Wait until the worker of a database reports a state; returns true if so.
sub kb_wait_state
{
	my ($node, $state, $dbname) = @_;
	$dbname //= 'postgres';
	return $node->poll_query_until('postgres',
		"SELECT state = '$state' FROM kafka_bridge.status WHERE database = '$dbname'");
}

1;
