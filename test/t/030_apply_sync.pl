# Two instances syncing one table through the real broker converge: A and
# B both call kafka_bridge.sync('client'), then write 10k random inserts,
# updates (some changing the key), deletes and rolled-back changes at the
# same time, each on its own range of keys, in transactions of 1 to 20
# statements.  Afterwards both tables hold exactly the rows the writers
# left (same md5, same rows as a model kept by the test), and nothing
# echoed: every record of the topic comes from the instance owning its
# key, each instance published exactly the records of its own writes, none
# twice, and the appliers' counters and status say what they did.
use strict;
use warnings;
use utf8;

use Encode qw(encode_utf8);
use IPC::Run;
use JSON::PP;
use Time::HiRes qw(usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $topic = 'regress_sync_client';
my $ops_per_side = 5000;
my %range = (A => [ 1, 1_000_000 ], B => [ 1_000_001, 2_000_000 ]);

my %node;
for my $name (qw(A B))
{
	my $node = kb_node($name, conf => "track_commit_timestamp = on\n");
	$node->start;
	$node->safe_psql('postgres', q{
		CREATE EXTENSION kafka_bridge;
		CREATE TABLE client (
			id int PRIMARY KEY,
			name text NOT NULL,
			email text,
			balance numeric(12,2),
			tags text[],
			version int NOT NULL DEFAULT 0);
	});
	ok(kb_wait_slot($node), "$name: the publisher created its slot");
	$node->safe_psql('postgres', "SELECT kafka_bridge.sync('client', topic => '$topic')");
	$node{$name} = $node;
}
for my $name (qw(A B))
{
	is($node{$name}->safe_psql('postgres',
			"SELECT topic || ' ' || format FROM kafka_bridge.subscribed_tables WHERE table_name = 'client'::regclass"),
		"$topic envelope", "$name: sync() subscribed the table to its topic");
	ok($node{$name}->poll_query_until('postgres',
			"SELECT state = 'connected' FROM kafka_bridge.status WHERE worker = 'applier'"),
		"$name: the applier is connected");
}

# ---- the workload: a model of each side's rows, and the SQL that makes it ----

srand(30030);

my @words = ('Ada', 'Bob', 'Zoé', "O'Brien", 'Ðurđa', 'back\\slash', 'a "quoted" name', 'Émile', 'x' x 300);

sub sql_literal
{
	my ($v) = @_;
	return 'NULL' unless defined $v;
	(my $s = $v) =~ s/'/''/g;
	return "'$s'";
}

sub sql_tags
{
	my ($tags) = @_;
	return 'NULL' unless defined $tags;
	return 'ARRAY[' . join(',', map { sql_literal($_) } @$tags) . ']::text[]';
}

sub sql_row
{
	my ($id, $r) = @_;
	return join(', ', $id, sql_literal($r->{name}), sql_literal($r->{email}),
		$r->{balance} // 'NULL', sql_tags($r->{tags}), $r->{version});
}

sub random_row
{
	my ($version) = @_;
	return {
		name => $words[ int(rand(@words)) ] . ' ' . int(rand(1000)),
		email => rand() < 0.2 ? undef : 'user' . int(rand(1e6)) . '@example.org',
		balance => rand() < 0.1 ? undef : sprintf('%.2f', rand(2e6) - 1e6),
		tags => rand() < 0.3 ? undef : [ map { $words[ int(rand(@words)) ] } 1 .. int(rand(4)) ],
		version => $version,
	};
}

# Writes $ops_per_side statements for one side; returns its SQL script, its
# committed rows (id => row) and the number of records its commits must
# publish.
sub workload
{
	my ($side) = @_;
	my ($lo, $hi) = @{ $range{$side} };
	my (%rows, @ids, %pos);
	my $next_id = $lo;
	my ($sql, $ops, $records, $rolled_back) = ('', 0, 0, 0);
	my $take = sub {    # pick a committed row not yet used by this transaction
		my ($used) = @_;
		for (1 .. 20)
		{
			my $id = $ids[ int(rand(@ids)) ];
			return $id unless $used->{$id};
		}
		return undef;
	};
	my $add = sub { my ($id) = @_; $pos{$id} = @ids; push @ids, $id; };
	my $remove = sub {
		my ($id) = @_;
		my $i = delete $pos{$id};
		my $last = pop @ids;
		if ($last != $id) { $ids[$i] = $last; $pos{$last} = $i; }
	};

	while ($ops < $ops_per_side)
	{
		my (%used, @changes);
		my $stmts = 1 + int(rand(20));
		my $tx_records = 0;
		$sql .= "BEGIN;\n";
		for (1 .. $stmts)
		{
			last if $ops >= $ops_per_side;
			my $dice = rand();
			my $id = @ids > 100 ? $take->(\%used) : undef;
			if (!defined $id || $dice < 0.40)
			{
				die "key range of $side exhausted" if $next_id > $hi;
				my $new = $next_id++;
				my $row = random_row(0);
				$sql .= "INSERT INTO client VALUES (" . sql_row($new, $row) . ");\n";
				push @changes, [ put => $new, $row ];
				$used{$new} = 1;
				$tx_records += 1;
			}
			elsif ($dice < 0.75)
			{
				my $row = random_row($rows{$id}{version} + 1);
				$sql .= "UPDATE client SET name = " . sql_literal($row->{name})
				  . ", email = " . sql_literal($row->{email})
				  . ", balance = " . ($row->{balance} // 'NULL')
				  . ", tags = " . sql_tags($row->{tags})
				  . ", version = version + 1 WHERE id = $id;\n";
				push @changes, [ put => $id, $row ];
				$used{$id} = 1;
				$tx_records += 1;
			}
			elsif ($dice < 0.82)
			{
				# a new key: a DELETE of the old one, its tombstone, a PUT
				my $new = $next_id++;
				$sql .= "UPDATE client SET id = $new WHERE id = $id;\n";
				push @changes, [ delete => $id ], [ put => $new, { %{ $rows{$id} } } ];
				$used{$id} = $used{$new} = 1;
				$tx_records += 3;
			}
			else
			{
				$sql .= "DELETE FROM client WHERE id = $id;\n";
				push @changes, [ delete => $id ];
				$used{$id} = 1;
				$tx_records += 2;    # the DELETE and its tombstone
			}
			$ops++;
		}
		if (rand() < 0.05)
		{
			$sql .= "ROLLBACK;\n";
			$rolled_back++;
			next;
		}
		$sql .= "COMMIT;\n";
		$records += $tx_records;
		for my $c (@changes)
		{
			my ($what, $id, $row) = @$c;
			if ($what eq 'put')
			{
				$add->($id) unless exists $rows{$id};
				$rows{$id} = $row;
			}
			else
			{
				delete $rows{$id};
				$remove->($id);
			}
		}
	}
	note "$side: $ops statements, $rolled_back transactions rolled back, "
	  . scalar(keys %rows) . " rows left, $records records to publish";
	return ($sql, \%rows, $records);
}

my (%script, %rows, %records);
for my $side (qw(A B))
{
	($script{$side}, $rows{$side}, $records{$side}) = workload($side);
}

# ---- both sides write at the same time ----

my $tempdir = PostgreSQL::Test::Utils::tempdir();
my (%run, %out, %err);
for my $side (qw(A B))
{
	my $file = "$tempdir/workload_$side.sql";
	open my $fh, '>:encoding(UTF-8)', $file or die "cannot write $file: $!";
	print $fh $script{$side};
	close $fh;
	($out{$side}, $err{$side}) = ('', '');
	$run{$side} = IPC::Run::start(
		[ $node{$side}->installed_command('psql'), '-X', '-q', '-v', 'ON_ERROR_STOP=1',
			'-d', $node{$side}->connstr('postgres'), '-f', $file ],
		'>', \$out{$side}, '2>', \$err{$side});
}
for my $side (qw(A B))
{
	ok($run{$side}->finish, "$side: the workload ran") or diag($err{$side});
}

# ---- convergence ----

my %expected_rows = (%{ $rows{A} }, %{ $rows{B} });
my $expected_count = scalar(keys %expected_rows);
my ($md5_a, $md5_b) = ('', '');
my $converged = 0;
for (my $waited = 0; $waited < 3000 && !$converged; $waited++)
{
	$md5_a = kb_md5($node{A}, 'client');
	$md5_b = kb_md5($node{B}, 'client');
	$converged = $md5_a eq $md5_b && $md5_a =~ /^$expected_count:/;
	usleep(100_000) unless $converged;
}
ok($converged, "A and B converge: the same $expected_count rows (md5 of the rows in key order)")
  or diag("A: $md5_a, B: $md5_b");

# the rows are the ones the writers left, value for value
for my $side (qw(A B))
{
	my $values = join(",\n", map { '(' . sql_row($_, $expected_rows{$_}) . ')' } sort { $a <=> $b } keys %expected_rows);
	# psql gets bytes: the strings go as UTF-8, as in the workload's files
	my $diff = $node{$side}->safe_psql('postgres', encode_utf8(qq{
		CREATE TEMP TABLE expected (LIKE client);
		INSERT INTO expected VALUES $values;
		SELECT count(*) FROM ((TABLE client EXCEPT TABLE expected) UNION ALL (TABLE expected EXCEPT TABLE client)) d;
	}));
	is($diff, '0', "$side: every row has the values of its last committed write");
}

# ---- no echo: each instance published its own writes, once, and nothing else ----

# every change is published once its publisher has confirmed its slot past it
for my $side (qw(A B))
{
	my $lsn = $node{$side}->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
	ok($node{$side}->poll_query_until('postgres', qq{
			SELECT confirmed_flush_lsn >= '$lsn' FROM pg_replication_slots
			WHERE slot_name = 'kafka_bridge_' || (SELECT oid FROM pg_database WHERE datname = current_database())}),
		"$side: the publisher is past everything written and applied");
}

my @records = kafka_records($topic);
my (%by_origin, %seen, @wrong_origin, @duplicates, @no_origin);
for my $r (@records)
{
	my $origin = $r->{headers}{origin};
	if (!defined $origin) { push @no_origin, $r->{offset}; next; }
	$by_origin{$origin}++;
	my ($id) = ($r->{key} // '') =~ /^\{"id":(\d+)\}$/;
	my $owner = defined $id && $id >= $range{B}[0] ? 'B' : 'A';
	push @wrong_origin, "offset $r->{offset} key " . ($r->{key} // 'null') . " origin $origin"
	  if !defined $id || $origin ne $owner;
	# one record per (origin, commit LSN, record number in the transaction),
	# the tombstone of a DELETE sharing its headers
	my $event_id = join('|', $origin, $r->{headers}{lsn} // '', $r->{headers}{seq} // '',
		defined $r->{value} ? 'event' : 'tombstone',
		defined $r->{headers}{seq} ? '' : ($r->{key} // '') . ($r->{value} // ''));
	push @duplicates, $r->{offset} if $seen{$event_id}++;
}
is(scalar(@no_origin), 0, 'every record has an origin header') or diag("offsets @no_origin[0 .. 9]");
is(scalar(@wrong_origin), 0, "every record of the topic comes from the instance owning its key")
  or diag(join("\n", @wrong_origin[ 0 .. ($#wrong_origin < 9 ? $#wrong_origin : 9) ]));
is(scalar(@duplicates), 0, 'no event was published twice') or diag("offsets @duplicates[0 .. 9]");
is($by_origin{A} // 0, $records{A}, "A published exactly the records of its own commits ($records{A})");
is($by_origin{B} // 0, $records{B}, "B published exactly the records of its own commits ($records{B})");

# ---- what the appliers say ----

my $total = scalar(@records);
for my $side (qw(A B))
{
	my $node = $node{$side};
	ok($node->poll_query_until('postgres', qq{
			SELECT sum(next_offset) = $total AND sum(lag) = 0 AND sum(consumed) = $total
			FROM kafka_bridge.subscription_status WHERE topic = '$topic'}),
		"$side: subscription_status shows all $total records consumed, no lag");
	my ($consumed, $applied, $skipped, $dead) = split /\|/, $node->safe_psql('postgres', qq{
		SELECT sum(consumed), sum(applied), sum(skipped), sum(dead_letters)
		FROM kafka_bridge.subscription_status WHERE topic = '$topic'});
	note "$side: consumed $consumed, applied $applied, skipped $skipped, dead letters $dead";
	ok($applied > 0, "$side: subscription_status counts applied events ($applied)");
	is($dead, 0, "$side: no dead letters counted");
	is($applied + $skipped + $dead, $consumed, "$side: every consumed record was applied, skipped or dead-lettered");
	is($node->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.dead_letters'), '0',
		"$side: kafka_bridge.dead_letters is empty");
	like($node->safe_psql('postgres',
			"SELECT state || ' ' || (pid IS NOT NULL) || ' ' || (events_applied > 0) FROM kafka_bridge.status WHERE worker = 'applier'"),
		qr/^connected true true$/, "$side: the applier's status row is connected and counts applied events");
}

# ---- a TRUNCATE is applied, and not echoed either ----

$node{A}->safe_psql('postgres', 'TRUNCATE client');
ok($node{B}->poll_query_until('postgres', 'SELECT count(*) = 0 FROM client'), "B: A's TRUNCATE empties B's table");
$node{B}->safe_psql('postgres', "INSERT INTO client VALUES ($range{B}[1], 'after the truncate', NULL, NULL, NULL, 0)");
ok($node{A}->poll_query_until('postgres', "SELECT count(*) = 1 FROM client WHERE id = $range{B}[1]"),
	"A: B's insert after the TRUNCATE arrives");
for my $side (qw(A B))
{
	my $lsn = $node{$side}->safe_psql('postgres', 'SELECT pg_current_wal_lsn()');
	ok($node{$side}->poll_query_until('postgres', qq{
			SELECT confirmed_flush_lsn >= '$lsn' FROM pg_replication_slots
			WHERE slot_name = 'kafka_bridge_' || (SELECT oid FROM pg_database WHERE datname = current_database())}),
		"$side: the publisher is past the TRUNCATE");
}
@records = kafka_records($topic);
is(join(', ', map { ($_->{headers}{event} // '?') . ' from ' . ($_->{headers}{origin} // '?') } @records[ $total .. $#records ]),
	'CLIENT-TRUNCATE from A, CLIENT-PUT from B',
	'the topic got the TRUNCATE from A and the insert from B, nothing from the TRUNCATE applied on B');
is(kb_md5($node{A}, 'client'), kb_md5($node{B}, 'client'), 'A and B hold the same row');

$node{$_}->stop for qw(A B);
done_testing();
