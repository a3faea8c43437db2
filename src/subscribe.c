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

#include "access/genam.h"
#include "access/relation.h"
#include "access/commit_ts.h"
#include "access/xact.h"
#include "catalog/catalog.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_inherits.h"
#include "catalog/pg_namespace.h"
#include "commands/dbcommands.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/guc.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "replication/origin.h"

#include "apply.h"
#include "kafka_bridge.h"

PG_FUNCTION_INFO_V1(kafka_bridge_subscribe);
PG_FUNCTION_INFO_V1(kafka_bridge_unsubscribe);
PG_FUNCTION_INFO_V1(kafka_bridge_sync);
PG_FUNCTION_INFO_V1(kafka_bridge_apply_event);

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
	/* pg_temp last: else it is searched first for relations */
	(void) set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET, PGC_S_SESSION,
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

/* A start_position argument: "beginning" or "end" (true). */
static bool
parse_start_position(const char *value)
{
	if (strcmp(value, "beginning") == 0)
		return false;
	if (strcmp(value, "end") == 0)
		return true;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid value \"%s\" for parameter \"start_position\"", value),
			 errhint("start_position is \"beginning\" (apply the whole topic) or \"end\" (apply only the records written after subscribe()).")));
	return false;				/* keep the compiler quiet */
}

/*
 * Longest wait for the brokers when subscribe() reads where a topic ends,
 * for the topic's metadata and all its partitions' ends together: librdkafka
 * waits without serving interrupts, with the subscriptions locked.
 */
#define KB_END_TIMEOUT_MS 5000

/*
 * start_position 'end': store the current end of every partition of the
 * topic as where the applier starts, once and for all, in the caller's
 * transaction.  Partitions that have a stored offset keep it; a topic
 * that does not exist yet has no record to skip.
 */
static void
store_end_offsets(const char *topic)
{
	KbKafkaClient *client;
	char	   *detail;
	char		error[512] = "";
	rd_kafka_t *rk;
	rd_kafka_topic_t *rkt;
	const struct rd_kafka_metadata *md = NULL;
	rd_kafka_resp_err_t err;
	int			npartitions = 0;
	int32	   *partitions = NULL;
	int64	   *ends = NULL;
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), KB_END_TIMEOUT_MS);

	if (kb_bootstrap_servers == NULL || kb_bootstrap_servers[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("start_position \"end\" needs kafka_bridge.bootstrap_servers to be set"),
				 errdetail("subscribe() reads where each partition of topic \"%s\" ends from the brokers.", topic)));
	client = kb_kafka_client_create(KB_CLIENT_CONSUMER,
									psprintf("kafka_bridge-subscribe-%s-%d", kb_instance_id(), MyProcPid),
									NULL, &detail);
	if (client == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("could not create a Kafka client to read the end of topic \"%s\"", topic),
				 errdetail("%s", detail)));

	/* no error is raised while the client exists: it would leak its threads */
	rk = kb_kafka_client_handle(client);
	rkt = rd_kafka_topic_new(rk, topic, NULL);
	err = rd_kafka_metadata(rk, 0, rkt, &md, KB_END_TIMEOUT_MS);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		snprintf(error, sizeof(error), "%s", rd_kafka_err2str(err));
	else if (md->topic_cnt == 1 && md->topics[0].err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		rd_kafka_topic_partition_list_t *list;

		npartitions = md->topics[0].partition_cnt;
		partitions = palloc(sizeof(int32) * Max(npartitions, 1));
		ends = palloc(sizeof(int64) * Max(npartitions, 1));

		/*
		 * Every partition's end in one request a leader: at the "timestamp"
		 * RD_KAFKA_OFFSET_END, Kafka's ListOffsets answers a partition's end.
		 * (A query a partition waited up to the whole timeout each for a
		 * partition whose leader was away.)
		 */
		list = rd_kafka_topic_partition_list_new(Max(npartitions, 1));
		for (int i = 0; i < npartitions; i++)
			rd_kafka_topic_partition_list_add(list, topic, md->topics[0].partitions[i].id)->offset =
				RD_KAFKA_OFFSET_END;
		if (npartitions > 0)
			err = rd_kafka_offsets_for_times(rk, list,
											 Max(TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline), 1000));
		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
			snprintf(error, sizeof(error), "%s", rd_kafka_err2str(err));
		for (int i = 0; i < npartitions && error[0] == '\0'; i++)
		{
			partitions[i] = list->elems[i].partition;
			ends[i] = list->elems[i].offset;
			if (list->elems[i].err != RD_KAFKA_RESP_ERR_NO_ERROR)
				snprintf(error, sizeof(error), "partition %d: %s", partitions[i],
						 rd_kafka_err2str(list->elems[i].err));
			else if (ends[i] < 0)
				snprintf(error, sizeof(error), "partition %d: no end offset in the answer",
						 partitions[i]);
		}
		rd_kafka_topic_partition_list_destroy(list);
	}
	if (error[0] && kb_kafka_client_last_error(client)[0])
		strlcat(error, psprintf(" (%s)", kb_kafka_client_last_error(client)), sizeof(error));
	if (md)
		rd_kafka_metadata_destroy(md);
	rd_kafka_topic_destroy(rkt);
	kb_kafka_client_destroy(client);

	if (error[0])
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not read where topic \"%s\" ends", topic),
				 errdetail("Kafka at \"%s\": %s.", kb_bootstrap_servers, error),
				 errhint("start_position \"end\" needs the brokers; subscribe with start_position => 'beginning', or when Kafka is reachable.")));
	for (int i = 0; i < npartitions; i++)
	{
		Oid			types[3] = {TEXTOID, INT4OID, INT8OID};
		Datum		values[3];

		values[0] = CStringGetTextDatum(topic);
		values[1] = Int32GetDatum(partitions[i]);
		values[2] = Int64GetDatum(ends[i]);
		run_as_owner("INSERT INTO kafka_bridge.apply_progress (topic, partition, next_offset, high_watermark) "
					 "VALUES ($1, $2, $3, $3) ON CONFLICT (topic, partition) DO NOTHING",
					 3, types, values, NULL);
	}
}

/*
 * Before changing the subscriptions: wait for the batch the applier is
 * applying under the current ones (it holds a ROW SHARE lock on the table
 * for each transaction), and keep it from starting another until this
 * transaction ends.
 */
static void
lock_subscriptions(void)
{
	run_as_owner("LOCK TABLE kafka_bridge.subscriptions IN EXCLUSIVE MODE", 0, NULL, NULL, NULL);
}

/*
 * The subscriptions changed: the applier reads them again before its next
 * transaction (the lock taken above orders it after this one), and is woken
 * when this transaction commits.
 */
static void
subscriptions_changed(void)
{
	kb_status_subscriptions_changed();
	kb_subscriptions_changed = true;
}

/*
 * The trigger that records tombstones of local deletes, on a table whose
 * policy compares versions; none on one that applies remote changes
 * unchecked.
 */
static void
set_tombstone_trigger(Relation rel, bool wanted)
{
	char	   *qualified = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
													   RelationGetRelationName(rel));

	Oid			types[1] = {OIDOID};
	Datum		values[1] = {ObjectIdGetDatum(RelationGetRelid(rel))};
	bool		present = run_as_owner("SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid OPERATOR(pg_catalog.=) $1 "
									   "AND tgname OPERATOR(pg_catalog.=) 'kafka_bridge_tombstone'",
									   1, types, values, NULL) > 0;

	if (present == wanted)
		return;
	if (present)
		run_as_owner(psprintf("DROP TRIGGER kafka_bridge_tombstone ON %s", qualified),
					 0, NULL, NULL, NULL);
	else
	{
		/* updates matter only when they set a key column */
		Relation	index = index_open(key_index(rel), AccessShareLock);
		StringInfoData columns;

		initStringInfo(&columns);
		for (int k = 0; k < index->rd_index->indnkeyatts; k++)
			appendStringInfo(&columns, "%s%s", k > 0 ? ", " : "",
							 quote_identifier(get_attname(RelationGetRelid(rel),
														  index->rd_index->indkey.values[k], false)));
		index_close(index, AccessShareLock);
		run_as_owner(psprintf("CREATE TRIGGER kafka_bridge_tombstone AFTER DELETE OR UPDATE OF %s ON %s "
							  "FOR EACH ROW EXECUTE FUNCTION kafka_bridge.record_tombstone()",
							  columns.data, qualified),
					 0, NULL, NULL, NULL);
	}
}

/*
 * The first table of relid's inheritance tree (relid itself, then its
 * partitions or children) whose owner is not a member of role, or
 * InvalidOid; *owner is set to that owner.  The applier's statements reach
 * every table of the tree, and each table's triggers, defaults and checks
 * are written by its own owner.  Children are not locked: one dropped
 * meanwhile is passed over.
 */
static Oid
table_owner_not_member(Oid relid, Oid role, Oid *owner)
{
	List	   *tree = find_all_inheritors(relid, NoLock, NULL);
	ListCell   *lc;
	Oid			found = InvalidOid;

	foreach(lc, tree)
	{
		HeapTuple	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(lfirst_oid(lc)));

		if (!HeapTupleIsValid(tup))
			continue;
		*owner = ((Form_pg_class) GETSTRUCT(tup))->relowner;
		ReleaseSysCache(tup);
		if (!is_member_of_role(*owner, role))
		{
			found = lfirst_oid(lc);
			break;
		}
	}
	list_free(tree);
	return found;
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
	Oid			refused;
	Oid			owner;
	KbConflictPolicy policy;
	Oid			types[7] = {OIDOID, TEXTOID, TEXTOID, TEXTOID, OIDOID, TEXTOID, TEXTOID};
	Datum		values[7];
	int			n;
	bool		from_end;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the table to subscribe must not be null")));
	relid = PG_GETARG_OID(0);
	format = kb_parse_format(PG_ARGISNULL(2) ? "envelope" :
							 text_to_cstring(PG_GETARG_TEXT_PP(2)));
	policy = kb_parse_conflict_policy(PG_NARGS() < 6 || PG_ARGISNULL(5) ? "last_write_wins" :
									  text_to_cstring(PG_GETARG_TEXT_PP(5)));
	from_end = (PG_NARGS() > 6 && !PG_ARGISNULL(6)) &&
		parse_start_position(text_to_cstring(PG_GETARG_TEXT_PP(6)));

	rel = kb_open_owned_table(relid);
	check_subscribable(rel);
	relname = RelationGetRelationName(rel);

	topic = PG_ARGISNULL(1) ? kb_default_topic(relname) :
		text_to_cstring(PG_GETARG_TEXT_PP(1));
	kb_check_topic(topic, PG_ARGISNULL(1));
	prefix = PG_ARGISNULL(3) ? kb_default_event_prefix(relname) :
		text_to_cstring(PG_GETARG_TEXT_PP(3));
	kb_check_event_prefix(prefix);

	/*
	 * The table's code runs as the apply role: its owner must be a member
	 * of it too, as the caller (the applier looks again each time).
	 */
	role = PG_ARGISNULL(4) ? rel->rd_rel->relowner : PG_GETARG_OID(4);
	if (!is_member_of_role(GetUserId(), role))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied to apply as role \"%s\"", GetUserNameFromId(role, false)),
				 errdetail("Only members of a role may make the applier write as that role.")));
	refused = table_owner_not_member(relid, role, &owner);
	if (OidIsValid(refused))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("the owner of table \"%s\" is not a member of role \"%s\"", get_rel_name(refused),
						GetUserNameFromId(role, false)),
				 refused == relid ?
				 errdetail("The table's triggers, defaults and checks run as the apply role: its owner, role \"%s\", would gain the rights of role \"%s\".",
						   GetUserNameFromId(owner, false), GetUserNameFromId(role, false)) :
				 errdetail("Table \"%s\" is a partition or child of table \"%s\", and its triggers, defaults and checks run as the apply role: its owner, role \"%s\", would gain the rights of role \"%s\".",
						   get_rel_name(refused), relname,
						   GetUserNameFromId(owner, false), GetUserNameFromId(role, false)),
				 refused == relid ?
				 errhint("Leave apply_role out to apply as the table's owner, or GRANT \"%s\" TO \"%s\".",
						 GetUserNameFromId(role, false), GetUserNameFromId(owner, false)) :
				 errhint("Apply as a role that the owners of the table and of all its partitions or children are members of, or GRANT \"%s\" TO \"%s\".",
						 GetUserNameFromId(role, false), GetUserNameFromId(owner, false))));

	values[0] = ObjectIdGetDatum(relid);
	values[1] = CStringGetTextDatum(topic);
	values[2] = CStringGetTextDatum(format == KB_FORMAT_FLAT ? "flat" : "envelope");
	values[3] = CStringGetTextDatum(prefix);
	values[4] = ObjectIdGetDatum(role);
	values[5] = CStringGetTextDatum(kb_conflict_policy_name(policy));
	values[6] = CStringGetTextDatum(from_end ? "end" : "beginning");

	lock_subscriptions();

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
	run_as_owner("INSERT INTO kafka_bridge.subscriptions (relid, topic, format, event_prefix, apply_role, conflict_policy, start_position) "
				 "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (relid) DO UPDATE SET "
				 "topic = excluded.topic, format = excluded.format, "
				 "event_prefix = excluded.event_prefix, apply_role = excluded.apply_role, "
				 "conflict_policy = excluded.conflict_policy, start_position = excluded.start_position",
				 7, types, values, NULL);
	set_tombstone_trigger(rel, policy != KB_POLICY_APPLY_REMOTE);
	if (from_end)
		store_end_offsets(topic);

	/* versions are commit timestamps: without them the applier waits */
	if (policy != KB_POLICY_APPLY_REMOTE && !track_commit_timestamp)
		ereport(WARNING,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("topic \"%s\" is not applied to table \"%s\" while track_commit_timestamp is off",
						topic, relname),
				 errdetail("Conflict policy %s compares the commit timestamps of row versions.",
						   kb_conflict_policy_name(policy)),
				 errhint("Set track_commit_timestamp = on in postgresql.conf and restart, or subscribe with conflict_policy => 'apply_remote'.")));

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

	lock_subscriptions();
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
	set_tombstone_trigger(rel, false);
	run_as_owner("DELETE FROM kafka_bridge.tombstones WHERE relid = $1", 1, types, values, NULL);
	subscriptions_changed();
	relation_close(rel, NoLock);
	PG_RETURN_VOID();
}

/*
 * kafka_bridge.sync(tbl, topic, format, event_prefix, conflict_policy, start_position):
 * publish the table to the topic and apply the topic to it.  The applier
 * skips the events whose origin is this instance, and applies the others
 * under a replication origin that the publisher filters out: nothing goes
 * round in circles.
 */
Datum
kafka_bridge_sync(PG_FUNCTION_ARGS)
{
	LOCAL_FCINFO(pub, 5);
	LOCAL_FCINFO(sub, 7);

	InitFunctionCallInfoData(*pub, NULL, 5, InvalidOid, NULL, NULL);
	InitFunctionCallInfoData(*sub, NULL, 7, InvalidOid, NULL, NULL);

	/* refuse a bad conflict_policy or start_position before publishing */
	if (PG_NARGS() > 4 && !PG_ARGISNULL(4))
		(void) kb_parse_conflict_policy(text_to_cstring(PG_GETARG_TEXT_PP(4)));
	if (PG_NARGS() > 5 && !PG_ARGISNULL(5))
		(void) parse_start_position(text_to_cstring(PG_GETARG_TEXT_PP(5)));

	/* publish(tbl, topic, event_prefix, format, tombstones) */
	for (int i = 0; i < 5; i++)
		pub->args[i].isnull = true;
	for (int i = 0; i < 7; i++)
		sub->args[i].isnull = true;
	pub->args[0] = fcinfo->args[0];
	pub->args[1] = fcinfo->args[1];
	pub->args[2] = fcinfo->args[3];
	pub->args[3] = fcinfo->args[2];

	/* subscribe(tbl, topic, format, event_prefix, apply_role, conflict_policy, start_position) */
	for (int i = 0; i < 4; i++)
		sub->args[i] = fcinfo->args[i];
	if (PG_NARGS() > 4)
		sub->args[5] = fcinfo->args[4];
	if (PG_NARGS() > 5)
		sub->args[6] = fcinfo->args[5];

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
					 "o AS (DELETE FROM kafka_bridge.apply_origins WHERE topic IN (SELECT topic FROM gone)), "
					 "t AS (DELETE FROM kafka_bridge.tombstones t WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) t.relid::pg_catalog.oid)) "
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
					 "SELECT relid::pg_catalog.oid, topic, format, event_prefix, apply_role::pg_catalog.oid, conflict_policy, xmin "
					 "FROM kafka_bridge.subscriptions ORDER BY topic FOR SHARE" :
					 "SELECT relid::pg_catalog.oid, topic, format, event_prefix, apply_role::pg_catalog.oid, conflict_policy, xmin "
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
		s->policy = kb_parse_conflict_policy(SPI_getvalue(tup, desc, 6));
		s->row_xmin = DatumGetTransactionId(SPI_getbinval(tup, desc, 7, &isnull));
		result = lappend(result, s);
	}
	return result;
}

/*
 * Why a subscription may not be applied now, or NULL: its apply role was
 * dropped, or the table's owner is not a member of it.  The table's own
 * code (triggers, defaults, checks, index expressions), which its owner
 * writes, runs as the apply role: an owner who may not act as that role
 * would gain its rights through the applier.  So are its partitions' or
 * children's, written by their owners.  Membership is looked at each
 * time, so that a REVOKE or a new owner holds from then on.
 */
char *
kb_subscription_refusal(const KbSubscription *s)
{
	Oid			refused;
	Oid			owner;

	if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(s->apply_role)))
		return psprintf("the subscription of topic \"%s\" applies as a role that no longer exists: subscribe its table again with an existing apply_role",
						s->topic);
	if (!SearchSysCacheExists1(RELOID, ObjectIdGetDatum(s->relid)))
		return NULL;			/* dropped: the event trigger forgets it */
	refused = table_owner_not_member(s->relid, s->apply_role, &owner);
	if (OidIsValid(refused))
		return psprintf("topic \"%s\" is not applied: the owner of table \"%s\"%s%s%s, role \"%s\", is not a member of its apply_role \"%s\", which the table's triggers, defaults and checks would run as; GRANT \"%s\" TO \"%s\", or subscribe the table again with an apply_role its owner is a member of",
						s->topic, get_rel_name(refused),
						refused == s->relid ? "" : " (under table \"",
						refused == s->relid ? "" : get_rel_name(s->relid),
						refused == s->relid ? "" : "\")",
						GetUserNameFromId(owner, false),
						GetUserNameFromId(s->apply_role, false),
						GetUserNameFromId(s->apply_role, false), GetUserNameFromId(owner, false));
	return NULL;
}

/* ---- kafka_bridge.apply_event() ---- */

static bool apply_event_origin_set = false;

/* The transaction that apply_event() gave a replication origin ended. */
static void
apply_event_xact_end(XactEvent event, void *arg)
{
	/* a prepared transaction would leave the origin on the session */
	if (apply_event_origin_set && event == XACT_EVENT_PRE_PREPARE)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("cannot prepare a transaction that applied events with kafka_bridge.apply_event()"),
				 errhint("Commit it instead.")));
	if (!apply_event_origin_set ||
		(event != XACT_EVENT_COMMIT && event != XACT_EVENT_ABORT &&
		 event != XACT_EVENT_PARALLEL_COMMIT && event != XACT_EVENT_PARALLEL_ABORT))
		return;
	replorigin_session_reset();
	replorigin_session_origin = InvalidRepOriginId;
	replorigin_session_origin_timestamp = 0;
	apply_event_origin_set = false;
}

/*
 * kafka_bridge.apply_event(tbl, key, value, origin, commit_time): apply one
 * event to a subscribed table as the applier does, conflict policy
 * included, in the caller's transaction, which commits with the event's
 * version (origin instance and commit time).  For replaying a dead letter
 * once its cause is fixed, and for testing races.  Returns applied,
 * skipped, or rejected with the reason.
 */
Datum
kafka_bridge_apply_event(PG_FUNCTION_ARGS)
{
	static bool callback_registered = false;
	Oid			relid;
	List	   *subs;
	ListCell   *lc;
	KbSubscription *sub = NULL;
	rd_kafka_message_t msg = {0};
	KbRecord	rec = {0};
	char	   *reason = NULL;
	KbApplyOutcome outcome;
	Oid			save_userid;
	int			save_sec;
	int			nestlevel;
	Oid			save_writer = kb_conflict_writer;

	if (!superuser())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("only superusers may apply events by hand"),
				 errdetail("The transaction commits under a replication origin, with the event's commit time.")));
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the table must not be null")));
	relid = PG_GETARG_OID(0);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	subs = kb_load_subscriptions(false);
	foreach(lc, subs)
		if (((KbSubscription *) lfirst(lc))->relid == relid)
			sub = lfirst(lc);
	if (sub == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("table \"%s\" is not subscribed", get_rel_name(relid)),
				 errhint("Events are applied to subscribed tables only, with their subscription's format and policy.")));

	reason = kb_subscription_refusal(sub);
	if (reason)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("events are not applied to table \"%s\" now", get_rel_name(relid)),
				 errdetail("The applier's reason: %s.", reason)));
	if (sub->policy != KB_POLICY_APPLY_REMOTE && !track_commit_timestamp)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("conflict policy %s needs track_commit_timestamp, which is off",
						kb_conflict_policy_name(sub->policy)),
				 errhint("Set track_commit_timestamp = on in postgresql.conf and restart.")));
	if (!PG_ARGISNULL(1))
	{
		msg.key = text_to_cstring(PG_GETARG_TEXT_PP(1));
		msg.key_len = strlen(msg.key);
	}
	if (!PG_ARGISNULL(2))
	{
		msg.payload = text_to_cstring(PG_GETARG_TEXT_PP(2));
		msg.len = strlen(msg.payload);
	}
	msg.partition = -1;
	msg.offset = -1;
	rec.msg = &msg;
	rec.origin = PG_ARGISNULL(3) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(3));
	rec.commit_time = PG_ARGISNULL(4) ? DT_NOBEGIN : PG_GETARG_TIMESTAMPTZ(4);
	if (rec.origin && strcmp(rec.origin, kb_instance_id()) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the event's origin is this instance"),
				 errdetail("An instance's own changes are never applied to it.")));

	/*
	 * One version per transaction, as the applier commits it.  An event
	 * without one is applied under this database's manual origin too, as
	 * the applier does with its own: under no origin, it would be taken
	 * for a local change and published again.
	 */
	{
		bool		versioned = rec.origin && !TIMESTAMP_IS_NOBEGIN(rec.commit_time);
		RepOriginId id = kb_origin_for_instance(versioned ? rec.origin : NULL, true);
		TimestampTz origin_time = versioned ? rec.commit_time : 0;

		if (apply_event_origin_set &&
			(replorigin_session_origin != id || replorigin_session_origin_timestamp != origin_time))
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("a transaction can apply the events of one source transaction only"),
					 errdetail("Its commit takes the origin and commit time of the events, which give the rows their version.")));
		if (!apply_event_origin_set)
		{
			if (replorigin_session_origin != InvalidRepOriginId)
				ereport(ERROR,
						(errcode(ERRCODE_OBJECT_IN_USE),
						 errmsg("this session already has a replication origin")));
			if (!callback_registered)
				RegisterXactCallback(apply_event_xact_end, NULL);
			callback_registered = true;
			replorigin_session_setup(id);
			replorigin_session_origin = id;
			replorigin_session_origin_timestamp = origin_time;
			apply_event_origin_set = true;
		}
	}

	/* as the applier: no ordinary trigger fires, as the subscription's role */
	nestlevel = NewGUCNestLevel();
	(void) set_config_option("session_replication_role", "replica", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("search_path", "", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	kb_conflict_writer = GetUserId();
	GetUserIdAndSecContext(&save_userid, &save_sec);
	PG_TRY();
	{
		SetUserIdAndSecContext(sub->apply_role, save_sec | KB_APPLY_SEC_CONTEXT);
		outcome = kb_apply_record(sub, &rec, false, &reason);
		SetUserIdAndSecContext(save_userid, save_sec);
	}
	PG_FINALLY();
	{
		kb_conflict_writer = save_writer;
	}
	PG_END_TRY();

	/*
	 * What the table's code set, even for the session, is undone with ours:
	 * the caller is a superuser, whose next statements it must not steer
	 */
	AtEOXact_GUC(false, nestlevel);
	SPI_finish();

	PG_RETURN_TEXT_P(cstring_to_text(outcome == KB_APPLY_APPLIED ? "applied" :
									 outcome == KB_APPLY_SKIPPED ? "skipped" :
									 psprintf("rejected: %s", reason)));
}
