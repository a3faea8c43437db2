-- kafka_bridge.subscribe(), unsubscribe(), sync(): the SQL surface of the
-- apply side.  (The applier itself runs against a real broker in test/t/03*.)
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS kafka_bridge;
RESET client_min_messages;

CREATE TABLE regress_sub_client (id int PRIMARY KEY, name text);
CREATE TABLE regress_sub_nokey (id int, name text);
CREATE TABLE regress_sub_full (id int, name text);
ALTER TABLE regress_sub_full REPLICA IDENTITY FULL;
CREATE TABLE regress_sub_by_index (a int NOT NULL, b int NOT NULL, c text);
CREATE UNIQUE INDEX regress_sub_by_index_ab ON regress_sub_by_index (a, b);
ALTER TABLE regress_sub_by_index REPLICA IDENTITY USING INDEX regress_sub_by_index_ab;
CREATE TEMP TABLE regress_sub_temp (id int PRIMARY KEY);
CREATE VIEW regress_sub_view AS SELECT * FROM regress_sub_client;

-- defaults: topic = table name, prefix = its upper case, envelope, the owner applies (here the caller)
SELECT kafka_bridge.subscribe('regress_sub_client');
SELECT table_name, topic, format, event_prefix, apply_role = current_user::regrole AS applies_as_me
  FROM kafka_bridge.subscribed_tables;
-- subscribing again replaces the settings
SELECT kafka_bridge.subscribe('regress_sub_client', topic => 'clients-v2', format => 'flat',
                              event_prefix => 'CLIENT');
SELECT table_name, topic, format, event_prefix FROM kafka_bridge.subscribed_tables;
-- a table identified by a unique index
SELECT kafka_bridge.subscribe('regress_sub_by_index');

-- refused, with the reason
SELECT kafka_bridge.subscribe('regress_sub_nokey');
SELECT kafka_bridge.subscribe('regress_sub_full');
SELECT kafka_bridge.subscribe('regress_sub_temp');
SELECT kafka_bridge.subscribe('regress_sub_view');
SELECT kafka_bridge.subscribe('kafka_bridge.dead_letters');
SELECT kafka_bridge.subscribe('pg_class');
SELECT kafka_bridge.subscribe(NULL);
SELECT kafka_bridge.subscribe('regress_sub_by_index', format => 'xml');
SELECT kafka_bridge.subscribe('regress_sub_by_index', topic => 'no spaces');
SELECT kafka_bridge.subscribe('regress_sub_by_index', event_prefix => '');
-- where a new subscription starts: the beginning of the topic (default), or
-- its end, read from the brokers at once (none here: refused, saying why)
SELECT start_position FROM kafka_bridge.subscribed_tables WHERE table_name = 'regress_sub_client'::regclass;
SELECT kafka_bridge.subscribe('regress_sub_client', start_position => 'middle');
\set VERBOSITY terse
SELECT kafka_bridge.subscribe('regress_sub_client', start_position => 'end');
\set VERBOSITY default
SELECT kafka_bridge.sync('regress_sub_client', start_position => 'latest');

-- one table per topic
SELECT kafka_bridge.subscribe('regress_sub_by_index', topic => 'clients-v2');
CREATE ROLE regress_sub_other;

-- only the owner subscribes, and only with EXECUTE granted
CREATE ROLE regress_sub_user;
GRANT USAGE ON SCHEMA kafka_bridge TO regress_sub_user;
SET ROLE regress_sub_user;
SELECT kafka_bridge.subscribe('regress_sub_by_index');
RESET ROLE;
GRANT EXECUTE ON FUNCTION kafka_bridge.subscribe(regclass, text, text, text, regrole, text, text) TO regress_sub_user;
SET ROLE regress_sub_user;
SELECT kafka_bridge.subscribe('regress_sub_by_index');
SELECT * FROM kafka_bridge.dead_letters;
RESET ROLE;
-- an owner needs no right on kafka_bridge's tables
CREATE TABLE regress_sub_owned (id int PRIMARY KEY);
ALTER TABLE regress_sub_owned OWNER TO regress_sub_user;
SET ROLE regress_sub_user;
SELECT kafka_bridge.subscribe('regress_sub_owned');
-- but may only apply as a role it is a member of
SELECT kafka_bridge.subscribe('regress_sub_owned', apply_role => 'regress_sub_other');
RESET ROLE;
SELECT table_name, apply_role FROM kafka_bridge.subscribed_tables WHERE table_name = 'regress_sub_owned'::regclass;
-- a superuser may not make it apply as a role its owner is not a member
-- of (the table's triggers and defaults run as the apply role)
SELECT kafka_bridge.subscribe('regress_sub_owned', apply_role => 'regress_sub_other');
-- and left out, apply_role is the table's owner, not the caller
SELECT kafka_bridge.subscribe('regress_sub_owned');
SELECT table_name, apply_role FROM kafka_bridge.subscribed_tables WHERE table_name = 'regress_sub_owned'::regclass;
GRANT regress_sub_other TO regress_sub_user;
SELECT kafka_bridge.subscribe('regress_sub_owned', apply_role => 'regress_sub_other');
SELECT table_name, apply_role FROM kafka_bridge.subscribed_tables WHERE table_name = 'regress_sub_owned'::regclass;
-- membership is looked at again when events are applied
REVOKE regress_sub_other FROM regress_sub_user;
SELECT kafka_bridge.apply_event('regress_sub_owned', '{"id":1}', '{"event":"REGRESS_SUB_OWNED-PUT","row":{"id":1}}');
SELECT count(*) FROM regress_sub_owned;
-- so is the membership of its partitions' owners: the applier's
-- statements reach them, and their triggers run as the apply role
CREATE TABLE regress_sub_parted (id int PRIMARY KEY) PARTITION BY RANGE (id);
CREATE TABLE regress_sub_parted_1 PARTITION OF regress_sub_parted FOR VALUES FROM (0) TO (100);
ALTER TABLE regress_sub_parted OWNER TO regress_sub_other;
SET client_min_messages = error;
SELECT kafka_bridge.subscribe('regress_sub_parted');
RESET client_min_messages;
ALTER TABLE regress_sub_parted_1 OWNER TO regress_sub_user;
SELECT kafka_bridge.apply_event('regress_sub_parted', '{"id":1}', '{"event":"REGRESS_SUB_PARTED-PUT","row":{"id":1}}');
SELECT kafka_bridge.subscribe('regress_sub_parted');
SELECT count(*) FROM regress_sub_parted;
ALTER TABLE regress_sub_parted_1 OWNER TO regress_sub_other;
SELECT kafka_bridge.apply_event('regress_sub_parted', '{"id":1}', '{"event":"REGRESS_SUB_PARTED-PUT","row":{"id":1}}');
SELECT count(*) FROM regress_sub_parted;
SELECT kafka_bridge.unsubscribe('regress_sub_parted');
DROP TABLE regress_sub_parted;

-- sync = publish + subscribe of the same topic
CREATE TABLE regress_sync (id bigint PRIMARY KEY, v text);
SET client_min_messages = error;
SELECT kafka_bridge.sync('regress_sync', event_prefix => 'SYNCED');
RESET client_min_messages;
SELECT p.topic AS published_to, p.event_prefix, s.topic AS subscribed_to, s.event_prefix, s.format
  FROM kafka_bridge.published_tables p JOIN kafka_bridge.subscribed_tables s USING (table_name)
 WHERE table_name = 'regress_sync'::regclass;

-- progress rows of a subscription go with it
INSERT INTO kafka_bridge.apply_progress (topic, partition, next_offset) VALUES ('regress_sync', 0, 42);
INSERT INTO kafka_bridge.apply_origins (topic, partition, origin, lsn, seq) VALUES ('regress_sync', 0, 'x', '0/1', 1);
SELECT table_name, topic, partition, next_offset, lag FROM kafka_bridge.subscription_status
 WHERE topic = 'regress_sync';
SELECT kafka_bridge.unsubscribe('regress_sync');
SELECT count(*) FROM kafka_bridge.apply_progress WHERE topic = 'regress_sync';
SELECT count(*) FROM kafka_bridge.apply_origins WHERE topic = 'regress_sync';
SELECT kafka_bridge.unsubscribe('regress_sync');

-- dropping a subscribed table forgets its subscription
DROP TABLE regress_sub_by_index;
SELECT table_name FROM kafka_bridge.subscribed_tables ORDER BY 1;

-- conflict policies: last_write_wins by default; a bad one is named
SELECT kafka_bridge.subscribe('regress_sub_client', conflict_policy => 'newest');
CREATE TABLE regress_conflict (id int PRIMARY KEY, v text);
SET client_min_messages = error;
SELECT kafka_bridge.subscribe('regress_conflict');
RESET client_min_messages;
SELECT conflict_policy FROM kafka_bridge.subscribed_tables WHERE table_name = 'regress_conflict'::regclass;
-- local deletes and key changes leave tombstones, through a trigger
SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = 'regress_conflict'::regclass;
INSERT INTO regress_conflict VALUES (1, 'a'), (2, 'b'), (3, 'c');
DELETE FROM regress_conflict WHERE id = 1;
UPDATE regress_conflict SET id = 20 WHERE id = 2;
UPDATE regress_conflict SET v = 'still 3' WHERE id = 3;
SELECT key, origin, commit_time, xid IS NOT NULL AS has_xid
  FROM kafka_bridge.tombstones WHERE relid = 'regress_conflict'::regclass ORDER BY key;
-- arrays nested deeper than 8 are refused, siblings after them included
-- (the depth went below zero and the next '[' wrote outside its array)
CREATE TABLE regress_sub_arr (id int PRIMARY KEY, a int[]);
SELECT kafka_bridge.subscribe('regress_sub_arr', conflict_policy => 'apply_remote');
SELECT kafka_bridge.apply_event('regress_sub_arr', '{"id":1}',
  '{"event":"REGRESS_SUB_ARR-PUT","row":{"id":1,"a":[' || repeat('[', 16) || '1' || repeat(']', 16) || ',[2],[3]]}}');
SELECT kafka_bridge.apply_event('regress_sub_arr', '{"id":2}',
  '{"event":"REGRESS_SUB_ARR-PUT","row":{"id":2,"a":[' || repeat('[', 13) || '1' || repeat(']', 13) || ',[2]]}}');
-- at the limit: 8 deep passes the reader, and the array's input function
-- refuses it (at most 6 dimensions); 9 deep is the reader's to refuse
SELECT kafka_bridge.apply_event('regress_sub_arr', '{"id":4}',
  '{"event":"REGRESS_SUB_ARR-PUT","row":{"id":4,"a":' || repeat('[', 8) || '1' || repeat(']', 8) || '}}');
SELECT kafka_bridge.apply_event('regress_sub_arr', '{"id":4}',
  '{"event":"REGRESS_SUB_ARR-PUT","row":{"id":4,"a":' || repeat('[', 9) || '1' || repeat(']', 9) || '}}');
SELECT kafka_bridge.apply_event('regress_sub_arr', '{"id":3}',
  '{"event":"REGRESS_SUB_ARR-PUT","row":{"id":3,"a":[[1,2],[3,4]]}}');
SELECT * FROM regress_sub_arr;
SELECT kafka_bridge.unsubscribe('regress_sub_arr');

-- apply_event(): the policy decides, with the event's version
SELECT kafka_bridge.apply_event('regress_conflict', '{"id":1}',
  '{"event":"REGRESS_CONFLICT-PUT","row":{"id":1,"v":"older than the delete"}}',
  'elsewhere', '2001-01-01 00:00:00+00');
SELECT kafka_bridge.apply_event('regress_conflict', '{"id":3}',
  '{"event":"REGRESS_CONFLICT-PUT","row":{"id":3,"v":"newer"}}',
  'elsewhere', '2099-01-01 00:00:00+00');
SELECT kafka_bridge.apply_event('regress_conflict', '{"id":20}',
  '{"event":"REGRESS_CONFLICT-DELETE","row":{"id":20}}',
  'elsewhere', '2099-01-01 00:00:01+00');
SELECT * FROM regress_conflict ORDER BY id;
SELECT key, kind, local_commit_time IS NOT NULL AS local_time_known, remote_origin,
       remote_commit_time, policy, resolution, topic
  FROM kafka_bridge.conflicts ORDER BY id;
SELECT key, origin, commit_time FROM kafka_bridge.tombstones
 WHERE relid = 'regress_conflict'::regclass ORDER BY key;
-- the applied row carries the remote version, under an origin named after the instance
-- (apply_event()'s own: the applier's is kafka_bridge_<db>:<instance>)
SELECT c.timestamp, regexp_replace(o.roname, '^kafka_bridge_\d+', 'kafka_bridge_<db>') AS origin
  FROM regress_conflict r, pg_xact_commit_timestamp_origin(r.xmin) c
  JOIN pg_replication_origin o ON o.roident = c.roident
 WHERE r.id = 3;
-- one source transaction per transaction
BEGIN;
SELECT kafka_bridge.apply_event('regress_conflict', '{"id":7}',
  '{"event":"REGRESS_CONFLICT-PUT","row":{"id":7,"v":"x"}}', 'elsewhere', '2099-01-02 00:00:00+00');
SELECT kafka_bridge.apply_event('regress_conflict', '{"id":8}',
  '{"event":"REGRESS_CONFLICT-PUT","row":{"id":8,"v":"y"}}', 'another', '2099-01-02 00:00:00+00');
ROLLBACK;
-- a prepared transaction would keep the origin on the session
BEGIN;
SELECT kafka_bridge.apply_event('regress_conflict', '{"id":7}',
  '{"event":"REGRESS_CONFLICT-PUT","row":{"id":7,"v":"x"}}', 'elsewhere', '2099-01-02 00:00:00+00');
PREPARE TRANSACTION 'regress_apply_event';
SELECT pg_replication_origin_session_is_setup() AS origin_left_on_session;
-- the table's code runs restricted, and what it sets is undone
CREATE FUNCTION regress_meddle() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_catalog.set_config('search_path', 'regress_meddled', false);
  IF NEW.v = 'temp' THEN
    CREATE TEMP TABLE regress_left_behind (x int);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER regress_meddle BEFORE INSERT ON regress_conflict
  FOR EACH ROW EXECUTE FUNCTION regress_meddle();
ALTER TABLE regress_conflict ENABLE ALWAYS TRIGGER regress_meddle;
SHOW search_path;
SELECT kafka_bridge.apply_event('regress_conflict', '{"id":10}',
  '{"event":"REGRESS_CONFLICT-PUT","row":{"id":10,"v":"x"}}', 'elsewhere', '2099-01-03 00:00:00+00');
SHOW search_path;
SELECT kafka_bridge.apply_event('regress_conflict', '{"id":11}',
  '{"event":"REGRESS_CONFLICT-PUT","row":{"id":11,"v":"temp"}}', 'elsewhere', '2099-01-04 00:00:00+00');
SELECT count(*) AS temp_tables_left FROM pg_class WHERE relname = 'regress_left_behind';
DROP TRIGGER regress_meddle ON regress_conflict;
DROP FUNCTION regress_meddle();
-- refused
SELECT kafka_bridge.apply_event('regress_sub_nokey', '{}', '{}');
SELECT kafka_bridge.apply_event('regress_conflict', '{"id":9}',
  '{"event":"REGRESS_CONFLICT-PUT","row":{"id":9}}', kafka_bridge.instance_id(), now());
SELECT kafka_bridge.apply_event('regress_conflict', '{"id":9}', 'not json', 'elsewhere', now());
SET ROLE regress_sub_user;
SELECT kafka_bridge.apply_event('regress_conflict', '{"id":9}', '{}', 'elsewhere', now());
RESET ROLE;
-- a partitioned table: its partitions' deletes leave their tombstones under
-- its name, where the applier looks for them
CREATE TABLE regress_parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
CREATE TABLE regress_parted_low PARTITION OF regress_parted FOR VALUES FROM (0) TO (100)
  PARTITION BY RANGE (id);
CREATE TABLE regress_parted_leaf PARTITION OF regress_parted_low FOR VALUES FROM (0) TO (50);
SET client_min_messages = error;
SELECT kafka_bridge.subscribe('regress_parted');
RESET client_min_messages;
INSERT INTO regress_parted VALUES (5, 'a');
DELETE FROM regress_parted WHERE id = 5;
SELECT relid::regclass, key FROM kafka_bridge.tombstones WHERE key = '["5"]';
SELECT kafka_bridge.apply_event('regress_parted', '{"id":5}',
  '{"event":"REGRESS_PARTED-PUT","row":{"id":5,"v":"older than the delete"}}',
  'elsewhere', '2001-01-01 00:00:00+00');
SELECT count(*) AS resurrected FROM regress_parted;
SELECT kafka_bridge.unsubscribe('regress_parted');
SELECT count(*) AS tombstones_left FROM kafka_bridge.tombstones WHERE key = '["5"]';
DROP TABLE regress_parted;
-- apply_remote checks nothing: no trigger
SELECT kafka_bridge.subscribe('regress_conflict', conflict_policy => 'apply_remote');
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'regress_conflict'::regclass;
-- unsubscribing forgets the tombstones
SELECT kafka_bridge.unsubscribe('regress_conflict');
SELECT count(*) AS tombstones FROM kafka_bridge.tombstones WHERE relid = 'regress_conflict'::regclass;
TRUNCATE kafka_bridge.conflicts;
DROP TABLE regress_conflict;

-- dead letters hold rows: not even monitoring roles read them unless granted
SELECT has_table_privilege('pg_monitor', 'kafka_bridge.dead_letters', 'SELECT') AS monitor_reads,
       has_table_privilege('regress_sub_user', 'kafka_bridge.dead_letters', 'SELECT') AS user_reads;

SELECT kafka_bridge.unsubscribe('regress_sub_client');
SELECT kafka_bridge.unsubscribe('regress_sub_owned');
SELECT kafka_bridge.unpublish('regress_sync');
DROP TABLE regress_sub_client, regress_sub_nokey, regress_sub_full, regress_sub_owned, regress_sync CASCADE;
DROP ROLE regress_sub_other;
REVOKE ALL ON SCHEMA kafka_bridge FROM regress_sub_user;
REVOKE ALL ON FUNCTION kafka_bridge.subscribe(regclass, text, text, text, regrole, text, text) FROM regress_sub_user;
DROP ROLE regress_sub_user;
