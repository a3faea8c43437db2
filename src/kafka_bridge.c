/*-------------------------------------------------------------------------
 * kafka_bridge.c
 *	  Module initialisation: settings, shared memory and the launcher.
 *
 * Loaded through shared_preload_libraries, kafka_bridge reserves its status
 * area and registers the launcher, which starts one worker per database.
 * Loaded any other way (as an output plugin, or by CREATE EXTENSION on a
 * server that does not preload it), only the settings exist, and the SQL
 * functions that need the workers say what to add to postgresql.conf.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/builtins.h"

#include "apply.h"
#include "kafka_bridge.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

bool		kb_preloaded = false;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

static void
kb_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	kb_status_request_shmem();
}

static void
kb_shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	kb_status_init_shmem();
}

/*
 * After a commit that wrote, wake this database's publisher; after one that
 * changed the subscriptions, its applier too.
 */
static void
kb_xact_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT && TransactionIdIsValid(GetTopTransactionIdIfAny()))
	{
		kb_status_wake(MyDatabaseId, KB_ROLE_PUBLISHER);
		if (kb_subscriptions_changed)
			kb_status_wake(MyDatabaseId, KB_ROLE_APPLIER);
	}
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT)
		kb_subscriptions_changed = false;
}

void
_PG_init(void)
{
	kb_define_settings();

	if (!process_shared_preload_libraries_in_progress)
		return;
	kb_preloaded = true;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = kb_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = kb_shmem_startup;

	kb_register_launcher();
	RegisterXactCallback(kb_xact_callback, NULL);
}

/* kafka_bridge.instance_id(): the id this instance puts in its events. */
PG_FUNCTION_INFO_V1(kafka_bridge_instance_id);

Datum
kafka_bridge_instance_id(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(kb_instance_id()));
}

/*
 * Start a thread of the process, named for top -H and perf.  It starts with
 * every signal blocked: PostgreSQL's signal handlers must only ever run on
 * the process's own thread.  Such a thread runs no PostgreSQL code (no
 * palloc, no elog).  Returns pthread_create's result.
 */
int
kb_start_thread(pthread_t *thread, void *(*main) (void *), void *arg, const char *name)
{
	sigset_t	all;
	sigset_t	saved;
	int			rc;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &saved);
	rc = pthread_create(thread, NULL, main, arg);
	pthread_sigmask(SIG_SETMASK, &saved, NULL);
	if (rc == 0)
		pthread_setname_np(*thread, name);
	return rc;
}
