# kafka_bridge.send(): a record reaches Kafka if and only if its transaction
# commits; a rolled-back savepoint drops its sends only; sends and row
# changes of a transaction arrive in commit order; 100k sends of one
# transaction all arrive, in order; a record at the producer's size limit
# arrives and one a byte larger is refused at once; a send made while the
# broker is down arrives once it is back; the function is not for PUBLIC.
use strict;
use warnings;

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $node = kb_node('send');
$node->start;
$node->safe_psql('postgres', q{
	CREATE EXTENSION kafka_bridge;
	CREATE TABLE orders (id int PRIMARY KEY, total numeric);
});
ok(kb_wait_slot($node), 'slot created');
$node->safe_psql('postgres', "SELECT kafka_bridge.publish('orders', topic => 'regress_send_orders')");

# commit, rollback, savepoints
$node->safe_psql('postgres', q{
	BEGIN;
	SELECT kafka_bridge.send('regress_send_app', 'k1', '{"a": 1}'::jsonb, '{"source": "test", "empty": null}');
	COMMIT;
	BEGIN;
	SELECT kafka_bridge.send('regress_send_app', 'rolled-back', '{"ghost": true}'::jsonb);
	ROLLBACK;
	BEGIN;
	SELECT kafka_bridge.send('regress_send_app', 'k2', 'plain text'::text);
	SAVEPOINT s;
	SELECT kafka_bridge.send('regress_send_app', 'in-savepoint', 'dropped'::text);
	ROLLBACK TO s;
	SELECT kafka_bridge.send('regress_send_app', 'k3', '\x6869'::bytea);
	SELECT kafka_bridge.send('regress_send_app', NULL, NULL::text);
	COMMIT;
});
my @r = kafka_wait_records('regress_send_app', 4);
is_deeply([ map { $_->{key} } @r ], [ 'k1', 'k2', 'k3', undef ],
	'committed sends arrive in order; the rolled-back transaction and savepoint send nothing');
is($r[0]{value}, '{"a": 1}', 'a jsonb value arrives as JSON');
is($r[0]{headers}{source}, 'test', 'headers arrive');
is($r[1]{value}, 'plain text', 'a text value arrives as its text');
is($r[2]{value}, 'hi', 'a bytea value arrives as its bytes');
ok(!defined $r[3]{value}, 'a null value arrives as null');

# sends and row changes of one transaction, in commit order
$node->safe_psql('postgres', q{
	BEGIN;
	INSERT INTO orders VALUES (1, 10);
	SELECT kafka_bridge.send('regress_send_orders', 'm1', '{"after": 1}'::jsonb);
	INSERT INTO orders VALUES (2, 20);
	SELECT kafka_bridge.send('regress_send_orders', 'm2', '{"after": 2}'::jsonb);
	COMMIT;
});
@r = kafka_wait_records('regress_send_orders', 4);
is_deeply([ map { $_->{key} } @r ], [ '{"id":1}', 'm1', '{"id":2}', 'm2' ],
	'row events and sends of a transaction arrive in the order they were made');

# a record at the producer's limit (message.max.bytes, 1,000,000 by
# default) is sent and arrives; one a byte larger is refused by send()
# itself.  librdkafka counts 36 bytes of framing, the key, the value and
# each header with its two lengths as varints (70 and 200 take 2 bytes
# each); a record it refused in the publisher would stop publishing.
my ($hname, $hvalue) = ('n' x 70, 'v' x 200);
my $at_limit = 1_000_000 - 36 - 1 - (2 + 70 + 2 + 200);
my $send_limit = sub {
	my ($len) = @_;
	return $node->psql('postgres',
		"SELECT kafka_bridge.send('regress_send_limit', 'k', repeat('x', $len), '{\"$hname\": \"$hvalue\"}')");
};
my ($rc, $out, $err) = $send_limit->($at_limit + 1);
like($err, qr/record for topic "regress_send_limit" is 1000001 bytes, more than the producer's limit of 1000000 bytes/,
	'a send one byte over the limit, framing counted, is refused');
($rc, $out, $err) = $send_limit->($at_limit);
is($rc, 0, 'a send at the limit is taken');
$node->safe_psql('postgres', 'INSERT INTO orders VALUES (3, 30)');
@r = kafka_wait_records('regress_send_limit', 1);
is(length($r[0]{value} // ''), $at_limit, 'the record at the limit arrives whole');
@r = kafka_wait_records('regress_send_orders', 5);
is($r[4]{key}, '{"id":3}', 'and publishing goes on after it');

# 100k sends in one transaction
$node->safe_psql('postgres',
	"SELECT count(kafka_bridge.send('regress_send_bulk', i::text, to_jsonb(i))) FROM generate_series(1, 100000) i");
@r = kafka_wait_records('regress_send_bulk', 100000, 300);
is(scalar(@r), 100000, '100k sends of one transaction all arrive');
my $in_order = 1;
for my $i (0 .. $#r) { $in_order = 0, last if $r[$i]{key} ne ($i + 1); }
ok($in_order, 'in order');

# a send while the broker is down arrives once it is back
kafka_stop();
$node->safe_psql('postgres', "SELECT kafka_bridge.send('regress_send_app', 'while-down', 'x'::text)");
ok(kb_wait_state($node, 'error'), 'the worker sees the broker down');
kafka_start();
@r = kafka_wait_records('regress_send_app', 5);
ok((grep { ($_->{key} // '') eq 'while-down' } @r), 'a send made while the broker was down arrives');

# errors and privileges
($rc, $out, $err) = $node->psql('postgres', "SELECT kafka_bridge.send('', 'k', 'v'::text)");
like($err, qr/invalid Kafka topic name ""/, 'an empty topic is refused');
($rc, $out, $err) = $node->psql('postgres', "SELECT kafka_bridge.send('t', 'k', 'v'::text, '{\"h\": 1}')");
like($err, qr/the value of Kafka record header "h" must be a string or null/, 'a non-string header is refused');
($rc, $out, $err) = $node->psql('postgres', "SELECT kafka_bridge.send('t', 'k', 'v'::text, '[1]')");
like($err, qr/the headers of a Kafka record must be a JSON object/, 'headers must be an object');
$node->safe_psql('postgres', 'CREATE ROLE regress_app LOGIN');
($rc, $out, $err) = $node->psql('postgres', "SELECT kafka_bridge.send('t', 'k', 'v'::text)",
	extra_params => [ '-U', 'regress_app' ]);
like($err, qr/permission denied/, 'a role without the grant cannot send');
$node->safe_psql('postgres', q{
	GRANT USAGE ON SCHEMA kafka_bridge TO regress_app;
	GRANT EXECUTE ON FUNCTION kafka_bridge.send(text, text, text, jsonb) TO regress_app;
});
($rc, $out, $err) = $node->psql('postgres', "SELECT kafka_bridge.send('regress_send_app', 'granted', 'v'::text)",
	extra_params => [ '-U', 'regress_app' ]);
is($rc, 0, 'after the grant it can');

$node->stop;
done_testing();
