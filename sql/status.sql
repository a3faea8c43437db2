-- kafka_bridge.status: the launcher, the workers, what they report.
-- The temporary instance lists regress_kb_missing_db in kafka_bridge.databases
-- and points at a port where no broker listens.

-- wait, 30 s at most, until a query returns true (the workers act on their own)
CREATE FUNCTION regress_wait_until(query text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  done boolean;
BEGIN
  FOR i IN 1..300 LOOP
    EXECUTE query INTO done;
    EXIT WHEN done;
    PERFORM pg_sleep(0.1);
  END LOOP;
END $$;

-- a listed database that does not exist is reported, not ignored
SELECT regress_wait_until($q$SELECT (SELECT count(*) FROM kafka_bridge.status WHERE state = 'error') = 2$q$);
SELECT database, worker, pid, state, last_error, last_error_at IS NOT NULL AS has_time
  FROM kafka_bridge.status ORDER BY worker;

-- once it exists, workers start there: the publisher reports the
-- unreachable broker, the applier has nothing to do
CREATE DATABASE regress_kb_missing_db;
SELECT regress_wait_until($q$SELECT EXISTS (SELECT 1 FROM kafka_bridge.status
       WHERE state = 'error' AND pid IS NOT NULL
       AND last_error LIKE '%Connection refused%')
       AND EXISTS (SELECT 1 FROM kafka_bridge.status
       WHERE worker = 'applier' AND state = 'idle' AND pid IS NOT NULL)$q$);
SELECT database, worker, pid IS NOT NULL AS running, state, brokers, activity,
       regexp_replace(last_error, ' \(after .*', '') AS last_error,
       events_published, events_applied, publish_lag_bytes, consumer_lag
  FROM kafka_bridge.status ORDER BY worker;

-- pg_stat_activity shows both processes and what they do
SELECT backend_type, datname, application_name,
       regexp_replace(query, '(waiting for Kafka at [0-9.:]+).*', '\1') AS query
  FROM pg_stat_activity WHERE backend_type LIKE 'kafka\_bridge%' ORDER BY 1;

-- taking the database out of the list stops its workers
ALTER SYSTEM SET kafka_bridge.databases = '';
SELECT pg_reload_conf();
SELECT regress_wait_until($q$SELECT NOT EXISTS (SELECT 1 FROM kafka_bridge.status)$q$);
SELECT count(*) FROM kafka_bridge.status;
DROP DATABASE regress_kb_missing_db;

-- a listed database that takes no connections is reported, with what to do
CREATE DATABASE regress_kb_closed ALLOW_CONNECTIONS false;
ALTER SYSTEM SET kafka_bridge.databases = 'regress_kb_closed';
SELECT pg_reload_conf();
SELECT regress_wait_until($q$SELECT (SELECT count(*) FROM kafka_bridge.status
       WHERE state = 'error' AND last_error LIKE '%does not allow connections%') = 2$q$);
SELECT database, worker, pid, state, last_error
  FROM kafka_bridge.status ORDER BY worker;
ALTER SYSTEM SET kafka_bridge.databases = '';
SELECT pg_reload_conf();
SELECT regress_wait_until($q$SELECT NOT EXISTS (SELECT 1 FROM kafka_bridge.status)$q$);
DROP DATABASE regress_kb_closed;
ALTER SYSTEM RESET kafka_bridge.databases;
SELECT pg_reload_conf();

-- the instance id defaults to the system identifier
SHOW kafka_bridge.instance_id;
SELECT kafka_bridge.instance_id() = system_identifier::text AS is_sysid
  FROM pg_control_system();

-- only monitoring roles see the status
CREATE ROLE regress_kb_nobody;
SET ROLE regress_kb_nobody;
SELECT * FROM kafka_bridge.status;
RESET ROLE;
GRANT pg_monitor TO regress_kb_nobody;
SET ROLE regress_kb_nobody;
SELECT 'allowed' AS result FROM (SELECT count(*) FROM kafka_bridge.status) s;
RESET ROLE;
DROP ROLE regress_kb_nobody;
DROP FUNCTION regress_wait_until(text);
