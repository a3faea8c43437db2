/*-------------------------------------------------------------------------
 * launcher.c
 *	  The kafka_bridge launcher: one background worker, connected to no
 *	  database, that keeps two workers running per database listed in
 *	  kafka_bridge.databases: a publisher and an applier.
 *
 * It starts the missing workers, restarts those that exit after
 * kafka_bridge.worker_restart_delay, stops those whose database left the
 * list on reload, and records in the status area why a database has no
 * worker (database missing, no free background worker slot).
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "utils/snapmgr.h"
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

typedef struct LaunchedWorker
{
	bool		in_use;
	char		dbname[NAMEDATALEN];
	KbWorkerRole role;
	int			slot;
	BackgroundWorkerHandle *handle;
	TimestampTz retry_at;		/* when no worker runs: next attempt */
} LaunchedWorker;

static LaunchedWorker launched[KB_MAX_WORKERS];

void
kb_register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	strlcpy(worker.bgw_library_name, KB_EXTENSION_NAME, BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "kafka_bridge_launcher_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "kafka_bridge launcher", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "kafka_bridge launcher", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

typedef enum DatabaseState
{
	DATABASE_OPEN,
	DATABASE_MISSING,
	DATABASE_CLOSED				/* ALLOW_CONNECTIONS false */
} DatabaseState;

/*
 * Whether a worker can connect to the database.  The launcher has no
 * database, so it scans the shared catalog pg_database without its
 * indexes, as autovacuum does.
 */
static DatabaseState
database_state(const char *dbname)
{
	DatabaseState state = DATABASE_MISSING;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tup);

		if (strcmp(NameStr(db->datname), dbname) == 0)
		{
			state = db->datallowconn ? DATABASE_OPEN : DATABASE_CLOSED;
			break;
		}
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	return state;
}

static void
start_worker(LaunchedWorker *lw)
{
	BackgroundWorker worker;
	KbWorkerSlot *slot = kb_status_slot(lw->slot);
	MemoryContext old;
	bool		registered;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, KB_EXTENSION_NAME, BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "kafka_bridge_worker_main", BGW_MAXLEN);
	snprintf(worker.bgw_name, BGW_MAXLEN, "kafka_bridge %s for database %s",
			 kb_role_name(lw->role), lw->dbname);
	snprintf(worker.bgw_type, BGW_MAXLEN, "kafka_bridge %s", kb_role_name(lw->role));
	/* the worker checks the generation, so a stale start cannot take a reused slot */
	worker.bgw_main_arg = Int32GetDatum(lw->slot | (slot->generation << 8));
	worker.bgw_notify_pid = MyProcPid;

	old = MemoryContextSwitchTo(TopMemoryContext);
	registered = RegisterDynamicBackgroundWorker(&worker, &lw->handle);
	MemoryContextSwitchTo(old);
	if (!registered)
	{
		lw->handle = NULL;
		lw->retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
												   kb_worker_restart_delay * 1000L);
		kb_status_set_error(lw->slot, KB_STATE_STOPPED,
							"no free background worker slot: raise max_worker_processes");
		ereport(WARNING,
				(errmsg("kafka_bridge could not start the %s for database \"%s\"",
						kb_role_name(lw->role), lw->dbname),
				 errhint("Raise max_worker_processes.")));
		return;
	}
	kb_status_set(lw->slot, KB_STATE_STARTING, "starting");
}

static void
stop_worker(LaunchedWorker *lw)
{
	if (lw->handle)
	{
		TerminateBackgroundWorker(lw->handle);
		(void) WaitForBackgroundWorkerShutdown(lw->handle);
		pfree(lw->handle);
	}
	kb_status_release(lw->slot);
	memset(lw, 0, sizeof(*lw));
}

static LaunchedWorker *
find_launched(const char *dbname, KbWorkerRole role)
{
	for (int i = 0; i < KB_MAX_WORKERS; i++)
		if (launched[i].in_use && launched[i].role == role &&
			strcmp(launched[i].dbname, dbname) == 0)
			return &launched[i];
	return NULL;
}

/*
 * Bring the running workers in line with kafka_bridge.databases.  Returns
 * how long the launcher may sleep before it has something to do.
 */
static long
reconcile(void)
{
	List	   *wanted = kb_database_names();
	TimestampTz now = GetCurrentTimestamp();
	long		nap = 60 * 1000L;
	ListCell   *lc;

	for (int i = 0; i < KB_MAX_WORKERS; i++)
	{
		bool		keep = false;

		if (!launched[i].in_use)
			continue;
		foreach(lc, wanted)
			keep |= (strcmp(launched[i].dbname, (char *) lfirst(lc)) == 0);
		if (!keep)
		{
			ereport(LOG,
					(errmsg("kafka_bridge is stopping the %s for database \"%s\", no longer in kafka_bridge.databases",
							kb_role_name(launched[i].role), launched[i].dbname)));
			stop_worker(&launched[i]);
		}
	}

	for (int n = 0; n < list_length(wanted) * KB_NUM_ROLES; n++)
	{
		const char *dbname = list_nth(wanted, n / KB_NUM_ROLES);
		KbWorkerRole role = (KbWorkerRole) (n % KB_NUM_ROLES);
		LaunchedWorker *lw = find_launched(dbname, role);
		pid_t		pid;
		DatabaseState state;

		if (lw == NULL)
		{
			for (int i = 0; i < KB_MAX_WORKERS && lw == NULL; i++)
				if (!launched[i].in_use)
					lw = &launched[i];
			Assert(lw != NULL);
			lw->in_use = true;
			strlcpy(lw->dbname, dbname, NAMEDATALEN);
			lw->role = role;
			lw->slot = kb_status_claim(dbname, role);
			lw->retry_at = now;
		}

		if (lw->handle)
		{
			if (GetBackgroundWorkerPid(lw->handle, &pid) != BGWH_STOPPED)
				continue;
			/* it exited: its last error, if any, is already in the slot */
			pfree(lw->handle);
			lw->handle = NULL;
			lw->retry_at = TimestampTzPlusMilliseconds(now, kb_worker_restart_delay * 1000L);
			kb_status_set(lw->slot, KB_STATE_STOPPED, "stopped, to be restarted");
		}

		if (lw->retry_at > now)
		{
			nap = Min(nap, TimestampDifferenceMilliseconds(now, lw->retry_at));
			continue;
		}

		state = database_state(dbname);
		if (state != DATABASE_OPEN)
		{
			if (state == DATABASE_MISSING)
				kb_status_set_error(lw->slot, KB_STATE_ERROR,
									"database \"%s\" does not exist: create it or remove it from kafka_bridge.databases",
									dbname);
			else
				kb_status_set_error(lw->slot, KB_STATE_ERROR,
									"database \"%s\" does not allow connections: ALTER DATABASE ... ALLOW_CONNECTIONS true, or remove it from kafka_bridge.databases",
									dbname);
			lw->retry_at = TimestampTzPlusMilliseconds(now, kb_worker_restart_delay * 1000L);
			nap = Min(nap, kb_worker_restart_delay * 1000L);
			continue;
		}
		start_worker(lw);
		if (lw->handle == NULL)
			nap = Min(nap, kb_worker_restart_delay * 1000L);
	}
	return Max(nap, 10L);
}

/*
 * After a launcher crash and restart, workers of the previous launcher may
 * still hold slots: stop them, so that this launcher owns every worker.
 */
static void
stop_orphans(void)
{
	for (int i = 0; i < KB_MAX_WORKERS; i++)
	{
		KbWorkerSlot *slot = kb_status_slot(i);

		if (slot->state == KB_STATE_FREE)
			continue;
		for (int tries = 0; slot->pid != 0 && tries < 100; tries++)
		{
			if (kill(slot->pid, SIGTERM) != 0)
				break;
			pg_usleep(100 * 1000L);
		}
		kb_status_release(i);
	}
}

void
kafka_bridge_launcher_main(Datum arg)
{
	MemoryContext loop_cxt;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/* no database: only the shared catalogs, enough to see pg_database */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("kafka_bridge launcher");
	stop_orphans();

	ereport(LOG, (errmsg("kafka_bridge launcher started")));

	loop_cxt = AllocSetContextCreate(TopMemoryContext, "kafka_bridge launcher loop",
									 ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		long		nap;

		CHECK_FOR_INTERRUPTS();
		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		pgstat_report_activity(STATE_RUNNING, "starting workers for kafka_bridge.databases");
		nap = reconcile();
		pgstat_report_activity(STATE_IDLE, NULL);

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 nap, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
