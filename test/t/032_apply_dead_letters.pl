# Bad records never stop the applier and are never lost: a corpus of bad
# records written with kcat into a topic subscribed in the envelope format
# and into one subscribed in the flat format (malformed JSON of several
# kinds, values that are no objects, unknown or missing event types, bad
# or missing keys, keys that do not match the row, values that the
# column types refuse, NOT NULL, CHECK and unique violations, oversized
# varchar, deletes without a key, an update with unchanged columns of a
# row missing here...) each land in kafka_bridge.dead_letters with its
# coordinates, raw bytes and a reason that says what is wrong; nothing of
# them reaches the table; the good records before, between and after them
# are applied; the applier keeps the same pid throughout.  Bursts of good
# and bad records consumed in one go (with and without the publisher's
# headers) lose no good record; an apply_role without the rights gives
# dead letters until it is granted them; after a restart no dead letter
# is written twice; records deleted from the topic before they were
# applied are named in a dead letter and the log.
use strict;
use warnings;

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $topic = 'regress_dl_client';
my $flat_topic = 'regress_dl_flat';
my $json = JSON::PP->new->canonical->utf8;

my $node = kb_node('dl', conf => "track_commit_timestamp = on\n");
$node->start;
$node->safe_psql('postgres', q{
	CREATE EXTENSION kafka_bridge;
	CREATE TYPE regress_mood AS ENUM ('happy', 'sad');
	CREATE TABLE client (
		id int PRIMARY KEY,
		name text NOT NULL,
		age int,
		born date,
		uid uuid,
		balance numeric(10,2),
		active boolean,
		tags text[],
		mood regress_mood,
		extra jsonb,
		code varchar(5),
		email text UNIQUE,
		score int CHECK (score >= 0),
		note text);
	CREATE TABLE flat_client (id int PRIMARY KEY, name text NOT NULL, age int);
	-- a trigger that applied rows fire (the applier runs with an empty search_path)
	CREATE FUNCTION regress_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
	  IF NEW.name = 'forbidden' THEN
	    RAISE EXCEPTION 'regress_refuse: client % is forbidden', NEW.id;
	  END IF;
	  RETURN NEW;
	END $$;
	CREATE TRIGGER regress_refuse BEFORE INSERT OR UPDATE ON client
	  FOR EACH ROW EXECUTE FUNCTION regress_refuse();
	ALTER TABLE client ENABLE ALWAYS TRIGGER regress_refuse;
	CREATE TABLE regress_burst (id int PRIMARY KEY, n int NOT NULL);
	CREATE TABLE regress_burst_h (id int PRIMARY KEY, n int NOT NULL);
	CREATE TABLE regress_guarded (id int PRIMARY KEY, v text);
	CREATE ROLE regress_reader NOLOGIN;
	GRANT SELECT ON regress_guarded TO regress_reader;
});

# ---- how the records are made ----

my $lsn = 0x3000000;
my $xid = 5000;

# An envelope record the way a publisher named regress_src writes it, one
# transaction each.  %o: row; event (default CLIENT-PUT, undef for none: no
# header nor field); key (default the row's id as the publisher writes it);
# fields (more fields of the value); value (raw bytes instead of the
# envelope); origin.
sub envelope
{
	my (%o) = @_;
	$lsn += 0x100;
	$xid++;
	my $lsn_text = sprintf('0/%X', $lsn);
	my $event = exists $o{event} ? $o{event} : 'CLIENT-PUT';
	my $origin = $o{origin} // 'regress_src';
	my %value = (
		table => 'public.client',
		origin => $origin,
		lsn => $lsn_text,
		commit_time => '2024-03-01T09:30:00.123456+00:00',
		xid => $xid,
		%{ $o{fields} // {} });
	$value{event} = $event if defined $event;
	$value{row} = $o{row} if exists $o{row};
	my $key = exists $o{key} ? $o{key}
	  : (ref $o{row} eq 'HASH' && defined $o{row}{id}) ? qq({"id":$o{row}{id}})
	  : undef;
	my @headers = (origin => $origin, lsn => $lsn_text, seq => '1');
	unshift @headers, (event => $event) if defined $event && !ref $event;
	return {
		key => $key,
		value => exists $o{value} ? $o{value} : $json->encode(\%value),
		headers => \@headers
	};
}

# A record of the seed's format: key = event type, value = the row.
sub flat
{
	my ($key, $value) = @_;
	return { key => $key, value => ref $value ? $json->encode($value) : $value };
}

# ---- the corpus: good records with what they leave, bad ones with the reason ----

my %ada = (
	id => 1, name => 'Ada', age => 36, born => '1815-12-10',
	uid => 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', balance => '1250.50',
	active => JSON::PP::true, tags => [ 'vip', 'early' ], mood => 'happy',
	extra => { k => [ 1, 2 ] }, code => 'abc', email => 'ada@example.org',
	score => 5, note => 'first');
my $valid = $json->encode({ event => 'CLIENT-PUT', table => 'public.client', row => { id => 101, name => 'cut' } });

my @envelope_cases = (
	{ name => 'a good PUT with every column', good => 1, record => envelope(row => \%ada) },
	# malformed JSON
	{ name => 'truncated JSON', absent => [101], reason => [qr/malformed JSON/],
	  record => envelope(key => '{"id":101}', value => substr($valid, 0, 40)) },
	{ name => 'not JSON at all', reason => [qr/malformed JSON/],
	  record => envelope(key => '{"id":102}', value => 'not json at all') },
	{ name => 'JSON followed by garbage', absent => [103], reason => [qr/malformed JSON/],
	  record => envelope(key => '{"id":103}', value => $json->encode({ event => 'CLIENT-PUT', row => { id => 103, name => 'x' } }) . ' }') },
	{ name => 'invalid UTF-8 in a string', absent => [104], reason => [qr/malformed JSON|UTF-?8|encoding/i],
	  record => envelope(key => '{"id":104}',
		value => '{"event":"CLIENT-PUT","table":"public.client","row":{"id":104,"name":"' . "\xff\xfe" . '"}}') },
	{ name => 'single-quoted JSON', absent => [105], reason => [qr/malformed JSON/],
	  record => envelope(key => '{"id":105}', value => q({'event':'CLIENT-PUT','row':{'id':105,'name':'x'}})) },
	{ name => 'a good PUT between bad ones', good => 1, record => envelope(row => { id => 2, name => 'Bob', age => 41, email => 'bob@example.org' }) },
	{ name => 'an empty value (not a tombstone)', reason => [qr/malformed JSON|empty/i],
	  record => envelope(key => '{"id":107}', value => '') },
	# values that are no objects
	{ name => 'value is an array', absent => [108], reason => [qr/object/],
	  record => envelope(key => '{"id":108}', value => '[{"id":108,"name":"x"}]') },
	{ name => 'value is a string', reason => [qr/object/],
	  record => envelope(key => '{"id":109}', value => '"CLIENT-PUT"') },
	{ name => 'value is the JSON null', reason => [qr/object|null/],
	  record => envelope(key => '{"id":110}', value => 'null') },
	# event types
	{ name => 'unknown event type', absent => [111], reason => [qr/unknown event type "CLIENT-UPSERT"/],
	  record => envelope(event => 'CLIENT-UPSERT', row => { id => 111, name => 'x' }) },
	{ name => "another table's event type", absent => [112], reason => [qr/unknown event type "ORDER-PUT"/],
	  record => envelope(event => 'ORDER-PUT', row => { id => 112, name => 'x' }) },
	{ name => 'event type missing', absent => [113], reason => [qr/"event"/],
	  record => envelope(event => undef, row => { id => 113, name => 'x' }) },
	{ name => 'event type not a string', absent => [114], reason => [qr/"event"/],
	  record => envelope(event => 42, row => { id => 114, name => 'x' }) },
	{ name => 'a good PUT after event errors', good => 1, record => envelope(row => { id => 3, name => 'Cy' }) },
	# keys
	{ name => 'PUT with a null key', absent => [116], reason => [qr/key/],
	  record => envelope(key => undef, row => { id => 116, name => 'x' }) },
	{ name => 'key not JSON', absent => [117], reason => [qr/key/],
	  record => envelope(key => 'id=117', row => { id => 117, name => 'x' }) },
	{ name => 'key not an object', absent => [118], reason => [qr/key/],
	  record => envelope(key => '118', row => { id => 118, name => 'x' }) },
	{ name => "key does not match the row's key", absent => [ 119, 120 ], reason => [qr/does not match/],
	  record => envelope(key => '{"id":119}', row => { id => 120, name => 'x' }) },
	{ name => 'key column missing from the row', absent => [121], reason => [ qr/key|missing/, qr/\bid\b/ ],
	  record => envelope(key => '{"id":121}', row => { name => 'no id 121' }),
	  check => [ q{SELECT count(*) FROM client WHERE name = 'no id 121'}, '0' ] },
	{ name => 'null key column', reason => [qr/null|key/],
	  record => envelope(key => '{"id":null}', row => { id => undef, name => 'null id 122' }),
	  check => [ q{SELECT count(*) FROM client WHERE name = 'null id 122'}, '0' ] },
	{ name => 'row missing', absent => [123], reason => [qr/row/],
	  record => envelope(key => '{"id":123}') },
	{ name => 'row not an object', absent => [124], reason => [qr/row/],
	  record => envelope(key => '{"id":124}', row => [ 124, 'x' ]) },
	{ name => 'a good PUT after key errors', good => 1, record => envelope(row => { id => 4, name => 'Dee', age => 20, note => 'kept' }) },
	# values the column types refuse
	{ name => 'int column given letters', absent => [125], reason => [qr/"age".*invalid input syntax for type integer: "abc"/],
	  record => envelope(row => { id => 125, name => 'x', age => 'abc' }) },
	{ name => 'int column out of range', absent => [126], reason => [qr/out of range/],
	  record => envelope(row => { id => 126, name => 'x', age => 99999999999 }) },
	{ name => 'int column given an object', absent => [127], reason => [qr/invalid input syntax for type integer/],
	  record => envelope(row => { id => 127, name => 'x', age => { a => 1 } }) },
	{ name => 'date out of range', absent => [128], reason => [qr/date\/time field value out of range|invalid/],
	  record => envelope(row => { id => 128, name => 'x', born => '2024-02-30' }) },
	{ name => 'date not a date', absent => [129], reason => [qr/invalid input syntax for type date/],
	  record => envelope(row => { id => 129, name => 'x', born => 'soon' }) },
	{ name => 'bad uuid', absent => [130], reason => [qr/invalid input syntax for type uuid/],
	  record => envelope(row => { id => 130, name => 'x', uid => 'not-a-uuid' }) },
	{ name => 'bad numeric', absent => [131], reason => [qr/invalid input syntax for type numeric/],
	  record => envelope(row => { id => 131, name => 'x', balance => '12abc' }) },
	{ name => 'numeric overflow', absent => [132], reason => [qr/numeric field overflow/],
	  record => envelope(row => { id => 132, name => 'x', balance => '123456789012.5' }) },
	{ name => 'bad boolean', absent => [133], reason => [qr/invalid input syntax for type boolean/],
	  record => envelope(row => { id => 133, name => 'x', active => 'maybe' }) },
	{ name => 'malformed array literal', absent => [134], reason => [qr/malformed array literal/],
	  record => envelope(row => { id => 134, name => 'x', tags => '{a,b' }) },
	{ name => 'ragged JSON array', absent => [135], reason => [qr/array/],
	  record => envelope(row => { id => 135, name => 'x', tags => [ ['a'], 'b' ] }) },
	{ name => 'bad enum value', absent => [136], reason => [qr/invalid input value for enum (\w+\.)?regress_mood: "angry"/],
	  record => envelope(row => { id => 136, name => 'x', mood => 'angry' }) },
	{ name => 'jsonb with \u0000', absent => [137], reason => [qr/\\u0000|unicode|NUL|malformed JSON/i],
	  record => envelope(row => { id => 137, name => 'x', extra => { a => "\x00" } }) },
	{ name => 'a good PUT after type errors', good => 1, record => envelope(row => { id => 5, name => 'Eve' }) },
	# constraints
	{ name => 'NOT NULL column given null', absent => [139], reason => [qr/null value in column "name"/],
	  record => envelope(row => { id => 139, name => undef }) },
	{ name => 'NOT NULL column absent from a new row', absent => [140], reason => [qr/null value in column "name"/],
	  record => envelope(row => { id => 140, age => 1 }) },
	{ name => 'CHECK constraint', absent => [141], reason => [qr/violates check constraint/],
	  record => envelope(row => { id => 141, name => 'x', score => -1 }) },
	{ name => 'unique index on a non-key column', absent => [142], reason => [qr/duplicate key value violates unique constraint/],
	  record => envelope(row => { id => 142, name => 'x', email => 'ada@example.org' }) },
	{ name => 'value too long for varchar(5)', absent => [143], reason => [qr/value too long for type character varying\(5\)/],
	  record => envelope(row => { id => 143, name => 'x', code => 'toolong' }) },
	{ name => 'a trigger refuses the row', absent => [146], reason => [qr/regress_refuse: client 146 is forbidden/],
	  record => envelope(row => { id => 146, name => 'forbidden' }) },
	{ name => 'an update that violates a unique index', reason => [qr/duplicate key value violates unique constraint/],
	  record => envelope(row => { id => 2, name => 'Bob', email => 'ada@example.org' }),
	  check => [ q{SELECT email FROM client WHERE id = 2}, 'bob@example.org' ] },
	{ name => 'update of a row whose second column is bad', reason => [qr/invalid input syntax for type integer/],
	  record => envelope(row => { id => 2, name => 'changed', age => 'abc' }),
	  check => [ q{SELECT name || ' ' || age FROM client WHERE id = 2}, 'Bob 41' ] },
	{ name => 'unchanged columns of a row missing here', absent => [145],
	  reason => [qr/unchanged|missing|not found|no row|does not exist/i],
	  record => envelope(row => { id => 145, name => 'x' }, fields => { unchanged => ['note'] }) },
	# deletes
	{ name => 'DELETE with a null key', reason => [qr/key/],
	  record => envelope(event => 'CLIENT-DELETE', key => undef, row => { id => 1 }),
	  check => [ q{SELECT count(*) FROM client WHERE id = 1}, '1' ] },
	{ name => 'DELETE with a key that is not JSON', reason => [qr/key/],
	  record => envelope(event => 'CLIENT-DELETE', key => 'one', row => { id => 1 }),
	  check => [ q{SELECT count(*) FROM client WHERE id = 1}, '1' ] },
	{ name => 'DELETE with a key of the wrong type', reason => [qr/invalid input syntax for type integer/],
	  record => envelope(event => 'CLIENT-DELETE', key => '{"id":"abc"}', row => { id => 'abc' }),
	  check => [ q{SELECT count(*) FROM client WHERE id IN (1, 2, 4, 5)}, '4' ] },
	# good records after all that
	{ name => 'a good DELETE', good => 1, record => envelope(event => 'CLIENT-DELETE', row => { id => 3 }) },
	{ name => 'its tombstone', good => 1, record => { %{ envelope(event => 'CLIENT-DELETE', row => { id => 3 }) }, value => undef } },
	{ name => 'a good PUT of some columns only', good => 1, record => envelope(row => { id => 4, name => 'Dee renamed' }) },
	{ name => 'a good PUT with a field that is no column', good => 1, record => envelope(row => { id => 8, name => 'Hal', nickname => 'h' }) },
	{ name => "this instance's own event", good => 1, record => envelope(origin => 'dl', row => { id => 10, name => 'echo' }) },
	{ name => 'the last good PUT', good => 1, record => envelope(row => { id => 11, name => 'Last' }) },
);

my @flat_cases = (
	{ name => 'flat: a good PUT', good => 1, record => flat('CLIENT-PUT', { id => 1, name => 'one', age => 1 }) },
	{ name => 'flat: unknown event type', absent => [2], reason => [qr/unknown event type "CLIENT-UPSERT"/],
	  record => flat('CLIENT-UPSERT', { id => 2, name => 'x' }) },
	{ name => 'flat: null key', absent => [3], reason => [qr/event|key/],
	  record => flat(undef, { id => 3, name => 'x' }) },
	{ name => 'flat: malformed JSON', reason => [qr/malformed JSON/],
	  record => flat('CLIENT-PUT', '{"id":4,"name":') },
	{ name => 'flat: value is an array', reason => [qr/object/],
	  record => flat('CLIENT-PUT', '[5]') },
	{ name => 'flat: int column given letters', absent => [6], reason => [qr/invalid input syntax for type integer: "old"/],
	  record => flat('CLIENT-PUT', { id => 6, name => 'x', age => 'old' }) },
	{ name => 'flat: PUT without the key column', reason => [ qr/key|missing/, qr/\bid\b/ ],
	  record => flat('CLIENT-PUT', { name => 'no id' }),
	  check => [ q{SELECT count(*) FROM flat_client WHERE name = 'no id'}, '0' ] },
	{ name => 'flat: DELETE without the key column', reason => [ qr/key|missing/, qr/\bid\b/ ],
	  record => flat('CLIENT-DELETE', {}),
	  check => [ q{SELECT count(*) FROM flat_client WHERE id = 1}, '1' ] },
	{ name => 'flat: NOT NULL column absent from a new row', absent => [9], reason => [qr/null value in column "name"/],
	  record => flat('CLIENT-PUT', { id => 9 }) },
	{ name => 'flat: a good PUT between bad ones', good => 1, record => flat('CLIENT-PUT', { id => 10, name => 'ten' }) },
	{ name => 'flat: a good DELETE', good => 1, record => flat('CLIENT-DELETE', { id => 10 }) },
	{ name => 'flat: the last good PUT', good => 1, record => flat('CLIENT-PUT', { id => 11, name => 'eleven', age => 11 }) },
);

# ---- the first good records, then the subscriptions ----

kafka_produce($topic, $envelope_cases[0]{record});
kafka_produce($flat_topic, $flat_cases[0]{record});
ok(kb_wait_slot($node), 'slot created');
$node->safe_psql('postgres', qq{
	SELECT kafka_bridge.subscribe('client', topic => '$topic');
	SELECT kafka_bridge.subscribe('flat_client', topic => '$flat_topic', format => 'flat', event_prefix => 'CLIENT');
});
ok($node->poll_query_until('postgres',
		q{SELECT (SELECT count(*) FROM client) = 1 AND (SELECT count(*) FROM flat_client) = 1}),
	'the first good records are applied');
my $pid = kb_applier($node)->{pid};
ok($pid > 0, "the applier runs (pid $pid)");

# ---- the rest, then wait until the applier has consumed everything ----

kafka_produce($topic, map { $_->{record} } @envelope_cases[ 1 .. $#envelope_cases ]);
kafka_produce($flat_topic, map { $_->{record} } @flat_cases[ 1 .. $#flat_cases ]);
my %cases = ($topic => \@envelope_cases, $flat_topic => \@flat_cases);
my %table = ($topic => 'client', $flat_topic => 'flat_client');
for my $t ($topic, $flat_topic)
{
	my $n = scalar(@{ $cases{$t} });
	is(scalar(kafka_records($t)), $n, "$t holds the $n records of the corpus, offsets 0 to " . ($n - 1));
	ok($node->poll_query_until('postgres', qq{
			SELECT next_offset = $n AND lag = 0 FROM kafka_bridge.subscription_status
			WHERE topic = '$t' AND partition = 0}),
		"$t: the applier consumed every record");
}

# ---- every bad record is a dead letter, with what it was and why ----

for my $t ($topic, $flat_topic)
{
	my $offset = -1;
	for my $case (@{ $cases{$t} })
	{
		$offset++;
		my $r = $case->{record};
		my $name = "$case->{name} (offset $offset)";
		my $where = qq{topic = '$t' AND "offset" = $offset};
		if ($case->{good})
		{
			is($node->safe_psql('postgres', "SELECT count(*) FROM kafka_bridge.dead_letters WHERE $where"),
				'0', "$name: no dead letter");
			next;
		}
		my $hex = sub { defined $_[0] ? unpack('H*', $_[0]) : 'null' };
		is($node->safe_psql('postgres', qq{
				SELECT format('%s %s %s %s %s', count(*), min(table_name::text), min(partition),
					coalesce(min(encode(key, 'hex')), 'null'), coalesce(min(encode(value, 'hex')), 'null'))
				FROM kafka_bridge.dead_letters WHERE $where}),
			join(' ', 1, $table{$t}, 0, $hex->($r->{key}), $hex->($r->{value})),
			"$name: one dead letter with the table, partition, raw key and value");
		my $reason = $node->safe_psql('postgres',
			"SELECT string_agg(reason, ' / ') FROM kafka_bridge.dead_letters WHERE $where");
		my $reason_ok = !!$reason;
		$reason_ok &&= $reason =~ $_ for @{ $case->{reason} };
		ok($reason_ok, "$name: the reason says what is wrong") or diag("reason: $reason");
		if (my %h = @{ $r->{headers} // [] })
		{
			is($node->safe_psql('postgres', "SELECT headers::text FROM kafka_bridge.dead_letters WHERE $where")
				  =~ /\Q$h{origin}\E/ ? 1 : 0,
				1, "$name: the headers are kept");
		}
		for my $id (@{ $case->{absent} // [] })
		{
			is($node->safe_psql('postgres', "SELECT count(*) FROM $table{$t} WHERE id = $id"),
				'0', "$name: row $id was not applied");
		}
		if ($case->{check})
		{
			is($node->safe_psql('postgres', $case->{check}[0]), $case->{check}[1],
				"$name: nothing of it reached the table");
		}
	}
}

my $bad = grep { !$_->{good} } @envelope_cases, @flat_cases;
is($node->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.dead_letters'), $bad,
	"$bad dead letters in all: the bad records and nothing else");
is($node->safe_psql('postgres', qq{
		SELECT count(*) FROM kafka_bridge.dead_letters
		WHERE topic IS NULL OR partition IS NULL OR "offset" IS NULL OR reason IS NULL OR failed_at IS NULL}),
	'0', 'every dead letter has its topic, partition, offset, reason and time');
for my $t ($topic, $flat_topic)
{
	my $n = grep { !$_->{good} } @{ $cases{$t} };
	is($node->safe_psql('postgres',
			"SELECT dead_letters FROM kafka_bridge.subscription_status WHERE topic = '$t' AND partition = 0"),
		$n, "$t: subscription_status counts $n dead letters");
}

# ---- the good records are applied ----

is($node->safe_psql('postgres', q{
		SELECT concat_ws('|', name, age, born, uid, balance, active, tags, mood, extra, code, email, score, note)
		FROM client WHERE id = 1}),
	'Ada|36|1815-12-10|a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11|1250.50|t|{vip,early}|happy|{"k": [1, 2]}|abc|ada@example.org|5|first',
	'the first good PUT: every column as sent');
is($node->safe_psql('postgres', q{SELECT string_agg(id || ' ' || name, ', ' ORDER BY id) FROM client}),
	'1 Ada, 2 Bob, 4 Dee renamed, 5 Eve, 8 Hal, 11 Last',
	'the good records between and after the bad ones are applied (3 deleted, 10 was our own)');
is($node->safe_psql('postgres', q{SELECT age || ' ' || note FROM client WHERE id = 4}), '20 kept',
	'a PUT of some columns keeps the others');
is($node->safe_psql('postgres', q{SELECT string_agg(id || ' ' || name || ' ' || coalesce(age::text, '-'), ', ' ORDER BY id) FROM flat_client}),
	'1 one 1, 11 eleven 11', 'flat: the good records are applied (10 put, then deleted)');

is(kb_applier($node)->{pid}, $pid, 'the applier never stopped: same pid');

# ---- bursts: good and bad records consumed together ----

# 1000 records without headers, every tenth bad, all in the topic before
# the subscription, so the applier gets them in large batches
my @burst;
for my $i (1 .. 1000)
{
	my $n = $i % 10 == 0 ? '"ten"' : $i;
	push @burst, { key => qq({"id":$i}), value => qq({"event":"BURST-PUT","row":{"id":$i,"n":$n}}) };
}
kafka_produce('regress_dl_burst', @burst);

# 300 records with the publisher's headers: transactions of 10 records
# sharing a commit LSN, numbered 1 to 10; the fifth of every third one bad
my @burst_h;
my @burst_h_bad;
for my $tx (0 .. 29)
{
	my $lsn_text = sprintf('0/%X', 0x5000000 + $tx * 0x1000);
	for my $seq (1 .. 10)
	{
		my $id = $tx * 10 + $seq;
		my $bad = $tx % 3 == 0 && $seq == 5;
		push @burst_h_bad, $tx * 10 + $seq - 1 if $bad;
		push @burst_h, {
			key => qq({"id":$id}),
			value => qq({"event":"BURST-PUT","origin":"regress_src","lsn":"$lsn_text","row":{"id":$id,"n":)
			  . ($bad ? '"x"' : $id) . '}}',
			headers => [ event => 'BURST-PUT', origin => 'regress_src', lsn => $lsn_text, seq => $seq ]
		};
	}
}
kafka_produce('regress_dl_burst_h', @burst_h);

$node->safe_psql('postgres', q{
	SELECT kafka_bridge.subscribe('regress_burst', topic => 'regress_dl_burst', event_prefix => 'BURST');
	SELECT kafka_bridge.subscribe('regress_burst_h', topic => 'regress_dl_burst_h', event_prefix => 'BURST');
});
ok($node->poll_query_until('postgres', q{
		SELECT count(*) = 2 FROM kafka_bridge.subscription_status
		WHERE topic IN ('regress_dl_burst', 'regress_dl_burst_h') AND lag = 0
		  AND next_offset = CASE topic WHEN 'regress_dl_burst' THEN 1000 ELSE 300 END}),
	'the bursts are consumed');
is($node->safe_psql('postgres', q{
		SELECT count(*) || ' ' || count(*) FILTER (WHERE id % 10 = 0) || ' ' || count(*) FILTER (WHERE n <> id)
		FROM regress_burst}),
	'900 0 0', 'burst without headers: the 900 good records are applied, the bad ones not');
is($node->safe_psql('postgres', q{
		SELECT string_agg("offset"::text, ',' ORDER BY "offset") FROM kafka_bridge.dead_letters
		WHERE topic = 'regress_dl_burst' AND reason ~ 'invalid input syntax for type integer'}),
	join(',', map { $_ * 10 - 1 } 1 .. 100), 'and each bad one is a dead letter at its offset');
is($node->safe_psql('postgres', 'SELECT count(*) FROM regress_burst_h'), 300 - scalar(@burst_h_bad),
	'burst with headers: every good record is applied, although its transaction had a bad one');
is($node->safe_psql('postgres', q{
		SELECT string_agg("offset"::text, ',' ORDER BY "offset") FROM kafka_bridge.dead_letters
		WHERE topic = 'regress_dl_burst_h' AND reason ~ 'invalid input syntax for type integer'}),
	join(',', @burst_h_bad), 'and each bad one is a dead letter at its offset');

# ---- an apply_role without the rights ----

kafka_produce('regress_dl_guarded', { key => '{"id":1}', value => '{"event":"GUARDED-PUT","row":{"id":1,"v":"a"}}' });
$node->safe_psql('postgres', q{
	SELECT kafka_bridge.subscribe('regress_guarded', topic => 'regress_dl_guarded', event_prefix => 'GUARDED',
		apply_role => 'regress_reader');
});
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 1 FROM kafka_bridge.dead_letters WHERE topic = 'regress_dl_guarded'}),
	'apply_role without INSERT: the record is a dead letter');
like($node->safe_psql('postgres', q{SELECT reason FROM kafka_bridge.dead_letters WHERE topic = 'regress_dl_guarded'}),
	qr/permission denied/, 'which says permission denied');
is($node->safe_psql('postgres', 'SELECT count(*) FROM regress_guarded'), '0', 'and the row is not there');
$node->safe_psql('postgres', 'GRANT INSERT, UPDATE, DELETE ON regress_guarded TO regress_reader');
kafka_produce('regress_dl_guarded', { key => '{"id":2}', value => '{"event":"GUARDED-PUT","row":{"id":2,"v":"b"}}' });
ok($node->poll_query_until('postgres', 'SELECT count(*) = 1 FROM regress_guarded WHERE id = 2'),
	'once granted the rights, the next record is applied');

# ---- after a restart, nothing is dead-lettered or applied again ----

my $dead = $node->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.dead_letters');
$node->restart;
kafka_produce($topic, envelope(row => { id => 12, name => 'After restart' }));
ok($node->poll_query_until('postgres', 'SELECT count(*) = 1 FROM client WHERE id = 12'),
	'after a restart the applier resumes with the next record');
is($node->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.dead_letters'), $dead,
	'and writes no dead letter twice');
is($node->safe_psql('postgres', q{SELECT string_agg(id::text, ',' ORDER BY id) FROM client}),
	'1,2,4,5,8,11,12', 'and applies nothing again');

# ---- records deleted before they were applied ----
# While the server is stopped, ids 3 to 12 go to offsets 2 to 11 and the
# records below offset 7 are deleted, as retention would: the applier goes
# on from offset 7 and says what it could not apply (compaction's gaps,
# where later records with the same keys follow, say nothing).
$node->stop;
kafka_produce('regress_dl_guarded',
	map { { key => qq({"id":$_}), value => qq({"event":"GUARDED-PUT","row":{"id":$_,"v":"r"}}) } } 3 .. 12);
kafka_delete_records('regress_dl_guarded', 0, 7);
$node->start;
ok($node->poll_query_until('postgres', 'SELECT count(*) = 1 FROM regress_guarded WHERE id = 12'),
	'records deleted: the applier goes on from the first record left');
is($node->safe_psql('postgres', 'SELECT string_agg(id::text, \',\' ORDER BY id) FROM regress_guarded'),
	'2,8,9,10,11,12', 'ids 3 to 7 are missing');
is($node->safe_psql('postgres', q{SELECT "offset" || ' ' || (key IS NULL AND value IS NULL) || ' ' || reason
		FROM kafka_bridge.dead_letters WHERE topic = 'regress_dl_guarded' AND "offset" > 0}),
	'2 true the records at offsets 2 to 6 were deleted from the topic (by its retention, or on request) before this instance applied them; the changes they carried are missing from the table',
	'a dead letter at the first offset missed says which records were lost');
like(slurp_file($node->logfile),
	qr/5 records of partition 0 of topic "regress_dl_guarded" were deleted before they were applied.*\n.*DETAIL:  Offsets 2 to 6; the partition now starts at offset 7/,
	'and so does the log');

$node->stop;
done_testing();
