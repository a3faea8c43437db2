# kafka_bridge.produce() against the real broker: a record sent at once
# returns its partition and offset and arrives with its key, value bytes and
# headers; a rollback does not undo it; only granted roles may call it;
# invalid topics, headers and oversized records are refused with clear
# errors; a reload of the Kafka settings rebuilds the backend's producer; a
# stopped broker makes it fail within statement_timeout (or the producer's
# message timeout), and it works again once the broker is back.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use KafkaBridgeTest;

my $node = kb_node('produce');
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION kafka_bridge');

# The value of the record at an offset of partition 0, as raw bytes.
sub raw_value
{
	my ($topic, $offset) = @_;
	my $bootstrap = kafka_bootstrap();
	return scalar `kcat -C -b '$bootstrap' -t '$topic' -p 0 -o $offset -c 1 -e -q -f '%s' 2>/dev/null`;
}

# Run SQL expected to fail; returns its stderr and how long it took.
sub psql_fails
{
	my ($sql, %params) = @_;
	my ($stdout, $stderr);
	my $start = time;
	my $rc = $node->psql('postgres', $sql,
		stdout => \$stdout, stderr => \$stderr, %params);
	my $elapsed = time - $start;
	note "failed as expected in ${elapsed}s: $stderr" if $rc != 0;
	return ($rc != 0 ? $stderr : "(no error; returned $stdout)", $elapsed);
}

# Run SQL in a background_psql session; returns its output and its errors
# (which the session object keeps until cleared).
sub bg_query
{
	my ($session, $sql) = @_;
	my $out = $session->query($sql);
	my $err = $session->{stderr};
	$session->{stderr} = '';
	return ($out, $err);
}

# Change a kafka_bridge setting with ALTER SYSTEM (undef: RESET) and wait
# until new sessions see the change.
sub set_system
{
	my ($name, $value) = @_;
	my $before = $node->safe_psql('postgres', "SELECT current_setting('$name')");
	$node->safe_psql('postgres',
		defined $value ? "ALTER SYSTEM SET $name = '$value'" : "ALTER SYSTEM RESET $name");
	$node->safe_psql('postgres', 'SELECT pg_reload_conf()');
	$node->poll_query_until('postgres',
		"SELECT current_setting('$name') <> '$before'")
	  or die "$name did not change";
}

# ---- three values, one producer: partition 0, increasing offsets ----
my $out = $node->safe_psql('postgres', q{
	SELECT partition || ',' || "offset" FROM kafka_bridge.produce('regress_produce', 'k-json',
		'{"b": [true, null], "a": 1}'::jsonb, '{"trace": "t-1", "empty": "", "none": null}');
	SELECT partition || ',' || "offset" FROM kafka_bridge.produce('regress_produce', 'k-text',
		'plain "text", not JSON');
	SELECT partition || ',' || "offset" FROM kafka_bridge.produce('regress_produce', NULL,
		'\x00ff41'::bytea);
});
is($out, "0,0\n0,1\n0,2", 'produce() returns partition 0 and increasing offsets');
is($node->safe_psql('postgres',
		q{SELECT "offset" FROM kafka_bridge.produce('regress_produce', 'k-null', NULL::text)}),
	'3', 'another session (another producer) continues the offsets');

my @r = kafka_wait_records('regress_produce', 4);
is(scalar(@r), 4, 'the topic holds the four records');
is_deeply([ map { $_->{key} } @r ], [ 'k-json', 'k-text', undef, 'k-null' ],
	'keys as given, a null key stays null');
is_deeply([ map { $_->{offset} } @r ], [ 0, 1, 2, 3 ], 'at the offsets produce() returned');
is_deeply($r[0]{headers}, { trace => 't-1', empty => '', none => undef },
	'headers arrive, empty and null values included');
is_deeply($r[1]{headers}, {}, 'no headers when none are given');
is(raw_value('regress_produce', 0), '{"a": 1, "b": [true, null]}',
	'a jsonb value arrives as its JSON text');
is(raw_value('regress_produce', 1), 'plain "text", not JSON',
	'a text value arrives as its bytes');
is(raw_value('regress_produce', 2), "\x00\xffA",
	'a bytea value arrives as its raw bytes');
ok(!defined $r[3]{value}, 'a null value makes a tombstone');

# ---- outside the transaction's fate ----
$node->safe_psql('postgres', q{
	BEGIN;
	SELECT kafka_bridge.produce('regress_produce_rollback', 'r', 'kept'::text);
	ROLLBACK;
});
@r = kafka_wait_records('regress_produce_rollback', 1);
is_deeply([ map { $_->{value} } @r ], ['kept'],
	'a record produced in a transaction that rolls back stays in the topic');

# ---- privileges ----
$node->safe_psql('postgres', 'CREATE ROLE regress_producer LOGIN');
my @as_producer = (extra_params => [ '-U', 'regress_producer' ]);
my $call = q{SELECT partition FROM kafka_bridge.produce('regress_produce_grant', 'u', '{"by": "regress_producer"}'::jsonb)};
my ($err) = psql_fails($call, @as_producer);
like($err, qr/permission denied for schema kafka_bridge/,
	'a role without grants cannot reach produce()');
$node->safe_psql('postgres', 'GRANT USAGE ON SCHEMA kafka_bridge TO regress_producer');
($err) = psql_fails($call, @as_producer);
like($err, qr/permission denied for function produce/,
	'USAGE on the schema alone is not enough: produce() is revoked from PUBLIC');
$node->safe_psql('postgres',
	'GRANT EXECUTE ON FUNCTION kafka_bridge.produce(text, text, jsonb, jsonb) TO regress_producer');
my ($rc, $stdout, $stderr) = $node->psql('postgres', $call, @as_producer);
is("$rc/$stdout", '0/0', 'after GRANT EXECUTE the role can produce');
@r = kafka_wait_records('regress_produce_grant', 1);
is($r[0]{value} // '(none)', '{"by": "regress_producer"}', 'its record arrives');
($err) = psql_fails(q{SELECT kafka_bridge.produce('regress_produce_grant', 'u', 'text'::text)},
	@as_producer);
like($err, qr/permission denied for function produce/,
	'the grant covers only the jsonb overload');

# ---- validation ----
($err) = psql_fails(q{SELECT kafka_bridge.produce('bad topic!', NULL, 'x'::text)});
like($err, qr/ERROR:  invalid Kafka topic name "bad topic!".*DETAIL:  A topic name may contain only/s,
	'an invalid topic is refused with the reason');
($err) = psql_fails(q{SELECT kafka_bridge.produce('', NULL, 'x'::text)});
like($err, qr/invalid Kafka topic name "".*A topic name cannot be empty/s, 'an empty topic is refused');
($err) = psql_fails(q{SELECT kafka_bridge.produce(NULL, NULL, 'x'::text)});
like($err, qr/ERROR:  the topic of kafka_bridge.produce\(\) cannot be null/, 'a null topic is refused');
($err) = psql_fails(q{SELECT kafka_bridge.produce('regress_produce_bad', NULL, 'x'::text, '["a", "b"]')});
like($err, qr/ERROR:  the headers of a Kafka record must be a JSON object.*DETAIL:  The headers argument is a JSON array/s,
	'headers that are not an object are refused');
($err) = psql_fails(q{SELECT kafka_bridge.produce('regress_produce_bad', NULL, 'x'::text, '{"ok": "v", "n": 1}')});
like($err, qr/ERROR:  the value of Kafka record header "n" must be a string or null/,
	'a header value that is not a string is refused, naming the header');
($err) = psql_fails(q{SELECT kafka_bridge.produce('regress_produce_bad', NULL, 'x'::text, '{"": "v"}')});
like($err, qr/ERROR:  the name of a Kafka record header cannot be empty/, 'an empty header name is refused');
($err) = psql_fails(q{SELECT kafka_bridge.produce('regress_produce_bad', NULL, repeat('x', 2000000))});
like($err, qr/ERROR:  record for Kafka topic "regress_produce_bad" is too large.*DETAIL:  Its key, value and headers take 2000000 bytes; with Kafka's record framing that is more than the producer's message.max.bytes of 1000000 bytes/s,
	'a record larger than message.max.bytes is refused before it is sent');
is(scalar(kafka_records('regress_produce_bad')), 0, 'no refused record reached Kafka');

# ---- settings: a reload rebuilds the session's producer ----
my $session = $node->background_psql('postgres', on_error_stop => 0);
is((bg_query($session, q{SELECT partition FROM kafka_bridge.produce('regress_produce_reload', NULL, 'one'::text)}))[0],
	'0', 'a session produces');
set_system('kafka_bridge.bootstrap_servers', '');
($out, $err) = bg_query($session, q{SELECT kafka_bridge.produce('regress_produce_reload', NULL, 'two'::text)});
like($err,
	qr/ERROR:  kafka_bridge.produce\(\) needs kafka_bridge.bootstrap_servers to be set.*HINT:  Set kafka_bridge.bootstrap_servers in postgresql.conf/s,
	'with kafka_bridge.bootstrap_servers emptied by a reload, the same session is told to set it');
set_system('kafka_bridge.bootstrap_servers', undef);
is(join('/', bg_query($session, q{SELECT "offset" FROM kafka_bridge.produce('regress_produce_reload', NULL, 'three'::text)})),
	'1/', 'after the next reload the session produces again, with a new producer');
$session->quit;
is_deeply([ map { $_->{value} } kafka_wait_records('regress_produce_reload', 2) ],
	[ 'one', 'three' ], 'the records of the session');

# ---- a broker that takes the record and does not answer ----
# The record is sent on a connection the session's producer holds, and the
# message timeout comes before an answer: produce() says the delivery is
# in doubt (the broker may have written it), not that it failed.
set_system('kafka_bridge.producer_options', 'message.timeout.ms=3000');
my $frozen = $node->background_psql('postgres', on_error_stop => 0);
is(join('/', bg_query($frozen, q{SELECT "offset" FROM kafka_bridge.produce('regress_produce_doubt', 'first', 'x'::text)})),
	'0/', 'a session produces before the broker freezes');
kafka_pause();
($out, $err) = bg_query($frozen, q{SELECT kafka_bridge.produce('regress_produce_doubt', 'second', 'y'::text)});
kafka_resume();
like($err, qr/ERROR:  the delivery of a record to Kafka topic "regress_produce_doubt" is in doubt.*DETAIL:  Local: Message timed out; the record was sent, and the broker may have written it.*HINT:  Calling again may write it twice/s,
	'a record sent but not answered before the message timeout: the delivery is in doubt');
$frozen->quit;
set_system('kafka_bridge.producer_options', undef);

# ---- a stopped broker ----
# a session whose producer knows the broker and the topic already
my $held = $node->background_psql('postgres', on_error_stop => 0);
is(join('/', bg_query($held, q{SELECT "offset" FROM kafka_bridge.produce('regress_produce_held', 'before', 'x'::text)})),
	'0/', 'a session produces before the outage');

kafka_stop();
my $elapsed;
($err, $elapsed) = psql_fails(q{
	SET statement_timeout = '3s';
	SELECT kafka_bridge.produce('regress_produce_outage', 'lost', 'never acknowledged'::text);
});
like($err, qr/ERROR:  canceling statement due to statement timeout.*CONTEXT:  waiting for Kafka to acknowledge a record for topic "regress_produce_outage" \(the record may still be delivered\)/s,
	'statement_timeout ends the wait, saying which topic and that the record may still be delivered');
ok($elapsed < 15, "it fails after statement_timeout (took ${elapsed}s)");

# without statement_timeout, the producer's message timeout (lower than 30 s)
set_system('kafka_bridge.producer_options', 'message.timeout.ms=2000');
($err, $elapsed) = psql_fails(q{
	SELECT kafka_bridge.produce('regress_produce_outage', 'lost', 'timed out'::text);
});
like($err, qr/ERROR:  could not deliver a record to Kafka topic "regress_produce_outage".*DETAIL:  Local: Message timed out\..*HINT:  Check that the brokers in kafka_bridge.bootstrap_servers/s,
	'the message timeout ends the wait with librdkafka\'s reason');
unlike($err, qr/canceling/, 'not as a cancel');
ok($elapsed < 15, "it fails after message.timeout.ms (took ${elapsed}s)");
set_system('kafka_bridge.producer_options', undef);

# the held session's record outlives its interrupted call
my $start = time;
($out, $err) = bg_query($held, q{
	SET statement_timeout = '3s';
	SELECT kafka_bridge.produce('regress_produce_held', 'interrupted', 'x'::text);
});
$elapsed = time - $start;
like($err, qr/canceling statement due to statement timeout/,
	'a session with a connected producer is interrupted by statement_timeout too');
ok($elapsed < 15, "within the timeout (took ${elapsed}s)");
bg_query($held, 'RESET statement_timeout');

kafka_start();
is($node->safe_psql('postgres',
		q{SELECT partition FROM kafka_bridge.produce('regress_produce_outage', 'back', 'after the outage'::text)}),
	'0', 'once the broker is back, produce() works again');
@r = kafka_wait_records('regress_produce_outage', 1);
is_deeply([ map { $_->{key} } @r ], ['back'],
	'records whose producer never reached a broker were dropped with it');

# the interrupted record may arrive before or not at all: the held session's
# next call must return its own record's offset, not that one's
my $offset;
($offset, $err) = bg_query($held,
	q{SELECT "offset" FROM kafka_bridge.produce('regress_produce_held', 'after', 'x'::text)});
is($err, '', 'the held session produces again once the broker is back');
$held->quit;
@r = kafka_wait_records('regress_produce_held', $offset + 1);
my ($at) = grep { $_->{offset} == $offset } @r;
is($at && $at->{key}, 'after',
	"the session's next call returns the offset of its own record ($offset)");
note 'held topic: ' . join(', ', map { "$_->{offset}:$_->{key}" } @r);

$node->stop;
done_testing();
