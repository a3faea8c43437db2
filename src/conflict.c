/*-------------------------------------------------------------------------
 * conflict.c
 *	  Versions of rows, tombstones and conflicts: what lets every instance
 *	  make the same choice when several write the same row at once.
 *
 * A row's version is the commit time and origin instance of the
 * transaction that wrote it last.  For a local write, that is its commit
 * timestamp (track_commit_timestamp) and this instance.  The applier
 * applies each source transaction's records in a transaction of its own,
 * under a replication origin named after the source instance and with the
 * source's commit time as commit timestamp, as core's apply workers do: a
 * row the applier wrote carries the version of the remote change, and
 * every instance compares the same pairs.  A deleted row leaves a
 * tombstone with the delete's version, so that an older change arriving
 * late does not bring it back.
 *
 * The policies: last_write_wins applies a remote change when its version
 * is newer than the local one (commit time, then origin id, as a
 * tie-break), which all instances agree on; keep_local never applies a
 * remote change over a row another origin wrote; error sends such a change
 * to the dead letters; apply_remote applies everything unchecked.  A
 * conflict is a remote change meeting a row version (or tombstone) that
 * another origin wrote; each is recorded in kafka_bridge.conflicts.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/commit_ts.h"
#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/indexing.h"
#include "catalog/pg_index.h"
#include "catalog/pg_trigger.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "replication/origin.h"
#include "utils/array.h"
#include "utils/guc.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/fmgrprotos.h"
#include "utils/hsearch.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/timestamp.h"
#include "utils/xid8.h"

#include "apply.h"
#include "kafka_bridge.h"

PG_FUNCTION_INFO_V1(kafka_bridge_record_tombstone);

/* who writes kafka_bridge's tables from the apply path (the applier's user) */
Oid			kb_conflict_writer = InvalidOid;

/* conflicts recorded (the applier's status counter follows it) */
uint64		kb_conflicts_counted = 0;

static const char *const policy_names[] = {
	[KB_POLICY_LAST_WRITE_WINS] = "last_write_wins",
	[KB_POLICY_KEEP_LOCAL] = "keep_local",
	[KB_POLICY_APPLY_REMOTE] = "apply_remote",
	[KB_POLICY_ERROR] = "error",
};

KbConflictPolicy
kb_parse_conflict_policy(const char *name)
{
	for (int i = 0; i < lengthof(policy_names); i++)
		if (strcmp(name, policy_names[i]) == 0)
			return (KbConflictPolicy) i;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid conflict_policy \"%s\"", name),
			 errhint("Use last_write_wins (the default), keep_local, apply_remote or error.")));
	return KB_POLICY_LAST_WRITE_WINS;	/* keep the compiler quiet */
}

const char *
kb_conflict_policy_name(KbConflictPolicy policy)
{
	return policy_names[policy];
}

/*
 * Order of versions: commit time first, then origin id, so that two
 * instances committing in the same microsecond still agree.
 */
int
kb_version_cmp(const KbVersion *a, const KbVersion *b)
{
	if (a->commit_time != b->commit_time)
		return a->commit_time < b->commit_time ? -1 : 1;
	return strcmp(a->origin, b->origin);
}

/* ---- replication origins, one per source instance ---- */

#define ORIGIN_SEPARATOR ':'

/*
 * The replication origin the applier writes a source instance's changes
 * under, created if need be (in a transaction): kafka_bridge_<db>:<id>.
 * kafka_bridge.apply_event() uses kafka_bridge_<db>.manual:<id>, since an
 * origin serves one session at a time and the applier keeps its own, and
 * kafka_bridge_<db>.manual (instance NULL) for events without a version:
 * under an origin, so that they are not published again.
 */
RepOriginId
kb_origin_for_instance(const char *instance, bool manual)
{
	char	   *name = instance == NULL ?
		psprintf("kafka_bridge_%u.manual", MyDatabaseId) :
		psprintf("kafka_bridge_%u%s%c%s", MyDatabaseId, manual ? ".manual" : "",
				 ORIGIN_SEPARATOR, instance);
	RepOriginId id = replorigin_by_name(name, true);

	if (id == InvalidRepOriginId)
		id = replorigin_create(name);
	pfree(name);
	return id;
}

/*
 * The instance a replication origin stands for: ours name the source
 * instance; the origins for events without a version (the applier's and
 * apply_event()'s) are this instance's; any other origin (core's logical
 * replication, say) stands for itself.  Cached: origins are never renamed.
 */
static const char *
origin_instance(RepOriginId id)
{
	static HTAB *cache = NULL;
	struct entry
	{
		RepOriginId id;
		char	   *instance;
	}		   *e;
	bool		found;

	if (id == InvalidRepOriginId)
		return kb_instance_id();
	if (cache == NULL)
	{
		HASHCTL		ctl = {0};

		ctl.keysize = sizeof(RepOriginId);
		ctl.entrysize = sizeof(struct entry);
		cache = hash_create("kafka_bridge origins", 16, &ctl, HASH_ELEM | HASH_BLOBS);
	}
	e = hash_search(cache, &id, HASH_ENTER, &found);
	if (!found)
	{
		char	   *name = NULL;
		char	   *ours = psprintf("kafka_bridge_%u", MyDatabaseId);
		size_t		len = strlen(ours);
		const char *instance;

		e->instance = NULL;
		if (!replorigin_by_oid(id, true, &name))
			instance = "";
		else if (strncmp(name, ours, len) == 0 && name[len] == ORIGIN_SEPARATOR)
			instance = name + len + 1;
		else if (strncmp(name, ours, len) == 0 && strncmp(name + len, ".manual:", 8) == 0)
			instance = name + len + 8;
		else if (strncmp(name, ours, len) == 0 &&
				 (name[len] == '\0' || strcmp(name + len, ".manual") == 0))
			instance = kb_instance_id();
		else
			instance = name;
		e->instance = MemoryContextStrdup(TopMemoryContext, instance);
	}
	return e->instance;
}

/*
 * The version of a row whose xmin is given.  A row this transaction wrote
 * has the version being applied (*current); one whose commit timestamp is
 * unknown (frozen, or older than track_commit_timestamp) is older than
 * anything.
 */
void
kb_row_version(TransactionId xmin, const KbVersion *current, KbVersion *v)
{
	RepOriginId nodeid = InvalidRepOriginId;

	if (TransactionIdIsCurrentTransactionId(xmin))
	{
		*v = *current;
		return;
	}
	v->commit_time = DT_NOBEGIN;
	v->origin = kb_instance_id();
	if (TransactionIdIsNormal(xmin) &&
		TransactionIdGetCommitTsData(xmin, &v->commit_time, &nodeid))
		v->origin = origin_instance(nodeid);
	else
		v->commit_time = DT_NOBEGIN;
}

/* ---- keys and tombstones ---- */

/* Whether a type's text form is the same whatever the session's settings. */
static bool
text_form_is_fixed(Oid type)
{
	switch (getBaseType(type))
	{
		case BOOLOID:
		case CHAROID:
		case NAMEOID:
		case INT2OID:
		case INT4OID:
		case INT8OID:
		case OIDOID:
		case NUMERICOID:
		case TEXTOID:
		case VARCHAROID:
		case BPCHAROID:
		case UUIDOID:
			return true;
		default:
			return false;
	}
}

/*
 * A row's key as text: a JSON array of the key columns' text forms, which
 * the local trigger (from the deleted tuple, in whatever session deleted
 * it) and the applier (from the event's values) both make the same way:
 * types whose text form follows settings (dates and times, intervals,
 * floats, bytea, arrays and composites of them) are written with the
 * settings fixed, as pg_dump does.
 */
char *
kb_key_text(int nkeys, const Datum *values, const Oid *types)
{
	StringInfoData buf;
	int			guc_level = -1;

	for (int k = 0; k < nkeys && guc_level < 0; k++)
		if (!text_form_is_fixed(types[k]))
			guc_level = kb_fix_text_settings();

	initStringInfo(&buf);
	appendStringInfoChar(&buf, '[');
	for (int k = 0; k < nkeys; k++)
	{
		Oid			out;
		bool		varlena;

		getTypeOutputInfo(types[k], &out, &varlena);
		if (k > 0)
			appendStringInfoChar(&buf, ',');
		escape_json(&buf, OidOutputFunctionCall(out, values[k]));
	}
	appendStringInfoChar(&buf, ']');
	if (guc_level >= 0)
		AtEOXact_GUC(false, guc_level);
	return buf.data;
}

/* Run a kept plan on kafka_bridge's tables as the applier's user. */
static int
run_plan(SPIPlanPtr *plan, const char *sql, int nargs, Oid *types,
		 Datum *values, const char *nulls, bool read_only)
{
	Oid			save_userid;
	int			save_sec;
	int			rc;

	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare(sql, nargs, types);

		if (p == NULL)
			elog(ERROR, "could not prepare \"%s\": %s", sql, SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*plan = p;
	}
	GetUserIdAndSecContext(&save_userid, &save_sec);
	if (OidIsValid(kb_conflict_writer))
		SetUserIdAndSecContext(kb_conflict_writer, save_sec | SECURITY_LOCAL_USERID_CHANGE);
	rc = SPI_execute_plan(*plan, values, nulls, read_only, 0);
	SetUserIdAndSecContext(save_userid, save_sec);
	if (rc < 0)
		elog(ERROR, "\"%s\" failed: %s", sql, SPI_result_code_string(rc));
	return rc;
}

/* A tombstone's version from a row (commit_time, origin, xid) of SPI's result. */
static void
tombstone_version(HeapTuple tup, TupleDesc desc, int first, KbVersion *v)
{
	bool		isnull;
	Datum		d;

	v->origin = SPI_getvalue(tup, desc, first + 1);
	if (v->origin == NULL)
		v->origin = kb_instance_id();
	d = SPI_getbinval(tup, desc, first, &isnull);
	if (!isnull)
		v->commit_time = DatumGetTimestampTz(d);
	else
	{
		FullTransactionId fxid;
		FullTransactionId next = ReadNextFullTransactionId();
		RepOriginId nodeid;

		d = SPI_getbinval(tup, desc, first + 2, &isnull);
		fxid = isnull ? InvalidFullTransactionId : DatumGetFullTransactionId(d);
		v->commit_time = DT_NOBEGIN;
		/* only an xid less than 2^31 old names its transaction */
		if (FullTransactionIdIsValid(fxid) &&
			U64FromFullTransactionId(next) - U64FromFullTransactionId(fxid) < (UINT64CONST(1) << 31) &&
			!TransactionIdGetCommitTsData(XidFromFullTransactionId(fxid), &v->commit_time, &nodeid))
			v->commit_time = DT_NOBEGIN;
	}
}

/*
 * The tombstones of the keys that are not NULL in keys[n]: found[i] and
 * v[i] for each.  Read with a new snapshot, as kb_tombstone_find().
 */
void
kb_tombstones_find(Oid relid, int n, char **keys, bool *found, KbVersion *v)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {OIDOID, TEXTARRAYOID};
	Datum		values[2];
	Datum	   *texts = palloc(sizeof(Datum) * n);
	int			ntexts = 0;

	for (int i = 0; i < n; i++)
	{
		found[i] = false;
		if (keys[i])
			texts[ntexts++] = CStringGetTextDatum(keys[i]);
	}
	values[0] = ObjectIdGetDatum(relid);
	values[1] = PointerGetDatum(construct_array(texts, ntexts, TEXTOID, -1, false, TYPALIGN_INT));
	run_plan(&plan, "SELECT key, commit_time, origin, xid FROM kafka_bridge.tombstones "
			 "WHERE relid OPERATOR(pg_catalog.=) $1 AND key OPERATOR(pg_catalog.=) ANY ($2)",
			 2, types, values, NULL, false);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		char	   *key = SPI_getvalue(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1);

		for (int i = 0; i < n; i++)
			if (keys[i] && !found[i] && strcmp(keys[i], key) == 0)
			{
				found[i] = true;
				tombstone_version(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2, &v[i]);
			}
	}
}

/*
 * The version of a tombstone of the key, if there is one.  A local
 * delete's commit time is read from its transaction's commit timestamp.
 * Read with a new snapshot (not read-only): a delete the row lock waited
 * for committed after the statement's snapshot was taken.
 */
bool
kb_tombstone_find(Oid relid, const char *key, KbVersion *v)
{
	char	   *keys[1] = {unconstify(char *, key)};
	bool		found;

	kb_tombstones_find(relid, 1, keys, &found, v);
	return found;
}

/*
 * Whether the table may have tombstones: false only when a look found none
 * and no transaction that wrote one committed anywhere since.  Writers
 * count theirs at commit, once visible and before their row locks go, so a
 * delete that a row lock waited for is counted by the time the caller asks.
 * Saves the applier a lookup per row on tables that never had a delete.
 */
typedef struct NoTombstones
{
	Oid			relid;
	uint64		written;		/* the count when none was found */
} NoTombstones;

static HTAB *no_tombstones = NULL;
static bool tombstone_in_xact = false;

/*
 * A transaction that wrote a tombstone counts it when it commits: after it
 * is visible, before its row locks are released.
 */
static void
tombstone_xact_end(XactEvent event, void *arg)
{
	if (!tombstone_in_xact)
		return;
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT)
		kb_status_tombstone_written();
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT ||
		event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		tombstone_in_xact = false;
}

static void
tombstone_written(Oid relid)
{
	static bool registered = false;

	if (!registered)
		RegisterXactCallback(tombstone_xact_end, NULL);
	registered = true;
	tombstone_in_xact = true;
	if (no_tombstones != NULL)
		(void) hash_search(no_tombstones, &relid, HASH_REMOVE, NULL);
}

bool
kb_tombstones_may_exist(Oid relid)
{
	static SPIPlanPtr plan = NULL;
	NoTombstones *e;
	uint64		written;
	bool		found;
	Oid			types[1] = {OIDOID};
	Datum		values[1] = {ObjectIdGetDatum(relid)};

	if (!kb_status_tombstones_written(&written))
		return true;
	if (no_tombstones == NULL)
	{
		HASHCTL		ctl = {0};

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(NoTombstones);
		no_tombstones = hash_create("kafka_bridge tables without tombstones", 16, &ctl,
									HASH_ELEM | HASH_BLOBS);
	}
	e = hash_search(no_tombstones, &relid, HASH_FIND, &found);
	if (e != NULL && e->written == written)
		return false;
	run_plan(&plan, "SELECT 1 FROM kafka_bridge.tombstones WHERE relid OPERATOR(pg_catalog.=) $1 LIMIT 1",
			 1, types, values, NULL, false);
	if (SPI_processed > 0)
	{
		if (e != NULL)
			(void) hash_search(no_tombstones, &relid, HASH_REMOVE, NULL);
		return true;
	}
	e = hash_search(no_tombstones, &relid, HASH_ENTER, &found);
	e->written = written;
	return false;
}

/* Record (or move forward) the tombstone of a key deleted by a remote change. */
void
kb_tombstone_store(Oid relid, const char *key, const KbVersion *v)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[4] = {OIDOID, TEXTOID, TIMESTAMPTZOID, TEXTOID};
	Datum		values[4] = {ObjectIdGetDatum(relid), CStringGetTextDatum(key),
	TimestampTzGetDatum(v->commit_time), CStringGetTextDatum(v->origin)};

	run_plan(&plan, "INSERT INTO kafka_bridge.tombstones AS t (relid, key, commit_time, origin) "
			 "VALUES ($1, $2, $3, $4) ON CONFLICT (relid, key) DO UPDATE SET "
			 "commit_time = excluded.commit_time, origin = excluded.origin, xid = NULL, "
			 "recorded_at = pg_catalog.now()",
			 4, types, values, NULL, false);
	tombstone_written(relid);
}

/* The key has a row again: its tombstone is of no more use. */
void
kb_tombstone_forget(Oid relid, const char *key)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {OIDOID, TEXTOID};
	Datum		values[2] = {ObjectIdGetDatum(relid), CStringGetTextDatum(key)};

	run_plan(&plan, "DELETE FROM kafka_bridge.tombstones "
			 "WHERE relid OPERATOR(pg_catalog.=) $1 AND key OPERATOR(pg_catalog.=) $2",
			 2, types, values, NULL, false);
}

/* One row of kafka_bridge.conflicts. */
void
kb_conflict_record(Oid relid, const char *key, const char *kind,
				   const KbVersion *local, const KbVersion *remote,
				   KbConflictPolicy policy, const char *resolution,
				   const char *topic, int32 partition, int64 offset)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[11] = {OIDOID, TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID, TEXTOID,
	TIMESTAMPTZOID, TEXTOID, TEXTOID, TEXTOID, INT4OID};
	Datum		values[12];
	char		nulls[12] = "            ";
	Oid			alltypes[12];

	memcpy(alltypes, types, sizeof(types));
	alltypes[11] = INT8OID;
	values[0] = ObjectIdGetDatum(relid);
	values[1] = CStringGetTextDatum(key);
	values[2] = CStringGetTextDatum(kind);
	values[3] = CStringGetTextDatum(local->origin);
	values[4] = TimestampTzGetDatum(local->commit_time);
	if (TIMESTAMP_IS_NOBEGIN(local->commit_time))
		nulls[4] = 'n';
	values[5] = CStringGetTextDatum(remote->origin);
	values[6] = TimestampTzGetDatum(remote->commit_time);
	values[7] = CStringGetTextDatum(kb_conflict_policy_name(policy));
	values[8] = CStringGetTextDatum(resolution);
	if (topic)
		values[9] = CStringGetTextDatum(topic);
	else
		nulls[9] = nulls[10] = nulls[11] = 'n';
	values[10] = Int32GetDatum(partition);
	values[11] = Int64GetDatum(offset);
	run_plan(&plan, "INSERT INTO kafka_bridge.conflicts (table_name, key, kind, local_origin, "
			 "local_commit_time, remote_origin, remote_commit_time, policy, resolution, "
			 "topic, partition, \"offset\") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
			 12, alltypes, values, nulls, false);
	kb_conflicts_counted++;
}

/*
 * Delete tombstones and conflicts older than their retention (in a
 * transaction, SPI connected, as the applier).  Returns how many rows went.
 */
uint64
kb_prune_conflicts(void)
{
	static SPIPlanPtr tomb_plan = NULL;
	static SPIPlanPtr conflict_plan = NULL;
	Oid			types[1] = {INT4OID};
	Datum		values[1];
	uint64		pruned;

	values[0] = Int32GetDatum(kb_tombstone_retention);
	run_plan(&tomb_plan, "DELETE FROM kafka_bridge.tombstones WHERE recorded_at OPERATOR(pg_catalog.<) "
			 "(pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => $1))",
			 1, types, values, NULL, false);
	pruned = SPI_processed;
	values[0] = Int32GetDatum(kb_conflict_retention);
	run_plan(&conflict_plan, "DELETE FROM kafka_bridge.conflicts WHERE detected_at OPERATOR(pg_catalog.<) "
			 "(pg_catalog.now() OPERATOR(pg_catalog.-) pg_catalog.make_interval(secs => $1))",
			 1, types, values, NULL, false);
	return pruned + SPI_processed;
}

/* ---- the trigger on subscribed tables ---- */

/*
 * AFTER DELETE OR UPDATE FOR EACH ROW on a table subscribed with a conflict
 * policy: a local delete (or an update that changes the key, which
 * subscribers see as a delete of the old key) leaves a tombstone with this
 * transaction's id; its commit time is read when it is needed.  The
 * applier's own writes do not fire it (session_replication_role = replica):
 * it records remote deletes itself, with their version.
 */
/*
 * The table whose subscription a tombstone trigger serves: the one it was
 * created on, which for a partition's clone of it is the partitioned
 * table's, up the triggers' tgparentid chain (the applier looks
 * tombstones up by the subscribed table).  Remembered by trigger.
 */
static Oid
subscribed_relid(Trigger *trigger, Relation rel)
{
	static HTAB *roots = NULL;
	typedef struct
	{
		Oid			tgoid;
		Oid			relid;
	}			Root;
	Root	   *root;
	bool		found;
	Oid			tgoid = trigger->tgoid;
	Oid			relid = RelationGetRelid(rel);

	if (!trigger->tgisclone)
		return relid;
	if (roots == NULL)
	{
		HASHCTL		ctl = {.keysize = sizeof(Oid),.entrysize = sizeof(Root)};

		roots = hash_create("kafka_bridge tombstone triggers", 16, &ctl,
							HASH_ELEM | HASH_BLOBS);
	}
	root = hash_search(roots, &trigger->tgoid, HASH_FIND, NULL);
	if (root != NULL)
		return root->relid;
	for (;;)
	{
		Relation	tgrel = table_open(TriggerRelationId, AccessShareLock);
		ScanKeyData skey;
		SysScanDesc scan;
		HeapTuple	tuple;
		Oid			parent;

		ScanKeyInit(&skey, Anum_pg_trigger_oid, BTEqualStrategyNumber, F_OIDEQ,
					ObjectIdGetDatum(tgoid));
		scan = systable_beginscan(tgrel, TriggerOidIndexId, true, NULL, 1, &skey);
		tuple = systable_getnext(scan);
		if (!HeapTupleIsValid(tuple))
			elog(ERROR, "could not find trigger %u", tgoid);
		relid = ((Form_pg_trigger) GETSTRUCT(tuple))->tgrelid;
		parent = ((Form_pg_trigger) GETSTRUCT(tuple))->tgparentid;
		systable_endscan(scan);
		table_close(tgrel, AccessShareLock);
		if (!OidIsValid(parent))
			break;
		tgoid = parent;
	}
	root = hash_search(roots, &trigger->tgoid, HASH_ENTER, &found);
	root->relid = relid;
	return relid;
}

Datum
kafka_bridge_record_tombstone(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr plan = NULL;
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Relation	rel;
	Oid			index;
	Relation	indrel;
	int			nkeys;
	Datum	   *keyvals;
	Oid		   *keytypes;
	bool		changed = false;
	char	   *key;
	Oid			subscribed;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_AFTER(trigdata->tg_event) || !TRIGGER_FIRED_FOR_ROW(trigdata->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("kafka_bridge.record_tombstone() must be an AFTER ... FOR EACH ROW trigger")));
	if (!TRIGGER_FIRED_BY_DELETE(trigdata->tg_event) && !TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
		return PointerGetDatum(NULL);

	rel = trigdata->tg_relation;
	index = RelationGetReplicaIndex(rel);
	if (!OidIsValid(index))
		index = RelationGetPrimaryKeyIndex(rel);
	if (!OidIsValid(index))
		return PointerGetDatum(NULL);	/* no key: the applier refuses the table anyway */

	indrel = index_open(index, AccessShareLock);
	nkeys = indrel->rd_index->indnkeyatts;
	keyvals = palloc(sizeof(Datum) * nkeys);
	keytypes = palloc(sizeof(Oid) * nkeys);
	for (int k = 0; k < nkeys; k++)
	{
		AttrNumber	att = indrel->rd_index->indkey.values[k];
		bool		isnull;
		bool		newnull;

		keytypes[k] = TupleDescAttr(RelationGetDescr(rel), att - 1)->atttypid;
		keyvals[k] = heap_getattr(trigdata->tg_trigtuple, att, RelationGetDescr(rel), &isnull);
		if (isnull)
			changed = true;		/* no key: nothing to remember */
		if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) && !isnull)
		{
			Datum		newval = heap_getattr(trigdata->tg_newtuple, att, RelationGetDescr(rel), &newnull);
			int16		typlen;
			bool		typbyval;

			get_typlenbyval(keytypes[k], &typlen, &typbyval);
			if (newnull || !datumIsEqual(keyvals[k], newval, typbyval, typlen))
				changed = true;
		}
	}
	index_close(indrel, AccessShareLock);

	/* an update that keeps the key deletes nothing */
	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) ? !changed : changed)
		return PointerGetDatum(NULL);

	key = kb_key_text(nkeys, keyvals, keytypes);
	subscribed = subscribed_relid(trigdata->tg_trigger, rel);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	{
		Oid			types[3] = {OIDOID, TEXTOID, XID8OID};
		Datum		values[3] = {ObjectIdGetDatum(subscribed),
			CStringGetTextDatum(key),
		FullTransactionIdGetDatum(GetTopFullTransactionId())};

		run_plan(&plan, "INSERT INTO kafka_bridge.tombstones AS t (relid, key, xid) "
				 "VALUES ($1, $2, $3) ON CONFLICT (relid, key) DO UPDATE SET "
				 "commit_time = NULL, origin = NULL, xid = excluded.xid, recorded_at = pg_catalog.now()",
				 3, types, values, NULL, false);
	}
	tombstone_written(subscribed);
	SPI_finish();
	return PointerGetDatum(NULL);
}
