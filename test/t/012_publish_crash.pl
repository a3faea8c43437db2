# A crash loses nothing: the postmaster is killed with SIGKILL while 100k
# rows in transactions of 10 rows are being written and published; after
# the restart every committed row is in the topic. Prints the duplicates.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use KafkaBridgeTest;

my $node = kb_node('crash');
$node->start;
$node->safe_psql('postgres', q{
	CREATE EXTENSION kafka_bridge;
	CREATE TABLE item (id int PRIMARY KEY, note text);
	CREATE PROCEDURE fill(n int) LANGUAGE plpgsql AS $$
	BEGIN
	  FOR b IN 0 .. n / 10 - 1 LOOP
	    INSERT INTO item SELECT g, 'row ' || g FROM generate_series(b * 10 + 1, b * 10 + 10) g;
	    COMMIT;
	  END LOOP;
	END $$;
});
ok(kb_wait_slot($node), 'slot created');
$node->safe_psql('postgres', "SELECT kafka_bridge.publish('item', topic => 'regress_crash_item')");

# write in the background, kill the postmaster once some are published
my $writer = $node->background_psql('postgres', on_error_stop => 0);
$writer->query_until(qr/start/, q{
	\echo start
	CALL fill(100000);
});
ok($node->poll_query_until('postgres', "SELECT events_published > 20000 FROM kafka_bridge.status WHERE worker = 'publisher'"),
	'publishing is under way');
$node->kill9;
eval { $writer->quit };

# the killed postmaster's children (the backend running CALL, the worker)
# exit on their own; the server starts again once they are all gone
my $started = 0;
for (my $i = 0; $i < 120 && !$started; $i++)
{
	$started = $node->start(fail_ok => 1);
	next if $started;
	$node->{_pid} = undef;    # the stale pid file named the killed postmaster
	sleep 1;
}
ok($started, 'the server restarts after the crash');
my $committed = $node->safe_psql('postgres', 'SELECT count(*) FROM item');
ok($committed > 20000, "$committed rows were committed before the crash");

my @r = kafka_wait_records('regress_crash_item', $committed, 300);
my %keys = map { $_->{key} => 1 } @r;
my %rows = map { ('{"id":' . $_ . '}') => 1 }
  split /\n/, $node->safe_psql('postgres', 'SELECT id FROM item');
my @missing = grep { !$keys{$_} } keys %rows;
is(scalar(@missing), 0, "every committed row is in the topic ($committed rows)");
my $dups = scalar(@r) - scalar(keys %keys);
diag("crash test: $committed committed rows, " . scalar(@r) . " records, $dups duplicates");

$node->stop;
done_testing();
