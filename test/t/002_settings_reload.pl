# Settings on reload: a bad librdkafka property is refused with a message
# naming the setting and the property, the running configuration stays; a
# good change reaches the running worker; secrets never reach the log; a
# misspelt setting is an error; kafka_bridge.databases starts and stops
# workers.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

# log_statement = 'all': statements naming a secret must be logged without it
my $node = kb_node('settings',
	conf => "kafka_bridge.producer_options = 'linger.ms=5'\nlog_statement = 'all'\n");
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION kafka_bridge');
ok(kb_wait_state($node, 'connected'), 'worker connected');

# remove lines added by a test step
sub drop_conf_lines
{
	my ($pattern) = @_;
	my $file = $node->data_dir . '/postgresql.conf';
	my @keep = grep { !/$pattern/ } split /^/, slurp_file($file);
	open my $fh, '>', $file or die $!;
	print $fh @keep;
	close $fh;
}

# 1. a bad property on reload
my $offset = -s $node->logfile;
$node->append_conf('postgresql.conf', qq{
kafka_bridge.producer_options = 'no.such.property=1' # step1
kafka_bridge.consumer_options = 'fetch.wait.max.ms=77' # step1
});
$node->reload;
$node->wait_for_log(qr/invalid value for parameter "kafka_bridge.producer_options"/, $offset);
ok($node->log_contains(
		qr/DETAIL:  librdkafka property "no.such.property": No such configuration property/, $offset),
	'the refusal names the librdkafka property');
ok($node->poll_query_until('postgres', "SELECT current_setting('kafka_bridge.consumer_options') = 'fetch.wait.max.ms=77'"),
	'the good setting of the same file applies');
is($node->safe_psql('postgres', 'SHOW kafka_bridge.producer_options'), 'linger.ms=5',
	'the refused setting keeps its value');
$node->wait_for_log(
	qr/is reconnecting with the reloaded Kafka settings(?s:.*)connected to Kafka brokers/, $offset);
pass('the worker reconnected with the settings in force');
drop_conf_lines(qr/# step1/);

# 2. secrets never reach the log, and non-superusers cannot read them
my $secret = 'tap-Secret-' . int(rand(1e9));
$offset = -s $node->logfile;
$node->append_conf('postgresql.conf', qq{
kafka_bridge.sasl_password = '$secret' # step2
kafka_bridge.ssl_key_password = '$secret-key' # step2
});
$node->reload;
$node->wait_for_log(qr/parameter "kafka_bridge.ssl_key_password" changed to \(value hidden by kafka_bridge\)/, $offset);
ok($node->poll_query_until('postgres', "SELECT current_setting('kafka_bridge.sasl_password') = '$secret'"),
	'superusers read the password');
$node->safe_psql('postgres', 'CREATE ROLE regress_kb_app LOGIN');
my ($rc, $out, $err) = $node->psql('postgres', 'SHOW kafka_bridge.sasl_password',
	extra_params => [ '-U', 'regress_kb_app' ]);
like($err, qr/must be superuser or have privileges of pg_read_all_settings/,
	'a non-superuser cannot read the SASL password');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM pg_settings WHERE name LIKE 'kafka_bridge.%password'",
		extra_params => [ '-U', 'regress_kb_app' ]),
	'0', 'pg_settings does not list the secrets');
# a statement that fails while naming a secret is not logged with its text
$node->psql('postgres', "ALTER SYSTEM SET kafka_bridge.kafka_options = 'sasl.password=$secret-typo'");
# nor one that sets it, whatever the case of the name
$node->safe_psql('postgres', "ALTER SYSTEM SET Kafka_Bridge.SASL_Password = '$secret-upper'");
$node->reload;
ok($node->poll_query_until('postgres', "SELECT current_setting('kafka_bridge.sasl_password') = '$secret-upper'"),
	'a secret set with ALTER SYSTEM applies');
$node->safe_psql('postgres', "ALTER SYSTEM RESET kafka_bridge.sasl_password");
ok(kb_wait_state($node, 'connected'), 'worker connected with the secrets set');
unlike(slurp_file($node->logfile), qr/\Q$secret\E/, 'no secret in the server log');

# 3. a misspelt setting in the file is an error, not silence
$offset = -s $node->logfile;
$node->append_conf('postgresql.conf', "kafka_bridge.bootstrap_server = 'typo:9092' # step3\n");
$node->reload;
$node->wait_for_log(qr/kafka_bridge\.bootstrap_server/, $offset);
ok($node->log_contains(qr/(unrecognized configuration parameter|invalid configuration parameter name) "kafka_bridge.bootstrap_server"/, $offset),
	'a misspelt kafka_bridge setting is reported');
drop_conf_lines(qr/# step3/);
$node->reload;

# 4. kafka_bridge.databases on reload starts and stops workers
$node->safe_psql('postgres', 'CREATE DATABASE regress_kb_second');
$node->safe_psql('regress_kb_second', 'CREATE EXTENSION kafka_bridge');
$node->append_conf('postgresql.conf', "kafka_bridge.databases = 'postgres, regress_kb_second' # step4\n");
$node->reload;
ok(kb_wait_state($node, 'connected', 'regress_kb_second'), 'a database added on reload gets a worker');
is($node->safe_psql('postgres', "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'kafka_bridge publisher'"),
	'2', 'one worker per database');
drop_conf_lines(qr/# step4/);
$node->reload;
ok($node->poll_query_until('postgres', "SELECT count(*) = 0 FROM kafka_bridge.status WHERE database = 'regress_kb_second'"),
	'a database removed on reload loses its worker');
ok($node->poll_query_until('postgres', "SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'kafka_bridge publisher'"),
	'its worker process is gone');

$node->stop;
done_testing();
