# The publisher's life cycle: without wal_level = logical the worker says so
# and creates no slot; the slot exists as soon as the extension does, even
# before Kafka is reachable, so changes committed while Kafka is not
# configured are published once it is; a standby promoted (no slot there)
# makes a new slot and says that changes may not have been published;
# DROP EXTENSION drops the slot so it retains no WAL.
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

# 3. a standby promoted has no slot (PostgreSQL 15 keeps none on standbys):
#    its publisher makes one, and says that what committed before it may
#    not have been published
is($node->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.slot_history WHERE NOT replaced_lost_slot'),
	'1', 'the slot the publisher made is in kafka_bridge.slot_history');
$node->backup('lifecycle_backup');
my $standby = PostgreSQL::Test::Cluster->new('lifecycle_standby');
$standby->init_from_backup($node, 'lifecycle_backup', has_streaming => 1);
$standby->start;
$node->safe_psql('postgres', 'INSERT INTO early VALUES (101)');
$node->wait_for_catchup($standby);
$node->stop;
$standby->promote;
ok(kb_wait_slot($standby), 'the promoted standby\'s publisher makes a slot');
ok($standby->poll_query_until('postgres',
		"SELECT last_error LIKE '%replication slot was lost%kafka_bridge.snapshot()%' FROM kafka_bridge.status WHERE worker = 'publisher'"),
	'the status says the slot was lost and what to do');
ok($standby->log_contains(qr/kafka_bridge created replication slot "kafka_bridge_\d+" again: the one before is lost/),
	'and the log warns');
is($standby->safe_psql('postgres',
		'SELECT string_agg(replaced_lost_slot::text, \',\' ORDER BY created_at) FROM kafka_bridge.slot_history'),
	'false,true', 'kafka_bridge.slot_history has both slots, the second replacing a lost one');
$standby->stop;
$node->start;

# 4. DROP EXTENSION drops the slot
$node->safe_psql('postgres', 'DROP EXTENSION kafka_bridge');
ok($node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM pg_replication_slots'),
	'DROP EXTENSION drops the slot');
ok($node->log_contains(qr/kafka_bridge dropped replication slot "kafka_bridge_\d+"/),
	'and the log says so');

$node->stop;
done_testing();
