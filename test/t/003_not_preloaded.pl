# kafka_bridge loaded without shared_preload_libraries: the extension
# installs, and what needs the workers says which line to add.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $node = kb_node('nopreload', preload => 0);
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION kafka_bridge');
my ($rc, $out, $err) = $node->psql('postgres', 'SELECT * FROM kafka_bridge.status');
isnt($rc, 0, 'the status view fails without the workers');
like($err, qr/kafka_bridge\.status needs kafka_bridge to be loaded at server start/,
	'the error says why');
like($err, qr/HINT:  Add kafka_bridge to shared_preload_libraries/, 'the hint names the line to add');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'kafka_bridge%'"),
	'0', 'no worker runs');

# once preloaded, the launcher and the workers are there
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'kafka_bridge'\n");
$node->restart;
ok($node->poll_query_until('postgres', "SELECT count(*) = 3 FROM pg_stat_activity WHERE backend_type LIKE 'kafka_bridge%'"),
	'after adding it and restarting, the launcher, the publisher and the applier run');
$node->stop;
done_testing();
