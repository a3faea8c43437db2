/*-------------------------------------------------------------------------
 * kafka_bridge.h
 *	  Declarations shared by the files of the kafka_bridge extension.
 *
 * One file a role: kafka_bridge.c (module init), settings.c (GUCs and the
 * librdkafka property lists), status.c (shared memory and the status view),
 * launcher.c (starts one worker per database), worker.c (the per-database
 * worker), kafka_client.c (librdkafka glue), publisher.c (the worker's
 * publishing), decoder.c (the output plugin), event_codec.c (rows to JSON),
 * publish.c (publish()/unpublish()), send.c (send()), produce.c (produce()).
 *-------------------------------------------------------------------------
 */
#ifndef KAFKA_BRIDGE_H
#define KAFKA_BRIDGE_H

#include "postgres.h"

#include "access/xlogdefs.h"
#include "datatype/timestamp.h"
#include "nodes/pg_list.h"
#include "port/atomics.h"

#include <pthread.h>

#include <librdkafka/rdkafka.h>

#define KB_EXTENSION_NAME "kafka_bridge"

/* Most databases kafka_bridge.databases may list: the status area is fixed. */
#define KB_MAX_DATABASES 32

/* Each database has a publisher and an applier, each with a status slot. */
#define KB_MAX_WORKERS (2 * KB_MAX_DATABASES)

/* ---- settings.c ---- */

extern char *kb_bootstrap_servers;
extern char *kb_databases;
extern char *kb_instance_id_setting;
extern char *kb_kafka_options;
extern char *kb_producer_options;
extern char *kb_consumer_options;
extern char *kb_sasl_password;
extern char *kb_ssl_key_password;
extern int	kb_worker_restart_delay;
extern int	kb_probe_interval;
extern int	kb_max_event_size;	/* kB */
extern int	kb_apply_batch_size;
extern int	kb_tombstone_retention;
extern int	kb_conflict_retention;
extern bool kb_create_topics;
extern bool kb_stream_large_transactions;
extern int	kb_topic_partitions;
extern int	kb_topic_replication_factor;
extern int	kb_topic_cleanup_policy;
extern int	kb_snapshot_chunk_rows;
extern int	kb_snapshot_chunk_time;	/* ms */

/* kafka_bridge.topic_cleanup_policy */
typedef enum KbCleanupPolicy
{
	KB_CLEANUP_COMPACT,
	KB_CLEANUP_DELETE,
	KB_CLEANUP_COMPACT_DELETE
} KbCleanupPolicy;

/* true when loaded through shared_preload_libraries (workers and shmem exist) */
extern bool kb_preloaded;

extern void kb_define_settings(void);
extern const char *kb_instance_id(void);
extern List *kb_database_names(void);
extern void kb_require_preload(const char *what);

typedef enum KbClientRole
{
	KB_CLIENT_PRODUCER,
	KB_CLIENT_CONSUMER
} KbClientRole;

/*
 * Apply a property list ("name=value name='value'") to a librdkafka
 * configuration.  On failure returns false and sets *detail to a palloc'd,
 * user-facing sentence naming the property.  conf may be NULL to only parse.
 */
extern bool kb_apply_property_list(rd_kafka_conf_t *conf, const char *list,
								   char **detail);
extern void kb_redact_secrets(char *text);

/* ---- status.c ---- */

typedef enum KbWorkerState
{
	KB_STATE_FREE = 0,			/* slot unused */
	KB_STATE_STARTING,			/* launcher registered the worker */
	KB_STATE_UNCONFIGURED,		/* kafka_bridge.bootstrap_servers is empty */
	KB_STATE_CONNECTING,		/* Kafka client created, no answer yet */
	KB_STATE_CONNECTED,			/* the last metadata request succeeded */
	KB_STATE_ERROR,				/* the last attempt failed; see last_error */
	KB_STATE_STOPPED,			/* worker exited; launcher restarts it */
	KB_STATE_IDLE				/* nothing to do (an applier without subscriptions) */
} KbWorkerState;

/* What a database worker does: one process of each kind per database. */
typedef enum KbWorkerRole
{
	KB_ROLE_PUBLISHER,			/* publishes the database's changes */
	KB_ROLE_APPLIER				/* applies subscribed topics to tables */
} KbWorkerRole;

#define KB_NUM_ROLES 2

#define KB_ACTIVITY_LEN 128

typedef struct KbWorkerSlot
{
	/* set by the launcher */
	NameData	dbname;
	KbWorkerRole role;
	int			generation;		/* bumped each time the slot is reused */

	/* set by the worker (strings under the status lock) */
	Oid			dboid;			/* for the commit hook's wake-up */
	struct Latch *latch;		/* the worker's latch, NULL when none runs */
	KbWorkerState state;
	int			pid;
	TimestampTz started_at;
	char		brokers[256];	/* brokers seen in the last metadata reply */
	char		activity[KB_ACTIVITY_LEN];
	char		last_error[1024];	/* a refusal names up to seven objects */
	TimestampTz last_error_at;

	/* counters filled by the publisher and the consumer */
	pg_atomic_uint64 events_published;
	pg_atomic_uint64 events_applied;
	pg_atomic_uint64 publish_lag_bytes;
	pg_atomic_uint64 consumer_lag;
	pg_atomic_uint64 conflicts;	/* met by the applier */
} KbWorkerSlot;

extern void kb_status_request_shmem(void);
extern void kb_status_init_shmem(void);
extern KbWorkerSlot *kb_status_slot(int index);
extern int	kb_status_claim(const char *dbname, KbWorkerRole role);
extern void kb_status_release(int index);
extern void kb_status_set(int index, KbWorkerState state, const char *activity);
extern void kb_status_set_error(int index, KbWorkerState state,
								const char *fmt,...) pg_attribute_printf(3, 4);
extern void kb_status_set_activity(int index, const char *activity);
extern void kb_status_get_activity(int index, char *activity, size_t size);
extern void kb_status_set_brokers(int index, const char *brokers);
extern void kb_status_set_pid(int index, int pid);
extern const char *kb_state_name(KbWorkerState state);
extern const char *kb_role_name(KbWorkerRole role);
extern void kb_status_set_latch(int index, Oid dboid, struct Latch *latch);
extern void kb_status_wake(Oid dboid, KbWorkerRole role);
extern void kb_status_subscriptions_changed(void);
extern uint32 kb_status_subscriptions_version(void);
extern void kb_status_tombstone_written(void);
extern bool kb_status_tombstones_written(uint64 *count);

/* ---- launcher.c / worker.c ---- */

extern void kb_register_launcher(void);
extern PGDLLEXPORT void kafka_bridge_launcher_main(Datum arg);
extern PGDLLEXPORT void kafka_bridge_worker_main(Datum arg);

/* ---- applier.c ---- */

extern void kb_applier_loop(int status_slot, const char *dbname) pg_attribute_noreturn();

/* ---- kafka_client.c ---- */

typedef struct KbKafkaClient KbKafkaClient;
typedef void (*KbDeliveryCallback) (rd_kafka_t *rk, const rd_kafka_message_t *msg,
									void *opaque);

extern KbKafkaClient *kb_kafka_client_create(KbClientRole role,
											 const char *client_id,
											 KbDeliveryCallback on_delivery,
											 char **detail);
extern rd_kafka_t *kb_kafka_client_handle(KbKafkaClient *client);
extern const char *kb_kafka_client_last_error(KbKafkaClient *client);
extern void kb_kafka_client_destroy(KbKafkaClient *client);
extern void kb_kafka_client_poll(KbKafkaClient *client, int timeout_ms);
extern void kb_kafka_client_set_threaded(KbKafkaClient *client, bool threaded);
extern void kb_kafka_client_wake(KbKafkaClient *client);
extern bool kb_kafka_client_probe(KbKafkaClient *client, int timeout_ms,
								  char *brokers, size_t brokers_size,
								  char *error, size_t error_size);
extern char *kb_kafka_settings_fingerprint(void);
extern bool kb_kafka_create_topic(rd_kafka_t *rk, const char *topic, bool compact,
								  char *error, size_t error_size);
extern bool kb_reload_settings(char **fingerprint);

/* ---- producer_thread.c ---- */

typedef struct KbProducerThread KbProducerThread;
typedef struct KbRecordHeader
{
	const char *name;			/* not terminated: name_len bytes */
	int			name_len;
	const char *value;			/* NULL: a null header */
	int			value_len;
} KbRecordHeader;
/* a record librdkafka refused; runs on the producing thread */
typedef void (*KbProduceErrorCallback) (void *opaque, rd_kafka_topic_t *rkt,
										rd_kafka_resp_err_t err);

/* ---- kafka_bridge.c ---- */

extern int	kb_start_thread(pthread_t *thread, void *(*main) (void *), void *arg,
							const char *name);

extern KbProducerThread *kb_producer_thread_start(KbKafkaClient *client,
												  KbProduceErrorCallback on_error);
extern void kb_producer_thread_stop(KbProducerThread *pt);
extern bool kb_producer_thread_put(KbProducerThread *pt, rd_kafka_topic_t *rkt,
								   void *opaque, const char *key, int key_len,
								   const char *value, int value_len,
								   const KbRecordHeader *headers, int nheaders);
extern void kb_producer_thread_flush(KbProducerThread *pt);
extern uint64 kb_producer_thread_written(KbProducerThread *pt);
extern uint64 kb_producer_thread_consumed(KbProducerThread *pt);
extern void kb_producer_thread_wake_me(KbProducerThread *pt);
extern bool kb_producer_thread_queue_full(KbProducerThread *pt);

/* ---- publisher.c ---- */

typedef struct KbPublisher KbPublisher;
struct LogicalDecodingContext;

extern bool kb_publisher_ensure_slot(void);
extern void kb_publisher_drop_slot(void);
extern KbPublisher *kb_publisher_start(int status_slot, KbKafkaClient *client);
extern void kb_publisher_stop(KbPublisher *pub);
extern void kb_publisher_stop_producing(KbPublisher *pub);
extern bool kb_publisher_step(KbPublisher *pub, int budget_ms,
							  char *error, size_t error_size);
extern bool kb_publisher_caught_up(KbPublisher *pub);
extern bool kb_publisher_pending(KbPublisher *pub);
extern XLogRecPtr kb_publisher_confirmed(KbPublisher *pub);
extern XLogRecPtr kb_publisher_decoded(KbPublisher *pub);
extern bool kb_publisher_streaming(KbPublisher *pub);
extern void kb_publisher_delivery_report(rd_kafka_t *rk,
										 const rd_kafka_message_t *msg,
										 void *opaque);

/*
 * The headers of a row event (see docs/events.md): lsn and seq NULL, or
 * commit_time NULL, leave those out.
 */
typedef struct KbEventHeaders
{
	const char *event;
	const char *origin;
	const char *lsn;
	const char *seq;
	const char *commit_time;
	/* their lengths (per record: no strlen) */
	int			event_len;
	int			origin_len;
	int			lsn_len;
	int			seq_len;
	int			commit_time_len;
} KbEventHeaders;

/*
 * Records produced outside the stream of transactions (snapshot chunks)
 * count their acknowledgements in a batch; NULL stands for the transaction
 * being decoded.
 */
typedef struct KbPublishBatch KbPublishBatch;

extern XLogRecPtr kb_publisher_boundary(KbPublisher *pub);
extern bool kb_publisher_prepare_topic(KbPublisher *pub, const char *topic, bool compact);
extern void kb_publisher_flush(KbPublisher *pub);
extern KbPublishBatch *kb_publisher_batch_new(KbPublisher *pub);
extern bool kb_publisher_produce(KbPublisher *pub, KbPublishBatch *batch,
								 const char *topic, int topic_len,
								 const char *key, int key_len, const char *value, int value_len,
								 const KbEventHeaders *headers, TimestampTz give_up_at);
extern bool kb_publisher_congested(KbPublisher *pub);
extern bool kb_publisher_batch_acknowledged(KbPublishBatch *batch);
extern void kb_publisher_batch_free(KbPublishBatch *batch);
extern bool kb_publisher_failed(KbPublisher *pub);

/*
 * The output plugin, when it decodes for the publisher, hands it records
 * directly (no frames): the publisher whose decoding ctx is, else NULL.
 */
extern KbPublisher *kb_publisher_of(struct LogicalDecodingContext *ctx);
extern bool kb_publisher_decodes(struct LogicalDecodingContext *ctx);
extern void kb_publisher_report(KbPublisher *pub, const char *fmt,...) pg_attribute_printf(2, 3);
extern void kb_publisher_report_end(KbPublisher *pub);
extern void kb_publisher_produce_send(KbPublisher *pub, const char *frame, int frame_len);
extern void kb_publisher_commit(KbPublisher *pub, XLogRecPtr end_lsn);
/* decoder.c: between two rounds of decoding (streamed transactions) */
extern void kb_decoder_next_round(struct LogicalDecodingContext *ctx);
extern bool kb_decoder_stream_open(struct LogicalDecodingContext *ctx);

/* ---- snapshot.c ---- */

/* what the publisher's loop does next for snapshots */
typedef enum KbSnapshotWork
{
	KB_SNAPSHOT_NONE,			/* nothing to do */
	KB_SNAPSHOT_WAITING,		/* chunks wait for their acknowledgements, or
								 * a look for snapshots to run is due soon */
	KB_SNAPSHOT_READY			/* a chunk may run at once */
} KbSnapshotWork;

extern KbSnapshotWork kb_snapshot_step(KbPublisher *pub, int status_slot);
extern void kb_snapshot_forget(void);
extern void kb_snapshot_wake(void);

#endif							/* KAFKA_BRIDGE_H */
