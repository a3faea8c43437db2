/*-------------------------------------------------------------------------
 * status.c
 *	  The shared-memory status area (one slot per database worker) and the
 *	  function behind the kafka_bridge.status view.
 *
 * The launcher claims a slot for each worker it starts (a publisher and an
 * applier per database); the worker writes its state, brokers and errors there; counters are atomics so
 * the publish and apply loops can bump them without taking the lock.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "kafka_bridge.h"

typedef struct KbStatusShared
{
	LWLock	   *lock;
	/* bumped by every change of the subscriptions, in any database */
	pg_atomic_uint32 subscriptions_version;
	/* bumped by every tombstone written, in any database */
	pg_atomic_uint64 tombstones_written;
	KbWorkerSlot slots[KB_MAX_WORKERS];
} KbStatusShared;

static KbStatusShared *kb_status = NULL;

void
kb_status_request_shmem(void)
{
	RequestAddinShmemSpace(MAXALIGN(sizeof(KbStatusShared)));
	RequestNamedLWLockTranche(KB_EXTENSION_NAME, 1);
}

void
kb_status_init_shmem(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	kb_status = ShmemInitStruct("kafka_bridge status", sizeof(KbStatusShared), &found);
	if (!found)
	{
		memset(kb_status, 0, sizeof(KbStatusShared));
		kb_status->lock = &(GetNamedLWLockTranche(KB_EXTENSION_NAME))->lock;
		pg_atomic_init_u32(&kb_status->subscriptions_version, 0);
		pg_atomic_init_u64(&kb_status->tombstones_written, 0);
		for (int i = 0; i < KB_MAX_WORKERS; i++)
		{
			KbWorkerSlot *s = &kb_status->slots[i];

			pg_atomic_init_u64(&s->events_published, 0);
			pg_atomic_init_u64(&s->events_applied, 0);
			pg_atomic_init_u64(&s->publish_lag_bytes, 0);
			pg_atomic_init_u64(&s->consumer_lag, 0);
			pg_atomic_init_u64(&s->conflicts, 0);
		}
	}
	LWLockRelease(AddinShmemInitLock);
}

KbWorkerSlot *
kb_status_slot(int index)
{
	Assert(kb_status != NULL && index >= 0 && index < KB_MAX_WORKERS);
	return &kb_status->slots[index];
}

/* Take a free slot for a worker of the database (the launcher alone calls this). */
int
kb_status_claim(const char *dbname, KbWorkerRole role)
{
	int			found = -1;

	LWLockAcquire(kb_status->lock, LW_EXCLUSIVE);
	for (int i = 0; i < KB_MAX_WORKERS && found < 0; i++)
	{
		KbWorkerSlot *s = &kb_status->slots[i];

		if (s->state == KB_STATE_FREE)
		{
			int			generation = s->generation + 1;

			memset(s, 0, offsetof(KbWorkerSlot, events_published));
			s->generation = generation;
			namestrcpy(&s->dbname, dbname);
			s->role = role;
			s->state = KB_STATE_STARTING;
			pg_atomic_write_u64(&s->events_published, 0);
			pg_atomic_write_u64(&s->events_applied, 0);
			pg_atomic_write_u64(&s->publish_lag_bytes, 0);
			pg_atomic_write_u64(&s->consumer_lag, 0);
			pg_atomic_write_u64(&s->conflicts, 0);
			found = i;
		}
	}
	LWLockRelease(kb_status->lock);
	if (found < 0)
		elog(ERROR, "no free kafka_bridge status slot");
	return found;
}

void
kb_status_release(int index)
{
	LWLockAcquire(kb_status->lock, LW_EXCLUSIVE);
	kb_status->slots[index].state = KB_STATE_FREE;
	kb_status->slots[index].pid = 0;
	LWLockRelease(kb_status->lock);
}

void
kb_status_set(int index, KbWorkerState state, const char *activity)
{
	KbWorkerSlot *s = kb_status_slot(index);

	LWLockAcquire(kb_status->lock, LW_EXCLUSIVE);
	s->state = state;
	if (activity)
		strlcpy(s->activity, activity, sizeof(s->activity));
	LWLockRelease(kb_status->lock);
}

void
kb_status_set_error(int index, KbWorkerState state, const char *fmt,...)
{
	KbWorkerSlot *s = kb_status_slot(index);
	char		buf[sizeof(s->last_error)];
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	/* a message cut short ends on a whole character */
	buf[pg_mbcliplen(buf, strlen(buf), sizeof(buf) - 1)] = '\0';

	LWLockAcquire(kb_status->lock, LW_EXCLUSIVE);
	s->state = state;
	strlcpy(s->last_error, buf, sizeof(s->last_error));
	s->last_error_at = GetCurrentTimestamp();
	LWLockRelease(kb_status->lock);
}

/* The activity alone, the state as it is. */
void
kb_status_set_activity(int index, const char *activity)
{
	KbWorkerSlot *s = kb_status_slot(index);

	LWLockAcquire(kb_status->lock, LW_EXCLUSIVE);
	strlcpy(s->activity, activity, sizeof(s->activity));
	LWLockRelease(kb_status->lock);
}

void
kb_status_get_activity(int index, char *activity, size_t size)
{
	KbWorkerSlot *s = kb_status_slot(index);

	LWLockAcquire(kb_status->lock, LW_SHARED);
	strlcpy(activity, s->activity, size);
	LWLockRelease(kb_status->lock);
}

void
kb_status_set_brokers(int index, const char *brokers)
{
	KbWorkerSlot *s = kb_status_slot(index);

	LWLockAcquire(kb_status->lock, LW_EXCLUSIVE);
	strlcpy(s->brokers, brokers ? brokers : "", sizeof(s->brokers));
	LWLockRelease(kb_status->lock);
}

void
kb_status_set_pid(int index, int pid)
{
	KbWorkerSlot *s = kb_status_slot(index);

	LWLockAcquire(kb_status->lock, LW_EXCLUSIVE);
	s->pid = pid;
	if (pid != 0)
		s->started_at = GetCurrentTimestamp();
	LWLockRelease(kb_status->lock);
}

void
kb_status_set_latch(int index, Oid dboid, Latch *latch)
{
	KbWorkerSlot *s = kb_status_slot(index);

	LWLockAcquire(kb_status->lock, LW_EXCLUSIVE);
	s->dboid = dboid;
	s->latch = latch;
	LWLockRelease(kb_status->lock);
}

/*
 * Wake the database's worker of the given role: the publisher at the commit
 * of every transaction that wrote, so it publishes at once rather than at
 * its next timeout; the applier when its subscriptions change.  Reads
 * without the lock: the worst a stale read does is a spurious wake-up.
 */
void
kb_status_wake(Oid dboid, KbWorkerRole role)
{
	if (kb_status == NULL)
		return;
	for (int i = 0; i < KB_MAX_WORKERS; i++)
	{
		KbWorkerSlot *s = &kb_status->slots[i];
		Latch	   *latch = s->latch;

		if (latch != NULL && s->dboid == dboid && s->role == role)
			SetLatch(latch);
	}
}

/*
 * The subscriptions changed (called before the change commits, with
 * kafka_bridge.subscriptions locked): the applier, which compares this
 * number at the start of each transaction, reads them again.
 */
void
kb_status_subscriptions_changed(void)
{
	if (kb_status != NULL)
		pg_atomic_fetch_add_u32(&kb_status->subscriptions_version, 1);
}

uint32
kb_status_subscriptions_version(void)
{
	return kb_status != NULL ? pg_atomic_read_u32(&kb_status->subscriptions_version) : 0;
}

/*
 * Tombstones: every writer of one bumps the count before its transaction
 * commits, so that the applier knows when a table it saw without any may
 * have some.  Returns false without the shared memory (not preloaded).
 */
void
kb_status_tombstone_written(void)
{
	if (kb_status != NULL)
		pg_atomic_fetch_add_u64(&kb_status->tombstones_written, 1);
}

bool
kb_status_tombstones_written(uint64 *count)
{
	if (kb_status == NULL)
		return false;
	*count = pg_atomic_read_u64(&kb_status->tombstones_written);
	return true;
}

const char *
kb_state_name(KbWorkerState state)
{
	switch (state)
	{
		case KB_STATE_FREE:
			return "free";
		case KB_STATE_STARTING:
			return "starting";
		case KB_STATE_UNCONFIGURED:
			return "unconfigured";
		case KB_STATE_CONNECTING:
			return "connecting";
		case KB_STATE_CONNECTED:
			return "connected";
		case KB_STATE_ERROR:
			return "error";
		case KB_STATE_STOPPED:
			return "stopped";
		case KB_STATE_IDLE:
			return "idle";
	}
	return "unknown";
}

const char *
kb_role_name(KbWorkerRole role)
{
	return role == KB_ROLE_APPLIER ? "applier" : "publisher";
}

/*
 * kafka_bridge.worker_status(): one row per database worker slot in use.
 * The kafka_bridge.status view selects from it.
 */
PG_FUNCTION_INFO_V1(kafka_bridge_worker_status);

Datum
kafka_bridge_worker_status(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	kb_require_preload("kafka_bridge.status");
	InitMaterializedSRF(fcinfo, 0);

	for (int i = 0; i < KB_MAX_WORKERS; i++)
	{
		KbWorkerSlot *s = &kb_status->slots[i];
		KbWorkerSlot copy;
		Datum		values[15];
		bool		nulls[15] = {0};
		int			n = 0;

		LWLockAcquire(kb_status->lock, LW_SHARED);
		memcpy(&copy, s, offsetof(KbWorkerSlot, events_published));
		LWLockRelease(kb_status->lock);
		if (copy.state == KB_STATE_FREE)
			continue;

		values[n++] = CStringGetTextDatum(NameStr(copy.dbname));
		values[n++] = CStringGetTextDatum(kb_role_name(copy.role));
		values[n] = Int32GetDatum(copy.pid);
		nulls[n++] = (copy.pid == 0);
		values[n++] = CStringGetTextDatum(kb_state_name(copy.state));
		values[n++] = CStringGetTextDatum(kb_instance_id());
		values[n] = CStringGetTextDatum(copy.brokers);
		nulls[n++] = (copy.brokers[0] == '\0');
		values[n] = CStringGetTextDatum(copy.activity);
		nulls[n++] = (copy.activity[0] == '\0');
		values[n] = CStringGetTextDatum(copy.last_error);
		nulls[n++] = (copy.last_error[0] == '\0');
		values[n] = TimestampTzGetDatum(copy.last_error_at);
		nulls[n++] = (copy.last_error_at == 0);
		values[n] = TimestampTzGetDatum(copy.started_at);
		nulls[n++] = (copy.started_at == 0);
		values[n++] = Int64GetDatum((int64) pg_atomic_read_u64(&s->events_published));
		values[n++] = Int64GetDatum((int64) pg_atomic_read_u64(&s->events_applied));
		values[n++] = Int64GetDatum((int64) pg_atomic_read_u64(&s->publish_lag_bytes));
		values[n++] = Int64GetDatum((int64) pg_atomic_read_u64(&s->consumer_lag));
		values[n++] = Int64GetDatum((int64) pg_atomic_read_u64(&s->conflicts));
		Assert(n == lengthof(values));

		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
