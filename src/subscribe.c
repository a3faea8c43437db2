/*-------------------------------------------------------------------------
 * subscribe.c
 *	  Which topics are applied to which tables: the SQL functions
 *	  kafka_bridge.subscribe(), unsubscribe() and sync(), and the reading of
 *	  the subscriptions by the applier.
 *
 * The subscriptions live in kafka_bridge.subscriptions, one table per topic.
 * A table's owner may subscribe it without any right on kafka_bridge's own
 * tables: the functions check ownership, then write those tables as the
 * owner of schema kafka_bridge.  At commit the applier is woken to pick up
 * the change.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/relation.h"
#include "access/xact.h"
#include "catalog/catalog.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_namespace.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#include "apply.h"
#include "kafka_bridge.h"

PG_FUNCTION_INFO_V1(kafka_bridge_subscribe);
PG_FUNCTION_INFO_V1(kafka_bridge_unsubscribe);
PG_FUNCTION_INFO_V1(kafka_bridge_sync);

extern Datum kafka_bridge_publish(PG_FUNCTION_ARGS);

bool		kb_subscriptions_changed = false;

/* The owner of schema kafka_bridge, who may write its tables. */
static Oid
schema_owner(void)
{
	Oid			nspid = get_namespace_oid(KB_SCHEMA_NAME, false);
	HeapTuple	tup = SearchSysCache1(NAMESPACEOID, ObjectIdGetDatum(nspid));
	Oid			owner;

	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for namespace %u", nspid);
	owner = ((Form_pg_namespace) GETSTRUCT(tup))->nspowner;
	ReleaseSysCache(tup);
	return owner;
}

/*
 * Run a statement on kafka_bridge's tables as the schema's owner, with
 * search_path pinned, so that the caller needs no right on them.
 */
static int
run_as_owner(const char *sql, int nargs, Oid *types, Datum *values, const char *nulls)
{
	Oid			save_userid;
	int			save_sec;
	int			save_nestlevel = NewGUCNestLevel();
	int			rc;

	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(schema_owner(), save_sec | SECURITY_LOCAL_USERID_CHANGE);
	(void) set_config_option("search_path", "pg_catalog", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);
	if (rc < 0)
		elog(ERROR, "SPI_execute_with_args failed: %s", SPI_result_code_string(rc));
	rc = SPI_processed;
	SPI_finish();
	AtEOXact_GUC(true, save_nestlevel);
	SetUserIdAndSecContext(save_userid, save_sec);
	return rc;
}

/* The index that identifies rows of rel: its replica identity, else its primary key. */
static Oid
key_index(Relation rel)
{
	Oid			index = RelationGetReplicaIndex(rel);

	return OidIsValid(index) ? index : RelationGetPrimaryKeyIndex(rel);
}

static void
check_subscribable(Relation rel)
{
	const char *name = RelationGetRelationName(rel);

	kb_check_table_kind(rel, "subscribe", "subscribed");
	if (IsCatalogRelation(rel) ||
		RelationGetNamespace(rel) == get_namespace_oid(KB_SCHEMA_NAME, true))
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("cannot subscribe table \"%s\"", name),
				 errdetail("System catalogs and the tables of kafka_bridge itself cannot be written from Kafka.")));
	if (rel->rd_rel->relpersistence == RELPERSISTENCE_TEMP)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot subscribe temporary table \"%s\"", name),
				 errdetail("The applier runs in its own session, which cannot see this session's temporary tables.")));
	if (!OidIsValid(key_index(rel)))
	{
		char	   *qualified = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
														   name);

		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("cannot subscribe table \"%s\" because it has no primary key", name),
				 errdetail("Events are applied by key: a PUT inserts or updates the row with its key, a DELETE removes it."),
				 errhint("Add a primary key with ALTER TABLE %s ADD PRIMARY KEY (...).", qualified)));
	}
}

/* Wake the applier when the transaction commits. */
static void
subscriptions_changed(void)
{
	kb_subscriptions_changed = true;
}

/*
 * kafka_bridge.subscribe(tbl, topic, format, event_prefix, apply_role):
 * apply a topic's events to a table; subscribing again replaces the
 * settings, and a new topic starts from its beginning.
 */
Datum
kafka_bridge_subscribe(PG_FUNCTION_ARGS)
{
	Oid			relid;
	Relation	rel;
	const char *relname;
	char	   *topic;
	char	   *prefix;
	KbEventFormat format;
	Oid			role;
	Oid			types[5] = {OIDOID, TEXTOID, TEXTOID, TEXTOID, OIDOID};
	Datum		values[5];
	int			n;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the table to subscribe must not be null")));
	relid = PG_GETARG_OID(0);
	format = kb_parse_format(PG_ARGISNULL(2) ? "envelope" :
							 text_to_cstring(PG_GETARG_TEXT_PP(2)));

	rel = kb_open_owned_table(relid);
	check_subscribable(rel);
	relname = RelationGetRelationName(rel);

	topic = PG_ARGISNULL(1) ? kb_default_topic(relname) :
		text_to_cstring(PG_GETARG_TEXT_PP(1));
	kb_check_topic(topic, PG_ARGISNULL(1));
	prefix = PG_ARGISNULL(3) ? kb_default_event_prefix(relname) :
		text_to_cstring(PG_GETARG_TEXT_PP(3));
	kb_check_event_prefix(prefix);

	role = PG_ARGISNULL(4) ? GetUserId() : PG_GETARG_OID(4);
	if (!is_member_of_role(GetUserId(), role))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to apply as role \"%s\"", GetUserNameFromId(role, false)),
				 errdetail("Only members of a role may make the applier write as that role.")));

	values[0] = ObjectIdGetDatum(relid);
	values[1] = CStringGetTextDatum(topic);
	values[2] = CStringGetTextDatum(format == KB_FORMAT_FLAT ? "flat" : "envelope");
	values[3] = CStringGetTextDatum(prefix);
	values[4] = ObjectIdGetDatum(role);

	/* one table per topic: two tables fed by one topic would fight over it */
	n = run_as_owner("SELECT 1 FROM kafka_bridge.subscriptions WHERE topic = $2 AND relid <> $1",
					 2, types, values, NULL);
	if (n > 0)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_OBJECT),
				 errmsg("topic \"%s\" is already applied to another table", topic),
				 errhint("The view kafka_bridge.subscribed_tables lists the subscriptions; give this table another topic.")));

	/* a table that changes topic forgets where it stood in the old one */
	run_as_owner("DELETE FROM kafka_bridge.apply_progress p USING kafka_bridge.subscriptions s "
				 "WHERE s.relid = $1 AND s.topic <> $2 AND p.topic = s.topic",
				 2, types, values, NULL);
	run_as_owner("DELETE FROM kafka_bridge.apply_origins p USING kafka_bridge.subscriptions s "
				 "WHERE s.relid = $1 AND s.topic <> $2 AND p.topic = s.topic",
				 2, types, values, NULL);
	run_as_owner("INSERT INTO kafka_bridge.subscriptions (relid, topic, format, event_prefix, apply_role) "
				 "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (relid) DO UPDATE SET "
				 "topic = excluded.topic, format = excluded.format, "
				 "event_prefix = excluded.event_prefix, apply_role = excluded.apply_role",
				 5, types, values, NULL);

	/* only the applier of a listed database applies: say so when there is none */
	{
		char	   *dbname = get_database_name(MyDatabaseId);
		ListCell   *lc;
		bool		listed = false;

		foreach(lc, kb_database_names())
			listed |= (strcmp(lfirst(lc), dbname) == 0);
		if (!listed)
			ereport(WARNING,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("topic \"%s\" is not applied to table \"%s\" while database \"%s\" is not in kafka_bridge.databases",
							topic, relname, dbname),
					 errhint("Add the database to kafka_bridge.databases in postgresql.conf and reload.")));
	}

	subscriptions_changed();
	relation_close(rel, NoLock);
	PG_RETURN_VOID();
}

/* kafka_bridge.unsubscribe(tbl): stop applying to a table. */
Datum
kafka_bridge_unsubscribe(PG_FUNCTION_ARGS)
{
	Oid			relid = PG_GETARG_OID(0);
	Relation	rel = kb_open_owned_table(relid);
	Oid			types[1] = {OIDOID};
	Datum		values[1] = {ObjectIdGetDatum(relid)};

	run_as_owner("DELETE FROM kafka_bridge.apply_progress p USING kafka_bridge.subscriptions s "
				 "WHERE s.relid = $1 AND p.topic = s.topic", 1, types, values, NULL);
	run_as_owner("DELETE FROM kafka_bridge.apply_origins p USING kafka_bridge.subscriptions s "
				 "WHERE s.relid = $1 AND p.topic = s.topic", 1, types, values, NULL);
	if (run_as_owner("DELETE FROM kafka_bridge.subscriptions WHERE relid = $1",
					 1, types, values, NULL) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("table \"%s\" is not subscribed", RelationGetRelationName(rel)),
				 errhint("The view kafka_bridge.subscribed_tables lists the subscribed tables.")));
	subscriptions_changed();
	relation_close(rel, NoLock);
	PG_RETURN_VOID();
}

/*
 * kafka_bridge.sync(tbl, topic, format, event_prefix): publish the table to
 * the topic and apply the topic to it.  The applier skips the events whose
 * origin is this instance, and applies the others under a replication
 * origin that the publisher filters out: nothing goes round in circles.
 */
Datum
kafka_bridge_sync(PG_FUNCTION_ARGS)
{
	LOCAL_FCINFO(pub, 5);
	LOCAL_FCINFO(sub, 5);

	InitFunctionCallInfoData(*pub, NULL, 5, InvalidOid, NULL, NULL);
	InitFunctionCallInfoData(*sub, NULL, 5, InvalidOid, NULL, NULL);

	/* publish(tbl, topic, event_prefix, format, tombstones) */
	for (int i = 0; i < 5; i++)
		pub->args[i].isnull = sub->args[i].isnull = true;
	pub->args[0] = fcinfo->args[0];
	pub->args[1] = fcinfo->args[1];
	pub->args[2] = fcinfo->args[3];
	pub->args[3] = fcinfo->args[2];

	/* subscribe(tbl, topic, format, event_prefix, apply_role) */
	for (int i = 0; i < 4; i++)
		sub->args[i] = fcinfo->args[i];

	(void) kafka_bridge_publish(pub);
	(void) kafka_bridge_subscribe(sub);
	PG_RETURN_VOID();
}

/*
 * Called by the sql_drop event trigger: forget the subscriptions of tables
 * that no longer exist, and where the applier stood in their topics.
 */
void
kb_forget_dropped_subscriptions(void)
{
	if (run_as_owner("WITH gone AS (DELETE FROM kafka_bridge.subscriptions s "
					 "WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) s.relid::pg_catalog.oid) "
					 "RETURNING topic), "
					 "p AS (DELETE FROM kafka_bridge.apply_progress WHERE topic IN (SELECT topic FROM gone)), "
					 "o AS (DELETE FROM kafka_bridge.apply_origins WHERE topic IN (SELECT topic FROM gone)) "
					 "SELECT topic FROM gone", 0, NULL, NULL, NULL) > 0)
		subscriptions_changed();
}

/*
 * Every subscription, in topic order; the caller has a transaction and SPI.
 * With lock, the rows stay as read until the transaction ends: subscribe()
 * and unsubscribe() wait for it.
 */
List *
kb_load_subscriptions(bool lock)
{
	List	   *result = NIL;
	int			rc;

	rc = SPI_execute(lock ?
					 "SELECT relid::pg_catalog.oid, topic, format, event_prefix, apply_role::pg_catalog.oid "
					 "FROM kafka_bridge.subscriptions ORDER BY topic FOR SHARE" :
					 "SELECT relid::pg_catalog.oid, topic, format, event_prefix, apply_role::pg_catalog.oid "
					 "FROM kafka_bridge.subscriptions ORDER BY topic", !lock, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "reading kafka_bridge.subscriptions failed: %s", SPI_result_code_string(rc));
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		KbSubscription *s = palloc0(sizeof(KbSubscription));
		bool		isnull;

		s->relid = DatumGetObjectId(SPI_getbinval(tup, desc, 1, &isnull));
		s->topic = SPI_getvalue(tup, desc, 2);
		s->format = strcmp(SPI_getvalue(tup, desc, 3), "flat") == 0 ?
			KB_FORMAT_FLAT : KB_FORMAT_ENVELOPE;
		s->event_prefix = SPI_getvalue(tup, desc, 4);
		s->apply_role = DatumGetObjectId(SPI_getbinval(tup, desc, 5, &isnull));
		result = lappend(result, s);
	}
	return result;
}
