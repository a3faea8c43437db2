# Publishing row changes to the real broker: insert, update, delete and
# truncate produce exactly the expected records, in order, with the
# documented keys, headers and values; rolled-back transactions and
# unpublished tables produce nothing; the flat format works for a consumer
# written like the seed's; the slot keeps advancing on an idle database.
use strict;
use warnings;
use utf8;

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $json = JSON::PP->new->canonical;
my $node = kb_node('pub');
$node->start;
$node->safe_psql('postgres', q{
	CREATE EXTENSION kafka_bridge;
	CREATE TABLE client (id int PRIMARY KEY, name text, email text);
	CREATE TABLE flat_client (id int PRIMARY KEY, name text);
	CREATE TABLE unpublished (id int PRIMARY KEY);
});
ok(kb_wait_slot($node), 'the worker created its replication slot');
$node->safe_psql('postgres', q{
	SELECT kafka_bridge.publish('client', topic => 'regress_pub_client');
	SELECT kafka_bridge.publish('flat_client', topic => 'regress_pub_flat', event_prefix => 'CLIENT', format => 'flat');
});

$node->safe_psql('postgres', q{
	INSERT INTO client VALUES (1, 'Ada', 'ada@example.org'), (2, 'Bob', NULL), (3, 'Cé "quoted"', 'c@example.org');
	UPDATE client SET name = 'Bobby' WHERE id = 2;
	BEGIN; INSERT INTO client VALUES (99, 'ghost', NULL); ROLLBACK;
	INSERT INTO unpublished VALUES (1);
	DELETE FROM client WHERE id = 1;
	TRUNCATE client;
});

my @r = kafka_wait_records('regress_pub_client', 7);
is(scalar(@r), 7, 'seven records: 3 inserts, 1 update, 1 delete, its tombstone, 1 truncate');
my @events = map { $_->{headers}{event} // '(none)' } @r;
is_deeply(\@events,
	[qw(CLIENT-PUT CLIENT-PUT CLIENT-PUT CLIENT-PUT CLIENT-DELETE CLIENT-DELETE CLIENT-TRUNCATE)],
	'event headers in commit order');

my @values = map { defined $_->{value} ? decode_json($_->{value}) : undef } @r;
is($r[0]{key}, '{"id":1}', 'the key is the primary key as canonical JSON');
is($values[0]{event}, 'CLIENT-PUT', 'envelope names the event');
is($values[0]{table}, 'public.client', 'envelope names the table');
is($values[0]{origin}, 'pub', 'envelope carries the instance id');
is($json->encode($values[0]{row}), '{"email":"ada@example.org","id":1,"name":"Ada"}', 'the row as JSON');
is($values[2]{row}{name}, 'Cé "quoted"', 'unicode and quotes survive');
ok(!defined $values[1]{row}{email} && exists $values[1]{row}{email}, 'NULL is null');
is($values[3]{row}{name}, 'Bobby', 'an update publishes the new row');
is($r[4]{key}, '{"id":1}', 'the delete is keyed by the deleted row');
is($values[4]{row}{id}, 1, 'the delete carries the key columns');
ok(!defined $r[5]{value} && $r[5]{key} eq '{"id":1}', 'a tombstone follows the delete');
is($r[0]{headers}{origin}, 'pub', 'origin header');
like($r[0]{headers}{lsn}, qr{^[0-9A-F]+/[0-9A-F]+$}, 'lsn header');
ok(!(grep { defined $_->{value} && $_->{value} =~ /ghost/ } @r), 'a rolled-back transaction publishes nothing');
is(scalar(kafka_records('unpublished')), 0, 'an unpublished table publishes nothing');

# the flat format, read the way the seed's Java consumer reads it
$node->safe_psql('postgres', q{
	INSERT INTO flat_client VALUES (1, 'Ada'), (2, 'Bob');
	DELETE FROM flat_client WHERE id = 1;
});
my @flat = kafka_wait_records('regress_pub_flat', 3);
my %clients;
for my $rec (@flat)
{
	my $client = decode_json($rec->{value});
	if ($rec->{key} eq 'CLIENT-PUT') { $clients{ $client->{id} } = $client; }
	elsif ($rec->{key} eq 'CLIENT-DELETE') { delete $clients{ $client->{id} }; }
	else { fail("unexpected key $rec->{key}"); }
}
is_deeply(\%clients, { 2 => { id => 2, name => 'Bob' } },
	'a consumer switching on CLIENT-PUT / CLIENT-DELETE rebuilds the table');

# counters and an idle database that does not retain WAL
ok($node->poll_query_until('postgres',
		"SELECT events_published >= 10 FROM kafka_bridge.status WHERE worker = 'publisher'"),
	'status counts the published events');
$node->safe_psql('postgres', 'INSERT INTO unpublished SELECT generate_series(2, 1000)');
my $lsn = $node->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
ok($node->poll_query_until('postgres',
		"SELECT confirmed_flush_lsn >= '$lsn' FROM pg_replication_slots WHERE slot_name LIKE 'kafka_bridge_%'"),
	'the slot advances past changes that publish nothing');
ok($node->poll_query_until('postgres',
		"SELECT publish_lag_bytes < 1000000 FROM kafka_bridge.status WHERE worker = 'publisher'"),
	'publish lag goes back down');

$node->stop;
done_testing();
