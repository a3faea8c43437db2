/* kafka_bridge--0.1.sql: the SQL objects of kafka_bridge 0.1 */

\echo Use "CREATE EXTENSION kafka_bridge" to load this file. \quit

-- Created here, not named in the control file: CREATE EXTENSION then fails
-- when a schema of that name exists already, so nobody can prepare one
-- (with a look-alike publications table) for the extension to adopt.
CREATE SCHEMA kafka_bridge;

CREATE FUNCTION kafka_bridge.instance_id()
RETURNS text
LANGUAGE C STRICT STABLE
AS 'MODULE_PATHNAME', 'kafka_bridge_instance_id';

COMMENT ON FUNCTION kafka_bridge.instance_id() IS
'the id this instance puts in the events it publishes (kafka_bridge.instance_id, or the system identifier)';

CREATE FUNCTION kafka_bridge.worker_status(
	OUT database text,
	OUT worker text,
	OUT pid integer,
	OUT state text,
	OUT instance_id text,
	OUT brokers text,
	OUT activity text,
	OUT last_error text,
	OUT last_error_at timestamptz,
	OUT started_at timestamptz,
	OUT events_published bigint,
	OUT events_applied bigint,
	OUT publish_lag_bytes bigint,
	OUT consumer_lag bigint,
	OUT conflicts bigint)
RETURNS SETOF record
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_worker_status';

CREATE VIEW kafka_bridge.status AS
	SELECT * FROM kafka_bridge.worker_status();

COMMENT ON VIEW kafka_bridge.status IS
'one row per worker (a publisher and an applier per database): state, brokers, last error, counters';

REVOKE ALL ON FUNCTION kafka_bridge.worker_status() FROM PUBLIC;
REVOKE ALL ON kafka_bridge.status FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kafka_bridge.worker_status() TO pg_monitor;
GRANT SELECT ON kafka_bridge.status TO pg_monitor;
GRANT USAGE ON SCHEMA kafka_bridge TO pg_monitor;

-- ---- Publishing tables: publish.c (SQL functions), decoder.c (output plugin) ----

-- A user catalog table, so that the output plugin reads it under the
-- historic snapshot of the change it decodes: a table published at LSN X
-- publishes the changes committed after X.  regclass rather than oid, so
-- that pg_dump writes table names, which restore to the new OIDs.
CREATE TABLE kafka_bridge.publications (
	relid regclass PRIMARY KEY,
	topic text NOT NULL,
	event_prefix text NOT NULL,
	format text NOT NULL CHECK (format IN ('envelope', 'flat')),
	tombstones boolean NOT NULL DEFAULT true,
	created_at timestamptz NOT NULL DEFAULT now(),
	-- the snapshot of the rows already there (snapshot.c): 'pending' until
	-- its first chunk, 'running', 'finishing' once every row is read (and
	-- not yet acknowledged by Kafka), then 'done'; 'skipped' with snapshot
	-- => false.  The output plugin holds back the PUT events of keys above
	-- snapshot_upto while it is pending or running: the snapshot publishes
	-- those rows.  snapshot_acked: the last key whose records Kafka
	-- acknowledged, where a snapshot starts again after a failure.
	snapshot_state text NOT NULL DEFAULT 'skipped'
		CHECK (snapshot_state IN ('skipped', 'pending', 'running', 'finishing', 'done')),
	snapshot_upto text[],
	snapshot_rows bigint NOT NULL DEFAULT 0,
	snapshot_estimate bigint NOT NULL DEFAULT 0,
	snapshot_started_at timestamptz,
	snapshot_done_at timestamptz,
	snapshot_acked text[]
) WITH (user_catalog_table = true);

COMMENT ON TABLE kafka_bridge.publications IS
'published tables; change it with kafka_bridge.publish() and kafka_bridge.unpublish() only';

SELECT pg_catalog.pg_extension_config_dump('kafka_bridge.publications', '');

CREATE FUNCTION kafka_bridge.publish(
	tbl regclass,
	topic text DEFAULT NULL,
	event_prefix text DEFAULT NULL,
	format text DEFAULT 'envelope',
	tombstones boolean DEFAULT true,
	snapshot boolean DEFAULT true)
RETURNS void
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_publish';

COMMENT ON FUNCTION kafka_bridge.publish(regclass, text, text, text, boolean, boolean) IS
'publish the row changes of a table to Kafka (topic defaults to the table name, event prefix to it in upper case), and first its existing rows unless snapshot is false; publishing again replaces the settings';

CREATE FUNCTION kafka_bridge.snapshot(tbl regclass)
RETURNS void
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_snapshot';

COMMENT ON FUNCTION kafka_bridge.snapshot(regclass) IS
'publish every row of a published table again, as PUT events, in chunks that the publisher runs; returns at once (progress in kafka_bridge.snapshots)';

CREATE VIEW kafka_bridge.snapshots AS
	SELECT relid AS table_name, topic, snapshot_state AS state,
		   snapshot_rows AS rows_done, snapshot_estimate AS rows_estimated,
		   snapshot_upto AS done_up_to_key, snapshot_started_at AS started_at,
		   snapshot_done_at AS done_at
	  FROM kafka_bridge.publications;

COMMENT ON VIEW kafka_bridge.snapshots IS
'per published table, the snapshot of its rows: state, rows published so far and estimated, the last key done';

CREATE FUNCTION kafka_bridge.unpublish(tbl regclass)
RETURNS void
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_unpublish';

COMMENT ON FUNCTION kafka_bridge.unpublish(regclass) IS
'stop publishing the row changes of a table';

CREATE VIEW kafka_bridge.published_tables AS
	SELECT relid AS table_name, topic, event_prefix, format, tombstones, created_at
	  FROM kafka_bridge.publications;

COMMENT ON VIEW kafka_bridge.published_tables IS
'the published tables, their topic, event prefix and format';

-- Forget the publication of a dropped table, so that no other table
-- inherits it with the OID.
CREATE FUNCTION kafka_bridge.forget_dropped_tables()
RETURNS event_trigger
LANGUAGE C
AS 'MODULE_PATHNAME', 'kafka_bridge_forget_dropped_tables';

CREATE EVENT TRIGGER kafka_bridge_forget_dropped_tables ON sql_drop
	EXECUTE FUNCTION kafka_bridge.forget_dropped_tables();

-- Publishing sends a table's rows out of the database: only for roles an
-- administrator grants it to, and then only for tables they own.
REVOKE ALL ON kafka_bridge.publications FROM PUBLIC;
REVOKE ALL ON kafka_bridge.published_tables FROM PUBLIC;
REVOKE ALL ON FUNCTION kafka_bridge.publish(regclass, text, text, text, boolean, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION kafka_bridge.snapshot(regclass) FROM PUBLIC;
REVOKE ALL ON kafka_bridge.snapshots FROM PUBLIC;
-- not done_up_to_key: a key is row data, which monitoring roles do not read
GRANT SELECT (table_name, topic, state, rows_done, rows_estimated, started_at, done_at)
	ON kafka_bridge.snapshots TO pg_monitor;
REVOKE ALL ON FUNCTION kafka_bridge.unpublish(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION kafka_bridge.forget_dropped_tables() FROM PUBLIC;
GRANT SELECT ON kafka_bridge.published_tables TO pg_monitor;

-- Each replication slot the publisher created for this database: one made
-- again under a name already here means the old one is gone (a standby
-- promoted, a restore, a DROP), and what committed between its confirmed
-- position and the new slot's start was not published (publisher.c).
CREATE TABLE kafka_bridge.slot_history (
	slot_name name NOT NULL,
	created_at timestamptz NOT NULL DEFAULT now(),
	start_lsn pg_lsn NOT NULL,
	system_identifier bigint NOT NULL,
	replaced_lost_slot boolean NOT NULL
);

COMMENT ON TABLE kafka_bridge.slot_history IS
'the replication slots the publisher created; replaced_lost_slot: changes committed before start_lsn may not have been published';

REVOKE ALL ON kafka_bridge.slot_history FROM PUBLIC;
GRANT SELECT ON kafka_bridge.slot_history TO pg_monitor;

-- kafka_bridge.send(): a record that reaches Kafka if and only if the calling
-- transaction commits, in commit order with the transaction's row events
CREATE FUNCTION kafka_bridge.send(topic text, key text, value jsonb, headers jsonb DEFAULT NULL)
RETURNS pg_lsn
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_send';
CREATE FUNCTION kafka_bridge.send(topic text, key text, value text, headers jsonb DEFAULT NULL)
RETURNS pg_lsn
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_send';
CREATE FUNCTION kafka_bridge.send(topic text, key text, value bytea, headers jsonb DEFAULT NULL)
RETURNS pg_lsn
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_send';
COMMENT ON FUNCTION kafka_bridge.send(text, text, jsonb, jsonb) IS
'send a record to Kafka if and only if the calling transaction commits';
REVOKE ALL ON FUNCTION kafka_bridge.send(text, text, jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION kafka_bridge.send(text, text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION kafka_bridge.send(text, text, bytea, jsonb) FROM PUBLIC;

-- kafka_bridge.produce() (produce.c): a record sent at once, whatever becomes
-- of the calling transaction; returns when the brokers acknowledged it
CREATE FUNCTION kafka_bridge.produce(topic text, key text, value jsonb, headers jsonb DEFAULT NULL,
	OUT partition integer, OUT "offset" bigint)
RETURNS record
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_produce';
CREATE FUNCTION kafka_bridge.produce(topic text, key text, value text, headers jsonb DEFAULT NULL,
	OUT partition integer, OUT "offset" bigint)
RETURNS record
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_produce';
CREATE FUNCTION kafka_bridge.produce(topic text, key text, value bytea, headers jsonb DEFAULT NULL,
	OUT partition integer, OUT "offset" bigint)
RETURNS record
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_produce';
COMMENT ON FUNCTION kafka_bridge.produce(text, text, jsonb, jsonb) IS
'send a record to Kafka now, even if the calling transaction rolls back; waits for the acknowledgement (at most 30 s or statement_timeout) and returns its partition and offset';
COMMENT ON FUNCTION kafka_bridge.produce(text, text, text, jsonb) IS
'send a record to Kafka now, even if the calling transaction rolls back; waits for the acknowledgement (at most 30 s or statement_timeout) and returns its partition and offset';
COMMENT ON FUNCTION kafka_bridge.produce(text, text, bytea, jsonb) IS
'send a record to Kafka now, even if the calling transaction rolls back; waits for the acknowledgement (at most 30 s or statement_timeout) and returns its partition and offset';
REVOKE ALL ON FUNCTION kafka_bridge.produce(text, text, jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION kafka_bridge.produce(text, text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION kafka_bridge.produce(text, text, bytea, jsonb) FROM PUBLIC;

-- A logical message with the prefix kafka_bridge is a Kafka record: the
-- publisher produces it.  PostgreSQL lets every role emit logical messages,
-- which would let any role of this database write any topic the server's
-- credentials reach, send()'s privileges notwithstanding.  In this
-- database, only the roles it is granted to again may (docs/sending.md).
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, bytea) FROM PUBLIC;

-- ---- Applying topics to tables: subscribe.c (SQL functions), applier.c
-- (the worker's consumer), apply.c (events to rows) ----

-- One table per topic.  apply_role is whose privileges and row security
-- apply to the rows written: by default the table's owner, who must be a
-- member of it.
CREATE TABLE kafka_bridge.subscriptions (
	relid regclass PRIMARY KEY,
	topic text NOT NULL UNIQUE,
	format text NOT NULL CHECK (format IN ('envelope', 'flat')),
	event_prefix text NOT NULL,
	apply_role regrole NOT NULL,
	conflict_policy text NOT NULL DEFAULT 'last_write_wins'
		CHECK (conflict_policy IN ('last_write_wins', 'keep_local', 'apply_remote', 'error')),
	created_at timestamptz NOT NULL DEFAULT now(),
	-- where partitions without a stored offset start; 'end' is resolved by
	-- subscribe() into kafka_bridge.apply_progress at once
	start_position text NOT NULL DEFAULT 'beginning'
		CHECK (start_position IN ('beginning', 'end'))
);

COMMENT ON TABLE kafka_bridge.subscriptions IS
'subscribed tables; change it with kafka_bridge.subscribe() and kafka_bridge.unsubscribe() only';

SELECT pg_catalog.pg_extension_config_dump('kafka_bridge.subscriptions', '');

-- Where the applier stands in each partition, written in the same
-- transaction as the rows applied from it: after any restart, it resumes at
-- next_offset and nothing is applied twice or skipped.
CREATE TABLE kafka_bridge.apply_progress (
	topic text NOT NULL,
	partition integer NOT NULL,
	next_offset bigint NOT NULL,
	high_watermark bigint NOT NULL DEFAULT 0,
	consumed bigint NOT NULL DEFAULT 0,
	applied bigint NOT NULL DEFAULT 0,
	skipped bigint NOT NULL DEFAULT 0,
	dead_letters bigint NOT NULL DEFAULT 0,
	last_error text,
	last_error_at timestamptz,
	updated_at timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (topic, partition)
);

COMMENT ON TABLE kafka_bridge.apply_progress IS
'the next offset to apply in each partition of a subscribed topic, with counters; written by the applier';

-- The last event applied from each origin in each partition: the position
-- (commit LSN, record number) of a replayed event, which the publisher's
-- at-least-once delivery may send twice, tells it is already applied.
CREATE TABLE kafka_bridge.apply_origins (
	topic text NOT NULL,
	partition integer NOT NULL,
	origin text NOT NULL,
	lsn pg_lsn NOT NULL,
	seq integer NOT NULL,
	PRIMARY KEY (topic, partition, origin)
);

COMMENT ON TABLE kafka_bridge.apply_origins IS
'per partition and origin instance, the position of the last event applied; replays at or before it are skipped';

-- Records that could not be applied, with why; nothing of them reached the
-- table, and the records after them were applied.
CREATE TABLE kafka_bridge.dead_letters (
	id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	table_name regclass,
	topic text NOT NULL,
	partition integer NOT NULL,
	"offset" bigint NOT NULL,
	key bytea,
	value bytea,
	headers jsonb,
	reason text NOT NULL,
	failed_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ON kafka_bridge.dead_letters (topic, partition, "offset");

COMMENT ON TABLE kafka_bridge.dead_letters IS
'records the applier could not apply, with their coordinates, raw key and value, headers and the reason';

-- Deleted rows of tables subscribed with a conflict policy: the version
-- (commit time, origin instance) of the delete, so that an older PUT
-- arriving late does not bring the row back.  key is the row's key columns
-- as a JSON array of their text forms.  A local delete (the trigger
-- kafka_bridge_tombstone) records its transaction id: its commit time is
-- read from track_commit_timestamp when needed.  Pruned after
-- kafka_bridge.tombstone_retention.
CREATE TABLE kafka_bridge.tombstones (
	relid regclass NOT NULL,
	key text NOT NULL,
	commit_time timestamptz,
	origin text,
	xid xid8,
	recorded_at timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (relid, key)
);

CREATE INDEX ON kafka_bridge.tombstones (recorded_at);

COMMENT ON TABLE kafka_bridge.tombstones IS
'version (commit time, origin) of rows deleted from subscribed tables, so that an older event cannot bring them back; pruned after kafka_bridge.tombstone_retention';

-- One row per conflict the applier met: a remote change to a row whose
-- current version (or tombstone) another origin wrote.  Pruned after
-- kafka_bridge.conflict_retention.
CREATE TABLE kafka_bridge.conflicts (
	id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	table_name regclass,
	key text NOT NULL,
	kind text NOT NULL,
	local_origin text,
	local_commit_time timestamptz,
	remote_origin text,
	remote_commit_time timestamptz,
	policy text NOT NULL,
	resolution text NOT NULL,
	topic text,
	partition integer,
	"offset" bigint,
	detected_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ON kafka_bridge.conflicts (detected_at);

COMMENT ON TABLE kafka_bridge.conflicts IS
'conflicts met by the applier: table, key, local and remote versions, policy and resolution; pruned after kafka_bridge.conflict_retention';

-- The trigger subscribe() puts on a table with a conflict policy: records
-- a tombstone for each local DELETE (and UPDATE of the key).  It does not
-- fire for the applier's own writes (session_replication_role = replica).
CREATE FUNCTION kafka_bridge.record_tombstone()
RETURNS trigger
LANGUAGE C SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS 'MODULE_PATHNAME', 'kafka_bridge_record_tombstone';

CREATE FUNCTION kafka_bridge.subscribe(
	tbl regclass,
	topic text DEFAULT NULL,
	format text DEFAULT 'envelope',
	event_prefix text DEFAULT NULL,
	apply_role regrole DEFAULT NULL,
	conflict_policy text DEFAULT 'last_write_wins',
	start_position text DEFAULT 'beginning')
RETURNS void
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_subscribe';

COMMENT ON FUNCTION kafka_bridge.subscribe(regclass, text, text, text, regrole, text, text) IS
'apply the events of a Kafka topic (by default the table name) to a table, as apply_role (by default the table''s owner), resolving conflicts by conflict_policy, from the beginning of the topic or (start_position => ''end'') from its current end';

CREATE FUNCTION kafka_bridge.unsubscribe(tbl regclass)
RETURNS void
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_unsubscribe';

COMMENT ON FUNCTION kafka_bridge.unsubscribe(regclass) IS
'stop applying a topic to a table and forget where the applier stood in it';

CREATE FUNCTION kafka_bridge.sync(
	tbl regclass,
	topic text DEFAULT NULL,
	format text DEFAULT 'envelope',
	event_prefix text DEFAULT NULL,
	conflict_policy text DEFAULT 'last_write_wins',
	start_position text DEFAULT 'beginning')
RETURNS void
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_sync';

COMMENT ON FUNCTION kafka_bridge.sync(regclass, text, text, text, text, text) IS
'publish a table to a topic and apply that topic to it: keeps the table in sync with every instance doing the same';

CREATE FUNCTION kafka_bridge.apply_event(
	tbl regclass,
	key text,
	value text,
	origin text DEFAULT NULL,
	commit_time timestamptz DEFAULT NULL)
RETURNS text
LANGUAGE C VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_apply_event';

COMMENT ON FUNCTION kafka_bridge.apply_event(regclass, text, text, text, timestamptz) IS
'apply one event to a subscribed table as the applier does (e.g. a dead letter once its cause is fixed); the transaction commits with the event''s origin and commit time';

CREATE VIEW kafka_bridge.subscribed_tables AS
	SELECT relid AS table_name, topic, format, event_prefix, apply_role, conflict_policy, created_at,
		   start_position
	  FROM kafka_bridge.subscriptions;

COMMENT ON VIEW kafka_bridge.subscribed_tables IS
'the subscribed tables, their topic, format and event prefix, the role that applies them and their conflict policy';

CREATE VIEW kafka_bridge.subscription_status AS
	SELECT s.relid AS table_name, s.topic, p.partition, p.next_offset,
		   GREATEST(p.high_watermark OPERATOR(pg_catalog.-) p.next_offset, 0) AS lag,
		   p.consumed, p.applied, p.skipped, p.dead_letters,
		   p.last_error, p.last_error_at, p.updated_at
	  FROM kafka_bridge.subscriptions s
	  LEFT JOIN kafka_bridge.apply_progress p ON p.topic OPERATOR(pg_catalog.=) s.topic;

COMMENT ON VIEW kafka_bridge.subscription_status IS
'per subscribed table and partition: next offset, lag behind the partition end, counts of records consumed, applied, skipped and dead-lettered, last error';

-- The subscriptions and the offsets say what gets written into which table:
-- only superusers and roles an administrator grants the functions to.  The
-- dead letters hold the rows of the records set aside: not even monitoring
-- roles read them unless granted.
REVOKE ALL ON kafka_bridge.subscriptions FROM PUBLIC;
REVOKE ALL ON kafka_bridge.apply_progress FROM PUBLIC;
REVOKE ALL ON kafka_bridge.apply_origins FROM PUBLIC;
REVOKE ALL ON kafka_bridge.dead_letters FROM PUBLIC;
REVOKE ALL ON kafka_bridge.tombstones FROM PUBLIC;
REVOKE ALL ON kafka_bridge.conflicts FROM PUBLIC;
REVOKE ALL ON FUNCTION kafka_bridge.record_tombstone() FROM PUBLIC;
REVOKE ALL ON kafka_bridge.subscribed_tables FROM PUBLIC;
REVOKE ALL ON kafka_bridge.subscription_status FROM PUBLIC;
REVOKE ALL ON FUNCTION kafka_bridge.subscribe(regclass, text, text, text, regrole, text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION kafka_bridge.unsubscribe(regclass) FROM PUBLIC;
REVOKE ALL ON FUNCTION kafka_bridge.apply_event(regclass, text, text, text, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION kafka_bridge.sync(regclass, text, text, text, text, text) FROM PUBLIC;
GRANT SELECT ON kafka_bridge.subscribed_tables TO pg_monitor;
GRANT SELECT ON kafka_bridge.subscription_status TO pg_monitor;
