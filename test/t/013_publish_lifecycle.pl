# The publisher's life cycle: without wal_level = logical the worker says so
# and creates no slot; the slot exists as soon as the extension does, even
# before Kafka is reachable, so changes committed while Kafka is not
# configured are published once it is; DROP EXTENSION drops the slot so it
# retains no WAL.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $bootstrap = kafka_bootstrap();

# 1. wal_level = replica
my $node = kb_node('lifecycle', conf => "wal_level = replica\nkafka_bridge.bootstrap_servers = '127.0.0.1:1'\n");
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION kafka_bridge');
ok( $node->poll_query_until('postgres',
		"SELECT last_error LIKE '%kafka_bridge needs wal_level = logical%' FROM kafka_bridge.status WHERE worker = 'publisher'"),
	'without wal_level = logical the status says what to change');
is($node->safe_psql('postgres', 'SELECT count(*) FROM pg_replication_slots'), '0',
	'and no slot is created');

# 2. the slot comes before Kafka
$node->append_conf('postgresql.conf', "wal_level = logical\n");
$node->restart;
ok(kb_wait_slot($node), 'the slot exists although no broker is reachable');
$node->safe_psql('postgres', q{
	CREATE TABLE early (id int PRIMARY KEY);
	SELECT kafka_bridge.publish('early', topic => 'regress_lifecycle_early');
	INSERT INTO early SELECT generate_series(1, 100);
});
ok(kb_wait_state($node, 'error'), 'the status shows the unreachable broker');
$node->append_conf('postgresql.conf', "kafka_bridge.bootstrap_servers = '$bootstrap'\n");
$node->reload;
my @r = kafka_wait_records('regress_lifecycle_early', 100);
my %keys = map { $_->{key} => 1 } @r;
is(scalar(keys %keys), 100, 'rows committed before Kafka was configured are published once it is');

# 3. DROP EXTENSION drops the slot
$node->safe_psql('postgres', 'DROP EXTENSION kafka_bridge');
ok($node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM pg_replication_slots'),
	'DROP EXTENSION drops the slot');
ok($node->log_contains(qr/kafka_bridge dropped replication slot "kafka_bridge_\d+"/),
	'and the log says so');

$node->stop;
done_testing();
