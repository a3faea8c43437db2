# The seed application's records apply unchanged: a producer written like
# the seed's Java code (record key CLIENT-PUT or CLIENT-DELETE, value the
# client as JSON, no headers), played here by kcat, feeds a table
# subscribed in the flat format.  The clients it puts appear with every
# field (a camelCase field into a quoted column, JSON nulls as NULL, fields
# that are no column ignored); puts of known clients update them; the
# clients it deletes, whether the value is the whole client or its id only,
# disappear.  Then kafka_bridge itself is the producer: an instance that
# publishes a table in the flat format feeds another's flat subscription,
# TRUNCATE included.
use strict;
use warnings;
use utf8;

use Encode qw(encode_utf8);
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $topic = 'regress_seed_clients';
my $json = JSON::PP->new->canonical->utf8;

my $node = kb_node('seed', conf => "track_commit_timestamp = on\n");
$node->start;
$node->safe_psql('postgres', q{
	CREATE EXTENSION kafka_bridge;
	CREATE TABLE client (
		id bigint PRIMARY KEY,
		nom text NOT NULL,
		prenom text,
		email text,
		telephone text,
		"dateNaissance" date);
});
$node->safe_psql('postgres', "SELECT kafka_bridge.subscribe('client', topic => '$topic', format => 'flat')");
is($node->safe_psql('postgres',
		"SELECT format || ' ' || event_prefix FROM kafka_bridge.subscribed_tables WHERE table_name = 'client'::regclass"),
	'flat CLIENT', 'a flat subscription, events CLIENT-* by default');

# ---- the seed's clients ----

srand(33033);
my @noms = ('Dupont', 'Martin', 'Lefèvre', "N'Diaye", 'Müller', 'Ōno');
my @prenoms = ('Jean', 'Zoé', 'Théo', 'Anaïs', undef);
my %clients;    # what the table must hold: id => client

sub random_client
{
	my ($id) = @_;
	return {
		id => $id,
		nom => $noms[ int(rand(@noms)) ],
		prenom => $prenoms[ int(rand(@prenoms)) ],
		email => "client$id\@example.org",
		telephone => rand() < 0.3 ? undef : sprintf('06%08d', int(rand(1e8))),
		dateNaissance => sprintf('%04d-%02d-%02d', 1940 + int(rand(60)), 1 + int(rand(12)), 1 + int(rand(28))),
		version => int(rand(5)),    # a field of the Java object that is no column
	};
}

sub sql_literal
{
	my ($v) = @_;
	return 'NULL' unless defined $v;
	(my $s = $v) =~ s/'/''/g;
	return "'$s'";
}

# how many rows differ between the table and %clients
sub differences
{
	my $values = join(",\n",
		map {
			my $c = $clients{$_};
			'(' . join(', ', $c->{id}, map { sql_literal($c->{$_}) } qw(nom prenom email telephone dateNaissance)) . ')'
		} sort { $a <=> $b } keys %clients);
	$values = "(0, 'none', NULL, NULL, NULL, NULL)" if !%clients;
	# psql gets bytes: the strings go as UTF-8, as kcat sent them
	return $node->safe_psql('postgres', encode_utf8(qq{
		CREATE TEMP TABLE expected (LIKE client);
		INSERT INTO expected VALUES $values;
		DELETE FROM expected WHERE id = 0;
		SELECT count(*) FROM ((TABLE client EXCEPT TABLE expected) UNION ALL (TABLE expected EXCEPT TABLE client)) d;
	}));
}

my $sent = 0;

sub send_records
{
	my (@records) = @_;
	kafka_produce($topic, map { +{ key => $_->[0], value => $json->encode($_->[1]) } } @records);
	$sent += @records;
	return;
}

# ---- 1. the producer puts 500 clients ----

my @puts;
for my $id (1 .. 500)
{
	my $c = random_client($id);
	push @puts, [ 'CLIENT-PUT', $c ];
	$clients{$id} = { %$c };
}
send_records(@puts);
ok($node->poll_query_until('postgres', "SELECT count(*) = 500 FROM client"), 'the 500 clients put appear');
is(differences(), '0', 'with every field as sent');
is($node->safe_psql('postgres', q{SELECT "dateNaissance" FROM client WHERE id = 1}), $clients{1}{dateNaissance},
	'the camelCase field fills the quoted column');
is($node->safe_psql('postgres', 'SELECT count(*) FROM client WHERE telephone IS NULL'),
	scalar(grep { !defined $_->{telephone} } values %clients), 'JSON nulls are NULLs');

# ---- 2. it updates 200 clients and deletes 150 ----

my (@changes, %deleted);
for my $id (map { 1 + int(rand(500)) } 1 .. 200)
{
	my $c = random_client($id);
	$c->{email} = "nouveau$id\@example.org";
	push @changes, [ 'CLIENT-PUT', $c ];
	$clients{$id} = { %$c };
}
my @ids = sort { $a <=> $b } keys %clients;
for my $i (0 .. 149)
{
	my $id = splice(@ids, int(rand(@ids)), 1);
	# the seed sends the whole client; a leaner producer only its id
	push @changes, [ 'CLIENT-DELETE', $i % 2 ? +{ %{ $clients{$id} } } : +{ id => $id } ];
	delete $clients{$id};
	$deleted{$id} = 1;
}
# a client deleted and put again comes back
my ($back) = sort { $a <=> $b } keys %deleted;
push @changes, [ 'CLIENT-PUT', random_client($back) ];
$clients{$back} = { %{ $changes[-1][1] } };
send_records(@changes);

ok($node->poll_query_until('postgres', qq{
		SELECT next_offset = $sent AND lag = 0 FROM kafka_bridge.subscription_status
		WHERE topic = '$topic' AND partition = 0}),
	"the applier consumed the $sent records");
is($node->safe_psql('postgres', 'SELECT count(*) FROM client'), scalar(keys %clients),
	'CLIENT-DELETE removed the deleted clients (' . (scalar(keys %deleted) - 1) . ' gone, 1 put back)');
is(differences(), '0', 'the table holds exactly the clients the producer left, with their last values');
is($node->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.dead_letters'), '0', 'no dead letters');
is($node->safe_psql('postgres', qq{SELECT applied FROM kafka_bridge.subscription_status WHERE topic = '$topic'}),
	$sent, "subscription_status counts the $sent records applied");

# ---- kafka_bridge's own flat records ----

my $pub = kb_node('pub', conf => "track_commit_timestamp = on
");
$pub->start;
$pub->safe_psql('postgres', q{
	CREATE EXTENSION kafka_bridge;
	CREATE TABLE client (id bigint PRIMARY KEY, nom text NOT NULL, prenom text, email text, telephone text,
		"dateNaissance" date);
});
ok(kb_wait_slot($pub), 'pub: slot created');
$pub->safe_psql('postgres',
	"SELECT kafka_bridge.publish('client', topic => 'regress_seed_from_pg', format => 'flat')");
$node->safe_psql('postgres', q{
	CREATE TABLE client_copy (LIKE client INCLUDING ALL);
	SELECT kafka_bridge.subscribe('client_copy', topic => 'regress_seed_from_pg', format => 'flat',
		event_prefix => 'CLIENT');
});
my $fill = q{
	INSERT INTO client SELECT g, 'Nom ' || g, CASE WHEN g % 3 = 0 THEN NULL ELSE 'Prénom' END,
		'c' || g || '@example.org', NULL, date '1990-01-01' + g FROM generate_series(1, 300) g;
	UPDATE client SET email = 'autre' || id || '@example.org' WHERE id % 4 = 0;
	UPDATE client SET id = id + 1000 WHERE id % 25 = 0;
	DELETE FROM client WHERE id % 9 = 0;
};
$pub->safe_psql('postgres', encode_utf8($fill));
my $pub_md5 = $pub->safe_psql('postgres', q{SELECT md5(string_agg(c::text, ',' ORDER BY id)) FROM client c});
ok($node->poll_query_until('postgres',
		"SELECT md5(string_agg(c::text, ',' ORDER BY id)) = '$pub_md5' FROM client_copy c"),
	'a flat subscription to what kafka_bridge publishes in the flat format holds the same rows');
$pub->safe_psql('postgres', 'TRUNCATE client');
ok($node->poll_query_until('postgres', 'SELECT count(*) = 0 FROM client_copy'),
	'CLIENT-TRUNCATE empties the subscribed table');
$pub->safe_psql('postgres', encode_utf8($fill));
ok($node->poll_query_until('postgres',
		"SELECT md5(string_agg(c::text, ',' ORDER BY id)) = '$pub_md5' FROM client_copy c"),
	'and the rows written after it arrive');

# the publisher sends the TRUNCATE and rows after it again (as after a
# crash, from the slot's confirmed position): all of it is told a replay
# and skipped, the TRUNCATE too, which applied again would empty the table
# of rows whose replays are skipped
my @published = kafka_records('regress_seed_from_pg');
my ($truncate_at) = grep { ($published[$_]{key} // '') eq 'CLIENT-TRUNCATE' } 0 .. $#published;
my @replay = map {
	my $h = $_->{headers};
	+{ key => $_->{key}, value => $_->{value},
	   headers => [ map { $_ => $h->{$_} } sort keys %$h ] }
} @published[$truncate_at .. $truncate_at + 5];
my $skipped_before = $node->safe_psql('postgres',
	"SELECT sum(skipped) FROM kafka_bridge.subscription_status WHERE topic = 'regress_seed_from_pg'");
kafka_produce('regress_seed_from_pg', @replay);
ok($node->poll_query_until('postgres',
		"SELECT sum(skipped) - $skipped_before >= " . (scalar(@replay) - 1)
		  . " FROM kafka_bridge.subscription_status WHERE topic = 'regress_seed_from_pg'"),
	'the replayed records are consumed (' . scalar(@replay) . ', a TRUNCATE first)');
is($node->safe_psql('postgres', "SELECT md5(string_agg(c::text, ',' ORDER BY id)) FROM client_copy c"),
	$pub_md5, 'and skipped as replays: the table still holds the rows written after the TRUNCATE');
is($node->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.dead_letters'), '0', 'no dead letters');

$pub->stop;
$node->stop;
done_testing();
