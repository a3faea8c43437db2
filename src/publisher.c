/*-------------------------------------------------------------------------
 * publisher.c
 *	  The publishing half of the database worker: decodes the database's WAL
 *	  in-process through the kafka_bridge output plugin, hands each record to
 *	  the librdkafka producer, and confirms the replication slot only past
 *	  transactions whose every record the broker acknowledged.
 *
 * Decoding runs in the worker itself, as pg_logical_slot_get_changes() does
 * it: no replication connection and no pg_hba.conf entry.  The plugin runs
 * with output 'kafka' and, seeing that it decodes for the publisher
 * (kb_publisher_of), hands each record to kb_publisher_produce() and each
 * commit to kb_publisher_commit(), rather than writing the binary frames
 * it writes for other callers (see decoder.c): nothing is built only to be
 * parsed again.
 *
 * Snapshots (snapshot.c) produce their records through the same producer,
 * between two rounds of decoding: a batch counts the acknowledgements of a
 * chunk's records like a transaction's, outside the FIFO.
 *
 * A topic is created (kafka_client.c) before the first record the
 * publisher sends to it, with the kafka_bridge.topic_* settings.
 *
 * Every transaction with records gets an entry in a FIFO, in commit order;
 * each record produced counts against its entry, each acknowledgement
 * (delivery report) counts it down.  The slot's confirmed position moves to
 * the commit end of the newest fully acknowledged transaction at the head of
 * the FIFO, or, when nothing is pending, to where decoding stands, so an idle
 * database does not retain WAL.  Any failed delivery drops the decoding
 * context and the producer: the worker starts again from the confirmed
 * position (at-least-once; the apply side recognises replays).
 *
 * The worker's thread decodes; the publisher's producing thread
 * (producer_thread.c) hands the records to librdkafka and serves their
 * acknowledgements (delivery reports): the delivery callback only counts
 * down atomics and records a failure, and the worker's thread reads them.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <pthread.h>

#include "access/xact.h"
#include "access/xlog.h"
#include "access/xlogutils.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/ilist.h"
#include "libpq/pqformat.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "nodes/makefuncs.h"
#include "replication/decode.h"
#include "replication/logical.h"
#include "replication/slot.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "postmaster/interrupt.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/pg_lsn.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "event_codec.h"
#include "kafka_bridge.h"

/* A decoded transaction whose records are not all acknowledged yet. */
typedef struct PendingTxn
{
	dlist_node	node;
	XLogRecPtr	end_lsn;		/* commit end; valid once committed */
	bool		committed;		/* its commit was decoded */
	bool		wake;			/* a batch: wake the worker once acknowledged */
	pg_atomic_uint64 outstanding;	/* records produced, not acknowledged */
} PendingTxn;

/*
 * Topics the publisher produced to: every topic it made sure exists, for
 * its whole life (so that it asks the brokers once per topic), and a
 * handle for at most KB_TOPIC_HANDLES of them, the most recently used.
 */
#define KB_TOPIC_HANDLES 32
#define KB_RETIRED_HANDLES 1024
#define KB_TOPIC_NAME_SIZE 256

typedef struct TopicEntry
{
	char		name[KB_TOPIC_NAME_SIZE];	/* hash key */
	rd_kafka_topic_t *rkt;		/* NULL: no handle now */
	uint64		last_used;
} TopicEntry;

/*
 * A handle given up while records in the producing thread's ring may still
 * name it: destroyed once the thread has handed those over.
 */
typedef struct RetiredHandle
{
	rd_kafka_topic_t *rkt;
	uint64		ring_upto;
} RetiredHandle;

struct KbPublisher
{
	int			status_slot;
	char		slot_name[NAMEDATALEN];
	KbKafkaClient *client;
	KbProducerThread *thread;	/* produces the records and serves their
								 * acknowledgements */
	LogicalDecodingContext *ctx;
	MemoryContext cxt;			/* PendingTxn entries */
	MemoryContext decode_cxt;	/* current while decoding: the WAL reader
								 * allocates buffers that must last */
	dlist_head	pending;		/* oldest first */
	PendingTxn *open_txn;		/* receiving records, no commit frame yet */
	XLogRecPtr	confirmed;		/* last position given to the slot */
	XLogRecPtr	saved;			/* last confirmed position written to disk */
	TimestampTz saved_at;
	/* written by the producing thread too: */
	pg_atomic_uint64 acknowledged;	/* records acknowledged, not yet counted
									 * in the status (one add to shared memory
									 * per step, not per record) */
	pg_atomic_uint32 failed;	/* a delivery failed: start again */
	pthread_mutex_t failure_lock;
	char		failure[512];	/* why, under failure_lock */
	XLogRecPtr	step_target;	/* the WAL end the last step decoded towards */
	/* topic handles, so that producing does not look each topic up by name */
	HTAB	   *topics;			/* TopicEntry by name */
	TopicEntry *last_topic;		/* the one the last record went to */
	int			last_topic_len;
	TopicEntry *handles[KB_TOPIC_HANDLES];	/* the entries with a handle */
	/* a streamed transaction's progress shown (kb_publisher_report) */
	bool		reporting;
	char		activity_before[KB_ACTIVITY_LEN];
	char		activity_shown[KB_ACTIVITY_LEN];	/* the last reported */
	int			nhandles;
	uint64		use_clock;
	RetiredHandle retired[KB_RETIRED_HANDLES];
	int			nretired;
};

/* the delivery-report callback has no other way to find its publisher */
static KbPublisher *current = NULL;

/* Slot name of a database: one slot per database the worker serves. */
static void
slot_name_for(char *buf, Oid dboid)
{
	snprintf(buf, NAMEDATALEN, "kafka_bridge_%u", dboid);
}

/*
 * Fail the publisher, saying why, unless it failed already: the worker
 * starts it again.  Callable from either thread (no PostgreSQL code).
 */
static void
set_failure(KbPublisher *pub, const char *fmt,...) pg_attribute_printf(2, 3);

static void
set_failure(KbPublisher *pub, const char *fmt,...)
{
	va_list		args;

	pthread_mutex_lock(&pub->failure_lock);
	if (!pg_atomic_read_u32(&pub->failed))
	{
		va_start(args, fmt);
		vsnprintf(pub->failure, sizeof(pub->failure), fmt, args);
		va_end(args);
		pg_atomic_write_u32(&pub->failed, 1);
	}
	pthread_mutex_unlock(&pub->failure_lock);
}

static inline bool
is_failed(KbPublisher *pub)
{
	return pg_atomic_read_u32(&pub->failed) != 0;
}

/*
 * Wake the worker's thread from the producing thread, wherever it waits:
 * on its latch (the worker's loop) or polling the client (waiting for room
 * in the ring).  SetLatch() is safe here as it is in a signal handler: it
 * sets flags and signals our own process, which only the worker's thread
 * receives (every other thread blocks every signal).
 */
static void
wake_worker(KbPublisher *pub)
{
	SetLatch(MyLatch);
	kb_kafka_client_wake(pub->client);
}

/*
 * Called by librdkafka once per record, acknowledged by the brokers or
 * failed for good, on the producing thread (producer_thread.c): no
 * PostgreSQL code here.  The count down of the record's transaction is the
 * last touch of it: the worker frees it once it reads zero.
 */
void
kb_publisher_delivery_report(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque)
{
	KbPublisher *pub = current;
	PendingTxn *txn = (PendingTxn *) msg->_private;
	bool		wake;

	if (pub == NULL || txn == NULL)
		return;
	if (msg->err)
	{
		set_failure(pub, "delivery to topic \"%s\" partition %d failed: %s",
					rd_kafka_topic_name(msg->rkt), msg->partition,
					rd_kafka_err2str(msg->err));
		wake_worker(pub);
		return;
	}
	pg_atomic_fetch_add_u64(&pub->acknowledged, 1);
	wake = txn->wake;
	if (pg_atomic_sub_fetch_u64(&txn->outstanding, 1) == 0 && wake)
		wake_worker(pub);
}

/*
 * A record librdkafka refused, on the producing thread: as for a failed
 * report, its transaction's count stays up.  Counting it down could let
 * the worker, between its look at the failure and its look at the count,
 * take the transaction as acknowledged and confirm the slot past a record
 * never delivered; the failed publisher is thrown away with its counts.
 */
static void
produce_failed(void *opaque, rd_kafka_topic_t *rkt, rd_kafka_resp_err_t err)
{
	KbPublisher *pub = current;

	if (pub == NULL)
		return;
	set_failure(pub, "cannot produce to topic \"%s\": %s", rd_kafka_topic_name(rkt),
				rd_kafka_err2str(err));
	wake_worker(pub);
}

/* Count the records acknowledged since the last call in the status. */
static void
report_acknowledged(KbPublisher *pub)
{
	uint64		n = pg_atomic_exchange_u64(&pub->acknowledged, 0);

	if (n > 0)
		pg_atomic_fetch_add_u64(&kb_status_slot(pub->status_slot)->events_published, n);
}

static void
prepare_write(LogicalDecodingContext *ctx, XLogRecPtr lsn, TransactionId xid,
			  bool last_write)
{
	resetStringInfo(ctx->out);
}

/*
 * Wait a little for the producing thread to make room in its ring (it
 * wakes us), doing meanwhile what the worker's loop would: interrupts, a
 * reload, the status (once librdkafka's own queue is full: the broker is
 * slow or away).
 */
static void
wait_for_thread(KbPublisher *pub, bool *waiting)
{
	if (!*waiting && kb_producer_thread_queue_full(pub->thread))
	{
		pgstat_report_activity(STATE_RUNNING, "waiting for the broker: the producer queue is full");
		kb_status_set(pub->status_slot, KB_STATE_ERROR,
					  "waiting for the broker: the producer queue is full");
		*waiting = true;
	}
	kb_producer_thread_flush(pub->thread);
	kb_kafka_client_poll(pub->client, 50);
	report_acknowledged(pub);
	if (*waiting && kb_kafka_client_last_error(pub->client)[0])
		kb_status_set_error(pub->status_slot, KB_STATE_ERROR, "cannot reach Kafka at \"%s\": %s",
							kb_bootstrap_servers, kb_kafka_client_last_error(pub->client));
	pg_atomic_write_u64(&kb_status_slot(pub->status_slot)->publish_lag_bytes,
						GetFlushRecPtr(NULL) - Min(pub->confirmed, GetFlushRecPtr(NULL)));
	CHECK_FOR_INTERRUPTS();
	if (ConfigReloadPending)
	{
		char	   *before = kb_kafka_settings_fingerprint();

		ConfigReloadPending = false;
		ProcessConfigFile(PGC_SIGHUP);
		/* new Kafka settings need a new producer: start over */
		if (strcmp(before, kb_kafka_settings_fingerprint()) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_CONFIG_FILE_ERROR),
					 errmsg("kafka_bridge restarts publishing with the reloaded Kafka settings")));
	}
	if (!PostmasterIsAlive())
		proc_exit(1);
}

/* Destroy the retired handles the producing thread is done with. */
static void
reap_retired(KbPublisher *pub)
{
	uint64		consumed = kb_producer_thread_consumed(pub->thread);
	int			kept = 0;

	for (int i = 0; i < pub->nretired; i++)
	{
		if (pub->retired[i].ring_upto <= consumed)
			rd_kafka_topic_destroy(pub->retired[i].rkt);
		else
			pub->retired[kept++] = pub->retired[i];
	}
	pub->nretired = kept;
}

/*
 * Give up the handle of the least recently used topic: its topic stays
 * known, and it gets a handle again when a record goes to it.
 */
static void
evict_handle(KbPublisher *pub)
{
	TopicEntry *oldest;
	int			o = 0;

	/* among the handles, not every topic known: those can be many */
	if (pub->nhandles == 0)
		return;
	for (int i = 1; i < pub->nhandles; i++)
		if (pub->handles[i]->last_used < pub->handles[o]->last_used)
			o = i;
	oldest = pub->handles[o];

	reap_retired(pub);
	if (pub->nretired == KB_RETIRED_HANDLES)
	{
		/* many evictions in a row: wait for the thread to pass them all */
		uint64		upto = kb_producer_thread_written(pub->thread);
		bool		waiting = false;

		for (;;)
		{
			kb_producer_thread_wake_me(pub->thread);
			if (kb_producer_thread_consumed(pub->thread) >= upto)
				break;
			wait_for_thread(pub, &waiting);
		}
		reap_retired(pub);
	}
	pub->retired[pub->nretired].rkt = oldest->rkt;
	pub->retired[pub->nretired].ring_upto = kb_producer_thread_written(pub->thread);
	pub->nretired++;
	oldest->rkt = NULL;
	pub->handles[o] = pub->handles[--pub->nhandles];
}

/*
 * The handle of a topic.  The topic is created first, the first time, if
 * it does not exist: compacted for row events keyed by row, else (flat
 * records, kafka_bridge.send() records) as an event log.  NULL when that
 * failed (pub->failed says why).
 */
static rd_kafka_topic_t *
topic_handle(KbPublisher *pub, rd_kafka_t *rk, const char *name, int len,
			 bool compact)
{
	char		key[KB_TOPIC_NAME_SIZE];
	TopicEntry *entry;
	bool		found;
	char		why[512];

	/* most records go where the one before went */
	entry = pub->last_topic;
	if (entry && entry->rkt && pub->last_topic_len == len &&
		memcmp(entry->name, name, len) == 0)
	{
		entry->last_used = ++pub->use_clock;
		return entry->rkt;
	}

	memset(key, 0, sizeof(key));
	memcpy(key, name, len);
	entry = hash_search(pub->topics, key, HASH_ENTER, &found);
	if (!found)
	{
		entry->rkt = NULL;
		if (!kb_kafka_create_topic(rk, entry->name, compact, why, sizeof(why)))
		{
			hash_search(pub->topics, key, HASH_REMOVE, NULL);
			pub->last_topic = NULL;
			set_failure(pub, "%s", why);
			return NULL;
		}
	}
	if (entry->rkt == NULL)
	{
		if (pub->nhandles >= KB_TOPIC_HANDLES)
			evict_handle(pub);
		entry->rkt = rd_kafka_topic_new(rk, entry->name, NULL);
		if (entry->rkt == NULL)
			elog(ERROR, "could not create a handle for topic \"%s\": %s", entry->name,
				 rd_kafka_err2str(rd_kafka_last_error()));
		pub->handles[pub->nhandles++] = entry;
	}
	entry->last_used = ++pub->use_clock;
	pub->last_topic = entry;
	pub->last_topic_len = len;
	return entry->rkt;
}

/*
 * Hand one record to the producing thread, waiting while its ring is full
 * (until give_up_at, if not 0: then false, and the record is not
 * produced).  key and value may be NULL (key_len and value_len are then
 * ignored).  Its acknowledgement counts down batch, or the open
 * transaction's entry when batch is NULL.  row_topic: a topic created for
 * it holds row events (see below).
 */
static bool
produce(KbPublisher *pub, const char *topic, int topic_len,
		const char *key, int key_len, const char *value, int value_len,
		const KbRecordHeader *headers, int nheaders, bool row_topic, PendingTxn *batch,
		TimestampTz give_up_at)
{
	rd_kafka_t *rk = kb_kafka_client_handle(pub->client);
	rd_kafka_topic_t *rkt;
	bool		waiting = false;

	if (topic_len <= 0 || topic_len >= KB_TOPIC_NAME_SIZE)
		elog(ERROR, "kafka_bridge output plugin sent a topic name of %d bytes", topic_len);
	/*
	 * After a failure the publisher starts over: produce nothing more.  A
	 * topic is created compacted when its first record is a row event keyed
	 * by the row (a JSON object): not for flat records, keyed by event type,
	 * of which compaction would keep one per type.
	 */
	rkt = is_failed(pub) ? NULL :
		topic_handle(pub, rk, topic, topic_len, row_topic && key && key_len > 0 && key[0] == '{');
	if (rkt == NULL)
		return true;

	if (batch == NULL && pub->open_txn == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(pub->cxt);

		pub->open_txn = palloc0(sizeof(PendingTxn));
		pg_atomic_init_u64(&pub->open_txn->outstanding, 0);
		dlist_push_tail(&pub->pending, &pub->open_txn->node);
		MemoryContextSwitchTo(old);
	}
	if (batch == NULL)
		batch = pub->open_txn;

	/* counted before it can be acknowledged */
	pg_atomic_fetch_add_u64(&batch->outstanding, 1);
	while (!kb_producer_thread_put(pub->thread, rkt, batch, key, key_len,
								   value, value_len, headers, nheaders))
	{
		if (give_up_at != 0 && GetCurrentTimestamp() >= give_up_at)
		{
			/* never handed over: nothing to acknowledge */
			pg_atomic_fetch_sub_u64(&batch->outstanding, 1);
			return false;
		}
		wait_for_thread(pub, &waiting);
	}
	return true;
}

/*
 * Produce the record of a kafka_bridge.send() frame (the output plugin's
 * record layout, see decoder.c, past its tag).
 */
void
kb_publisher_produce_send(KbPublisher *pub, const char *frame, int frame_len)
{
	StringInfoData in = {.data = (char *) frame,.len = frame_len,.maxlen = frame_len};
	int			topic_len = pq_getmsgint(&in, 4);
	const char *topic = pq_getmsgbytes(&in, topic_len);
	int			key_len = pq_getmsgint(&in, 4);
	const char *key = key_len >= 0 ? pq_getmsgbytes(&in, key_len) : NULL;
	int			value_len = pq_getmsgint(&in, 4);
	const char *value = value_len >= 0 ? pq_getmsgbytes(&in, value_len) : NULL;
	int			nheaders = pq_getmsgint(&in, 2);
	KbRecordHeader *headers = palloc(sizeof(KbRecordHeader) * Max(nheaders, 1));

	for (int i = 0; i < nheaders; i++)
	{
		int			hv_len;

		headers[i].name_len = pq_getmsgint(&in, 2);
		headers[i].name = pq_getmsgbytes(&in, headers[i].name_len);
		hv_len = pq_getmsgint(&in, 4);
		headers[i].value = hv_len >= 0 ? pq_getmsgbytes(&in, hv_len) : NULL;
		headers[i].value_len = Max(hv_len, 0);
	}
	(void) produce(pub, topic, topic_len, key, key_len, value, value_len, headers, nheaders,
				   false, NULL, 0);
	pfree(headers);
}

/*
 * Produce a row event of batch (NULL: of the transaction being decoded) to
 * topic, which is created as a row topic if need be.  key NULL is a null
 * key, value NULL a tombstone.  With give_up_at (not 0), false when the
 * producer had no room for it by then: it was not produced.
 */
bool
kb_publisher_produce(KbPublisher *pub, KbPublishBatch *batch,
					 const char *topic, int topic_len,
					 const char *key, int key_len, const char *value, int value_len,
					 const KbEventHeaders *eh, TimestampTz give_up_at)
{
	KbRecordHeader headers[5];
	int			n = 0;

#define ADD_HEADER(hname, field) \
	(headers[n].name = (hname), headers[n].name_len = sizeof(hname) - 1, \
	 headers[n].value = eh->field, headers[n].value_len = eh->field##_len, n++)
	ADD_HEADER(KB_HEADER_EVENT, event);
	ADD_HEADER(KB_HEADER_ORIGIN, origin);
	if (eh->lsn)
	{
		ADD_HEADER(KB_HEADER_LSN, lsn);
		ADD_HEADER(KB_HEADER_SEQ, seq);
	}
	if (eh->commit_time)
		ADD_HEADER(KB_HEADER_COMMIT_TIME, commit_time);
#undef ADD_HEADER
	return produce(pub, topic, topic_len, key, key_len, value, value_len, headers, n, true,
				   (PendingTxn *) batch, give_up_at);
}

/* The transaction whose records were just produced committed at end_lsn. */
void
kb_publisher_commit(KbPublisher *pub, XLogRecPtr end_lsn)
{
	kb_producer_thread_flush(pub->thread);
	if (pub->open_txn)
	{
		pub->open_txn->end_lsn = end_lsn;
		pub->open_txn->committed = true;
		pub->open_txn = NULL;
	}
}

/*
 * The decoding context's write callback.  The output plugin hands the
 * publisher its records directly (kb_publisher_of), so it never writes.
 */
static void
write_frame(LogicalDecodingContext *ctx, XLogRecPtr lsn, TransactionId xid,
			bool last_write)
{
	elog(ERROR, "kafka_bridge output plugin wrote a frame to the publisher");
}

KbPublisher *
kb_publisher_of(LogicalDecodingContext *ctx)
{
	return ctx->write == write_frame ? current : NULL;
}

/*
 * Show what the publisher does with a streamed transaction in its row of
 * kafka_bridge.status (and in pg_stat_activity, until the next round of
 * decoding says otherwise); kb_publisher_report_end() shows again what was
 * shown before.
 */
void
kb_publisher_report(KbPublisher *pub, const char *fmt,...)
{
	char		activity[KB_ACTIVITY_LEN];
	va_list		args;

	va_start(args, fmt);
	vsnprintf(activity, sizeof(activity), fmt, args);
	va_end(args);
	if (!pub->reporting)
		kb_status_get_activity(pub->status_slot, pub->activity_before, sizeof(pub->activity_before));
	pub->reporting = true;
	strlcpy(pub->activity_shown, activity, sizeof(pub->activity_shown));
	kb_status_set_activity(pub->status_slot, activity);
	pgstat_report_activity(STATE_RUNNING, activity);
}

void
kb_publisher_report_end(KbPublisher *pub)
{
	char		now_shown[KB_ACTIVITY_LEN];

	if (!pub->reporting)
		return;
	pub->reporting = false;
	/* unless the worker has shown something else since (an error, say) */
	kb_status_get_activity(pub->status_slot, now_shown, sizeof(now_shown));
	if (strcmp(now_shown, pub->activity_shown) == 0)
		kb_status_set_activity(pub->status_slot, pub->activity_before);
}

/* Whether ctx decodes for a publisher (known from its startup on). */
bool
kb_publisher_decodes(LogicalDecodingContext *ctx)
{
	return ctx->write == write_frame;
}

/*
 * Note a slot just created in kafka_bridge.slot_history; true when one of
 * that name was created before: it is lost (PostgreSQL 15 keeps slots on
 * no standby and in no base backup, and an administrator may drop one),
 * and the changes committed before start were maybe never published.
 */
static bool
record_slot(const char *slot_name, XLogRecPtr start)
{
	Oid			types[3] = {NAMEOID, LSNOID, INT8OID};
	Datum		values[3];
	bool		lost;
	bool		isnull;
	NameData	name;

	namestrcpy(&name, slot_name);
	values[0] = NameGetDatum(&name);
	values[1] = LSNGetDatum(start);
	values[2] = Int64GetDatum((int64) GetSystemIdentifier());
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute_with_args("INSERT INTO kafka_bridge.slot_history "
							  "(slot_name, start_lsn, system_identifier, replaced_lost_slot) "
							  "SELECT $1, $2, $3, EXISTS (SELECT FROM kafka_bridge.slot_history "
							  "WHERE slot_name OPERATOR(pg_catalog.=) $1) RETURNING replaced_lost_slot",
							  3, types, values, NULL, false, 0) != SPI_OK_INSERT_RETURNING ||
		SPI_processed != 1)
		elog(ERROR, "writing kafka_bridge.slot_history failed");
	lost = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	return lost;
}

/*
 * Create the database's slot if it does not exist yet.  Its start point is
 * the current end of WAL: what committed before was not published.  True
 * when the slot replaces a lost one (see record_slot).
 */
bool
kb_publisher_ensure_slot(void)
{
	LogicalDecodingContext *ctx;
	MemoryContext cxt = CurrentMemoryContext;
	char		slot_name[NAMEDATALEN];
	XLogRecPtr	start;
	bool		lost;

	slot_name_for(slot_name, MyDatabaseId);
	if (SearchNamedReplicationSlot(slot_name, true) != NULL)
		return false;

	CheckSlotRequirements();
	pgstat_report_activity(STATE_RUNNING, "creating the replication slot");
	ReplicationSlotCreate(slot_name, true, RS_EPHEMERAL, false);

	StartTransactionCommand();
	ctx = CreateInitDecodingContext(KB_EXTENSION_NAME, NIL, false, InvalidXLogRecPtr,
									XL_ROUTINE(.page_read = read_local_xlog_page,
											   .segment_open = wal_segment_open,
											   .segment_close = wal_segment_close),
									NULL, NULL, NULL);
	DecodingContextFindStartpoint(ctx);
	FreeDecodingContext(ctx);
	CommitTransactionCommand();

	start = MyReplicationSlot->data.confirmed_flush;
	ReplicationSlotPersist();
	ReplicationSlotRelease();
	lost = record_slot(slot_name, start);
	MemoryContextSwitchTo(cxt);
	if (lost)
		ereport(WARNING,
				(errmsg("kafka_bridge created replication slot \"%s\" again: the one before is lost, and changes committed before %X/%X may not have been published",
						slot_name, LSN_FORMAT_ARGS(start)),
				 errdetail("kafka_bridge.slot_history lists a slot of that name created before. PostgreSQL 15 keeps replication slots on no standby and in no base backup: a promoted standby or a restored backup has none, and a dropped slot is gone."),
				 errhint("Publish the current rows of the published tables again with kafka_bridge.snapshot() on each.")));
	else
		ereport(LOG,
				(errmsg("kafka_bridge created replication slot \"%s\"", slot_name)));
	return lost;
}

/*
 * The extension is gone (DROP EXTENSION): nothing will be published, so the
 * slot must not hold WAL back any more.
 */
void
kb_publisher_drop_slot(void)
{
	char		slot_name[NAMEDATALEN];

	slot_name_for(slot_name, MyDatabaseId);
	if (SearchNamedReplicationSlot(slot_name, true) == NULL)
		return;
	ReplicationSlotDrop(slot_name, true);
	ereport(LOG,
			(errmsg("kafka_bridge dropped replication slot \"%s\": the extension is no longer installed",
					slot_name)));
}

/*
 * Start publishing for this database: acquire (or create) its slot and set
 * up decoding from the slot's position.  The client must be a producer
 * created with kb_publisher_delivery_report as its delivery callback.
 */
KbPublisher *
kb_publisher_start(int status_slot, KbKafkaClient *client)
{
	KbPublisher *pub;
	MemoryContext old;
	MemoryContext caller_cxt;
	List	   *options;

	pub = MemoryContextAllocZero(TopMemoryContext, sizeof(KbPublisher));
	pub->status_slot = status_slot;
	pub->client = client;
	slot_name_for(pub->slot_name, MyDatabaseId);
	pub->cxt = AllocSetContextCreate(TopMemoryContext, "kafka_bridge publisher",
									 ALLOCSET_SMALL_SIZES);
	pub->decode_cxt = AllocSetContextCreate(TopMemoryContext, "kafka_bridge decoding",
											ALLOCSET_DEFAULT_SIZES);
	{
		HASHCTL		ctl;

		ctl.keysize = KB_TOPIC_NAME_SIZE;
		ctl.entrysize = sizeof(TopicEntry);
		ctl.hcxt = pub->cxt;
		pub->topics = hash_create("kafka_bridge topics", 64, &ctl,
								  HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	}
	dlist_init(&pub->pending);

	kb_publisher_ensure_slot();
	ReplicationSlotAcquire(pub->slot_name, true);

	/* the decoding context must outlive the transaction that creates it */
	caller_cxt = CurrentMemoryContext;
	StartTransactionCommand();
	/* the options live as long as the context, freed with the publisher */
	old = MemoryContextSwitchTo(pub->cxt);
	options = list_make1(makeDefElem("output", (Node *) makeString("kafka"), -1));
	MemoryContextSwitchTo(TopMemoryContext);
	pub->ctx = CreateDecodingContext(InvalidXLogRecPtr, options, false,
									 XL_ROUTINE(.page_read = read_local_xlog_page,
												.segment_open = wal_segment_open,
												.segment_close = wal_segment_close),
									 prepare_write, write_frame, NULL);
	MemoryContextSwitchTo(old);
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller_cxt);

	XLogBeginRead(pub->ctx->reader, MyReplicationSlot->data.restart_lsn);
	pub->confirmed = MyReplicationSlot->data.confirmed_flush;
	pub->saved = pub->confirmed;
	pg_atomic_init_u64(&pub->acknowledged, 0);
	pg_atomic_init_u32(&pub->failed, 0);
	pthread_mutex_init(&pub->failure_lock, NULL);
	current = pub;
	pub->thread = kb_producer_thread_start(client, produce_failed);

	ereport(LOG,
			(errmsg("kafka_bridge is publishing from replication slot \"%s\" at %X/%X",
					pub->slot_name, LSN_FORMAT_ARGS(pub->confirmed))));
	return pub;
}

/* Stop publishing: free decoding, release the slot (records in flight are left to the caller's producer). */
void
kb_publisher_stop(KbPublisher *pub)
{
	if (pub == NULL)
		return;
	kb_publisher_stop_producing(pub);
	report_acknowledged(pub);
	if (pub->ctx)
		FreeDecodingContext(pub->ctx);
	if (MyReplicationSlot != NULL)
		ReplicationSlotRelease();
	MemoryContextDelete(pub->cxt);
	MemoryContextDelete(pub->decode_cxt);
	if (current == pub)
		current = NULL;
	pfree(pub);
}

/*
 * Stop the producing thread and let go of the topic handles: nothing is
 * produced from here on, no acknowledgement served until the next poll.
 * Touches no PostgreSQL state: the worker's exit calls it too, so that no
 * thread of librdkafka's runs while exit() cleans up the libraries.
 */
void
kb_publisher_stop_producing(KbPublisher *pub)
{
	if (pub == NULL || pub->thread == NULL)
		return;
	kb_producer_thread_stop(pub->thread);
	pub->thread = NULL;
	/* the thread is stopped: no record names a handle any more */
	for (int i = 0; i < pub->nhandles; i++)
		rd_kafka_topic_destroy(pub->handles[i]->rkt);
	for (int i = 0; i < pub->nretired; i++)
		rd_kafka_topic_destroy(pub->retired[i].rkt);
	pub->nhandles = 0;
	pub->nretired = 0;
}

/*
 * Move the slot's confirmed position past every fully acknowledged
 * transaction at the head of the FIFO; with nothing pending, to where
 * decoding stands.
 */
static void
confirm_acknowledged(KbPublisher *pub)
{
	XLogRecPtr	target = InvalidXLogRecPtr;

	while (!dlist_is_empty(&pub->pending))
	{
		PendingTxn *head = dlist_head_element(PendingTxn, node, &pub->pending);

		if (!head->committed || pg_atomic_read_u64(&head->outstanding) > 0)
			break;
		target = head->end_lsn;
		dlist_delete(&head->node);
		pfree(head);
	}
	if (dlist_is_empty(&pub->pending))
		target = pub->ctx->reader->EndRecPtr;

	if (target != InvalidXLogRecPtr && target > pub->confirmed)
	{
		LogicalConfirmReceivedLocation(target);
		pub->confirmed = target;
	}

	/*
	 * The confirmed position reaches disk at the next checkpoint unless we
	 * save the slot: do it five times a second (a small fsync each), so that
	 * a crash replays a fraction of a second of records rather than a
	 * checkpoint's worth.
	 */
	if (pub->confirmed > pub->saved &&
		TimestampDifferenceExceeds(pub->saved_at, GetCurrentTimestamp(), 200))
	{
		ReplicationSlotMarkDirty();
		ReplicationSlotSave();
		pub->saved = pub->confirmed;
		pub->saved_at = GetCurrentTimestamp();
	}
}

/*
 * Decode the WAL flushed so far, for at most budget_ms, producing records
 * as they come, then serve acknowledgements and confirm what is safe.
 * Returns false when a delivery failed: the caller stops this publisher
 * and the producer, and starts both again.
 */
bool
kb_publisher_step(KbPublisher *pub, int budget_ms, char *error, size_t error_size)
{
	XLogRecPtr	end_of_wal = GetFlushRecPtr(NULL);
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), budget_ms);
	uint64		records = 0;
	MemoryContext caller_cxt = CurrentMemoryContext;

	pub->step_target = end_of_wal;
	if (pub->ctx->reader->EndRecPtr < end_of_wal)
		pgstat_report_activity(STATE_RUNNING, "decoding and publishing changes");
	kb_decoder_next_round(pub->ctx);
	MemoryContextSwitchTo(pub->decode_cxt);

	while (!is_failed(pub) && pub->ctx->reader->EndRecPtr < end_of_wal)
	{
		char	   *errm = NULL;
		XLogRecord *record = XLogReadRecord(pub->ctx->reader, &errm);

		if (errm)
			elog(ERROR, "could not read WAL for replication slot \"%s\": %s",
				 pub->slot_name, errm);
		if (record != NULL)
			LogicalDecodingProcessRecord(pub->ctx, pub->ctx->reader);

		CHECK_FOR_INTERRUPTS();
		if ((++records & 1023) == 0)
		{
			kb_kafka_client_poll(pub->client, 0);
			if (GetCurrentTimestamp() >= deadline)
				break;
		}
	}
	kb_producer_thread_flush(pub->thread);
	kb_kafka_client_poll(pub->client, 0);
	report_acknowledged(pub);
	/* decoding may also have left TopMemoryContext current */
	MemoryContextSwitchTo(caller_cxt);

	if (is_failed(pub))
	{
		pthread_mutex_lock(&pub->failure_lock);
		strlcpy(error, pub->failure, error_size);
		pthread_mutex_unlock(&pub->failure_lock);
		return false;
	}
	confirm_acknowledged(pub);
	pg_atomic_write_u64(&kb_status_slot(pub->status_slot)->publish_lag_bytes,
						GetFlushRecPtr(NULL) - Min(pub->confirmed, GetFlushRecPtr(NULL)));
	return true;
}

/* The slot's confirmed position: what is published for sure. */
XLogRecPtr
kb_publisher_confirmed(KbPublisher *pub)
{
	return pub->confirmed;
}

/* How far decoding has read. */
XLogRecPtr
kb_publisher_decoded(KbPublisher *pub)
{
	return pub->ctx ? pub->ctx->reader->EndRecPtr : pub->confirmed;
}

/* Whether a transaction streamed before its end is being kept (decoder.c). */
bool
kb_publisher_streaming(KbPublisher *pub)
{
	return pub->ctx && kb_decoder_stream_open(pub->ctx);
}

/* Whether records wait for their acknowledgement. */
bool
kb_publisher_pending(KbPublisher *pub)
{
	return !dlist_is_empty(&pub->pending);
}

/* Whether decoding has caught up with the WAL flushed so far. */
bool
kb_publisher_caught_up(KbPublisher *pub)
{
	return pub->ctx->reader->EndRecPtr >= GetFlushRecPtr(NULL);
}

/*
 * Where decoding stands when the last step decoded everything it set out
 * to (else InvalidXLogRecPtr): every transaction that committed before
 * this position has had its records produced, none after.  A snapshot
 * chunk runs only there (see snapshot.c).
 */
XLogRecPtr
kb_publisher_boundary(KbPublisher *pub)
{
	if (is_failed(pub) || pub->ctx->reader->EndRecPtr < pub->step_target)
		return InvalidXLogRecPtr;
	return pub->ctx->reader->EndRecPtr;
}

/*
 * Have the producing thread take the records put so far at once (it is
 * woken every few records and at each commit; a batch ends elsewhere).
 */
void
kb_publisher_flush(KbPublisher *pub)
{
	kb_producer_thread_flush(pub->thread);
}

/* A batch of records outside any transaction (a snapshot chunk). */
KbPublishBatch *
kb_publisher_batch_new(KbPublisher *pub)
{
	/* in pub->cxt: acknowledgements may come after the batch is given up */
	PendingTxn *batch = MemoryContextAllocZero(pub->cxt, sizeof(PendingTxn));

	pg_atomic_init_u64(&batch->outstanding, 0);
	batch->wake = true;
	return (KbPublishBatch *) batch;
}

/*
 * Whether librdkafka's queue is full (the broker is slow or away): a
 * snapshot chunk would then wait for room with its table locked.
 */
bool
kb_publisher_congested(KbPublisher *pub)
{
	return kb_producer_thread_queue_full(pub->thread);
}

/* Whether a delivery failed: the worker starts the publisher again. */
bool
kb_publisher_failed(KbPublisher *pub)
{
	return is_failed(pub);
}

/* Whether every record of batch is acknowledged. */
bool
kb_publisher_batch_acknowledged(KbPublishBatch *batch)
{
	return pg_atomic_read_u64(&((PendingTxn *) batch)->outstanding) == 0;
}

/*
 * Free a batch once every record of it is acknowledged: the last report
 * touched it last.  (A batch left unacknowledged goes with its publisher.)
 */
void
kb_publisher_batch_free(KbPublishBatch *batch)
{
	Assert(kb_publisher_batch_acknowledged(batch));
	pfree(batch);
}

/*
 * Make sure a topic exists and the producer knows its partitions, before a
 * snapshot chunk locks its table: creating a topic and learning its leaders
 * takes a while, during which the table's writers would wait.  compact: a
 * topic of row events keyed by row.  False when the topic could not be
 * created (the publisher is then failed).
 */
bool
kb_publisher_prepare_topic(KbPublisher *pub, const char *topic, bool compact)
{
	rd_kafka_t *rk = kb_kafka_client_handle(pub->client);
	int			len = strlen(topic);
	rd_kafka_topic_t *rkt;
	const struct rd_kafka_metadata *md = NULL;

	if (len <= 0 || len >= KB_TOPIC_NAME_SIZE)
		return true;			/* produce() says what is wrong */
	if (hash_search(pub->topics, topic, HASH_FIND, NULL) != NULL)
		return true;
	rkt = topic_handle(pub, rk, topic, len, compact);
	if (rkt == NULL)
		return false;
	if (rd_kafka_metadata(rk, 0, rkt, &md, 5000) == RD_KAFKA_RESP_ERR_NO_ERROR)
		rd_kafka_metadata_destroy(md);
	return true;
}
