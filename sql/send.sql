-- kafka_bridge.send(): what the output plugin makes of sends, and errors.
CREATE EXTENSION IF NOT EXISTS kafka_bridge;
SELECT 'init' FROM pg_create_logical_replication_slot('regress_send_slot', 'kafka_bridge');

BEGIN;
SELECT kafka_bridge.send('regress_app', 'k1', '{"b": [1, 2], "a": "x"}'::jsonb, '{"trace": "t-1", "none": null}') IS NOT NULL AS sent;
SELECT kafka_bridge.send('regress_app', 'k2', E'text with "quotes" and \\ and ünïcode'::text) IS NOT NULL AS sent;
SAVEPOINT s;
SELECT kafka_bridge.send('regress_app', 'dropped', 'rolled back to the savepoint'::text) IS NOT NULL AS sent;
ROLLBACK TO s;
SELECT kafka_bridge.send('regress_app', NULL, '\x00ff10'::bytea) IS NOT NULL AS sent;
SELECT kafka_bridge.send('regress_app', 'null value', NULL::jsonb) IS NOT NULL AS sent;
COMMIT;
BEGIN;
SELECT kafka_bridge.send('regress_app', 'ghost', 'rolled back'::text) IS NOT NULL AS sent;
ROLLBACK;
-- a message of another prefix is not a send
SELECT pg_logical_emit_message(true, 'other', 'not for kafka_bridge') IS NOT NULL AS emitted;

SELECT data FROM pg_logical_slot_get_changes('regress_send_slot', NULL, NULL,
	'include-xids', '0', 'include-timestamp', '0', 'include-lsn', '0');

-- the kafka output: one record frame per send, then a commit frame
SELECT kafka_bridge.send('regress_app', 'k', 'v'::text) IS NOT NULL AS sent;
SELECT chr(get_byte(data, 0)) AS frame, length(data) AS bytes
  FROM pg_logical_slot_get_binary_changes('regress_send_slot', NULL, NULL, 'output', 'kafka', 'include-lsn', '0');

-- errors
SELECT kafka_bridge.send(NULL, 'k', 'v'::text);
SELECT kafka_bridge.send('bad topic', 'k', 'v'::text);
SELECT kafka_bridge.send('t', 'k', 'v'::text, '{"h": 1}');
SELECT kafka_bridge.send('t', 'k', 'v'::text, '{"": "x"}');
-- the headers appliers read to tell replays and order versions are kafka_bridge's own
SELECT kafka_bridge.send('t', 'k', 'v'::text, '{"origin": "7311551838474567890", "lsn": "FFFFFFFF/FFFFFFFF"}');
SELECT kafka_bridge.send('t', 'k', 'v'::text, '{"commit_time": "2999-01-01T00:00:00+00:00"}');
SELECT kafka_bridge.send('t', 'k', 'v'::text, '"scalar"');
-- the producer's limit (message.max.bytes, 1000000) counts the key, the
-- value, the headers and 36 bytes of record framing
SELECT kafka_bridge.send('t', 'k', repeat('x', 999963)) IS NOT NULL AS at_the_limit;
SELECT kafka_bridge.send('t', 'k', repeat('x', 999964));
SELECT kafka_bridge.send('t', 'k', repeat('x', 999959), '{"h": "v"}') IS NOT NULL AS at_the_limit;
SELECT kafka_bridge.send('t', 'k', repeat('x', 999960), '{"h": "v"}');
CREATE ROLE regress_kb_sender;
SET ROLE regress_kb_sender;
SELECT kafka_bridge.send('t', 'k', 'v'::text);
-- nor may it write a record as a logical message with send()'s prefix
SELECT pg_logical_emit_message(true, 'kafka_bridge', '\x7400000001740000000100000001760000'::bytea);
RESET ROLE;
DROP ROLE regress_kb_sender;

-- logical messages with send()'s prefix that send() did not write are
-- skipped with a warning, not produced (and never stop the publisher)
SELECT count(*) > 0 AS consumed FROM pg_logical_slot_get_changes('regress_send_slot', NULL, NULL);
SELECT 'emitted' FROM pg_logical_emit_message(true, 'kafka_bridge', '\x00'::bytea);
SELECT 'emitted' FROM pg_logical_emit_message(true, 'kafka_bridge', '\x740000000174ffffffff000000'::bytea);
SELECT 'emitted' FROM pg_logical_emit_message(true, 'kafka_bridge', '\x740000000174fffffffe00000001760000'::bytea);
SELECT 'emitted' FROM pg_logical_emit_message(true, 'kafka_bridge', '\x740000000121ffffffff00000001760000'::bytea);
SELECT 'emitted' FROM pg_logical_emit_message(true, 'kafka_bridge', '\x740000000174ffffffff00000001760000ff'::bytea);
-- well formed, but with a header appliers trust (origin)
SELECT 'emitted' FROM pg_logical_emit_message(true, 'kafka_bridge',
  decode('740000000174ffffffff0000000176' || '0001' || '0006' || encode('origin', 'hex') || '0000000178', 'hex'));
-- well formed: produced
SELECT 'emitted' FROM pg_logical_emit_message(true, 'kafka_bridge',
  decode('740000000174ffffffff0000000176' || '0001' || '0005' || encode('trace', 'hex') || '0000000178', 'hex'));
\set VERBOSITY terse
SELECT data FROM pg_logical_slot_get_changes('regress_send_slot', NULL, NULL,
	'include-xids', '0', 'include-timestamp', '0', 'include-lsn', '0');
\set VERBOSITY default

SELECT pg_drop_replication_slot('regress_send_slot');
