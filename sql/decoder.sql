-- The kafka_bridge output plugin: the records it makes of row changes.
SET client_min_messages = warning;
CREATE EXTENSION IF NOT EXISTS kafka_bridge;
RESET client_min_messages;
-- timestamptz values and commit times come out in UTC whatever this says
SET TimeZone = 'America/New_York';

SELECT 'init' FROM pg_create_logical_replication_slot('regress_slot', 'kafka_bridge');

-- The records since the last call, without the parts that change from run
-- to run (xid, commit time, LSNs, and the instance id, which defaults to the
-- system identifier).
CREATE FUNCTION regress_changes(VARIADIC options text[] DEFAULT '{}')
RETURNS SETOF text LANGUAGE sql AS $$
  SELECT replace(data, kafka_bridge.instance_id(), '<instance>')
    FROM pg_logical_slot_get_changes('regress_slot', NULL, NULL,
           VARIADIC ARRAY['include-xids', '0', 'include-timestamp', '0',
                          'include-lsn', '0'] || options)
$$;

CREATE TABLE client (id int PRIMARY KEY, name text);
SELECT kafka_bridge.publish('client');

-- insert, update, delete; then a DELETE's tombstone (null value, same key)
INSERT INTO client VALUES (1, 'Ada'), (2, 'Brian');
UPDATE client SET name = 'Ada L.' WHERE id = 1;
DELETE FROM client WHERE id = 2;
SELECT replace(data, kafka_bridge.instance_id(), '<instance>') AS data
  FROM pg_logical_slot_get_changes('regress_slot', NULL, NULL,
       'include-xids', '0', 'include-timestamp', '0', 'include-lsn', '0');

-- a new key is a new record key: DELETE the old one, then PUT
UPDATE client SET id = 3 WHERE id = 1;
SELECT * FROM regress_changes();

-- nothing for a rolled-back transaction, an unpublished table, a logical
-- message, or a transaction that only does those
BEGIN;
INSERT INTO client VALUES (10, 'ghost');
ROLLBACK;
CREATE TABLE regress_unpublished (id int PRIMARY KEY, v text);
INSERT INTO regress_unpublished VALUES (1, 'not published');
SELECT 'msg' FROM pg_logical_emit_message(true, 'regress', 'hello');
BEGIN;
INSERT INTO client VALUES (11, 'savepoint rolled back');
SAVEPOINT s;
INSERT INTO client VALUES (12, 'kept');
ROLLBACK TO s;
INSERT INTO client VALUES (13, 'after');
COMMIT;
SELECT * FROM regress_changes();

-- the default options: xid, commit time and LSN in the envelope, LSN in
-- the headers
INSERT INTO client VALUES (20, 'full');
SELECT regexp_replace(regexp_replace(regexp_replace(
         replace(data, kafka_bridge.instance_id(), '<instance>'),
         '"lsn":"[0-9A-F]+/[0-9A-F]+"', '"lsn":"<lsn>"', 'g'),
         '"commit_time":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00"', '"commit_time":"<utc>"', 'g'),
         '"xid":\d+', '"xid":<xid>') AS data
  FROM pg_logical_slot_get_changes('regress_slot', NULL, NULL);

-- Types.  Lossless: numbers stay numbers, numeric a string with every digit,
-- json embedded, timestamps and intervals ISO 8601 (timestamptz in UTC),
-- bytea in hex.
CREATE TYPE regress_mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN regress_posint AS int CHECK (VALUE > 0);
CREATE DOMAIN regress_code AS text CHECK (VALUE ~ '^[A-Z]+$');
CREATE TABLE regress_types (
  id int PRIMARY KEY,
  i2 int2, i4 int4, i8 int8, o oid,
  n numeric, f4 float4, f8 float8,
  b bool, t text, vc varchar(20), by bytea,
  d date, tm time, ttz timetz, ts timestamp, tstz timestamptz, iv interval,
  u uuid, js json, jb jsonb,
  ia int[], ta text[], pa regress_posint[],
  e regress_mood, dp regress_posint, dc regress_code, pt point);
SELECT kafka_bridge.publish('regress_types');
INSERT INTO regress_types VALUES
  (1, -32768, 2147483647, -9223372036854775808, 4294967295,
   '12345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890.0123456789',
   1.1, 0.1,
   true, E'héllo "quoted" back\\slash\nnew line\ttab \x01 😀', 'short', '\x00ff10',
   '2024-02-29', '13:14:15.5', '13:14:15+02', '2024-02-29 13:14:15.123456',
   '2024-02-29 13:14:15+02', '1 year 2 mons 3 days 04:05:06.789',
   'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', E'{"a":\n [1, 2.50, "x\\ny"],\r\n\t"b": null}',
   '{"z": {"nested": [true, false]}, "a": 1.50}',
   '{1,2,3}', '{"a b","c\"d",NULL,"NULL",""}', '{1,2}',
   'happy', 7, 'ABC', '(1.5,-2)'),
  (2, 0, 0, 0, 0,
   'NaN', 'NaN', 'Infinity',
   false, '', '', '\x',
   'infinity', '00:00', '00:00+00', '-infinity', 'infinity', '0',
   '00000000-0000-0000-0000-000000000000', '"just a string"', 'null',
   '{{1,2},{3,NULL}}', '{{a,b},{c,d}}', '{}',
   'sad', 1, 'Z', '(0,0)'),
  (3, NULL, NULL, NULL, NULL, '-Infinity', '-Infinity', '-Infinity',
   NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL, '[0:1]={5,6}', NULL, NULL, NULL, NULL, NULL, NULL),
  (4, 1, 1, 1, 1, '-0.000001', '-0', '1e300', NULL, NULL, NULL, NULL,
   '0044-03-15 BC', NULL, NULL, '2024-01-01 00:00:00', '2024-07-01 12:00:00.000001',
   '-1 days -00:00:01', NULL, '[]', '{}', '{{{1}},{{2}}}', NULL, NULL,
   NULL, NULL, NULL, NULL);
CREATE TEMP TABLE regress_decoded AS SELECT d FROM regress_changes() d;
SELECT d FROM regress_decoded;
-- and back: each row rebuilt from its event through the columns' input
-- functions, as the apply side does, equals the row in the table
SELECT orig.id,
       (SELECT array_agg(key) FROM jsonb_each(to_jsonb(orig)) a
          FULL JOIN jsonb_each(to_jsonb(rebuilt)) b USING (key)
         WHERE a.value IS DISTINCT FROM b.value) AS differing_columns
  FROM regress_decoded,
       jsonb_populate_record(NULL::regress_types, d::jsonb -> 'value' -> 'row') rebuilt
  JOIN regress_types orig USING (id)
 ORDER BY orig.id;
-- DateStyle, IntervalStyle, bytea_output and extra_float_digits change
-- nothing
SET DateStyle = 'SQL, DMY';
SET IntervalStyle = 'iso_8601';
SET bytea_output = 'escape';
SET extra_float_digits = -3;
UPDATE regress_types SET id = id WHERE id = 1;
SELECT * FROM regress_changes();
RESET DateStyle;
RESET IntervalStyle;
RESET bytea_output;
RESET extra_float_digits;

-- generated and dropped columns are not sent; names are JSON-escaped
CREATE SCHEMA "Sales";
CREATE TABLE "Sales"."Big ""Orders""" (
  "Id" int PRIMARY KEY, gone int, "total €" numeric, "a""b" text,
  doubled numeric GENERATED ALWAYS AS ("total €" * 2) STORED);
ALTER TABLE "Sales"."Big ""Orders""" DROP COLUMN gone;
SELECT kafka_bridge.publish('"Sales"."Big ""Orders"""', topic => 'sales.orders',
                            event_prefix => 'Order "Big"');
INSERT INTO "Sales"."Big ""Orders""" VALUES (1, 9.99, 'x');
SELECT * FROM regress_changes();

-- Format flat (seed-compatible): key = event type, value = the row; a
-- DELETE's value is the old key; no tombstones.
CREATE TABLE regress_flat (id int PRIMARY KEY, name text);
SELECT kafka_bridge.publish('regress_flat', topic => 'flat', format => 'flat');
INSERT INTO regress_flat VALUES (1, 'one');
UPDATE regress_flat SET name = 'uno';
DELETE FROM regress_flat;
INSERT INTO regress_flat VALUES (2, 'two');
TRUNCATE regress_flat;
SELECT * FROM regress_changes();
-- a TRUNCATE after another record of its transaction has a number (seq)
-- of its own: its value is null, as a tombstone's, but it shares no
-- number (an applier takes a record whose number it saw for a replay)
BEGIN;
INSERT INTO regress_flat VALUES (3, 'three');
TRUNCATE regress_flat;
COMMIT;
SELECT (data::jsonb)->'key' AS key, (data::jsonb)->'headers'->'seq' AS seq
  FROM pg_logical_slot_get_changes('regress_slot', NULL, NULL, 'include-xids', '0', 'include-timestamp', '0');

-- Replica identities.  FULL without a primary key: every column is the
-- key, so an UPDATE is a DELETE of the old row and a PUT of the new one.
CREATE TABLE regress_full (a int, b text);
ALTER TABLE regress_full REPLICA IDENTITY FULL;
SELECT kafka_bridge.publish('regress_full');
INSERT INTO regress_full VALUES (1, 'x');
UPDATE regress_full SET b = 'y';
UPDATE regress_full SET b = 'y';
DELETE FROM regress_full;
SELECT * FROM regress_changes();
-- FULL with a primary key: the key is the primary key, a DELETE carries
-- the whole old row
CREATE TABLE regress_full_pk (id int PRIMARY KEY, b text);
ALTER TABLE regress_full_pk REPLICA IDENTITY FULL;
SELECT kafka_bridge.publish('regress_full_pk', tombstones => false);
INSERT INTO regress_full_pk VALUES (1, 'x');
UPDATE regress_full_pk SET b = 'y';
DELETE FROM regress_full_pk;
SELECT * FROM regress_changes();
-- USING INDEX: that index's columns, in attnum order
CREATE TABLE regress_by_index (x int, b int NOT NULL, a int NOT NULL);
CREATE UNIQUE INDEX regress_by_index_ab ON regress_by_index (a, b);
ALTER TABLE regress_by_index REPLICA IDENTITY USING INDEX regress_by_index_ab;
SELECT kafka_bridge.publish('regress_by_index');
INSERT INTO regress_by_index VALUES (1, 2, 3);
UPDATE regress_by_index SET x = 10;
DELETE FROM regress_by_index;
SELECT * FROM regress_changes();
-- a published table whose identity goes away later: events with a null key
ALTER TABLE regress_by_index REPLICA IDENTITY NOTHING;
INSERT INTO regress_by_index VALUES (4, 5, 6);
DELETE FROM regress_by_index;
SELECT * FROM regress_changes();

-- TOAST: an UPDATE that leaves a TOASTed column alone does not have its
-- value; the column is listed in "unchanged" and left out of the row.
CREATE TABLE regress_toast (id int PRIMARY KEY, small int, big text);
ALTER TABLE regress_toast ALTER COLUMN big SET STORAGE EXTERNAL;
SELECT kafka_bridge.publish('regress_toast');
INSERT INTO regress_toast
  SELECT 1, 1, string_agg(md5(i::text), '') FROM generate_series(1, 200) i;
UPDATE regress_toast SET small = 2;
UPDATE regress_toast SET big = 'short now', small = 3;
SELECT length(d), regexp_replace(d, '[0-9a-f]{250}[0-9a-f]*', '<long hex>', 'g') FROM regress_changes() d;
-- with REPLICA IDENTITY FULL the old row has the value: the row is whole
ALTER TABLE regress_toast REPLICA IDENTITY FULL;
UPDATE regress_toast SET big = (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 200) i);
UPDATE regress_toast SET small = 4;
SELECT length(d), regexp_replace(d, '[0-9a-f]{250}[0-9a-f]*', '<long hex>', 'g') FROM regress_changes() d;

-- Partitions: a published partitioned table's changes are its own, rows
-- converted to its columns whatever the partition's column order.
CREATE TABLE regress_parted (id int PRIMARY KEY, v text, w int) PARTITION BY RANGE (id);
CREATE TABLE regress_parted_1 PARTITION OF regress_parted FOR VALUES FROM (0) TO (100);
CREATE TABLE regress_parted_2 (w int, dropme int, v text, id int NOT NULL);
ALTER TABLE regress_parted_2 DROP COLUMN dropme;
ALTER TABLE regress_parted ATTACH PARTITION regress_parted_2 FOR VALUES FROM (100) TO (200);
SELECT kafka_bridge.publish('regress_parted');
INSERT INTO regress_parted VALUES (1, 'in one', 10), (101, 'in two', 20);
UPDATE regress_parted SET id = 150 WHERE id = 1;
-- truncating the partitioned table is one TRUNCATE; a partition alone, none
TRUNCATE regress_parted_1;
TRUNCATE regress_parted;
SELECT * FROM regress_changes();
-- a partition published on its own goes to its own topic
SELECT kafka_bridge.publish('regress_parted_2', topic => 'parted_two');
INSERT INTO regress_parted VALUES (2, 'one', 1), (102, 'two', 2);
TRUNCATE regress_parted_2;
SELECT * FROM regress_changes();

-- TRUNCATE of several published tables at once: one event each
INSERT INTO client VALUES (30, 'x');
INSERT INTO regress_full_pk VALUES (30, 'x');
TRUNCATE client, regress_full_pk, regress_unpublished;
SELECT * FROM regress_changes();

-- Publishing takes effect at its place in the WAL: one call decodes all of
-- these, and each change is emitted as the publication was when it ran.
INSERT INTO regress_unpublished VALUES (2, 'before publish');
SELECT kafka_bridge.publish('regress_unpublished', topic => 'first', snapshot => false);
INSERT INTO regress_unpublished VALUES (3, 'after publish');
BEGIN;
INSERT INTO regress_unpublished VALUES (4, 'same transaction, before');
SELECT kafka_bridge.publish('regress_unpublished', topic => 'second', event_prefix => 'SECOND', snapshot => false);
INSERT INTO regress_unpublished VALUES (5, 'same transaction, after');
COMMIT;
SELECT kafka_bridge.unpublish('regress_unpublished');
INSERT INTO regress_unpublished VALUES (6, 'after unpublish');
BEGIN;
SELECT kafka_bridge.publish('regress_unpublished', topic => 'rolled_back');
INSERT INTO regress_unpublished VALUES (7, 'publish rolled back');
ROLLBACK;
ALTER TABLE regress_unpublished ADD COLUMN extra int DEFAULT 42;
SELECT kafka_bridge.publish('regress_unpublished', topic => 'third', snapshot => false);
INSERT INTO regress_unpublished VALUES (8, 'new column');
ALTER TABLE regress_unpublished RENAME TO regress_renamed;
INSERT INTO regress_renamed VALUES (9, 'renamed');
SELECT * FROM regress_changes();
SELECT kafka_bridge.unpublish('regress_renamed');
ALTER TABLE regress_renamed RENAME TO regress_unpublished;

-- While a snapshot runs, the PUTs of keys above the last one it covered
-- (snapshot_upto) wait for it; DELETEs always go.  Here the snapshot's
-- progress is written by hand, and publish() again makes the decoder see it.
CREATE TABLE regress_snap (a int, b text COLLATE "C", v text, PRIMARY KEY (b, a));
INSERT INTO regress_snap SELECT g, 'k' || g, 'old' FROM generate_series(1, 6) g;
SELECT kafka_bridge.publish('regress_snap');
INSERT INTO regress_snap VALUES (0, 'k0', 'pending: waits');
UPDATE kafka_bridge.publications SET snapshot_state = 'running', snapshot_upto = '{k3,3}'
 WHERE relid = 'regress_snap'::regclass;
SELECT kafka_bridge.publish('regress_snap');
INSERT INTO regress_snap VALUES (0, 'k3', 'covered: goes'), (4, 'k3', 'above: waits');
UPDATE regress_snap SET v = 'covered: goes' WHERE b = 'k2';
UPDATE regress_snap SET v = 'above: waits' WHERE b = 'k5';
DELETE FROM regress_snap WHERE b = 'k6';
UPDATE regress_snap SET b = 'k9' WHERE b = 'k1';
UPDATE kafka_bridge.publications SET snapshot_state = 'done' WHERE relid = 'regress_snap'::regclass;
SELECT kafka_bridge.publish('regress_snap');
UPDATE regress_snap SET v = 'done: goes' WHERE b = 'k4';
SELECT * FROM regress_changes();
SELECT kafka_bridge.unpublish('regress_snap');
DROP TABLE regress_snap;

-- all-tables: unpublished tables too (default topic and prefix, envelope),
-- but never kafka_bridge's own
CREATE TABLE regress_other (k text PRIMARY KEY);
INSERT INTO regress_other VALUES ('o');
SELECT kafka_bridge.publish('regress_other', format => 'flat');
SELECT kafka_bridge.unpublish('regress_other');
SELECT * FROM regress_changes('all-tables', 'on');

-- Changes made under a replication origin (as kafka_bridge's consumer
-- applies them) are not published again, unless include-origins says so.
SELECT 'origin' FROM pg_replication_origin_create('regress_kb_origin');
SELECT 'session' FROM pg_replication_origin_session_setup('regress_kb_origin');
INSERT INTO client VALUES (40, 'from elsewhere');
SELECT pg_replication_origin_session_reset();
INSERT INTO client VALUES (41, 'local');
SELECT replace(data, kafka_bridge.instance_id(), '<instance>') AS data
  FROM pg_logical_slot_peek_changes('regress_slot', NULL, NULL, 'include-origins', 'on',
       'include-xids', '0', 'include-timestamp', '0', 'include-lsn', '0');
SELECT * FROM regress_changes();
SELECT pg_replication_origin_drop('regress_kb_origin');
-- so are events applied with kafka_bridge.apply_event(), with a version
-- (origin, commit time) or without one (as a seed application's record)
SET client_min_messages = error;
SELECT kafka_bridge.subscribe('client', topic => 'regress_client_in', conflict_policy => 'apply_remote');
RESET client_min_messages;
SELECT kafka_bridge.apply_event('client', '{"id":42}', '{"event":"CLIENT-PUT","row":{"id":42,"name":"unversioned"}}');
SELECT kafka_bridge.apply_event('client', '{"id":43}', '{"event":"CLIENT-PUT","row":{"id":43,"name":"versioned"}}',
  'regress_elsewhere', '2026-01-01 00:00:00+00');
INSERT INTO client VALUES (44, 'local');
SELECT * FROM regress_changes();
SELECT kafka_bridge.unsubscribe('client');

-- a transaction too big for logical_decoding_work_mem (64kB here) spills
-- to disk: still one record per row
INSERT INTO client SELECT g, 'row ' || g FROM generate_series(1000, 5999) g;
SELECT count(*), count(DISTINCT d) FROM regress_changes() d;
SELECT spill_txns > 0 AS spilled FROM pg_stat_replication_slots
 WHERE slot_name = 'regress_slot';
DELETE FROM client WHERE id >= 1000;
SELECT count(*) FROM regress_changes();

-- Output 'kafka': binary frames for the publisher (layout in decoder.c).
CREATE FUNCTION regress_int(f bytea, pos int, len int) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE len WHEN 2 THEN ('x0000' || encode(substring(f FROM pos + 1 FOR 2), 'hex'))::bit(32)::int4
                  WHEN 4 THEN ('x' || encode(substring(f FROM pos + 1 FOR 4), 'hex'))::bit(32)::int4
                  ELSE ('x' || encode(substring(f FROM pos + 1 FOR 8), 'hex'))::bit(64)::int8 END
$$;
CREATE FUNCTION regress_lsn(v bigint) RETURNS pg_lsn LANGUAGE sql IMMUTABLE AS $$
  SELECT format('%s/%s', to_hex(v >> 32), to_hex(v & 4294967295))::pg_lsn
$$;
-- one frame, field by field; it must be used up exactly
CREATE FUNCTION regress_frame(f bytea, OUT tag text, OUT topic text, OUT key text,
  OUT value text, OUT headers text[], OUT end_lsn pg_lsn, OUT commit_lsn pg_lsn,
  OUT commit_time timestamptz, OUT xid bigint)
LANGUAGE plpgsql AS $$
DECLARE
  pos int := 1;
  len int;
  n int;
  name text;
BEGIN
  tag := chr(get_byte(f, 0));
  IF tag = 'C' THEN
    end_lsn := regress_lsn(regress_int(f, 1, 8));
    commit_lsn := regress_lsn(regress_int(f, 9, 8));
    commit_time := '2000-01-01 00:00:00+00'::timestamptz
                   + regress_int(f, 17, 8) * interval '1 microsecond';
    xid := regress_int(f, 25, 4);
    pos := 29;
  ELSE
    len := regress_int(f, pos, 4); pos := pos + 4;
    topic := convert_from(substring(f FROM pos + 1 FOR len), 'UTF8'); pos := pos + len;
    len := regress_int(f, pos, 4); pos := pos + 4;
    IF len >= 0 THEN
      key := convert_from(substring(f FROM pos + 1 FOR len), 'UTF8'); pos := pos + len;
    END IF;
    len := regress_int(f, pos, 4); pos := pos + 4;
    IF len >= 0 THEN
      value := convert_from(substring(f FROM pos + 1 FOR len), 'UTF8'); pos := pos + len;
    END IF;
    n := regress_int(f, pos, 2); pos := pos + 2;
    headers := '{}';
    FOR i IN 1..n LOOP
      len := regress_int(f, pos, 2); pos := pos + 2;
      name := convert_from(substring(f FROM pos + 1 FOR len), 'UTF8'); pos := pos + len;
      len := regress_int(f, pos, 4); pos := pos + 4;
      headers := headers || (name || '=' ||
                 convert_from(substring(f FROM pos + 1 FOR len), 'UTF8'));
      pos := pos + len;
    END LOOP;
  END IF;
  IF pos <> length(f) THEN
    RAISE EXCEPTION 'frame of % bytes, % used', length(f), pos;
  END IF;
END $$;

INSERT INTO client VALUES (50, 'kafka');
DELETE FROM client WHERE id = 50;
INSERT INTO regress_flat VALUES (50, 'kafka');
INSERT INTO regress_unpublished VALUES (50, 'nothing, no commit frame');
TRUNCATE regress_flat;
CREATE TEMP TABLE regress_frames AS
  SELECT n, f.*
    FROM pg_logical_slot_peek_binary_changes('regress_slot', NULL, NULL,
           'output', 'kafka', 'include-xids', 'off', 'include-timestamp', 'off')
           WITH ORDINALITY AS c(lsn, xid, data, n),
         regress_frame(c.data) f;
\pset null '(null)'
SELECT n, tag, topic, key,
       regexp_replace(replace(value, kafka_bridge.instance_id(), '<instance>'),
                      '"lsn":"[0-9A-F]+/[0-9A-F]+"', '"lsn":"<lsn>"') AS value,
       regexp_replace(replace(headers::text, kafka_bridge.instance_id(), '<instance>'),
                      'lsn=[0-9A-F]+/[0-9A-F]+', 'lsn=<lsn>') AS headers
  FROM regress_frames ORDER BY n;
\pset null ''
-- each commit frame follows its records: their lsn header is its commit
-- LSN, its time and xid are the transaction's
SELECT r.n, c.n AS commit_frame,
       r.headers[3] = 'lsn=' || c.commit_lsn AS lsn_is_commit_lsn,
       c.end_lsn > c.commit_lsn AS end_after_commit,
       c.commit_time = pg_xact_commit_timestamp(c.xid::text::xid) AS time_and_xid
  FROM regress_frames r
  JOIN LATERAL (SELECT * FROM regress_frames c
                 WHERE c.tag = 'C' AND c.n > r.n ORDER BY c.n LIMIT 1) c ON true
 WHERE r.tag = 'R' ORDER BY r.n;
SELECT get_byte(data, 0) = ascii('R') AS record, count(*)
  FROM pg_logical_slot_get_binary_changes('regress_slot', NULL, NULL, 'output', 'kafka')
 GROUP BY 1 ORDER BY 1;
-- binary frames need a binary function
INSERT INTO client VALUES (51, 'x');
SELECT data FROM pg_logical_slot_get_changes('regress_slot', NULL, NULL, 'output', 'kafka');

-- every option is checked; none may be given twice
SELECT data FROM pg_logical_slot_peek_changes('regress_slot', NULL, NULL, 'include-xid', '0');
SELECT data FROM pg_logical_slot_peek_changes('regress_slot', NULL, NULL, 'include-xids', 'maybe');
SELECT data FROM pg_logical_slot_peek_changes('regress_slot', NULL, NULL, 'include-timestamp', '');
SELECT data FROM pg_logical_slot_peek_changes('regress_slot', NULL, NULL, 'include-lsn', '2');
SELECT data FROM pg_logical_slot_peek_changes('regress_slot', NULL, NULL, 'all-tables', 'yes please');
SELECT data FROM pg_logical_slot_peek_changes('regress_slot', NULL, NULL, 'include-origins', 'nope');
SELECT data FROM pg_logical_slot_peek_changes('regress_slot', NULL, NULL, 'output', 'avro');
SELECT data FROM pg_logical_slot_peek_changes('regress_slot', NULL, NULL, 'include-lsn', '0', 'include-lsn', '1');
SELECT data FROM pg_logical_slot_peek_changes('regress_slot', NULL, NULL, 'output', 'json', 'output', 'json');
SELECT * FROM regress_changes('output', 'json');

-- The catalog is read as it was at each change, even once VACUUM FULL has
-- rewritten it.  After DROP EXTENSION nothing is published any more, not
-- even the changes made before it that were not decoded yet.
SELECT kafka_bridge.instance_id() AS instance \gset
INSERT INTO client VALUES (60, 'before VACUUM FULL');
VACUUM FULL kafka_bridge.publications;
INSERT INTO client VALUES (61, 'after VACUUM FULL');
SELECT replace(data, :'instance', '<instance>') AS data
  FROM pg_logical_slot_peek_changes('regress_slot', NULL, NULL,
       'include-xids', '0', 'include-timestamp', '0', 'include-lsn', '0');
DROP EXTENSION kafka_bridge;
INSERT INTO client VALUES (62, 'after DROP EXTENSION');
SELECT count(*) FROM pg_logical_slot_get_changes('regress_slot', NULL, NULL);
INSERT INTO client VALUES (63, 'all-tables without the extension');
SELECT replace(data, :'instance', '<instance>') AS data
  FROM pg_logical_slot_get_changes('regress_slot', NULL, NULL, 'all-tables', 'on',
       'include-xids', '0', 'include-timestamp', '0', 'include-lsn', '0');
CREATE EXTENSION kafka_bridge;

SELECT 'dropped' FROM pg_drop_replication_slot('regress_slot');

DROP TABLE client, regress_unpublished, regress_types, "Sales"."Big ""Orders""",
  regress_flat, regress_full, regress_full_pk, regress_by_index, regress_toast,
  regress_parted, regress_other;
DROP SCHEMA "Sales";
DROP TYPE regress_mood;
DROP DOMAIN regress_posint, regress_code;
DROP FUNCTION regress_changes, regress_frame, regress_int, regress_lsn;
SELECT count(*) FROM kafka_bridge.publications;
