/*-------------------------------------------------------------------------
 * worker.c
 *	  The per-database kafka_bridge workers' entry point, and the
 *	  publisher's main loop: reload of the settings, and the broker checks
 *	  that feed kafka_bridge.status.
 *
 * The launcher starts two workers per database, each with the index of its
 * status slot: the publisher (here, with publisher.c) and the applier
 * (applier.c).  The publisher keeps a Kafka producer built from the
 * settings in force, rebuilds it when a reload changes them, and reports
 * what it does in its status slot and in pg_stat_activity.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "access/xact.h"
#include "access/xlog.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "kafka_bridge.h"

/* timeout of one metadata request to the brokers */
#define KB_PROBE_TIMEOUT_MS 1000

static int	my_slot = -1;

typedef struct WorkerState WorkerState;
static WorkerState *running_state = NULL;	/* for worker_kafka_at_exit */
static void drop_kafka_at_exit(WorkerState *w);

/*
 * At the worker's exit, however it comes (an error, a signal, shutdown):
 * the producing thread stopped and librdkafka's handle destroyed, so that
 * none of their threads runs while exit() cleans up the libraries (SSL).
 * Registered before the connection to the database, it runs after
 * PostgreSQL's own clean-up of the session.
 */
static void
worker_kafka_at_exit(int code, Datum arg)
{
	if (running_state != NULL)
		drop_kafka_at_exit(running_state);
	running_state = NULL;
}

static void
worker_on_exit(int code, Datum arg)
{
	kb_status_set_latch(my_slot, InvalidOid, NULL);
	kb_status_set_pid(my_slot, 0);
}

/* Report what the worker does, in its status slot and in pg_stat_activity. */
static void
report(KbWorkerState state, const char *activity)
{
	kb_status_set(my_slot, state, activity);
	pgstat_report_activity(STATE_IDLE, activity);
}

static bool
extension_installed(void)
{
	bool		installed;
	MemoryContext cxt = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	pgstat_report_activity(STATE_RUNNING, "looking for the kafka_bridge extension");
	installed = OidIsValid(get_extension_oid(KB_EXTENSION_NAME, true));
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
	return installed;
}

/*
 * Check the brokers and record the outcome; log only changes of state so an
 * outage does not flood the server log.  keep_activity: the brokers being
 * up leaves the activity shown as it is (a streamed transaction's
 * progress).
 */
static void
probe_brokers(KbKafkaClient *client, const char *dbname, bool keep_activity)
{
	KbWorkerSlot *slot = kb_status_slot(my_slot);
	KbWorkerState before = slot->state;
	char		brokers[256];
	char		error[512];
	char		activity[128];

	pgstat_report_activity(STATE_RUNNING, "checking the Kafka brokers");
	if (kb_kafka_client_probe(client, KB_PROBE_TIMEOUT_MS, brokers, sizeof(brokers),
							  error, sizeof(error)))
	{
		kb_status_set_brokers(my_slot, brokers);
		snprintf(activity, sizeof(activity), "connected to Kafka brokers %s", brokers);
		report(KB_STATE_CONNECTED, keep_activity ? NULL : activity);
		if (before != KB_STATE_CONNECTED)
			ereport(LOG,
					(errmsg("kafka_bridge publisher for database \"%s\" connected to Kafka brokers %s",
							dbname, brokers)));
	}
	else
	{
		kb_status_set_brokers(my_slot, NULL);
		kb_status_set_error(my_slot, KB_STATE_ERROR, "%s", error);
		snprintf(activity, sizeof(activity), "waiting for Kafka at %s", kb_bootstrap_servers);
		report(KB_STATE_ERROR, activity);
		if (before != KB_STATE_ERROR)
			ereport(LOG,
					(errmsg("kafka_bridge publisher for database \"%s\" cannot reach Kafka", dbname),
					 errdetail("%s", error),
					 errhint("Check kafka_bridge.bootstrap_servers and that the brokers are up; the worker keeps retrying.")));
	}
}

/* What the worker holds between two turns of its loop. */
struct WorkerState
{
	const char *dbname;
	char	   *client_id;
	KbKafkaClient *client;		/* the producer; NULL until it can be built */
	KbPublisher *pub;			/* NULL until the extension and a client exist */
	bool		have_extension;
	TimestampTz next_probe;
	TimestampTz publish_retry_at;
	int			backoff_ms;		/* after a failed delivery, doubling */
	XLogRecPtr	failed_upto;	/* what was decoded when it failed */
	uint64		published_at_probe; /* events_published at the last probe */
	XLogRecPtr	last_flush;		/* WAL flushed when last looked at, idle */
	TimestampTz flush_moved_at; /* when that last moved */
	bool		memory_to_return;	/* busy since malloc_trim last ran */
	TimestampTz trimmed_at;		/* when it last ran */
};

/* Drop the publisher and the producer; both are built again later. */
static void
drop_kafka(WorkerState *w)
{
	kb_publisher_stop(w->pub);
	w->pub = NULL;
	kb_kafka_client_destroy(w->client);
	w->client = NULL;
}

/* The Kafka part of drop_kafka alone: the process is exiting. */
static void
drop_kafka_at_exit(WorkerState *w)
{
	kb_publisher_stop_producing(w->pub);
	kb_kafka_client_destroy(w->client);
	w->client = NULL;
}

/* Periodic work: extension present?  slot?  client built?  brokers reachable? */
static void
check_and_probe(WorkerState *w)
{
	uint64		published = pg_atomic_read_u64(&kb_status_slot(my_slot)->events_published);

	w->have_extension = extension_installed();
	if (w->have_extension && wal_level < WAL_LEVEL_LOGICAL)
	{
		kb_status_set_error(my_slot, KB_STATE_ERROR,
							"wal_level is \"%s\": kafka_bridge needs wal_level = logical",
							GetConfigOption("wal_level", false, false));
		report(KB_STATE_ERROR, "waiting for wal_level = logical (a restart)");
		w->next_probe = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 60 * 1000L);
		return;
	}
	/* the slot first: changes are kept from here on, whatever Kafka does */
	if (w->have_extension)
	{
		if (kb_publisher_ensure_slot())
			kb_status_set_error(my_slot, kb_status_slot(my_slot)->state,
								"the replication slot was lost (a standby promoted, a backup restored, a slot dropped) and made again: changes committed before it may not have been published; run kafka_bridge.snapshot() on the published tables");
	}
	else
	{
		if (w->pub)
			drop_kafka(w);		/* DROP EXTENSION: stop publishing */
		kb_publisher_drop_slot();
	}

	if (kb_bootstrap_servers[0] == '\0')
		report(KB_STATE_UNCONFIGURED, "waiting for kafka_bridge.bootstrap_servers to be set");
	else
	{
		if (w->client == NULL)
		{
			char	   *detail;

			w->client = kb_kafka_client_create(KB_CLIENT_PRODUCER, w->client_id,
											   kb_publisher_delivery_report, &detail);
			if (w->client == NULL)
			{
				kb_status_set_error(my_slot, KB_STATE_ERROR, "%s", detail);
				report(KB_STATE_ERROR, "waiting for a usable Kafka configuration");
				ereport(LOG,
						(errmsg("kafka_bridge publisher for database \"%s\" cannot create a Kafka client",
								w->dbname),
						 errdetail("%s", detail)));
			}
			else
				report(KB_STATE_CONNECTING, "connecting to Kafka");
		}
		/* acknowledgements since the last probe say more than a metadata request */
		if (w->client && w->pub && published > w->published_at_probe)
			report(KB_STATE_CONNECTED, NULL);
		else if (w->client)
			probe_brokers(w->client, w->dbname,
						  w->pub && kb_publisher_streaming(w->pub));
	}
	w->published_at_probe = published;
	if (!w->have_extension)
		pgstat_report_activity(STATE_IDLE,
							   psprintf("%s; extension kafka_bridge is not installed in this database",
										kb_status_slot(my_slot)->activity));

	/* probe more often while something is wrong */
	w->next_probe = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
												kb_status_slot(my_slot)->state == KB_STATE_CONNECTED
												? kb_probe_interval * 1000L : 1000L);
}

/* One turn of publishing; on a failed delivery, start again after a backoff. */
static void
publish_step(WorkerState *w)
{
	char		error[512];

	if (kb_publisher_step(w->pub, 100, error, sizeof(error)))
	{
		/*
		 * The failure is over once everything decoded when it happened is
		 * confirmed.  A step that succeeds says nothing by itself: a record
		 * refused for good fails a later step, after the steps that
		 * produced it again.
		 */
		if (w->backoff_ms > 0 && kb_publisher_confirmed(w->pub) >= w->failed_upto)
			w->backoff_ms = 0;
		return;
	}
	w->backoff_ms = Min(Max(w->backoff_ms * 2, 1000), 30000);
	w->failed_upto = Max(w->failed_upto, kb_publisher_decoded(w->pub));
	kb_status_set_error(my_slot, KB_STATE_ERROR, "%s", error);
	report(KB_STATE_ERROR, "publishing again from the confirmed position after an error");
	ereport(LOG,
			(errmsg("kafka_bridge publisher for database \"%s\" restarts publishing in %d ms", w->dbname,
					w->backoff_ms),
			 errdetail("%s", error),
			 errhint("Records not acknowledged by the broker are published again from the slot's confirmed position.")));
	drop_kafka(w);
	w->publish_retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), w->backoff_ms);
	w->next_probe = w->publish_retry_at;
}

/*
 * Whether WAL was written in the last second, while we are caught up: a
 * large transaction maybe, with no commit to wake us yet, which decoding
 * follows as it is written (streamed to the plugin, or spilled) rather than
 * all after its commit.
 */
static bool
wal_moved_lately(WorkerState *w)
{
	XLogRecPtr	flushed = GetFlushRecPtr(NULL);
	TimestampTz now = GetCurrentTimestamp();

	if (flushed != w->last_flush)
	{
		w->last_flush = flushed;
		w->flush_moved_at = now;
	}
	return !TimestampDifferenceExceeds(w->flush_moved_at, now, 1000);
}

/*
 * Caught up, nothing waiting for the broker: give what decoding freed back
 * to the system (see kafka_bridge_worker_main), at most every 10 s, so
 * that a steady stream of transactions, caught up between two of them,
 * does not have its memory taken away and faulted back in each time.
 */
static void
return_memory(WorkerState *w)
{
	TimestampTz now = GetCurrentTimestamp();

	if (!TimestampDifferenceExceeds(w->trimmed_at, now, 10000))
		return;
#ifdef __GLIBC__
	malloc_trim(0);
#endif
	w->trimmed_at = now;
	w->memory_to_return = false;
}

static void
worker_loop(const char *dbname)
{
	/* static: the exit callback finds it after an error left this frame */
	static WorkerState w;
	char	   *fingerprint = kb_kafka_settings_fingerprint();
	MemoryContext loop_cxt = AllocSetContextCreate(TopMemoryContext,
												   "kafka_bridge worker loop",
												   ALLOCSET_DEFAULT_SIZES);

	memset(&w, 0, sizeof(w));
	w.dbname = dbname;
	w.client_id = psprintf("kafka_bridge-%s-%s", kb_instance_id(), dbname);
	running_state = &w;

	for (;;)
	{
		TimestampTz now;
		long		nap;
		KbSnapshotWork snapshot;

		CHECK_FOR_INTERRUPTS();
		/* what the last rounds did, for pg_stat_* and autovacuum (at most once a second) */
		pgstat_report_stat(false);
		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);

		if (ConfigReloadPending && kb_reload_settings(&fingerprint))
		{
			ereport(LOG,
					(errmsg("kafka_bridge publisher for database \"%s\" is reconnecting with the reloaded Kafka settings",
							dbname)));
			drop_kafka(&w);
			w.next_probe = 0;
		}

		now = GetCurrentTimestamp();
		if (now >= w.next_probe)
			check_and_probe(&w);

		if (w.pub == NULL && w.client && w.have_extension &&
			wal_level >= WAL_LEVEL_LOGICAL && now >= w.publish_retry_at)
		{
			w.pub = kb_publisher_start(my_slot, w.client);
			kb_snapshot_forget();
		}

		snapshot = KB_SNAPSHOT_NONE;
		if (w.pub)
			publish_step(&w);
		else if (w.client)
			kb_kafka_client_poll(w.client, 0);
		/* a chunk of a table's snapshot between two rounds of decoding */
		if (w.pub)
			snapshot = kb_snapshot_step(w.pub, my_slot);

		/*
		 * No sleep while WAL or a snapshot chunk waits.  Short naps while
		 * acknowledgements do: a commit wakes us, and so does the producing
		 * thread once a snapshot chunk is acknowledged (a loop that polled
		 * without waiting would take the CPU the producer's threads and a
		 * local broker need).
		 */
		if (w.pub && (!kb_publisher_caught_up(w.pub) || snapshot == KB_SNAPSHOT_READY))
			nap = 0;
		else if (w.pub && (snapshot == KB_SNAPSHOT_WAITING || kb_publisher_pending(w.pub)))
			nap = 10;
		else if (w.pub && wal_moved_lately(&w))
			nap = 20;
		else
			nap = Min(TimestampDifferenceMilliseconds(GetCurrentTimestamp(), w.next_probe), 1000L);
		if (nap == 0)
			w.memory_to_return = true;
		else if (w.memory_to_return && (w.pub == NULL || !kb_publisher_pending(w.pub)))
			return_memory(&w);
		/* a commit woke us: maybe publish() or snapshot(), look soon */
		if (nap > 0 &&
			(WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					   nap, PG_WAIT_EXTENSION) & WL_LATCH_SET))
			kb_snapshot_wake();
		else if (!PostmasterIsAlive())
			proc_exit(1);
		ResetLatch(MyLatch);
	}
}

void
kafka_bridge_worker_main(Datum arg)
{
	int			packed = DatumGetInt32(arg);
	KbWorkerSlot *slot;
	char		dbname[NAMEDATALEN];

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/*
	 * Every Kafka record and each of its headers is malloc'd (on the
	 * publisher's producing thread), and freed in bursts of thousands when
	 * their acknowledgements are served; glibc's fast bins then fill with
	 * chunks that each larger malloc consolidates again.  Without fast bins
	 * that work goes away.
	 */
#ifdef __GLIBC__
	mallopt(M_MXFAST, 0);
#endif

	my_slot = packed & 0xff;
	slot = kb_status_slot(my_slot);
	if (slot->generation != (packed >> 8) || slot->state == KB_STATE_FREE)
		proc_exit(0);			/* the launcher gave this slot away meanwhile */
	strlcpy(dbname, NameStr(slot->dbname), sizeof(dbname));

	/*
	 * Decoding allocates and frees up to logical_decoding_work_mem over and
	 * over: the reorder buffer fills, is streamed or spilled, and fills
	 * again, and a spilled transaction comes back from disk 4096 changes at
	 * a time.  By default glibc gives the freed memory back to the kernel
	 * at once (its 8 MB blocks are mmap'd, and the heap is trimmed beyond
	 * 128 kB free at its top), and the kernel hands out and zeroes the same
	 * pages again a moment later: page faults took a tenth of the decoding
	 * thread on a 1M-row transaction (bench/publish, one_txn).  The
	 * publisher keeps what it freed while it is busy and gives it back
	 * with malloc_trim() once it is caught up (return_memory).  In alternating
	 * runs that transaction then took 4% less of the decoding thread
	 * spilled, and streamed went from slower than spilled to faster
	 * (docs/publishing.md); the worker's peak grew from 112 to 130 MB.
	 */
#ifdef __GLIBC__
	if (slot->role != KB_ROLE_APPLIER)
	{
		mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
		mallopt(M_TRIM_THRESHOLD, INT_MAX);
	}
#endif

	kb_status_set_pid(my_slot, MyProcPid);
	before_shmem_exit(worker_on_exit, (Datum) 0);
	before_shmem_exit(worker_kafka_at_exit, (Datum) 0);

	BackgroundWorkerInitializeConnection(dbname, NULL, 0);
	pgstat_report_appname("kafka_bridge");

	/*
	 * Whatever postgresql.conf or ALTER DATABASE says: a snapshot chunk
	 * must see the rows committed before it locked its table (a snapshot
	 * taken before the lock would miss them), and the applier reads each
	 * row as it stands when it writes it.
	 */
	SetConfigOption("default_transaction_isolation", "read committed", PGC_SUSET, PGC_S_OVERRIDE);

	/*
	 * Names in the workers' SQL resolve in pg_catalog alone, as in core's
	 * apply workers: a schema of search_path cannot slip in an operator or
	 * function of the same name (the workers run as a superuser).
	 */
	SetConfigOption("search_path", "", PGC_SUSET, PGC_S_OVERRIDE);
	kb_status_set_latch(my_slot, MyDatabaseId, MyLatch);

	PG_TRY();
	{
		if (slot->role == KB_ROLE_APPLIER)
			kb_applier_loop(my_slot, dbname);
		else
			worker_loop(dbname);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		/* keep the reason in the status view; the launcher restarts us */
		MemoryContextSwitchTo(TopMemoryContext);
		edata = CopyErrorData();
		kb_status_set_error(my_slot, KB_STATE_STOPPED, "%s", edata->message);
		PG_RE_THROW();
	}
	PG_END_TRY();
}
