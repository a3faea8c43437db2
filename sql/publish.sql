-- kafka_bridge.publish(), unpublish() and the published_tables view.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS kafka_bridge;
RESET client_min_messages;

CREATE TABLE client (id int PRIMARY KEY, name text);
CREATE TABLE "Order Lines" (id int PRIMARY KEY);
CREATE TABLE regress_keyless (a int, b text);
CREATE TABLE regress_by_index (a int NOT NULL, b text);
CREATE UNIQUE INDEX regress_by_index_a ON regress_by_index (a);
ALTER TABLE regress_by_index REPLICA IDENTITY USING INDEX regress_by_index_a;
CREATE TABLE regress_full (a int, b text);
ALTER TABLE regress_full REPLICA IDENTITY FULL;
CREATE TABLE regress_parted (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
CREATE TABLE regress_parted_1 PARTITION OF regress_parted FOR VALUES FROM (0) TO (100);

-- defaults: topic = table name, event prefix = table name in upper case
SELECT kafka_bridge.publish('client');
SELECT table_name, topic, event_prefix, format, tombstones,
       created_at > now() - interval '1 hour' AS created_recently
  FROM kafka_bridge.published_tables;

-- all arguments
SELECT kafka_bridge.publish('regress_by_index', topic => 'shop.lines-v2',
                            event_prefix => 'LINE', tombstones => false);
-- REPLICA IDENTITY FULL is a key too; so is a partitioned table's primary key
SELECT kafka_bridge.publish('regress_full');
SELECT kafka_bridge.publish('regress_parted');
-- flat: keyed by event type, so a notice about partitions; never tombstones
SELECT kafka_bridge.publish('"Order Lines"', topic => 'order_lines', format => 'flat');

-- publishing again replaces the settings, and keeps the creation time
UPDATE kafka_bridge.publications SET created_at = '2020-01-01 00:00:00+00'
 WHERE relid = 'client'::regclass;
SELECT kafka_bridge.publish('client', topic => 'clients');
SELECT table_name, topic, event_prefix, format, tombstones,
       created_at = '2020-01-01 00:00:00+00' AS created_kept
  FROM kafka_bridge.published_tables WHERE table_name = 'client'::regclass;
SELECT kafka_bridge.publish('client');

SELECT table_name, topic, event_prefix, format, tombstones
  FROM kafka_bridge.published_tables ORDER BY table_name::text;

-- a table needs a primary key or a replica identity
SELECT kafka_bridge.publish('regress_keyless');
ALTER TABLE regress_keyless REPLICA IDENTITY NOTHING;
SELECT kafka_bridge.publish('regress_keyless');

-- only tables: not views, sequences, indexes, catalogs, kafka_bridge's own
CREATE VIEW regress_view AS SELECT 1 AS x;
SELECT kafka_bridge.publish('regress_view');
CREATE SEQUENCE regress_seq;
SELECT kafka_bridge.publish('regress_seq');
SELECT kafka_bridge.publish('client_pkey');
SELECT kafka_bridge.publish('pg_class');
SELECT kafka_bridge.publish('kafka_bridge.publications');
-- only tables whose changes reach the WAL
CREATE TEMP TABLE regress_temp (id int PRIMARY KEY);
SELECT kafka_bridge.publish('regress_temp');
CREATE UNLOGGED TABLE regress_unlogged (id int PRIMARY KEY);
SELECT kafka_bridge.publish('regress_unlogged');
SELECT kafka_bridge.publish(NULL);

-- formats
SELECT kafka_bridge.publish('client', format => 'avro');
SELECT kafka_bridge.publish('client', format => '');

-- topic names Kafka would refuse
SELECT kafka_bridge.publish('client', topic => '');
SELECT kafka_bridge.publish('client', topic => '.');
SELECT kafka_bridge.publish('client', topic => '..');
SELECT kafka_bridge.publish('client', topic => 'has space');
SELECT kafka_bridge.publish('client', topic => 'clients/eu');
SELECT kafka_bridge.publish('client', topic => 'clïents');
SELECT kafka_bridge.publish('client', topic => repeat('t', 250));
SELECT kafka_bridge.publish('client', topic => repeat('t', 249));
SELECT length(topic) FROM kafka_bridge.published_tables
 WHERE table_name = 'client'::regclass;
-- a table name that is no topic name needs a topic
SELECT kafka_bridge.publish('"Order Lines"');
-- event prefix
SELECT kafka_bridge.publish('client', event_prefix => '');
SELECT kafka_bridge.publish('client', event_prefix => 'Client V2');
SELECT table_name, topic, event_prefix FROM kafka_bridge.published_tables
 WHERE table_name = 'client'::regclass;
SELECT kafka_bridge.publish('client');

-- unpublish
SELECT kafka_bridge.unpublish('regress_full');
SELECT kafka_bridge.unpublish('regress_full');
SELECT kafka_bridge.unpublish('regress_keyless');
SELECT kafka_bridge.unpublish(NULL) IS NULL AS strict;
SELECT table_name FROM kafka_bridge.published_tables ORDER BY table_name::text;

-- in one transaction, each step sees the one before
BEGIN;
SELECT kafka_bridge.publish('regress_full');
SELECT count(*) FROM kafka_bridge.published_tables WHERE table_name = 'regress_full'::regclass;
SELECT kafka_bridge.unpublish('regress_full');
SELECT count(*) FROM kafka_bridge.published_tables WHERE table_name = 'regress_full'::regclass;
ROLLBACK;

-- Snapshots.  A new publication of a table with rows publishes them first
-- (the publisher runs it; here no publisher runs, so it stays pending); an
-- empty table has nothing to snapshot; snapshot => false skips it.
CREATE TABLE regress_snap (id int PRIMARY KEY, v text);
INSERT INTO regress_snap SELECT g, 'v' || g FROM generate_series(1, 100) g;
ANALYZE regress_snap;
CREATE TABLE regress_snap_empty (id int PRIMARY KEY);
CREATE TABLE regress_snap_skip (id int PRIMARY KEY);
INSERT INTO regress_snap_skip VALUES (1);
SELECT kafka_bridge.publish('regress_snap');
SELECT kafka_bridge.publish('regress_snap_empty');
SELECT kafka_bridge.publish('regress_snap_skip', snapshot => false);
SELECT table_name, state, rows_done, rows_estimated, done_up_to_key,
       started_at IS NOT NULL AS started, done_at IS NOT NULL AS done
  FROM kafka_bridge.snapshots WHERE table_name::text LIKE 'regress_snap%' ORDER BY 1::text;
-- publishing again to the same topic, in the same format, keeps the
-- snapshot as it is
SELECT kafka_bridge.publish('regress_snap_skip', event_prefix => 'SKIPPED');
SELECT state FROM kafka_bridge.snapshots WHERE table_name = 'regress_snap_skip'::regclass;
-- to another topic, the rows go there too (unless snapshot => false)
SELECT kafka_bridge.publish('regress_snap_skip', topic => 'snap_skip');
SELECT topic, state, rows_done FROM kafka_bridge.snapshots WHERE table_name = 'regress_snap_skip'::regclass;
SELECT kafka_bridge.publish('regress_snap_skip', topic => 'snap_skip_2', snapshot => false);
SELECT topic, state FROM kafka_bridge.snapshots WHERE table_name = 'regress_snap_skip'::regclass;
-- snapshot() starts one over, for published tables only
SELECT kafka_bridge.snapshot('regress_snap_skip');
SELECT state, rows_done, rows_estimated > 0 AS estimated, done_at IS NULL AS not_done
  FROM kafka_bridge.snapshots WHERE table_name = 'regress_snap_skip'::regclass;
SELECT kafka_bridge.snapshot('regress_keyless');
SELECT kafka_bridge.snapshot('regress_view');
SELECT kafka_bridge.snapshot(NULL);
DROP TABLE regress_snap, regress_snap_empty, regress_snap_skip;

-- Rights.  The functions are not for everyone; once granted, a role still
-- publishes only the tables it owns.
CREATE ROLE regress_kb_owner;
CREATE ROLE regress_kb_other;
GRANT USAGE ON SCHEMA kafka_bridge TO regress_kb_owner, regress_kb_other;
GRANT CREATE ON SCHEMA public TO regress_kb_owner;
SET ROLE regress_kb_owner;
CREATE TABLE regress_owned (id int PRIMARY KEY);
SELECT kafka_bridge.publish('regress_owned');
SELECT * FROM kafka_bridge.published_tables;
SELECT * FROM kafka_bridge.publications;
RESET ROLE;
GRANT EXECUTE ON FUNCTION kafka_bridge.publish(regclass, text, text, text, boolean, boolean),
                          kafka_bridge.unpublish(regclass), kafka_bridge.snapshot(regclass)
   TO regress_kb_owner, regress_kb_other;
SET ROLE regress_kb_owner;
SELECT kafka_bridge.publish('regress_owned');
-- the catalog stays out of reach: publish() writes it itself
INSERT INTO kafka_bridge.publications VALUES ('regress_owned', 't', 'P', 'flat');
SET ROLE regress_kb_other;
SELECT kafka_bridge.publish('regress_owned', topic => 'stolen');
SELECT kafka_bridge.unpublish('regress_owned');
SELECT kafka_bridge.snapshot('regress_owned');
SELECT kafka_bridge.publish('client');
RESET ROLE;
SELECT table_name, topic FROM kafka_bridge.published_tables
 WHERE table_name = 'regress_owned'::regclass;
-- monitoring roles may read the view
GRANT pg_monitor TO regress_kb_other;
SET ROLE regress_kb_other;
SELECT count(*) FROM kafka_bridge.published_tables;
SELECT count(state) FROM kafka_bridge.snapshots;
-- but not a snapshot's last key, which is row data
SELECT done_up_to_key FROM kafka_bridge.snapshots;
RESET ROLE;

-- dropping a published table forgets its publication, whoever drops it
SET ROLE regress_kb_owner;
DROP TABLE regress_owned;
RESET ROLE;
SELECT count(*) FROM kafka_bridge.publications
 WHERE relid::oid NOT IN (SELECT oid FROM pg_class);
DROP TABLE regress_parted;
SELECT table_name FROM kafka_bridge.published_tables ORDER BY table_name::text;

-- the catalog is part of a pg_dump of the database
SELECT extconfig::regclass[] AS dumped_tables FROM pg_extension
 WHERE extname = 'kafka_bridge';

-- the event trigger is only for event triggers
SELECT kafka_bridge.forget_dropped_tables();

REVOKE CREATE ON SCHEMA public FROM regress_kb_owner;
DROP OWNED BY regress_kb_owner, regress_kb_other;
DROP ROLE regress_kb_owner, regress_kb_other;
DROP VIEW regress_view;
DROP SEQUENCE regress_seq;
DROP TABLE client, "Order Lines", regress_keyless, regress_by_index,
  regress_full, regress_unlogged;
SELECT count(*) FROM kafka_bridge.publications;
