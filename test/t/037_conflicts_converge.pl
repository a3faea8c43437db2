# Three instances, A, B and C, sync one table under last_write_wins and
# write the same rows at the same time: for 60 s each runs seeded random
# inserts, updates and deletes over one key space of 1,000 rows, the broker
# is restarted once in the middle, then the writes stop.  Within 10 s of the
# last write the three tables must be identical (md5 of the ordered rows).
# Five seeds, each on a fresh table and topic.  Prints, per instance, the
# conflicts met and how they were resolved.
#
# KB_CONVERGE_SECONDS shortens the write phase (for a quick local run).
use strict;
use warnings;

use IPC::Run;
use Time::HiRes qw(time usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $seconds = $ENV{KB_CONVERGE_SECONDS} // 60;
my @seeds = (37001, 37002, 37003, 37004, 37005);
my @names = qw(A B C);

my %node;
for my $name (@names)
{
	my $node = kb_node($name);
	$node->start;
	$node->safe_psql('postgres', 'CREATE EXTENSION kafka_bridge');
	ok(kb_wait_slot($node), "$name: the publisher created its slot");
	$node{$name} = $node;
}

# the statements of one writer: a loop of single-statement transactions on
# random keys, for $seconds, with random() seeded
sub writer_sql
{
	my ($name, $seed) = @_;
	my $setseed = (($seed * 7 + ord($name)) % 1000) / 1000.0;
	return qq{
SELECT setseed($setseed);
DO \$\$
DECLARE
	stop timestamptz := clock_timestamp() + interval '$seconds seconds';
	k int;
	r float8;
	i int := 0;
BEGIN
	WHILE clock_timestamp() < stop LOOP
		i := i + 1;
		k := 1 + floor(random() * 1000)::int;
		r := random();
		IF r < 0.45 THEN
			INSERT INTO conv VALUES (k, '$name' || i, 1)
			  ON CONFLICT (id) DO UPDATE SET v = excluded.v, n = conv.n + 1;
		ELSIF r < 0.8 THEN
			UPDATE conv SET v = '$name' || i, n = n + 1 WHERE id = k;
		ELSE
			DELETE FROM conv WHERE id = k;
		END IF;
		COMMIT;
		PERFORM pg_sleep(0.005);
	END LOOP;
END
\$\$;
};
}

sub md5s
{
	return map { $node{$_}->safe_psql('postgres',
			"SELECT count(*) || ' ' || coalesce(md5(string_agg(t::text, ',' ORDER BY id)), '-') FROM conv t") } @names;
}

for my $seed (@seeds)
{
	my $topic = "regress_converge_$seed";

	for my $name (@names)
	{
		$node{$name}->safe_psql('postgres', qq{
			DROP TABLE IF EXISTS conv;
			CREATE TABLE conv (id int PRIMARY KEY, v text NOT NULL, n int NOT NULL);
			SELECT kafka_bridge.sync('conv', topic => '$topic');
			TRUNCATE kafka_bridge.conflicts;
		});
	}
	for my $name (@names)
	{
		$node{$name}->poll_query_until('postgres',
			"SELECT state = 'connected' FROM kafka_bridge.status WHERE worker = 'applier'")
		  or die "$name: the applier did not connect";
	}

	# the three writers at once, and the broker restarted half way
	my %h;
	for my $name (@names)
	{
		# (from a file: IPC::Run feeds a scalar only while it is pumped)
		my $file = "${PostgreSQL::Test::Utils::tmp_check}/writer_${name}_$seed.sql";
		open(my $fh, '>', $file) or die "cannot write $file: $!";
		print $fh writer_sql($name, $seed);
		close($fh);
		$h{$name} = IPC::Run::start(
			[ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d', $node{$name}->connstr('postgres'), '-f', $file ],
			'>', \my $out, '2>', \my $err);
	}
	sleep($seconds / 2);
	kafka_stop();
	sleep(3);
	kafka_start();
	my $ok_writers = 1;
	for my $name (@names)
	{
		$ok_writers &&= $h{$name}->finish;
	}
	my $last_write = time;
	ok($ok_writers, "seed $seed: the three writers ran for $seconds s");

	# identical within 10 s of the last write
	my @m;
	my $converged;
	while (time - $last_write < 120)
	{
		@m = md5s();
		if ($m[0] eq $m[1] && $m[1] eq $m[2])
		{
			# and it stays so: nothing is still on its way
			usleep(500_000);
			my @again = md5s();
			if (join('|', @again) eq join('|', @m))
			{
				$converged = time - $last_write;
				last;
			}
		}
		usleep(200_000);
	}
	ok(defined $converged, "seed $seed: A, B and C hold the same rows (" . join(' / ', @m) . ")");
	cmp_ok($converged // 999, '<=', 10, sprintf("seed %d: converged %.1f s after the last write", $seed, $converged // -1));

	for my $name (@names)
	{
		my $dead = $node{$name}->safe_psql('postgres',
			"SELECT count(*) FROM kafka_bridge.dead_letters WHERE topic = '$topic'");
		is($dead, 0, "seed $seed: $name set no record aside");
		my $conflicts = $node{$name}->safe_psql('postgres',
			"SELECT string_agg(kind || ' ' || resolution || ': ' || c, ', ' ORDER BY kind, resolution) "
			  . "FROM (SELECT kind, resolution, count(*) AS c FROM kafka_bridge.conflicts "
			  . "WHERE table_name = 'conv'::regclass GROUP BY 1, 2) s");
		my $total = $node{$name}->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.conflicts');
		my $counter = $node{$name}->safe_psql('postgres',
			"SELECT conflicts FROM kafka_bridge.status WHERE worker = 'applier'");
		diag("seed $seed, $name: $total conflicts (last_write_wins): $conflicts");
		cmp_ok($counter, '>=', $total, "seed $seed: $name counts its conflicts in kafka_bridge.status");
	}
	# with 1,000 keys written by three instances, conflicts do happen
	my $all = 0;
	$all += $node{$_}->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.conflicts') for @names;
	cmp_ok($all, '>', 0, "seed $seed: the instances met conflicts ($all) and resolved them alike");
	for my $name (@names)
	{
		$node{$name}->safe_psql('postgres', "SELECT kafka_bridge.unpublish('conv'); SELECT kafka_bridge.unsubscribe('conv')");
	}
}

$node{$_}->stop for @names;
done_testing();
