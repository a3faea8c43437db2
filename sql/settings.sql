-- The kafka_bridge.* settings: strict validation, reload, secrets.
CREATE EXTENSION kafka_bridge;

-- every setting, with its context (the secrets are not listed, even here)
SELECT name, setting, context, unit
  FROM pg_settings WHERE name LIKE 'kafka\_bridge.%' ORDER BY name;

-- the prefix is reserved: a misspelt setting is an error
ALTER SYSTEM SET kafka_bridge.bootstrap_server = 'localhost:9092';
SET kafka_bridge.bogus = 1;

-- topics kafka_bridge creates: counts are positive or -1, policies Kafka's
ALTER SYSTEM SET kafka_bridge.topic_partitions = 0;
ALTER SYSTEM SET kafka_bridge.topic_replication_factor = -2;
ALTER SYSTEM SET kafka_bridge.topic_cleanup_policy = 'forever';
ALTER SYSTEM SET kafka_bridge.snapshot_chunk_rows = 0;

-- librdkafka judges the property lists: unknown property, bad value
ALTER SYSTEM SET kafka_bridge.producer_options = 'no.such.property=1';
ALTER SYSTEM SET kafka_bridge.producer_options = 'linger.ms=abc';
ALTER SYSTEM SET kafka_bridge.consumer_options = 'auto.offset.reset=sideways';
ALTER SYSTEM SET kafka_bridge.kafka_options = 'compression.type=zip';
-- properties kafka_bridge manages itself, for its guarantees
ALTER SYSTEM SET kafka_bridge.producer_options = 'enable.idempotence=false';
ALTER SYSTEM SET kafka_bridge.producer_options = 'acks=1';
ALTER SYSTEM SET kafka_bridge.consumer_options = 'group.id=mine';
ALTER SYSTEM SET kafka_bridge.kafka_options = 'bootstrap.servers=elsewhere:9092';
ALTER SYSTEM SET kafka_bridge.kafka_options = 'log.queue=false';
ALTER SYSTEM SET kafka_bridge.producer_options = 'delivery.report.only.error=true';
-- nothing that loads code into the server
ALTER SYSTEM SET kafka_bridge.kafka_options = 'plugin.library.paths=/tmp/evil.so';
ALTER SYSTEM SET kafka_bridge.kafka_options = 'ssl.engine.location=/tmp/evil.so';
ALTER SYSTEM SET kafka_bridge.kafka_options = 'sasl.kerberos.kinit.cmd=''touch /tmp/pwned''';
-- secrets belong in the superuser-only settings
ALTER SYSTEM SET kafka_bridge.kafka_options = 'sasl.password=hunter2';
ALTER SYSTEM SET kafka_bridge.kafka_options = 'ssl.key.password=hunter2';
-- syntax
ALTER SYSTEM SET kafka_bridge.kafka_options = 'linger.ms=1 linger.ms=2';
ALTER SYSTEM SET kafka_bridge.kafka_options = 'linger.ms';
ALTER SYSTEM SET kafka_bridge.kafka_options = '=5';
ALTER SYSTEM SET kafka_bridge.kafka_options = 'client.id=''unterminated';
-- quoting, and several properties
ALTER SYSTEM SET kafka_bridge.kafka_options = 'client.id=''with space'' socket.timeout.ms=30000 debug=broker,topic';
ALTER SYSTEM RESET kafka_bridge.kafka_options;

-- the other settings
ALTER SYSTEM SET kafka_bridge.bootstrap_servers = 'host:0';
ALTER SYSTEM SET kafka_bridge.bootstrap_servers = 'host:port';
ALTER SYSTEM SET kafka_bridge.databases = 'a, b, a';
ALTER SYSTEM SET kafka_bridge.databases = 'a,,b';
ALTER SYSTEM SET kafka_bridge.instance_id = 'has space';
ALTER SYSTEM SET kafka_bridge.instance_id = 'instance/1';
ALTER SYSTEM SET kafka_bridge.worker_restart_delay = 0;
ALTER SYSTEM SET kafka_bridge.probe_interval = 'soon';
SET kafka_bridge.bootstrap_servers = 'localhost:9092';

-- A reload of a file with a bad property list: that setting keeps its
-- value, the good setting next to it applies.
SELECT current_setting('data_directory') AS datadir \gset
\setenv KB_DATADIR :datadir
\! printf "%s\n" "kafka_bridge.producer_options = 'no.such.property=1' # regress" "kafka_bridge.consumer_options = 'fetch.wait.max.ms=77' # regress" >> "$KB_DATADIR/postgresql.conf"
SELECT name, setting, applied, error
  FROM pg_file_settings WHERE name LIKE 'kafka\_bridge.%\_options' ORDER BY seqno;
SELECT pg_reload_conf();
SELECT pg_sleep(1);
\c
SHOW kafka_bridge.consumer_options;
SHOW kafka_bridge.producer_options;
\! sed -i '/# regress$/d' "$KB_DATADIR/postgresql.conf"
SELECT pg_reload_conf();

-- secrets: superusers may read them; pg_settings never lists them
SHOW kafka_bridge.sasl_password;
SELECT count(*) FROM pg_settings WHERE name LIKE 'kafka\_bridge.%password';
CREATE ROLE regress_kb_reader;
SET ROLE regress_kb_reader;
SHOW kafka_bridge.sasl_password;
SELECT current_setting('kafka_bridge.ssl_key_password');
SELECT count(*) FROM pg_settings WHERE name LIKE 'kafka\_bridge.%password';
SHOW kafka_bridge.producer_options;
RESET ROLE;
DROP ROLE regress_kb_reader;
