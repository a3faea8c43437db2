/* kafka_bridge--0.1.sql: the SQL objects of kafka_bridge 0.1 */

\echo Use "CREATE EXTENSION kafka_bridge" to load this file. \quit

CREATE FUNCTION kafka_bridge.instance_id()
RETURNS text
LANGUAGE C STRICT STABLE
AS 'MODULE_PATHNAME', 'kafka_bridge_instance_id';

COMMENT ON FUNCTION kafka_bridge.instance_id() IS
'the id this instance puts in the events it publishes (kafka_bridge.instance_id, or the system identifier)';

CREATE FUNCTION kafka_bridge.worker_status(
	OUT database text,
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
	OUT consumer_lag bigint)
RETURNS SETOF record
LANGUAGE C STRICT VOLATILE
AS 'MODULE_PATHNAME', 'kafka_bridge_worker_status';

CREATE VIEW kafka_bridge.status AS
	SELECT * FROM kafka_bridge.worker_status();

COMMENT ON VIEW kafka_bridge.status IS
'one row per database worker: state, brokers, last error, counters';

REVOKE ALL ON FUNCTION kafka_bridge.worker_status() FROM PUBLIC;
REVOKE ALL ON kafka_bridge.status FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kafka_bridge.worker_status() TO pg_monitor;
GRANT SELECT ON kafka_bridge.status TO pg_monitor;
GRANT USAGE ON SCHEMA kafka_bridge TO pg_monitor;
