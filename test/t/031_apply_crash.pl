# Applying is exactly-once across a crash: A publishes 100k inserts; B
# subscribes and its postmaster is killed with SIGKILL while it applies
# them.  After the restart B holds exactly A's rows, and an ENABLE ALWAYS
# trigger on B's table, which logs every applied row in the applying
# transaction, logged each event exactly once: nothing was applied twice
# and nothing was skipped.  Then A's postmaster is killed while it
# writes and publishes up to 200k more inserts, one a transaction, that B
# applies as they come: the publisher
# sends again what Kafka had not confirmed, and B still applies each
# event once.  Last, the broker stops while A writes and B applies: once
# it is back, B catches up, still applying each event once.
use strict;
use warnings;

use Time::HiRes qw(usleep);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $topic = 'regress_crash_apply_client';
my $events = 100_000;

# ---- A publishes 100k inserts, 100 a transaction ----

my $node_a = kb_node('A', conf => "track_commit_timestamp = on\n");
$node_a->start;
$node_a->safe_psql('postgres', q{
	CREATE EXTENSION kafka_bridge;
	CREATE TABLE client (id int PRIMARY KEY, name text NOT NULL, amount numeric, created date);
	CREATE PROCEDURE regress_fill(n int) LANGUAGE plpgsql AS $$
	BEGIN
	  FOR b IN 0 .. n / 100 - 1 LOOP
	    INSERT INTO client
	      SELECT g, 'client ' || g, g * 1.5, date '2024-01-01' + g % 1000
	      FROM generate_series(b * 100 + 1, b * 100 + 100) g;
	    COMMIT;
	  END LOOP;
	END $$;
});
ok(kb_wait_slot($node_a), 'A: slot created');
$node_a->safe_psql('postgres', "SELECT kafka_bridge.publish('client', topic => '$topic')");
$node_a->safe_psql('postgres', "CALL regress_fill($events)");
ok($node_a->poll_query_until('postgres', "SELECT sum(events_published) >= $events FROM kafka_bridge.status"),
	"A: published the $events inserts");

# ---- B subscribes, with a trigger that logs each applied row ----

my $node_b = kb_node('B', conf => "track_commit_timestamp = on\n");
$node_b->start;
$node_b->safe_psql('postgres', q{
	CREATE EXTENSION kafka_bridge;
	CREATE TABLE client (id int PRIMARY KEY, name text NOT NULL, amount numeric, created date);
	CREATE TABLE regress_apply_log (n bigserial PRIMARY KEY, id int NOT NULL, op text NOT NULL);
	-- the applier runs with an empty search_path, as core's apply workers do
	CREATE FUNCTION regress_log_apply() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
	  IF TG_OP = 'DELETE' THEN
	    INSERT INTO public.regress_apply_log (id, op) VALUES (OLD.id, TG_OP);
	  ELSE
	    INSERT INTO public.regress_apply_log (id, op) VALUES (NEW.id, TG_OP);
	  END IF;
	  RETURN NULL;
	END $$;
	CREATE TRIGGER regress_log_apply AFTER INSERT OR UPDATE OR DELETE ON client
	  FOR EACH ROW EXECUTE FUNCTION regress_log_apply();
	ALTER TABLE client ENABLE ALWAYS TRIGGER regress_log_apply;
});
ok($node_b->poll_query_until('postgres', "SELECT state = 'idle' FROM kafka_bridge.status WHERE worker = 'applier'"),
	'B: the applier waits, idle, for a subscription');
$node_b->safe_psql('postgres', "SELECT kafka_bridge.subscribe('client', topic => '$topic')");

# kill the postmaster as soon as the applier is well under way
my $seen = 0;
for (my $waited = 0; $waited < 3000; $waited++)
{
	$seen = $node_b->safe_psql('postgres', 'SELECT count(*) FROM client');
	last if $seen >= 10_000;
	usleep(50_000);
}
diag('B before the kill: ' . $node_b->safe_psql('postgres', 'SELECT * FROM kafka_bridge.subscription_status'))
  if $seen < 10_000;
$node_b->kill9;
ok($seen >= 10_000 && $seen < $events, "B: killed while applying ($seen of $events rows applied)");

# the killed postmaster's children exit on their own; the server starts
# again once they are all gone
my $started = 0;
for (my $i = 0; $i < 120 && !$started; $i++)
{
	$started = $node_b->start(fail_ok => 1);
	next if $started;
	$node_b->{_pid} = undef;    # the stale pid file named the killed postmaster
	sleep 1;
}
ok($started, 'B: restarts after the crash');
my $after_crash = $node_b->safe_psql('postgres', 'SELECT count(*) FROM client');
note "B: $after_crash rows survived the crash";

# ---- B ends with A's rows, each applied once ----

ok($node_b->poll_query_until('postgres', "SELECT count(*) >= $events FROM client"),
	'B: the applier resumes and applies the rest');
ok($node_b->poll_query_until('postgres', qq{
		SELECT sum(next_offset) = $events AND sum(lag) = 0
		FROM kafka_bridge.subscription_status WHERE topic = '$topic'}),
	'B: subscription_status shows every record consumed');
is(kb_md5($node_b, 'client'), kb_md5($node_a, 'client'), 'B holds exactly the rows of A (md5 of the rows in key order)');
is($node_b->safe_psql('postgres', q{
		SELECT count(*) || ' ' || count(DISTINCT id) || ' ' || count(*) FILTER (WHERE op <> 'INSERT')
		FROM regress_apply_log}),
	"$events $events 0",
	"the trigger logged $events inserts of distinct rows: no event was applied twice");
is($node_b->safe_psql('postgres', q{
		SELECT count(*) FROM client c WHERE NOT EXISTS (SELECT FROM regress_apply_log l WHERE l.id = c.id)}),
	'0', 'every row of the table was logged by the trigger in the applying transaction');
is($node_b->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.dead_letters'), '0', 'no dead letters');
like($node_b->safe_psql('postgres', "SELECT state FROM kafka_bridge.status WHERE worker = 'applier'"),
	qr/^connected$/, "B: the applier's status is connected after the restart");

# ---- A crashes while publishing: the replayed records are not applied again ----

$node_a->safe_psql('postgres', q{
	CREATE PROCEDURE regress_fill_more(first int, n int) LANGUAGE plpgsql AS $$
	BEGIN
	  FOR g IN first .. first + n - 1 LOOP
	    INSERT INTO client VALUES (g, 'client ' || g, g * 1.5, date '2024-01-01' + g % 1000);
	    COMMIT;
	  END LOOP;
	END $$;
});
my $writer = $node_a->background_psql('postgres', on_error_stop => 0);
$writer->query_until(qr/start/, qq{
	\\echo start
	CALL regress_fill_more($events + 1, 2 * $events);
});
ok($node_a->poll_query_until('postgres',
		"SELECT sum(events_published) > $events + 20000 FROM kafka_bridge.status"),
	'A: publishing more inserts is under way');
$node_a->kill9;
eval { $writer->quit };
$started = 0;
for (my $i = 0; $i < 120 && !$started; $i++)
{
	$started = $node_a->start(fail_ok => 1);
	next if $started;
	$node_a->{_pid} = undef;
	sleep 1;
}
ok($started, 'A: restarts after the crash');
my $committed = $node_a->safe_psql('postgres', 'SELECT count(*) FROM client');
# (the backend running CALL does not notice the postmaster's death and
# finishes it: the publisher has the rows written after the crash to send)
ok($committed > $events + 20000, "A: $committed rows committed");

ok($node_b->poll_query_until('postgres', "SELECT count(*) = $committed FROM client"),
	"B: applies every row A committed ($committed)");
ok($node_b->poll_query_until('postgres', qq{
		SELECT sum(lag) = 0 FROM kafka_bridge.subscription_status WHERE topic = '$topic'}),
	'B: consumed the whole topic');
my $records = $node_b->safe_psql('postgres', qq{
	SELECT sum(next_offset) || ' records, ' || sum(applied) || ' applied, ' || sum(skipped) || ' skipped'
	FROM kafka_bridge.subscription_status WHERE topic = '$topic'});
diag("after A's crash: $committed rows, topic: $records (skipped: the replays)");
is(kb_md5($node_b, 'client'), kb_md5($node_a, 'client'), 'B holds exactly the rows of A');
is($node_b->safe_psql('postgres', q{
		SELECT count(*) || ' ' || count(DISTINCT id) || ' ' || count(*) FILTER (WHERE op <> 'INSERT')
		FROM regress_apply_log}),
	"$committed $committed 0",
	'the trigger logged one insert per row: the replayed records were not applied again');
is($node_b->safe_psql('postgres', 'SELECT count(*) FROM kafka_bridge.dead_letters'), '0', 'no dead letters');

# ---- the broker stops while B applies, and comes back ----

$writer = $node_a->background_psql('postgres', on_error_stop => 0);
$writer->query_until(qr/start/, qq{
	\\echo start
	CALL regress_fill_more($committed + 1, $events);
});
ok($node_b->poll_query_until('postgres', "SELECT count(*) > $committed + 5000 FROM client"),
	'B: applying the third batch is under way');
kafka_stop();
my $during = $node_b->safe_psql('postgres', 'SELECT count(*) FROM client');
$writer->quit;
my $total = $node_a->safe_psql('postgres', 'SELECT count(*) FROM client');
is($total, $committed + $events, "A: wrote the third batch ($events rows) with the broker down for part of it");
ok($node_b->poll_query_until('postgres', "SELECT state = 'error' FROM kafka_bridge.status WHERE worker = 'applier'"),
	"B: the applier's status shows the broker down");
kafka_start();
ok($node_b->poll_query_until('postgres', "SELECT count(*) = $total FROM client"),
	"B: once the broker is back, B catches up ($during rows when it stopped, $total now)");
ok($node_b->poll_query_until('postgres', "SELECT state = 'connected' FROM kafka_bridge.status WHERE worker = 'applier'"),
	"B: the applier is connected again");
is(kb_md5($node_b, 'client'), kb_md5($node_a, 'client'), 'B holds exactly the rows of A');
is($node_b->safe_psql('postgres', q{
		SELECT count(*) || ' ' || count(DISTINCT id) || ' ' || count(*) FILTER (WHERE op <> 'INSERT')
		FROM regress_apply_log}),
	"$total $total 0", 'each event still applied once');

$node_b->stop;
$node_a->stop;
done_testing();
