/*-------------------------------------------------------------------------
 * publish.c
 *	  Which tables are published, and as what: the SQL functions
 *	  kafka_bridge.publish() and kafka_bridge.unpublish(), the event trigger
 *	  that forgets dropped tables, and the lookup the output plugin uses.
 *
 * The publications live in kafka_bridge.publications, a user catalog table,
 * so that the output plugin reads it under the historic snapshot of the
 * change it decodes: a table published at LSN X publishes the changes
 * committed after X, and nothing before.  These functions write the table
 * directly rather than through SQL, so that a table's owner can publish it
 * without any right on the catalog itself, and then send a relcache
 * invalidation for the table; logical decoding replays it at the same point
 * of the WAL, which is how the output plugin's cache learns of the change.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "commands/dbcommands.h"
#include "replication/slot.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/relation.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/catalog.h"
#include "catalog/indexing.h"
#include "catalog/namespace.h"
#include "catalog/objectaddress.h"
#include "catalog/pg_class.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_inherits.h"
#include "catalog/pg_type.h"
#include "commands/event_trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "executor/tuptable.h"
#include "optimizer/plancat.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/formatting.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "apply.h"
#include "event_codec.h"

/* Kafka's limit on topic names (Topic.MAX_NAME_LENGTH) */
#define KB_TOPIC_MAX_LEN 249

/*
 * Short enough that a catalog row is never TOASTed: decoding could not
 * follow a TOAST pointer of a catalog row whose TOAST table VACUUM FULL
 * rewrote since.
 */
#define KB_EVENT_PREFIX_MAX_LEN 200

PG_FUNCTION_INFO_V1(kafka_bridge_publish);
PG_FUNCTION_INFO_V1(kafka_bridge_unpublish);
PG_FUNCTION_INFO_V1(kafka_bridge_snapshot);
PG_FUNCTION_INFO_V1(kafka_bridge_forget_dropped_tables);

/* The topic a table is published to when none is given: its name. */
char *
kb_default_topic(const char *relname)
{
	return pstrdup(relname);
}

/* The event prefix when none is given: the table name in upper case. */
char *
kb_default_event_prefix(const char *relname)
{
	return str_toupper(relname, strlen(relname), DEFAULT_COLLATION_OID);
}

/*
 * Whether relid exists now, as opposed to in the historic snapshot being
 * decoded.  Decoding opens a user catalog table through its current
 * pg_class row, and errors out when there is none: the WAL written before
 * DROP EXTENSION kafka_bridge could then never be decoded.
 */
static bool
relation_exists_now(Oid relid)
{
	Relation	classrel = table_open(RelationRelationId, AccessShareLock);
	Snapshot	snapshot = RegisterSnapshot(GetNonHistoricCatalogSnapshot(RelationRelationId));
	ScanKeyData key;
	SysScanDesc scan;
	bool		found;

	ScanKeyInit(&key, Anum_pg_class_oid, BTEqualStrategyNumber, F_OIDEQ,
				ObjectIdGetDatum(relid));
	scan = systable_beginscan(classrel, ClassOidIndexId, true, snapshot, 1, &key);
	found = HeapTupleIsValid(systable_getnext(scan));
	systable_endscan(scan);
	UnregisterSnapshot(snapshot);
	table_close(classrel, AccessShareLock);
	return found;
}

/*
 * Open kafka_bridge.publications, or return NULL when it does not exist
 * (the extension is not installed in this database, or not as of the
 * historic snapshot being decoded).
 */
static Relation
open_publications(LOCKMODE lockmode)
{
	Oid			nspid = get_namespace_oid(KB_SCHEMA_NAME, true);
	Oid			relid;

	if (!OidIsValid(nspid))
		return NULL;
	relid = get_relname_relid(KB_PUBLICATIONS_NAME, nspid);
	if (!OidIsValid(relid))
		return NULL;
	/* dropped since: nothing was published through it any more */
	if (HistoricSnapshotActive() && !relation_exists_now(relid))
		return NULL;
	return table_open(relid, lockmode);
}

/* Same, for the SQL functions, which belong to the extension. */
static Relation
open_publications_or_error(LOCKMODE lockmode)
{
	Relation	rel = open_publications(lockmode);

	if (rel == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation \"%s.%s\" does not exist",
						KB_SCHEMA_NAME, KB_PUBLICATIONS_NAME),
				 errhint("Reinstall the extension with DROP EXTENSION kafka_bridge and CREATE EXTENSION kafka_bridge.")));
	return rel;
}

/*
 * Start a scan of the publications catalog for one table: by primary key,
 * or during decoding by reading the (small) table, because decoding sees a
 * user catalog table's heap through its current file but an index through
 * the file it had then, which VACUUM FULL may have removed.
 */
static SysScanDesc
begin_scan_for(Relation catalog, Oid relid, ScanKeyData *key)
{
	bool		use_index = !HistoricSnapshotActive();

	ScanKeyInit(key, Anum_kb_publications_relid, BTEqualStrategyNumber,
				F_OIDEQ, ObjectIdGetDatum(relid));
	return systable_beginscan(catalog,
							  use_index ? RelationGetPrimaryKeyIndex(catalog) : InvalidOid,
							  use_index, NULL, 1, key);
}

/* The snapshot columns of a publication's catalog row. */
static void
read_snapshot_state(HeapTuple tuple, TupleDesc desc, KbPublication *pub)
{
	bool		isnull;
	Datum		d;
	char	   *state;

	pub->snapshot_active = false;
	pub->nupto = 0;
	pub->upto = NULL;
	d = heap_getattr(tuple, Anum_kb_publications_snapshot_state, desc, &isnull);
	if (isnull)
		return;
	state = TextDatumGetCString(d);
	pub->snapshot_active = strcmp(state, "pending") == 0 || strcmp(state, "running") == 0;
	d = heap_getattr(tuple, Anum_kb_publications_snapshot_upto, desc, &isnull);
	if (pub->snapshot_active && !isnull)
		pub->upto = kb_snapshot_key_strings(d, &pub->nupto);
}

/* A snapshot_upto value (text[]) as strings, NULL for a null element. */
char	  **
kb_snapshot_key_strings(Datum key, int *n)
{
	Datum	   *elems;
	bool	   *elem_nulls;
	char	  **strings;

	deconstruct_array(DatumGetArrayTypeP(key), TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &elem_nulls, n);
	strings = palloc(sizeof(char *) * Max(*n, 1));
	for (int i = 0; i < *n; i++)
		strings[i] = elem_nulls[i] ? NULL : TextDatumGetCString(elems[i]);
	return strings;
}

/*
 * Read the publication of relid into *pub (strings palloc'd in the current
 * memory context).  Returns false when the table is not published.
 *
 * The output plugin calls this during decoding, where the scan sees the
 * catalog as of the change being decoded.
 */
bool
kb_lookup_publication(Oid relid, KbPublication *pub)
{
	Relation	catalog = open_publications(AccessShareLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	bool		found = false;

	if (catalog == NULL)
		return false;
	scan = begin_scan_for(catalog, relid, &key);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
	{
		TupleDesc	desc = RelationGetDescr(catalog);
		bool		isnull;
		Datum		d;
		char	   *format;

		d = heap_getattr(tuple, Anum_kb_publications_topic, desc, &isnull);
		pub->topic = isnull ? NULL : TextDatumGetCString(d);
		d = heap_getattr(tuple, Anum_kb_publications_event_prefix, desc, &isnull);
		pub->event_prefix = isnull ? NULL : TextDatumGetCString(d);
		d = heap_getattr(tuple, Anum_kb_publications_format, desc, &isnull);
		format = isnull ? NULL : TextDatumGetCString(d);
		d = heap_getattr(tuple, Anum_kb_publications_tombstones, desc, &isnull);
		pub->tombstones = isnull ? true : DatumGetBool(d);

		/* the functions below never store these, but a superuser could */
		if (pub->topic == NULL || pub->event_prefix == NULL || format == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("publication of table with OID %u in %s.%s has a null column",
							relid, KB_SCHEMA_NAME, KB_PUBLICATIONS_NAME),
					 errhint("Publish the table again with kafka_bridge.publish().")));
		pub->format = strcmp(format, "flat") == 0 ? KB_FORMAT_FLAT : KB_FORMAT_ENVELOPE;
		read_snapshot_state(tuple, desc, pub);
		found = true;
	}
	systable_endscan(scan);
	table_close(catalog, AccessShareLock);
	return found;
}

KbEventFormat
kb_parse_format(const char *name)
{
	if (strcmp(name, "envelope") == 0)
		return KB_FORMAT_ENVELOPE;
	if (strcmp(name, "flat") == 0)
		return KB_FORMAT_FLAT;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid event format \"%s\"", name),
			 errhint("The accepted formats are \"envelope\" and \"flat\".")));
	return KB_FORMAT_ENVELOPE;	/* keep the compiler quiet */
}

/* An event prefix is 1 to KB_EVENT_PREFIX_MAX_LEN bytes. */
void
kb_check_event_prefix(const char *prefix)
{
	if (prefix[0] == '\0' || strlen(prefix) > KB_EVENT_PREFIX_MAX_LEN)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid event prefix \"%s\"", prefix),
				 errdetail("An event prefix has between 1 and %d bytes.",
						   KB_EVENT_PREFIX_MAX_LEN),
				 errhint("Events are named <prefix>-PUT, <prefix>-DELETE and <prefix>-TRUNCATE; the prefix defaults to the table name in upper case.")));
}

/*
 * What makes topic (len bytes, not terminated) no valid Kafka topic name,
 * as an error detail, or NULL.
 */
const char *
kb_topic_problem(const char *topic, size_t len)
{
	if (len == 0)
		return "A topic name cannot be empty.";
	if (len > KB_TOPIC_MAX_LEN)
		return "A topic name has at most 249 characters.";
	if ((len == 1 && topic[0] == '.') || (len == 2 && topic[0] == '.' && topic[1] == '.'))
		return "Kafka does not accept \".\" and \"..\" as topic names.";
	for (size_t i = 0; i < len; i++)
	{
		char		c = topic[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
			  (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
			return "A topic name may contain only ASCII letters, digits, \".\", \"_\" and \"-\".";
	}
	return NULL;
}

/*
 * Refuse a name Kafka would refuse (its rules for topic names), now rather
 * than in the publisher, where it would stop the table's events.
 */
void
kb_check_topic(const char *topic, bool is_default)
{
	const char *detail = kb_topic_problem(topic, strlen(topic));

	if (detail == NULL)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_NAME),
			 errmsg("invalid Kafka topic name \"%s\"", topic),
			 errdetail("%s", detail),
			 is_default ?
			 errhint("The topic defaults to the table's name; give another with the topic argument.") : 0));
}

/*
 * Check that the current user owns relid (superusers own everything), then
 * lock it against concurrent publish and ALTER TABLE, but not against DML.
 * The check comes before the lock so that nobody can block a table they do
 * not own.
 */
Relation
kb_open_owned_table(Oid relid)
{
	Relation	rel;
	char		relkind = get_rel_relkind(relid);

	if (relkind == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("relation with OID %u does not exist", relid)));
	if (!pg_class_ownercheck(relid, GetUserId()))
		aclcheck_error(ACLCHECK_NOT_OWNER, get_relkind_objtype(relkind),
					   get_rel_name(relid));
	rel = relation_open(relid, ShareUpdateExclusiveLock);
	return rel;
}

/*
 * Only plain and partitioned tables are published or subscribed: verb and
 * participle name the action in the error ("subscribe", "subscribed").
 */
void
kb_check_table_kind(Relation rel, const char *verb, const char *participle)
{
	char		relkind = rel->rd_rel->relkind;

	if (relkind != RELKIND_RELATION && relkind != RELKIND_PARTITIONED_TABLE)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("cannot %s relation \"%s\"", verb, RelationGetRelationName(rel)),
				 errdetail_relkind_not_supported(relkind),
				 errhint("Only plain and partitioned tables can be %s.", participle)));
}

/* The kinds of table whose changes logical decoding sees, and nothing else. */
static void
check_publishable(Relation rel)
{
	const char *name = RelationGetRelationName(rel);

	kb_check_table_kind(rel, "publish", "published");
	if (IsCatalogRelation(rel))
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("cannot publish system catalog \"%s\"", name)));
	if (RelationGetNamespace(rel) == get_namespace_oid(KB_SCHEMA_NAME, true))
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("cannot publish table \"%s\" of kafka_bridge itself", name),
				 errdetail("The output plugin never emits the tables of schema \"%s\".",
						   KB_SCHEMA_NAME)));
	if (rel->rd_rel->relpersistence == RELPERSISTENCE_TEMP)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot publish temporary table \"%s\"", name),
				 errdetail("Changes to temporary tables are not written to the WAL, so logical decoding never sees them.")));
	if (rel->rd_rel->relpersistence == RELPERSISTENCE_UNLOGGED)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot publish unlogged table \"%s\"", name),
				 errdetail("Changes to unlogged tables are not written to the WAL, so logical decoding never sees them."),
				 errhint("Make it a logged table with ALTER TABLE %s SET LOGGED.",
						 quote_identifier(name))));

	/*
	 * Events are keyed by the replica identity, and a DELETE only carries
	 * the old row's identity columns: without one, a delete could not say
	 * which row it removes.
	 */
	if (rel->rd_rel->relreplident != REPLICA_IDENTITY_FULL &&
		!OidIsValid(RelationGetReplicaIndex(rel)))
	{
		char	   *qualified = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
														   name);

		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cannot publish table \"%s\" because it has no replica identity", name),
				 errdetail("Events are keyed by the primary key or replica identity, and a DELETE carries only those columns of the old row."),
				 errhint("Add a primary key with ALTER TABLE %s ADD PRIMARY KEY (...), or make every column the identity with ALTER TABLE %s REPLICA IDENTITY FULL.",
						 qualified, qualified)));
	}
}

/*
 * Tell the output plugin, in this process and in every decoding of the WAL
 * to come, that the publication of rel changed.  For a partitioned table
 * this covers every partition, whose changes are the ones decoded.
 */
void
kb_invalidate_publication(Relation rel)
{
	Oid			relid = RelationGetRelid(rel);

	if (rel->rd_rel->relkind == RELKIND_PARTITIONED_TABLE)
	{
		List	   *all = find_all_inheritors(relid, AccessShareLock, NULL);
		ListCell   *lc;

		foreach(lc, all)
			CacheInvalidateRelcacheByRelid(lfirst_oid(lc));
	}
	else
		CacheInvalidateRelcacheByRelid(relid);
	/* so that the rest of this transaction sees the new catalog row */
	CommandCounterIncrement();
}

/*
 * The snapshot columns of a publication starting in state (or, when
 * estimate is negative, left as they are by heap_modify_tuple).
 */
static void
set_snapshot_columns(Datum *values, bool *nulls, bool *replace,
					 const char *state, int64 estimate)
{
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	bool		done = strcmp(state, "done") == 0;

	values[Anum_kb_publications_snapshot_state - 1] = CStringGetTextDatum(state);
	nulls[Anum_kb_publications_snapshot_upto - 1] = true;
	values[Anum_kb_publications_snapshot_rows - 1] = Int64GetDatum(0);
	values[Anum_kb_publications_snapshot_estimate - 1] = Int64GetDatum(Max(estimate, 0));
	values[Anum_kb_publications_snapshot_started_at - 1] = TimestampTzGetDatum(now);
	nulls[Anum_kb_publications_snapshot_started_at - 1] = strcmp(state, "skipped") == 0;
	values[Anum_kb_publications_snapshot_done_at - 1] = TimestampTzGetDatum(now);
	nulls[Anum_kb_publications_snapshot_done_at - 1] = !done;
	nulls[Anum_kb_publications_snapshot_acked - 1] = true;
	for (int i = Anum_kb_publications_snapshot_state; i <= Natts_kb_publications; i++)
		replace[i - 1] = true;
}

/*
 * How many rows the table holds, about (the planner's estimate, summed
 * over the partitions): what kafka_bridge.snapshots shows the progress
 * against.
 */
int64
kb_estimate_rows(Relation rel)
{
	List	   *relids = find_all_inheritors(RelationGetRelid(rel), AccessShareLock, NULL);
	ListCell   *lc;
	double		total = 0;

	foreach(lc, relids)
	{
		Relation	leaf = relation_open(lfirst_oid(lc), NoLock);

		if (leaf->rd_rel->relkind == RELKIND_RELATION)
		{
			BlockNumber pages;
			double		tuples;
			double		allvisfrac;

			estimate_rel_size(leaf, NULL, &pages, &tuples, &allvisfrac);
			total += Max(tuples, 0);
		}
		relation_close(leaf, NoLock);
	}
	return (int64) total;
}

/*
 * Whether the table (every partition of it) holds no row.  The caller
 * holds a SHARE lock on all of them, so no writer can commit rows between
 * this look and the end of the caller's transaction.
 */
static bool
table_is_empty(Relation rel)
{
	List	   *relids = find_all_inheritors(RelationGetRelid(rel), ShareLock, NULL);
	ListCell   *lc;
	Snapshot	snapshot = RegisterSnapshot(GetLatestSnapshot());
	bool		empty = true;

	foreach(lc, relids)
	{
		Relation	leaf = relation_open(lfirst_oid(lc), NoLock);

		if (leaf->rd_rel->relkind == RELKIND_RELATION)
		{
			TableScanDesc scan = table_beginscan(leaf, snapshot, 0, NULL);
			TupleTableSlot *slot = table_slot_create(leaf, NULL);

			empty = !table_scan_getnextslot(scan, ForwardScanDirection, slot);
			ExecDropSingleTupleTableSlot(slot);
			table_endscan(scan);
		}
		relation_close(leaf, NoLock);
		if (!empty)
			break;
	}
	UnregisterSnapshot(snapshot);
	return empty;
}

/*
 * The snapshot state a new publication of rel starts in: "skipped" when
 * not wanted, "done" for an empty table (nothing to publish, and the
 * stream publishes everything from the start), else "pending".  The SHARE
 * lock taken to look waits for the transactions writing the table and
 * holds new ones until publish() commits: a row committed after the look
 * is committed after the publication, and the stream publishes it.
 */
static const char *
initial_snapshot_state(Relation rel, bool wanted, int64 *estimate)
{
	*estimate = 0;
	if (!wanted)
		return "skipped";
	LockRelationOid(RelationGetRelid(rel), ShareLock);
	if (table_is_empty(rel))
		return "done";
	*estimate = kb_estimate_rows(rel);
	return "pending";
}

/*
 * Insert or update the publication of relid.  A new one starts with
 * snapshot_state, and so does an existing one when snapshot_state is not
 * NULL; else it keeps its snapshot as it is.
 */
static void
store_publication(Oid relid, const char *topic, const char *prefix,
				  KbEventFormat format, bool tombstones,
				  const char *snapshot_state, int64 estimate)
{
	Relation	catalog = open_publications_or_error(RowExclusiveLock);
	TupleDesc	desc = RelationGetDescr(catalog);
	Datum		values[Natts_kb_publications];
	bool		nulls[Natts_kb_publications];
	bool		replace[Natts_kb_publications];
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	old;
	HeapTuple	tuple;

	memset(nulls, false, sizeof(nulls));
	memset(replace, false, sizeof(replace));
	values[Anum_kb_publications_relid - 1] = ObjectIdGetDatum(relid);
	values[Anum_kb_publications_topic - 1] = CStringGetTextDatum(topic);
	values[Anum_kb_publications_event_prefix - 1] = CStringGetTextDatum(prefix);
	values[Anum_kb_publications_format - 1] =
		CStringGetTextDatum(format == KB_FORMAT_FLAT ? "flat" : "envelope");
	values[Anum_kb_publications_tombstones - 1] = BoolGetDatum(tombstones);
	values[Anum_kb_publications_created_at - 1] =
		TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());

	scan = begin_scan_for(catalog, relid, &key);
	old = systable_getnext(scan);
	if (HeapTupleIsValid(old))
	{
		/* published again: new settings, same creation time */
		replace[Anum_kb_publications_topic - 1] = true;
		replace[Anum_kb_publications_event_prefix - 1] = true;
		replace[Anum_kb_publications_format - 1] = true;
		replace[Anum_kb_publications_tombstones - 1] = true;
		if (snapshot_state)
			set_snapshot_columns(values, nulls, replace, snapshot_state, estimate);
		tuple = heap_modify_tuple(old, desc, values, nulls, replace);
		CatalogTupleUpdate(catalog, &old->t_self, tuple);
	}
	else
	{
		set_snapshot_columns(values, nulls, replace, snapshot_state, estimate);
		tuple = heap_form_tuple(desc, values, nulls);
		CatalogTupleInsert(catalog, tuple);
	}
	systable_endscan(scan);
	table_close(catalog, NoLock);
}

/*
 * kafka_bridge.publish(tbl, topic, event_prefix, format, tombstones):
 * publish a table's changes, or change how an already published table is
 * published (every argument then replaces the previous setting).
 */
Datum
kafka_bridge_publish(PG_FUNCTION_ARGS)
{
	Oid			relid;
	Relation	rel;
	const char *relname;
	char	   *topic;
	char	   *prefix;
	KbEventFormat format;
	bool		tombstones;
	bool		snapshot;
	KbPublication existing;
	const char *snapshot_state = NULL;	/* NULL: the snapshot stays as it is */
	int64		estimate = 0;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the table to publish must not be null")));
	relid = PG_GETARG_OID(0);
	format = kb_parse_format(PG_ARGISNULL(3) ? "envelope" :
						  text_to_cstring(PG_GETARG_TEXT_PP(3)));
	tombstones = PG_ARGISNULL(4) ? true : PG_GETARG_BOOL(4);
	snapshot = (PG_NARGS() <= 5 || PG_ARGISNULL(5)) ? true : PG_GETARG_BOOL(5);

	rel = kb_open_owned_table(relid);
	check_publishable(rel);
	relname = RelationGetRelationName(rel);

	topic = PG_ARGISNULL(1) ? kb_default_topic(relname) :
		text_to_cstring(PG_GETARG_TEXT_PP(1));
	kb_check_topic(topic, PG_ARGISNULL(1));

	prefix = PG_ARGISNULL(2) ? kb_default_event_prefix(relname) :
		text_to_cstring(PG_GETARG_TEXT_PP(2));
	kb_check_event_prefix(prefix);

	if (format == KB_FORMAT_FLAT)
	{
		/* flat records are keyed by event type, and compaction needs row keys */
		tombstones = false;
		ereport(NOTICE,
				(errmsg("flat events of table \"%s\" are keyed by event type, not by row", relname),
				 errdetail("Kafka keeps records in order only within a partition, and the changes to one row may go to different partitions."),
				 errhint("Give topic \"%s\" a single partition if the order of the changes to a row matters.", topic)));
	}

	/* recorded all the same: it applies once the server decodes again */
	if (!XLogLogicalInfoActive())
		ereport(WARNING,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("changes of table \"%s\" are not published while wal_level is below \"logical\"",
						relname),
				 errhint("Set wal_level = logical in postgresql.conf and restart the server.")));

	/* only the worker's slot publishes: say so when there is none yet */
	else
	{
		char		slot_name[NAMEDATALEN];

		snprintf(slot_name, sizeof(slot_name), "kafka_bridge_%u", MyDatabaseId);
		if (SearchNamedReplicationSlot(slot_name, true) == NULL)
			ereport(WARNING,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("changes of table \"%s\" are not published until the kafka_bridge worker of database \"%s\" has created replication slot \"%s\"",
							relname, get_database_name(MyDatabaseId), slot_name),
					 errdetail("Changes committed before the slot exists are never published."),
					 errhint("List the database in kafka_bridge.databases, and wait until kafka_bridge.status shows its worker.")));
	}

	/*
	 * The rows already there, for a new publication (see snapshot.c), and
	 * again for one that goes to another topic or in another format: the
	 * consumers of the new topic need them, and a snapshot running for the
	 * old one starts over (its chunks in flight no longer count)
	 */
	if (!kb_lookup_publication(relid, &existing) ||
		strcmp(existing.topic, topic) != 0 || existing.format != format)
		snapshot_state = initial_snapshot_state(rel, snapshot, &estimate);
	store_publication(relid, topic, prefix, format, tombstones, snapshot_state, estimate);
	kb_invalidate_publication(rel);
	relation_close(rel, NoLock);
	PG_RETURN_VOID();
}

/*
 * The catalog row of rel's publication, found by the scan *scan (which the
 * caller ends); an error with hint when rel is not published.
 */
static HeapTuple
published_row(Relation catalog, Relation rel, ScanKeyData *key, SysScanDesc *scan,
			  const char *hint)
{
	HeapTuple	tuple;

	*scan = begin_scan_for(catalog, RelationGetRelid(rel), key);
	tuple = systable_getnext(*scan);
	if (!HeapTupleIsValid(tuple))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("table \"%s\" is not published", RelationGetRelationName(rel)),
				 errhint("%s", hint)));
	return tuple;
}

/* kafka_bridge.unpublish(tbl): stop publishing a table's changes. */
Datum
kafka_bridge_unpublish(PG_FUNCTION_ARGS)
{
	Oid			relid = PG_GETARG_OID(0);
	Relation	rel = kb_open_owned_table(relid);
	Relation	catalog = open_publications_or_error(RowExclusiveLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;

	tuple = published_row(catalog, rel, &key, &scan,
						  "The view kafka_bridge.published_tables lists the published tables.");
	CatalogTupleDelete(catalog, &tuple->t_self);
	systable_endscan(scan);
	table_close(catalog, NoLock);

	kb_invalidate_publication(rel);
	relation_close(rel, NoLock);
	PG_RETURN_VOID();
}

/*
 * kafka_bridge.snapshot(tbl): publish every row of a published table again.
 * It only records the request; the publisher of the database runs the
 * snapshot in chunks (snapshot.c), and kafka_bridge.snapshots shows how far
 * it got.  A snapshot already running starts over.
 */
Datum
kafka_bridge_snapshot(PG_FUNCTION_ARGS)
{
	Oid			relid = PG_GETARG_OID(0);
	Relation	rel = kb_open_owned_table(relid);
	Relation	catalog = open_publications_or_error(RowExclusiveLock);
	TupleDesc	desc = RelationGetDescr(catalog);
	Datum		values[Natts_kb_publications] = {0};
	bool		nulls[Natts_kb_publications] = {0};
	bool		replace[Natts_kb_publications] = {0};
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;

	tuple = published_row(catalog, rel, &key, &scan,
						  "Publish it with kafka_bridge.publish(), which publishes its rows first.");
	set_snapshot_columns(values, nulls, replace, "pending", kb_estimate_rows(rel));
	CatalogTupleUpdate(catalog, &tuple->t_self, heap_modify_tuple(tuple, desc, values, nulls, replace));
	systable_endscan(scan);
	table_close(catalog, NoLock);

	kb_invalidate_publication(rel);
	relation_close(rel, NoLock);
	PG_RETURN_VOID();
}

/*
 * The sql_drop event trigger: forget the publications of tables that no
 * longer exist, so that a dropped table does not linger in the catalog (where
 * pg_dump could not name it) and a new table that happens to get its OID is
 * not published by mistake.  It runs as whoever drops, and needs no right
 * on the catalog.
 */
Datum
kafka_bridge_forget_dropped_tables(PG_FUNCTION_ARGS)
{
	Relation	catalog;
	SysScanDesc scan;
	HeapTuple	tuple;

	if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("function \"%s\" must be fired by an event trigger",
						"kafka_bridge.forget_dropped_tables")));

	catalog = open_publications(RowExclusiveLock);
	if (catalog == NULL)
		PG_RETURN_NULL();
	kb_forget_dropped_subscriptions();
	scan = systable_beginscan(catalog, InvalidOid, false, NULL, 0, NULL);
	while (HeapTupleIsValid(tuple = systable_getnext(scan)))
	{
		bool		isnull;
		Oid			relid = DatumGetObjectId(heap_getattr(tuple, Anum_kb_publications_relid,
														  RelationGetDescr(catalog),
														  &isnull));

		if (!isnull && !SearchSysCacheExists1(RELOID, ObjectIdGetDatum(relid)))
			CatalogTupleDelete(catalog, &tuple->t_self);
	}
	systable_endscan(scan);
	table_close(catalog, NoLock);
	PG_RETURN_NULL();
}
