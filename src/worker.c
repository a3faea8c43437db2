/*-------------------------------------------------------------------------
 * worker.c
 *	  The per-database kafka_bridge worker: its main loop, reload of the
 *	  settings, and the broker checks that feed kafka_bridge.status.
 *
 * Started by the launcher with the index of its status slot.  It keeps a
 * Kafka client built from the settings in force, rebuilds it when a reload
 * changes them, and reports what it does in its status slot and in
 * pg_stat_activity.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "kafka_bridge.h"

/* timeout of one metadata request to the brokers */
#define KB_PROBE_TIMEOUT_MS 2000

static int	my_slot = -1;

static void
worker_on_exit(int code, Datum arg)
{
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

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	pgstat_report_activity(STATE_RUNNING, "looking for the kafka_bridge extension");
	installed = OidIsValid(get_extension_oid(KB_EXTENSION_NAME, true));
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
	return installed;
}

/*
 * Check the brokers and record the outcome; log only changes of state so an
 * outage does not flood the server log.
 */
static void
probe_brokers(KbKafkaClient *client, const char *dbname)
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
		report(KB_STATE_CONNECTED, activity);
		if (before != KB_STATE_CONNECTED)
			ereport(LOG,
					(errmsg("kafka_bridge worker for database \"%s\" connected to Kafka brokers %s",
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
					(errmsg("kafka_bridge worker for database \"%s\" cannot reach Kafka", dbname),
					 errdetail("%s", error),
					 errhint("Check kafka_bridge.bootstrap_servers and that the brokers are up; the worker keeps retrying.")));
	}
}

static void
worker_loop(const char *dbname)
{
	KbKafkaClient *client = NULL;
	char	   *fingerprint = kb_kafka_settings_fingerprint();
	TimestampTz next_probe = 0;
	bool		have_extension = false;
	char	   *client_id = psprintf("kafka_bridge-%s-%s", kb_instance_id(), dbname);
	MemoryContext loop_cxt = AllocSetContextCreate(TopMemoryContext,
												   "kafka_bridge worker loop",
												   ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		TimestampTz now;
		long		nap;

		CHECK_FOR_INTERRUPTS();
		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);

		if (ConfigReloadPending)
		{
			char	   *now_fp;

			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			now_fp = kb_kafka_settings_fingerprint();
			if (strcmp(now_fp, fingerprint) != 0)
			{
				ereport(LOG,
						(errmsg("kafka_bridge worker for database \"%s\" is reconnecting with the reloaded Kafka settings",
								dbname)));
				kb_kafka_client_destroy(client);
				client = NULL;
				next_probe = 0;
			}
			pfree(fingerprint);
			fingerprint = MemoryContextStrdup(TopMemoryContext, now_fp);
		}

		now = GetCurrentTimestamp();
		if (now >= next_probe)
		{
			if (!have_extension)
				have_extension = extension_installed();

			if (kb_bootstrap_servers[0] == '\0')
				report(KB_STATE_UNCONFIGURED, "waiting for kafka_bridge.bootstrap_servers to be set");
			else
			{
				if (client == NULL)
				{
					char	   *detail;

					client = kb_kafka_client_create(KB_CLIENT_PRODUCER, client_id, &detail);
					if (client == NULL)
					{
						kb_status_set_error(my_slot, KB_STATE_ERROR, "%s", detail);
						report(KB_STATE_ERROR, "waiting for a usable Kafka configuration");
						ereport(LOG,
								(errmsg("kafka_bridge worker for database \"%s\" cannot create a Kafka client", dbname),
								 errdetail("%s", detail)));
					}
					else
						report(KB_STATE_CONNECTING, "connecting to Kafka");
				}
				if (client)
					probe_brokers(client, dbname);
			}
			if (!have_extension)
				pgstat_report_activity(STATE_IDLE,
									   psprintf("%s; extension kafka_bridge is not installed in this database",
												kb_status_slot(my_slot)->activity));

			/* probe more often while something is wrong */
			next_probe = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													 kb_status_slot(my_slot)->state == KB_STATE_CONNECTED
													 ? kb_probe_interval * 1000L : 1000L);
		}

		if (client)
			kb_kafka_client_poll(client);

		nap = Min(TimestampDifferenceMilliseconds(GetCurrentTimestamp(), next_probe), 1000L);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(nap, 1L), PG_WAIT_EXTENSION);
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

	my_slot = packed & 0xff;
	slot = kb_status_slot(my_slot);
	if (slot->generation != (packed >> 8) || slot->state == KB_STATE_FREE)
		proc_exit(0);			/* the launcher gave this slot away meanwhile */
	strlcpy(dbname, NameStr(slot->dbname), sizeof(dbname));

	kb_status_set_pid(my_slot, MyProcPid);
	before_shmem_exit(worker_on_exit, (Datum) 0);

	BackgroundWorkerInitializeConnection(dbname, NULL, 0);
	pgstat_report_appname("kafka_bridge");

	PG_TRY();
	{
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
