# Every type round-trips from one instance to another: A publishes a table
# with a column of each kind (integers, floats with NaN, infinities and
# -0, numerics, text with odd characters, bytea, dates and times with
# infinities and BC dates, intervals, uuid, json and jsonb, arrays with
# nulls, several dimensions, other lower bounds, enums, domains,
# composites, ranges, network and geometric types, bits, money, xml,
# tsvector, oid) and B, subscribed, ends with the same text for every
# value (json and jsonb scalars too: strings, numbers, booleans, and
# strings whose text is itself JSON).  An UPDATE that leaves a TOASTed
# value alone keeps B's copy of it; a DELETE deletes.  A composite key and
# a partitioned table also sync, with rows changing key or partition.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $topic = 'regress_types';
my $schema = q{
	CREATE TYPE regress_mood AS ENUM ('happy', 'sad', 'ok');
	CREATE DOMAIN regress_posint AS int CHECK (VALUE > 0);
	CREATE TYPE regress_pair AS (a int, b text);
	CREATE TABLE regress_types (
		id int PRIMARY KEY,
		i2 smallint, i8 bigint, f4 real, f8 double precision, num numeric, num_s numeric(12,3),
		b boolean, t text, vc varchar(10), ch char(5), by bytea,
		d date, ts timestamp, tstz timestamptz, tm time, tmtz timetz, iv interval,
		u uuid, j json, jb jsonb,
		ia int[], ta text[], ia2 int[], ia0 int[], fa float8[],
		mood regress_mood, pos regress_posint, pair regress_pair, r int4range, tsr tstzrange,
		ip inet, net cidr, mac macaddr, pt point, bits bit(4), vb varbit, m money, x xml,
		tsv tsvector, o oid,
		big text);
	ALTER TABLE regress_types ALTER COLUMN big SET STORAGE EXTERNAL;
	CREATE TABLE regress_composite (tenant text, id int, v text, PRIMARY KEY (tenant, id));
	CREATE TABLE regress_parted (region text, id int, v text, PRIMARY KEY (region, id)) PARTITION BY LIST (region);
	CREATE TABLE regress_parted_eu PARTITION OF regress_parted FOR VALUES IN ('eu');
	CREATE TABLE regress_parted_us PARTITION OF regress_parted FOR VALUES IN ('us');
};
my @columns = qw(i2 i8 f4 f8 num num_s b t vc ch by d ts tstz tm tmtz iv u j jb ia ta ia2 ia0 fa
  mood pos pair r tsr ip net mac pt bits vb m x tsv o big);

my $node_a = kb_node('A', conf => "track_commit_timestamp = on\n");
my $node_b = kb_node('B', conf => "track_commit_timestamp = on\n");
for my $node ($node_a, $node_b)
{
	$node->start;
	$node->safe_psql('postgres', "CREATE EXTENSION kafka_bridge; $schema");
}
ok(kb_wait_slot($node_a), 'A: slot created');
$node_a->safe_psql('postgres', "SELECT kafka_bridge.publish('regress_types', topic => '$topic')");
$node_b->safe_psql('postgres', "SELECT kafka_bridge.subscribe('regress_types', topic => '$topic')");
for my $table (qw(regress_composite regress_parted))
{
	$node_a->safe_psql('postgres', "SELECT kafka_bridge.publish('$table')");
	$node_b->safe_psql('postgres', "SELECT kafka_bridge.subscribe('$table')");
}

$node_a->safe_psql('postgres', q{
	INSERT INTO regress_types (id, i2, i8, f4, f8, num, num_s, b, t, vc, ch, by, d, ts, tstz, tm, tmtz, iv,
		u, j, jb, ia, ta, ia2, ia0, fa, mood, pos, pair, r, tsr, ip, net, mac, pt, bits, vb, m, x, tsv, o)
	VALUES
	(1, 12, 1234567890123, 1.5, 2.25, 3.14159, 42.5, true, 'plain', 'short', 'ab', '\x0102',
	 '2024-02-29', '2024-02-29 13:14:15.123456', '2024-02-29 13:14:15.5+02', '13:14:15', '13:14:15+02',
	 '1 year 2 mons 3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
	 '{"a": 1, "b": [true, null]}', '{"k": [1, {"z": 2}], "e": ""}',
	 '{1,2,3}', '{a,b}', '{{1,2},{3,4}}', '{}', '{1.5,2.5}', 'happy', 7, '(1,"x y")', '[1,5)',
	 '[2024-01-01 00:00:00+00,2024-02-01 00:00:00+00)', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
	 '(1.5,-2)', B'1010', B'101', 12.34, '<a b="1">t</a>', 'a:1 b:2', 4294967295),
	(2, -32768, -9223372036854775808, 'NaN', 'Infinity', 'NaN', -999999999.999, false,
	 E'quote '' dq " backslash \\\\ tab \t newline \n cr \r unicode é ☃ 😀 \u2028', 'ten chars!', 'abcde',
	 '\x00ff7f80', 'infinity', '-infinity', 'infinity', '24:00:00', '00:00:00.000001-03:30',
	 '-1 year -2 mons +3 days -04:05:06', '00000000-0000-0000-0000-000000000000',
	 '{"spaces" :  [1,2] , "unicode": "\u00e9"}', '{"num": 1.50, "big": 123456789012345678901234567890}',
	 '{1,NULL,3}', '{"a b","c,d","\"q\"",NULL,"NULL",""}', '{{{1}},{{2}}}', '[0:1]={5,6}',
	 '{NaN,Infinity,-Infinity,-0}', 'sad', 1, '(,)', 'empty', '(,)', '::1', '2001:db8::/32',
	 'ff:ff:ff:ff:ff:ff', '(0,0)', B'0000', B'', -0.01, '<empty/>', '', 0),
	(3, NULL, NULL, '-Infinity', '-0', '-0.000000000000000000000000000001', 0, NULL, '', '', '',
	 '', '0044-03-15 BC', '4713-01-01 00:00:00 BC', '1999-12-31 23:59:59.999999-12', '00:00', '23:59:59.999999+14:59',
	 '0', NULL, '[]', '[]', '{}', '{}', NULL, '[-2:-1]={1,2}', '{}', 'ok', 2147483647, '(,"")',
	 '(,)', '[,)', '0.0.0.0', '0.0.0.0/0', '00:00:00:00:00:00', '(-1e-300,1e300)', B'1111', B'1',
	 0, NULL, 'x', NULL),
	(4, 1, 1, 1e-38, 1e-300, 1e100, 0.001, true, repeat('x', 100), 'x', 'x', NULL, '2000-01-01',
	 '2000-01-01', '2000-01-01 00:00:00+00', '12:00', '12:00+00', '1 mon -1 day', NULL,
	 '"a json string"', '"a jsonb string"', NULL, NULL, NULL, NULL, '{0.1,1e-300}', NULL, NULL, NULL,
	 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
	(5, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
	 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
	 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
	-- json scalars: a jsonb string alone, numbers and booleans
	INSERT INTO regress_types (id, jb) VALUES (6, '"a jsonb string alone"');
	INSERT INTO regress_types (id, j, jb) VALUES (7, '42', 'true');
	-- json strings whose text is itself JSON
	INSERT INTO regress_types (id, j, jb) VALUES (8, '"123"', '"[1, 2]"');
	-- a value stored out of line, uncompressed
	UPDATE regress_types SET big = (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 1000) g) WHERE id = 1;
});

# Compare every column of every row on A and B; returns the differences.
sub differences
{
	my @diff;
	my %ids_a = map { $_ => 1 } split /\n/, $node_a->safe_psql('postgres', 'SELECT id FROM regress_types');
	my %ids_b = map { $_ => 1 } split /\n/, $node_b->safe_psql('postgres', 'SELECT id FROM regress_types');
	push @diff, map { "row $_ missing on B" } grep { !$ids_b{$_} } sort keys %ids_a;
	push @diff, map { "row $_ on B only" } grep { !$ids_a{$_} } sort keys %ids_b;
	my $both = join(',', grep { $ids_b{$_} } sort keys %ids_a) || 'NULL';
	for my $column (@columns)
	{
		my $query = "SELECT id, $column FROM regress_types WHERE id IN ($both) ORDER BY id";
		my %a_rows = map { (split /\|/, $_, 2)[0] => $_ } split /\n/, $node_a->safe_psql('postgres', $query);
		my %b_rows = map { (split /\|/, $_, 2)[0] => $_ } split /\n/, $node_b->safe_psql('postgres', $query);
		for my $id (sort keys %a_rows)
		{
			my ($x, $y) = ($a_rows{$id}, $b_rows{$id} // '');
			next if $x eq $y;
			$_ = length($_) > 120 ? substr($_, 0, 120) . '...' : $_ for ($x, $y);
			push @diff, "$column: A $x, B $y";
		}
	}
	return @diff;
}

# Wait until B has consumed everything A published so far.
sub caught_up
{
	my $lsn = $node_a->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
	$node_a->poll_query_until('postgres', qq{
		SELECT confirmed_flush_lsn >= '$lsn' FROM pg_replication_slots
		WHERE slot_name = 'kafka_bridge_' || (SELECT oid FROM pg_database WHERE datname = current_database())})
	  or return 0;
	my $n = scalar(kafka_records($topic));
	return $node_b->poll_query_until('postgres', qq{
		SELECT next_offset = $n AND lag = 0 FROM kafka_bridge.subscription_status WHERE topic = '$topic'});
}

ok(caught_up(), 'B consumed the inserts');
is($node_b->safe_psql('postgres', 'SELECT string_agg(id::text, \',\' ORDER BY id) FROM regress_types'),
	'1,2,3,4,5,6,7,8', 'B: the 8 rows are there');
my @diff = differences();
is(scalar(@diff), 0, 'every value of every type is the same on B as on A') or diag(join("\n", @diff));
is(kb_md5($node_b, 'regress_types'), kb_md5($node_a, 'regress_types'), 'same md5 of the rows');

# an UPDATE that leaves the TOASTed column alone
$node_a->safe_psql('postgres', "UPDATE regress_types SET t = 'changed' WHERE id = 1");
ok(caught_up(), 'B consumed the update');
is($node_b->safe_psql('postgres', 'SELECT t FROM regress_types WHERE id = 1'), 'changed', 'B: the update is applied');
is($node_b->safe_psql('postgres', 'SELECT length(big) FROM regress_types WHERE id = 1'), '32000',
	'B keeps its copy of the TOASTed value the update did not carry');
@diff = differences();
is(scalar(@diff), 0, 'A and B still hold the same values') or diag(join("\n", @diff));

# an UPDATE of every row, then a DELETE
$node_a->safe_psql('postgres', q{
	UPDATE regress_types SET i2 = coalesce(i2, 0) + 1, big = big || 'y' WHERE id <= 5;
	DELETE FROM regress_types WHERE id = 5;
});
ok(caught_up(), 'B consumed the updates and the delete');
is($node_b->safe_psql('postgres', 'SELECT count(*) FROM regress_types WHERE id = 5'), '0', 'B: row 5 is deleted');
@diff = differences();
is(scalar(@diff), 0, 'A and B hold the same values after the updates') or diag(join("\n", @diff));
is($node_b->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.dead_letters'), '0', 'no dead letters')
  or diag($node_b->safe_psql('postgres', 'SELECT "offset" || \': \' || reason FROM kafka_bridge.dead_letters'));

# ---- a composite key, a partitioned table, rows changing key or partition ----

$node_a->safe_psql('postgres', q{
	INSERT INTO regress_composite SELECT t, g, t || g FROM unnest(ARRAY['acme', 'O''Hara', 'a,b']) t, generate_series(1, 50) g;
	UPDATE regress_composite SET v = v || ' updated' WHERE id % 3 = 0;
	UPDATE regress_composite SET id = id + 100 WHERE id % 5 = 0;
	UPDATE regress_composite SET tenant = 'moved' WHERE tenant = 'a,b' AND id < 10;
	DELETE FROM regress_composite WHERE id % 7 = 0;
	INSERT INTO regress_parted SELECT CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g, 'v' || g FROM generate_series(1, 100) g;
	UPDATE regress_parted SET region = 'us' WHERE region = 'eu' AND id % 4 = 0;
	UPDATE regress_parted SET v = 'changed' WHERE id % 3 = 0;
	DELETE FROM regress_parted WHERE id % 10 = 1;
});
for my $table (qw(regress_composite regress_parted))
{
	ok($node_b->poll_query_until('postgres',
			"SELECT count(*) = " . $node_a->safe_psql('postgres', "SELECT count(*) FROM $table") . " FROM $table"),
		"B: $table has as many rows as A");
}
# the rows are the same, and in the same partitions
ok($node_b->poll_query_until('postgres', "SELECT md5(string_agg(x::text, ',' ORDER BY tenant, id)) = '"
			. $node_a->safe_psql('postgres', "SELECT md5(string_agg(x::text, ',' ORDER BY tenant, id)) FROM regress_composite x")
			. "' FROM regress_composite x"),
	'B: regress_composite holds the rows of A (keys changed, deleted, with quotes and commas)');
ok($node_b->poll_query_until('postgres', "SELECT md5(string_agg(tableoid::regclass || ' ' || x::text, ',' ORDER BY region, id)) = '"
			. $node_a->safe_psql('postgres', "SELECT md5(string_agg(tableoid::regclass || ' ' || x::text, ',' ORDER BY region, id)) FROM regress_parted x")
			. "' FROM regress_parted x"),
	'B: regress_parted holds the rows of A, each in the same partition');

$node_b->stop;
$node_a->stop;
done_testing();
