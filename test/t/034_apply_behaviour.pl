# How the applier treats columns and rights, against the real broker:
# every type round-trips from A to B; an UPDATE that leaves a TOASTed column
# unchanged keeps B's value; an identity column generated always is
# inserted and never updated; a NULL for a domain NOT NULL is refused; a
# column only A has is ignored (and logged once); a column only B has gets
# its default on insert and keeps its value on update; a record replayed
# with the same origin and position is skipped; the apply role's
# privileges and row security hold, and its owner must stay a member of
# the apply role; a record that comes just after an
# unsubscribe() commits is not applied; a setting a trigger changes for the
# session does not outlive its batch.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use KafkaBridgeTest;

my $bootstrap = kafka_bootstrap();
my $a = kb_node('A', conf => "track_commit_timestamp = on\n");
my $b = kb_node('B', conf => "track_commit_timestamp = on\n");
$_->start for ($a, $b);

my $types = q{
	CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
	CREATE DOMAIN positive AS int CHECK (VALUE > 0);
	CREATE TABLE regress_bh_types (
		id bigint PRIMARY KEY, i2 int2, i4 int4, n numeric, n_nan numeric, f8 float8,
		f8_inf float8, t text, b bytea, flag bool, d date, ts timestamp, tstz timestamptz,
		iv interval, u uuid, j json, jb jsonb, arr int[], tarr text[], m mood, p positive,
		nothing text, jstr jsonb, jsarr jsonb[]);
};
$_->safe_psql('postgres', "CREATE EXTENSION kafka_bridge; $types") for ($a, $b);
ok(kb_wait_slot($a), 'A has its slot');

# ---- every type, from A's publisher to B's applier ----
$a->safe_psql('postgres', "SELECT kafka_bridge.publish('regress_bh_types')");
$b->safe_psql('postgres', "SELECT kafka_bridge.subscribe('regress_bh_types')");
$a->safe_psql('postgres', q{
	INSERT INTO regress_bh_types VALUES
	(1, -32768, 2147483647, (repeat('9', 120) || '.' || repeat('1', 30))::numeric, 'NaN', 1.1,
	 '-Infinity', E'unicode \u00e9\u4e2d "quotes" \\ back\nslash', '\x00ff10', true,
	 '2024-02-29', '2024-02-29 12:34:56.789', '2024-02-29 12:34:56.789+05',
	 '1 year 2 mons 3 days 04:05:06.5', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
	 '{"a": [1, 2.50, "x"]}', '{"k": {"n": null}}', '{{1,2},{3,NULL}}',
	 '{"with, comma","quo\"te",NULL}', 'happy', 7, NULL, '"a string"',
	 ARRAY['"s"', '1', '{"x": "y"}']::jsonb[]),
	(2, NULL, NULL, NULL, NULL, 'NaN', 'Infinity', '', '\x', false, 'infinity',
	 '-infinity', 'infinity', '-1 day', NULL, 'null', '[]', '{}', '{}', 'sad', 1, NULL, '2', '{}');
});
my $dump = "SELECT string_agg(t::text, E'\\n' ORDER BY id) FROM regress_bh_types t";
ok($b->poll_query_until('postgres', "SELECT count(*) = 2 FROM regress_bh_types"), 'B applied both rows');
is($b->safe_psql('postgres', $dump), $a->safe_psql('postgres', $dump),
	'every type arrives on B exactly as it is on A');
# the applier reports what it wrote to the statistics autovacuum goes by
# (as any backend does, within a second or so), not only when it exits
ok($b->poll_query_until('postgres',
		"SELECT n_tup_ins = 2 FROM pg_stat_user_tables WHERE relname = 'regress_bh_types'"),
	"B's statistics count the applier's 2 inserts");

# ---- TOAST: an UPDATE that leaves a big column alone ----
$_->safe_psql('postgres', q{
	CREATE TABLE regress_bh_toast (id int PRIMARY KEY, big text, small text);
	ALTER TABLE regress_bh_toast ALTER COLUMN big SET STORAGE EXTERNAL;
}) for ($a, $b);
$a->safe_psql('postgres', "SELECT kafka_bridge.publish('regress_bh_toast')");
$b->safe_psql('postgres', "SELECT kafka_bridge.subscribe('regress_bh_toast')");
$a->safe_psql('postgres', "INSERT INTO regress_bh_toast VALUES (1, repeat('x', 100000), 'a')");
ok($b->poll_query_until('postgres', "SELECT count(*) = 1 FROM regress_bh_toast"), 'B has the row');
$a->safe_psql('postgres', "UPDATE regress_bh_toast SET small = 'b' WHERE id = 1");
ok($b->poll_query_until('postgres', "SELECT small = 'b' FROM regress_bh_toast WHERE id = 1"),
	'the update reached B');
is($b->safe_psql('postgres', "SELECT length(big), big = repeat('x', 100000) FROM regress_bh_toast"),
	'100000|t', 'the unchanged TOASTed column keeps its value on B');

# ---- a GENERATED ALWAYS identity column that is not the key: inserted
#      with the source's value, left alone by updates (which could set it
#      to DEFAULT only), under an upsert (apply_remote) and an update
#      (last_write_wins) alike ----
for my $policy ('apply_remote', 'last_write_wins')
{
	my $tbl = "regress_bh_ident_$policy";
	$_->safe_psql('postgres',
		"CREATE TABLE $tbl (id int PRIMARY KEY, n bigint GENERATED ALWAYS AS IDENTITY (START 100), v text)")
	  for ($a, $b);
	$a->safe_psql('postgres', "SELECT kafka_bridge.publish('$tbl')");
	$b->safe_psql('postgres', "SELECT kafka_bridge.subscribe('$tbl', conflict_policy => '$policy')");
	$a->safe_psql('postgres', "INSERT INTO $tbl (id, v) VALUES (1, 'a'), (2, 'a')");
	$a->safe_psql('postgres', "UPDATE $tbl SET v = 'b' WHERE id = 1");
	my $rows = "SELECT string_agg(t::text, ',' ORDER BY id) FROM $tbl t";
	ok($b->poll_query_until('postgres', "SELECT ($rows) = '(1,100,b),(2,101,a)'"),
		"$policy: a table with an identity column generated always gets the rows and the update");
	is($b->safe_psql('postgres',
			"SELECT count(*) FROM kafka_bridge.dead_letters WHERE table_name = '$tbl'::regclass"),
		'0', "$policy: and no dead letter");
}

# ---- a NULL for a column of a domain NOT NULL (on B only): refused
#      with the domain's reason, the next row applied ----
$a->safe_psql('postgres', q{
	CREATE TABLE regress_bh_domain (id int PRIMARY KEY, v text);
	SELECT kafka_bridge.publish('regress_bh_domain');
});
$b->safe_psql('postgres', q{
	CREATE DOMAIN required_text AS text NOT NULL;
	CREATE TABLE regress_bh_domain (id int PRIMARY KEY, v required_text);
	SELECT kafka_bridge.subscribe('regress_bh_domain');
});
$a->safe_psql('postgres', "INSERT INTO regress_bh_domain VALUES (1, NULL)");
$a->safe_psql('postgres', "INSERT INTO regress_bh_domain VALUES (2, 'x')");
ok($b->poll_query_until('postgres', "SELECT count(*) = 1 FROM regress_bh_domain WHERE id = 2"),
	'the row with a value arrives');
is($b->safe_psql('postgres', q{
		SELECT string_agg(convert_from(key, 'UTF8') || ' ' || reason, E'\n')
		  FROM kafka_bridge.dead_letters WHERE table_name = 'regress_bh_domain'::regclass}),
	'{"id":1} column "v": domain public.required_text does not allow null values',
	'the NULL for the domain NOT NULL goes to the dead letters, with the domain\'s reason');
is($b->safe_psql('postgres', "SELECT count(*) FROM regress_bh_domain"), '1', 'and is not stored');

# ---- columns only one side has ----
$a->safe_psql('postgres', q{
	CREATE TABLE regress_bh_cols (id int PRIMARY KEY, name text, only_on_a text);
	SELECT kafka_bridge.publish('regress_bh_cols');
});
$b->safe_psql('postgres', q{
	CREATE TABLE regress_bh_cols (id int PRIMARY KEY, name text, only_on_b text DEFAULT 'default-b');
	SELECT kafka_bridge.subscribe('regress_bh_cols');
});
my $log_offset = -s $b->logfile;
$a->safe_psql('postgres', "INSERT INTO regress_bh_cols VALUES (1, 'one', 'a1'), (2, 'two', 'a2')");
ok($b->poll_query_until('postgres', "SELECT count(*) = 2 FROM regress_bh_cols"), 'B has both rows');
is($b->safe_psql('postgres', "SELECT string_agg(id || ':' || name || ':' || only_on_b, ',' ORDER BY id) FROM regress_bh_cols"),
	'1:one:default-b,2:two:default-b', "a column only B has gets its default on insert");
$b->safe_psql('postgres', "UPDATE regress_bh_cols SET only_on_b = 'local' WHERE id = 1");
$a->safe_psql('postgres', "UPDATE regress_bh_cols SET name = 'uno', only_on_a = 'a1bis' WHERE id = 1");
ok($b->poll_query_until('postgres', "SELECT name = 'uno' FROM regress_bh_cols WHERE id = 1"), 'the update reached B');
is($b->safe_psql('postgres', "SELECT only_on_b FROM regress_bh_cols WHERE id = 1"), 'local',
	'and kept the value of the column only B has');
my $log = slurp_file($b->logfile, $log_offset);
my @ignored = ($log =~ /ignores member "only_on_a" of the events of topic "regress_bh_cols"/g);
is(scalar(@ignored), 1, "the member only A has is ignored, and logged once");

# ---- a replayed record is recognised and skipped ----
my ($rec) = grep { $_->{value} =~ /"uno"/ } kafka_records('regress_bh_cols');
ok($rec, 'the update record is in the topic');
my $value_file = $b->basedir . '/replay.json';
open(my $fh, '>', $value_file) or die;
print $fh $rec->{value};
close $fh;
$b->safe_psql('postgres', "UPDATE regress_bh_cols SET name = 'changed locally' WHERE id = 1");
my $skipped_before = $b->safe_psql('postgres',
	"SELECT sum(skipped) FROM kafka_bridge.subscription_status WHERE topic = 'regress_bh_cols'");
my @h = map { ('-H', "$_=$rec->{headers}{$_}") } sort keys %{ $rec->{headers} };
system('kcat', '-P', '-b', $bootstrap, '-t', 'regress_bh_cols', '-p', $rec->{partition},
	'-k', $rec->{key}, @h, $value_file) == 0 or die 'kcat failed';
ok( $b->poll_query_until('postgres',
		"SELECT sum(skipped) > $skipped_before FROM kafka_bridge.subscription_status WHERE topic = 'regress_bh_cols'"),
	'the replayed record is counted as skipped');
is($b->safe_psql('postgres', "SELECT name FROM regress_bh_cols WHERE id = 1"), 'changed locally',
	'and did not overwrite the row');

# ---- the apply role's rights and row security ----
$b->safe_psql('postgres', q{
	CREATE ROLE regress_applier;
	CREATE TABLE regress_bh_rights (id int PRIMARY KEY, owner text);
	GRANT SELECT, INSERT, UPDATE ON regress_bh_rights TO regress_applier;
	ALTER TABLE regress_bh_rights ENABLE ROW LEVEL SECURITY;
	CREATE POLICY regress_only_mine ON regress_bh_rights TO regress_applier
		USING (owner = 'mine') WITH CHECK (owner = 'mine');
	SELECT kafka_bridge.subscribe('regress_bh_rights', apply_role => 'regress_applier');
});
$a->safe_psql('postgres', q{
	CREATE TABLE regress_bh_rights (id int PRIMARY KEY, owner text);
	SELECT kafka_bridge.publish('regress_bh_rights');
	INSERT INTO regress_bh_rights VALUES (1, 'mine'), (2, 'theirs');
	DELETE FROM regress_bh_rights WHERE id = 1;
	INSERT INTO regress_bh_rights VALUES (3, 'mine');
});
ok( $b->poll_query_until('postgres',
		"SELECT count(*) = 2 FROM kafka_bridge.dead_letters WHERE topic = 'regress_bh_rights'"),
	'two records of regress_bh_rights are dead letters');
is( $b->safe_psql('postgres',
		"SELECT string_agg(convert_from(key, 'UTF8') || ' ' || reason, E'\\n' ORDER BY key) FROM kafka_bridge.dead_letters WHERE topic = 'regress_bh_rights'")
	  =~ s/ \(.*//gmr,
	qq({"id":1} permission denied for table regress_bh_rights\n{"id":2} new row violates row-level security policy for table "regress_bh_rights"),
	'row security refuses the row the policy does not allow, and the missing DELETE right refuses the delete');
is($b->safe_psql('postgres', "SELECT string_agg(id || ':' || owner, ',' ORDER BY id) FROM regress_bh_rights"),
	'1:mine,3:mine', 'the allowed rows are applied; the refused ones change nothing');

# ---- the table's owner must stay a member of the apply role: the
#      table's triggers, defaults and checks run as that role.  Revoked,
#      the topic waits (status says why) and loses nothing; granted again,
#      it is applied ----
$b->safe_psql('postgres', q{
	CREATE ROLE regress_bh_owner;
	CREATE ROLE regress_bh_writer;
	GRANT regress_bh_writer TO regress_bh_owner;
	CREATE TABLE regress_bh_owned (id int PRIMARY KEY, v text);
	ALTER TABLE regress_bh_owned OWNER TO regress_bh_owner;
	GRANT SELECT, INSERT, UPDATE, DELETE ON regress_bh_owned TO regress_bh_writer;
	SELECT kafka_bridge.subscribe('regress_bh_owned', apply_role => 'regress_bh_writer');
});
$a->safe_psql('postgres', q{
	CREATE TABLE regress_bh_owned (id int PRIMARY KEY, v text);
	SELECT kafka_bridge.publish('regress_bh_owned');
	INSERT INTO regress_bh_owned VALUES (1, 'while a member');
});
ok($b->poll_query_until('postgres', 'SELECT count(*) = 1 FROM regress_bh_owned'),
	'owner a member of the apply role: the row is applied');
$b->safe_psql('postgres', 'REVOKE regress_bh_writer FROM regress_bh_owner');
ok($b->poll_query_until('postgres',
		"SELECT last_error LIKE '%owner of table \"regress_bh_owned\"%not a member of its apply_role%' FROM kafka_bridge.status WHERE worker = 'applier'"),
	'membership revoked: the status says the topic is not applied, and why');
$a->safe_psql('postgres', "INSERT INTO regress_bh_owned VALUES (2, 'after the revoke')");
# the row is in the topic before the sentinel is written: an applier that
# still applied the table would have it by the time the sentinel arrives
is(scalar(kafka_wait_records('regress_bh_owned', 2, 60)), 2, 'the row written after the revoke is in the topic');
$a->safe_psql('postgres', "INSERT INTO regress_bh_domain VALUES (4, 'sentinel')");
ok($b->poll_query_until('postgres', 'SELECT count(*) = 1 FROM regress_bh_domain WHERE id = 4'),
	'a later row of another subscribed table arrives');
sleep 1;
is($b->safe_psql('postgres', 'SELECT string_agg(v, \',\' ORDER BY id) FROM regress_bh_owned'), 'while a member',
	'the row written after the revoke is not applied');
is($b->safe_psql('postgres', "SELECT count(*) FROM kafka_bridge.dead_letters WHERE topic = 'regress_bh_owned'"), '0',
	'nor set aside');
$b->safe_psql('postgres', 'GRANT regress_bh_writer TO regress_bh_owner');
ok($b->poll_query_until('postgres', 'SELECT count(*) = 2 FROM regress_bh_owned'),
	'granted again: the row waiting in the topic is applied');

# ---- unsubscribe() in a transaction that the applier's look at the
#      subscriptions (once a second) falls into: a record that comes just
#      after its commit is not applied to the table, nor the topic's
#      progress written back ----
$_->safe_psql('postgres', 'CREATE TABLE regress_bh_unsub (id int PRIMARY KEY, v text)') for ($a, $b);
$a->safe_psql('postgres', "SELECT kafka_bridge.publish('regress_bh_unsub')");
$b->safe_psql('postgres', "SELECT kafka_bridge.subscribe('regress_bh_unsub')");
$a->safe_psql('postgres', "INSERT INTO regress_bh_unsub VALUES (1, 'before')");
ok($b->poll_query_until('postgres', 'SELECT count(*) = 1 FROM regress_bh_unsub'),
	'a subscribed table gets its row');
my $unsub = $b->background_psql('postgres');
$unsub->query_safe('BEGIN');
$unsub->query_safe("SELECT kafka_bridge.unsubscribe('regress_bh_unsub')");
sleep 3;
$unsub->query_safe('COMMIT');
$unsub->quit;
$a->safe_psql('postgres', "INSERT INTO regress_bh_unsub VALUES (2, 'after')");
# a row of a table still subscribed, written after it, tells when it is past
$a->safe_psql('postgres', "INSERT INTO regress_bh_domain VALUES (3, 'sentinel')");
ok($b->poll_query_until('postgres', 'SELECT count(*) = 1 FROM regress_bh_domain WHERE id = 3'),
	'a later row of another subscribed table arrives');
sleep 1;
is($b->safe_psql('postgres', 'SELECT string_agg(v, \',\') FROM regress_bh_unsub'), 'before',
	'the row written after unsubscribe() committed is not applied');
is($b->safe_psql('postgres',
		"SELECT count(*) FROM kafka_bridge.apply_progress WHERE topic = 'regress_bh_unsub'"),
	'0', 'nor is the unsubscribed topic\'s progress written back');

# ---- a trigger of the table that changes a setting for the session
#      (default_transaction_read_only): undone after its batch, so the next
#      batch still writes ----
$a->safe_psql('postgres', q{
	CREATE TABLE regress_bh_guc (id int PRIMARY KEY, v text);
	SELECT kafka_bridge.publish('regress_bh_guc');
});
$b->safe_psql('postgres', q{
	CREATE TABLE regress_bh_guc (id int PRIMARY KEY, v text);
	CREATE FUNCTION regress_bh_guc_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		PERFORM set_config('default_transaction_read_only', 'on', false);
		RETURN NEW;
	END $$;
	CREATE TRIGGER regress_bh_guc_set BEFORE INSERT ON regress_bh_guc
		FOR EACH ROW EXECUTE FUNCTION regress_bh_guc_trigger();
	ALTER TABLE regress_bh_guc ENABLE ALWAYS TRIGGER regress_bh_guc_set;
	SELECT kafka_bridge.subscribe('regress_bh_guc');
});
my $guc_log_offset = -s $b->logfile;
$a->safe_psql('postgres', "INSERT INTO regress_bh_guc VALUES (1, 'first')");
ok($b->poll_query_until('postgres', 'SELECT count(*) = 1 FROM regress_bh_guc'),
	'a row whose trigger sets default_transaction_read_only for the session is applied');
$a->safe_psql('postgres', "INSERT INTO regress_bh_guc VALUES (2, 'second')");
ok($b->poll_query_until('postgres', 'SELECT count(*) = 2 FROM regress_bh_guc'),
	'and the next batch is applied too');
unlike(slurp_file($b->logfile, $guc_log_offset), qr/read-only transaction/,
	'at once: no batch met a read-only transaction (the setting did not outlive its batch)');

# ---- unsubscribe() and subscribe() in one transaction, the way to apply a
#      topic again from its beginning: the applier sees a new subscription
#      (its offsets and replay marks in memory go with the old one), and
#      applies the topic's rows again ----
$_->safe_psql('postgres', 'CREATE TABLE regress_bh_again (id int PRIMARY KEY, v text)') for ($a, $b);
$a->safe_psql('postgres', "SELECT kafka_bridge.publish('regress_bh_again')");
$b->safe_psql('postgres', "SELECT kafka_bridge.subscribe('regress_bh_again', conflict_policy => 'apply_remote')");
$a->safe_psql('postgres', "INSERT INTO regress_bh_again VALUES (1, 'first')");
ok($b->poll_query_until('postgres', 'SELECT count(*) = 1 FROM regress_bh_again'),
	'a subscribed table gets its row');
$b->safe_psql('postgres', q{
	SET session_replication_role = replica;
	DELETE FROM regress_bh_again;
	BEGIN;
	SELECT kafka_bridge.unsubscribe('regress_bh_again');
	SELECT kafka_bridge.subscribe('regress_bh_again', conflict_policy => 'apply_remote');
	COMMIT;
});
$a->safe_psql('postgres', "INSERT INTO regress_bh_again VALUES (2, 'second')");
ok($b->poll_query_until('postgres', 'SELECT count(*) = 1 FROM regress_bh_again WHERE id = 2'),
	'subscribed again in one transaction: the row written since arrives');
is($b->safe_psql('postgres', "SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM regress_bh_again"),
	'1:first,2:second', 'and the topic is applied again from its beginning');

# ---- a deferred constraint trigger of the table that refuses a row at
#      COMMIT: one by one, it fires with its record, which goes to the
#      dead letters; the others of its transaction are applied ----
$a->safe_psql('postgres', q{
	CREATE TABLE regress_bh_deferred (id int PRIMARY KEY, v text);
	SELECT kafka_bridge.publish('regress_bh_deferred');
});
$b->safe_psql('postgres', q{
	CREATE TABLE regress_bh_deferred (id int PRIMARY KEY, v text);
	CREATE FUNCTION regress_bh_refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		IF NEW.v = 'bad' THEN
			RAISE EXCEPTION 'row % refused at commit', NEW.id;
		END IF;
		RETURN NULL;
	END $$;
	CREATE CONSTRAINT TRIGGER regress_bh_deferred_check AFTER INSERT ON regress_bh_deferred
		DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION regress_bh_refuse_bad();
	ALTER TABLE regress_bh_deferred ENABLE ALWAYS TRIGGER regress_bh_deferred_check;
	SELECT kafka_bridge.subscribe('regress_bh_deferred', conflict_policy => 'apply_remote');
});
$a->safe_psql('postgres', "INSERT INTO regress_bh_deferred VALUES (1, 'good'), (2, 'bad'), (3, 'good')");
ok($b->poll_query_until('postgres',
		"SELECT count(*) = 1 FROM kafka_bridge.dead_letters WHERE topic = 'regress_bh_deferred'"),
	'a row a deferred constraint trigger refuses goes to the dead letters');
is($b->safe_psql('postgres', "SELECT reason LIKE '%row 2 refused at commit%' FROM kafka_bridge.dead_letters WHERE topic = 'regress_bh_deferred'"),
	't', 'with the trigger\'s error as its reason');
is($b->safe_psql('postgres', "SELECT string_agg(id::text, ',' ORDER BY id) FROM regress_bh_deferred"),
	'1,3', 'and the other rows of its transaction are applied');

$_->stop for ($a, $b);
done_testing();
