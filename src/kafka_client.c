/*-------------------------------------------------------------------------
 * kafka_client.c
 *	  librdkafka glue: builds a client from the kafka_bridge.* settings,
 *	  serves its callbacks on the worker's own thread, and probes the brokers.
 *
 * librdkafka runs threads of its own.  They must never run PostgreSQL code,
 * so logs go to a queue of their own served by kb_kafka_client_poll() in
 * the worker, and the threads are created with every signal blocked so
 * that PostgreSQL's handlers only run on the worker's thread.
 *
 * Delivery reports and errors come on librdkafka's main queue.  By default
 * kb_kafka_client_poll() serves it too.  The publisher has it served by
 * its producing thread instead (producer_thread.c), which also produces
 * the records, so that malloc and free of a record happen on one thread.
 * The delivery callback must then run no PostgreSQL code (no palloc, no
 * elog, no GUC); the error callback only copies the error under a lock.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <pthread.h>
#include <signal.h>

#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "postmaster/interrupt.h"
#include "utils/guc.h"
#include "utils/elog.h"
#include "utils/memutils.h"

#include "kafka_bridge.h"

struct KbKafkaClient
{
	rd_kafka_t *rk;
	rd_kafka_queue_t *logq;		/* librdkafka's logs, served on our thread */
	KbClientRole role;
	/* latest error reported by librdkafka that names a broker, as reported */
	pthread_mutex_t error_lock;
	char		last_error[512];
	/* the same, secrets redacted, for the worker's thread */
	char		last_error_shown[512];
	/* a thread of the caller's serves the main queue */
	bool		threaded;
};

/* (may run on the publisher's producing thread) */
static void
client_error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
	KbKafkaClient *client = (KbKafkaClient *) opaque;

	pthread_mutex_lock(&client->error_lock);
	/* "1/1 brokers are down" names no address: keep the previous, better one */
	if (err != RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN || !client->last_error[0])
		strlcpy(client->last_error, reason, sizeof(client->last_error));
	pthread_mutex_unlock(&client->error_lock);
}

static void
client_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
	char		line[1024];

	strlcpy(line, buf, sizeof(line));
	kb_redact_secrets(line);
	ereport(level <= 2 ? LOG : DEBUG1,
			(errmsg_internal("librdkafka %s: %s", fac, line)));
}

static bool
conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, char **detail)
{
	char		errstr[512];

	if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) == RD_KAFKA_CONF_OK)
		return true;
	/* the value may be a secret: never echo it */
	*detail = psprintf("librdkafka property \"%s\": %s", name,
					   strstr(name, "password") ? "invalid value" : errstr);
	return false;
}

/*
 * Create a producer or consumer from the settings in force.  Returns NULL
 * and a user-facing *detail when librdkafka refuses the configuration.
 */
KbKafkaClient *
kb_kafka_client_create(KbClientRole role, const char *client_id,
					   KbDeliveryCallback on_delivery, char **detail)
{
	KbKafkaClient *client = MemoryContextAllocZero(TopMemoryContext, sizeof(KbKafkaClient));
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	char		errstr[512];
	sigset_t	all;
	sigset_t	saved;
	bool		ok;

	client->role = role;
	pthread_mutex_init(&client->error_lock, NULL);
	*detail = NULL;

	/*
	 * Defaults the user may override: a record waits for the broker as long
	 * as it takes (an outage delays, never drops), and the producer queue is
	 * bounded so that an outage holds the worker's memory at a fixed size.
	 * A broker that comes back is reconnected to within a second (instead
	 * of librdkafka's up to 10 s): one connection attempt a second to a
	 * broker that is down costs nothing, and the backlog starts at once.
	 * Records are compressed with lz4: events are JSON with the same field
	 * names over and over, batches shrink several times, and the broker
	 * and the network do that much less (bench/publish, bench/snapshot);
	 * every Kafka client since 0.10 reads it.  The producer holds at most
	 * 10,000 records (librdkafka: 100,000): a few batches' worth keeps the
	 * broker busy, and records acknowledged and freed soon after they were
	 * made are still in the CPU's cache (bench/publish: the producing
	 * threads used 0.2 us less CPU a record); a crash also sends fewer
	 * records twice.
	 */
	ok = conf_set(conf, "bootstrap.servers", kb_bootstrap_servers, detail) &&
		conf_set(conf, "client.id", client_id, detail) &&
		conf_set(conf, "log.queue", "true", detail) &&
		conf_set(conf, "reconnect.backoff.max.ms", "1000", detail) &&
		(role != KB_CLIENT_CONSUMER ||
		 conf_set(conf, "auto.offset.reset", "earliest", detail)) &&
		(role != KB_CLIENT_PRODUCER ||
		 (conf_set(conf, "message.timeout.ms", "0", detail) &&
		  conf_set(conf, "delivery.report.only.error", "false", detail) &&
		  conf_set(conf, "queue.buffering.max.kbytes", "65536", detail) &&
		  conf_set(conf, "queue.buffering.max.messages", "10000", detail) &&
		  conf_set(conf, "compression.type", "lz4", detail))) &&
		kb_apply_property_list(conf, kb_kafka_options, detail) &&
		kb_apply_property_list(conf,
							   role == KB_CLIENT_PRODUCER ? kb_producer_options
							   : kb_consumer_options,
							   detail);
	if (ok && role == KB_CLIENT_PRODUCER)
		ok = conf_set(conf, "enable.idempotence", "true", detail) &&
			conf_set(conf, "acks", "all", detail);

	/*
	 * The applier stores offsets in PostgreSQL with the rows and assigns
	 * partitions itself; the group (named by client_id) only shows its
	 * progress to Kafka's tools.  A partition whose stored offset has left
	 * the log starts again at its beginning unless the user says otherwise.
	 */
	if (ok && role == KB_CLIENT_CONSUMER)
		ok = conf_set(conf, "group.id", client_id, detail) &&
			conf_set(conf, "enable.auto.commit", "false", detail) &&
			conf_set(conf, "enable.auto.offset.store", "false", detail);
	if (ok && kb_sasl_password && kb_sasl_password[0])
		ok = conf_set(conf, "sasl.password", kb_sasl_password, detail);
	if (ok && kb_ssl_key_password && kb_ssl_key_password[0])
		ok = conf_set(conf, "ssl.key.password", kb_ssl_key_password, detail);
	if (!ok)
	{
		rd_kafka_conf_destroy(conf);
		pfree(client);
		return NULL;
	}

	rd_kafka_conf_set_opaque(conf, client);
	rd_kafka_conf_set_error_cb(conf, client_error_cb);
	rd_kafka_conf_set_log_cb(conf, client_log_cb);
	if (on_delivery)
		rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &saved);
	client->rk = rd_kafka_new(role == KB_CLIENT_PRODUCER ? RD_KAFKA_PRODUCER
							  : RD_KAFKA_CONSUMER,
							  conf, errstr, sizeof(errstr));
	pthread_sigmask(SIG_SETMASK, &saved, NULL);

	if (client->rk == NULL)
	{
		/* on failure the configuration is still ours */
		rd_kafka_conf_destroy(conf);
		kb_redact_secrets(errstr);
		*detail = psprintf("librdkafka refused the configuration: %s", errstr);
		pfree(client);
		return NULL;
	}
	client->logq = rd_kafka_queue_new(client->rk);
	rd_kafka_set_log_queue(client->rk, client->logq);
	return client;
}

/*
 * Whether a thread of the caller's serves the client's main queue
 * (delivery reports and errors: producer_thread.c); kb_kafka_client_poll()
 * then serves the logs only.
 */
void
kb_kafka_client_set_threaded(KbKafkaClient *client, bool threaded)
{
	client->threaded = threaded;
}

/*
 * Cut short a kb_kafka_client_poll() waiting on the worker's thread (or
 * the next one): callable from any thread.
 */
void
kb_kafka_client_wake(KbKafkaClient *client)
{
	rd_kafka_queue_yield(client->logq);
}

/*
 * Destroy a client.  Records still queued or in flight are dropped, not
 * waited for: the publisher only ever drops what it has not confirmed, and
 * decodes it again.
 */
void
kb_kafka_client_destroy(KbKafkaClient *client)
{
	if (client == NULL)
		return;
	Assert(!client->threaded);
	rd_kafka_queue_destroy(client->logq);
	if (client->role == KB_CLIENT_PRODUCER)
		rd_kafka_purge(client->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
	rd_kafka_destroy(client->rk);
	pfree(client);
}

/*
 * What librdkafka last reported about an unreachable broker, or "" (valid
 * until the next call).
 */
const char *
kb_kafka_client_last_error(KbKafkaClient *client)
{
	pthread_mutex_lock(&client->error_lock);
	strlcpy(client->last_error_shown, client->last_error, sizeof(client->last_error_shown));
	pthread_mutex_unlock(&client->error_lock);
	kb_redact_secrets(client->last_error_shown);
	return client->last_error_shown;
}

rd_kafka_t *
kb_kafka_client_handle(KbKafkaClient *client)
{
	return client->rk;
}

/*
 * Serve callbacks (logs; errors and delivery reports unless a thread serves
 * them), waiting up to timeout_ms for the first one or kb_kafka_client_wake().
 */
void
kb_kafka_client_poll(KbKafkaClient *client, int timeout_ms)
{
	if (client->threaded)
		rd_kafka_queue_poll_callback(client->logq, timeout_ms);
	else
	{
		rd_kafka_poll(client->rk, timeout_ms);
		rd_kafka_queue_poll_callback(client->logq, 0);
	}
}

/*
 * Ask the cluster for its brokers.  On success fills brokers with
 * "id@host:port,..." and forgets the previous error; on failure fills error
 * with a sentence naming the unreachable address.
 */
bool
kb_kafka_client_probe(KbKafkaClient *client, int timeout_ms,
					  char *brokers, size_t brokers_size,
					  char *error, size_t error_size)
{
	const struct rd_kafka_metadata *md = NULL;
	rd_kafka_resp_err_t err;

	err = rd_kafka_metadata(client->rk, 0, NULL, &md, timeout_ms);
	/* collect what the brokers' threads reported meanwhile */
	kb_kafka_client_poll(client, 0);

	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		StringInfoData buf;

		initStringInfo(&buf);
		for (int i = 0; i < md->broker_cnt; i++)
			appendStringInfo(&buf, "%s%d@%s:%d", i ? "," : "",
							 md->brokers[i].id, md->brokers[i].host,
							 md->brokers[i].port);
		strlcpy(brokers, buf.data, brokers_size);
		pfree(buf.data);
		rd_kafka_metadata_destroy(md);
		pthread_mutex_lock(&client->error_lock);
		client->last_error[0] = '\0';
		pthread_mutex_unlock(&client->error_lock);
		return true;
	}

	snprintf(error, error_size, "cannot reach Kafka at \"%s\": %s",
			 kb_bootstrap_servers,
			 kb_kafka_client_last_error(client)[0] ? client->last_error_shown
			 : rd_kafka_err2str(err));
	return false;
}

/*
 * Everything a Kafka client is built from: when it changes on reload, the
 * worker rebuilds its clients.
 */
char *
kb_kafka_settings_fingerprint(void)
{
	return psprintf("%s\n%s\n%s\n%s\n%s\n%s",
					kb_bootstrap_servers, kb_kafka_options, kb_producer_options,
					kb_consumer_options, kb_sasl_password, kb_ssl_key_password);
}

/*
 * Reload the configuration file after SIGHUP.  Returns true when the Kafka
 * settings changed, so that the caller builds its client again;
 * *fingerprint (in TopMemoryContext) follows the settings in force.
 */
bool
kb_reload_settings(char **fingerprint)
{
	char	   *now_fp;
	bool		changed;

	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	now_fp = kb_kafka_settings_fingerprint();
	changed = (*fingerprint == NULL || strcmp(now_fp, *fingerprint) != 0);
	if (*fingerprint)
		pfree(*fingerprint);
	*fingerprint = MemoryContextStrdup(TopMemoryContext, now_fp);
	pfree(now_fp);
	return changed;
}

/* longest wait for the brokers to create a topic */
#define KB_CREATE_TOPIC_TIMEOUT_MS 10000

static const char *
cleanup_policy_name(void)
{
	switch ((KbCleanupPolicy) kb_topic_cleanup_policy)
	{
		case KB_CLEANUP_COMPACT:
			return "compact";
		case KB_CLEANUP_DELETE:
			return "delete";
		case KB_CLEANUP_COMPACT_DELETE:
			return "compact,delete";
	}
	return "compact";
}

/*
 * Create a topic unless kafka_bridge.create_topics is off, with the
 * kafka_bridge.topic_* settings: with compact (row events keyed by row)
 * kafka_bridge.topic_cleanup_policy, else (flat records, the records of
 * kafka_bridge.send()) the broker's cleanup policy.  A topic that
 * exists already is left as it is.  Returns false with *error when the
 * brokers refused or did not answer; brokers that do not know the request,
 * or do not let this client create topics, are not an error: the topic
 * may exist, and producing says so if not.
 */
bool
kb_kafka_create_topic(rd_kafka_t *rk, const char *topic, bool compact,
					  char *error, size_t error_size)
{
	char		errstr[512];
	rd_kafka_NewTopic_t *new_topic;
	rd_kafka_AdminOptions_t *options;
	rd_kafka_queue_t *queue;
	rd_kafka_event_t *event;
	rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
	const char *reason = NULL;
	bool		ok;

	if (!kb_create_topics)
		return true;
	new_topic = rd_kafka_NewTopic_new(topic, kb_topic_partitions, kb_topic_replication_factor,
									  errstr, sizeof(errstr));
	if (new_topic == NULL)
	{
		snprintf(error, error_size, "cannot create topic \"%s\": %s", topic, errstr);
		return false;
	}
	if (compact)
		(void) rd_kafka_NewTopic_set_config(new_topic, "cleanup.policy", cleanup_policy_name());
	options = rd_kafka_AdminOptions_new(rk, RD_KAFKA_ADMIN_OP_CREATETOPICS);
	(void) rd_kafka_AdminOptions_set_request_timeout(options, KB_CREATE_TOPIC_TIMEOUT_MS,
													 errstr, sizeof(errstr));
	(void) rd_kafka_AdminOptions_set_operation_timeout(options, KB_CREATE_TOPIC_TIMEOUT_MS,
													   errstr, sizeof(errstr));
	queue = rd_kafka_queue_new(rk);
	rd_kafka_CreateTopics(rk, &new_topic, 1, options, queue);
	/* in slices, serving interrupts: a shutdown does not wait for the broker */
	event = NULL;
	for (int waited = 0; event == NULL && waited < KB_CREATE_TOPIC_TIMEOUT_MS + 1000; waited += 100)
	{
		event = rd_kafka_queue_poll(queue, 100);
		if (event == NULL)
			CHECK_FOR_INTERRUPTS();
	}
	if (event == NULL)
		err = RD_KAFKA_RESP_ERR__TIMED_OUT;
	else if (rd_kafka_event_error(event))
	{
		err = rd_kafka_event_error(event);
		reason = rd_kafka_event_error_string(event);
	}
	else
	{
		const rd_kafka_CreateTopics_result_t *result = rd_kafka_event_CreateTopics_result(event);
		size_t		n;
		const rd_kafka_topic_result_t **topics = rd_kafka_CreateTopics_result_topics(result, &n);

		if (n == 1)
		{
			err = rd_kafka_topic_result_error(topics[0]);
			reason = rd_kafka_topic_result_error_string(topics[0]);
		}
	}

	ok = true;
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		ereport(LOG,
				(errmsg("kafka_bridge created topic \"%s\" (partitions %d, replication factor %d, cleanup.policy %s)",
						topic, kb_topic_partitions, kb_topic_replication_factor,
						compact ? cleanup_policy_name() : "of the broker")));
	else if (err == RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED ||
			 err == RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED ||
			 err == RD_KAFKA_RESP_ERR_UNSUPPORTED_VERSION ||
			 err == RD_KAFKA_RESP_ERR__UNSUPPORTED_FEATURE)
		ereport(LOG,
				(errmsg("kafka_bridge could not create topic \"%s\": %s", topic,
						reason ? reason : rd_kafka_err2str(err)),
				 errhint("Create the topic yourself, or set kafka_bridge.create_topics = off.")));
	else if (err != RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS)
	{
		/*
		 * A timeout is the brokers being unreachable, or a cluster that does
		 * not serve CreateTopics at all (librdkafka's mock cluster names a
		 * controller it does not have): say what to do about the latter.
		 */
		snprintf(error, error_size,
				 "cannot create topic \"%s\" (kafka_bridge.topic_partitions = %d, kafka_bridge.topic_replication_factor = %d): %s%s",
				 topic, kb_topic_partitions, kb_topic_replication_factor,
				 reason && reason[0] ? reason : rd_kafka_err2str(err),
				 err == RD_KAFKA_RESP_ERR__TIMED_OUT ?
				 " (if the brokers are up but do not create topics on request, create it yourself and set kafka_bridge.create_topics = off)" : "");
		ok = false;
	}
	if (event)
		rd_kafka_event_destroy(event);
	rd_kafka_queue_destroy(queue);
	rd_kafka_AdminOptions_destroy(options);
	rd_kafka_NewTopic_destroy(new_topic);
	return ok;
}
