/*-------------------------------------------------------------------------
 * snapshot.c
 *	  Publishing the rows a table already holds: the chunks the publisher
 *	  runs between two rounds of decoding, and the filter through which the
 *	  output plugin holds back the changes of rows a snapshot has not
 *	  reached yet.
 *
 * publish() (for a table with rows) and snapshot() put the table's
 * publication in state "pending".  The publisher then runs chunks, each one
 * transaction that
 *
 *	1. locks the table in SHARE mode, with a short lock_timeout (on timeout
 *	   it gives up and tries again a second later, so writers never queue
 *	   long behind it, nor often);
 *	2. reads the rows whose key is above snapshot_upto, in key order,
 *	   at most kafka_bridge.snapshot_chunk_rows of them and for at most
 *	   kafka_bridge.snapshot_chunk_time, and produces each as a PUT event
 *	   with the producer the stream uses (waiting for room in the
 *	   producer within that time too: while the broker is slow or away
 *	   the chunk ends early, and none starts while librdkafka's queue is
 *	   full);
 *	3. moves snapshot_upto to the last key read (state "running", or
 *	   "finishing" once no row is left) and commits, which releases the
 *	   lock.
 *
 * The chunk's acknowledgements are waited for afterwards, without the
 * lock (at most KB_SNAPSHOT_MAX_IN_FLIGHT chunks wait at once):
 * snapshot_acked follows the last key acknowledged, and the state becomes
 * "done" once the last chunk is.  If the producer fails, records of the
 * chunks in flight may be lost: when the publisher starts again,
 * snapshot_upto goes back to snapshot_acked and those rows are read again
 * (as they are then; the changes the stream published meanwhile are older).
 *
 * Why no row is missed or published twice at the hand-over: while the
 * snapshot is not done, the output plugin drops the PUT events whose key
 * is above snapshot_upto as kafka_bridge.publications stood when the change
 * committed (the historic catalog snapshot logical decoding gives it).  The
 * SHARE lock orders every writer of the table against every chunk: a
 * transaction that wrote the table committed either before the chunk got
 * its lock (the chunk reads its rows; it sees the old snapshot_upto, so its
 * changes above it are dropped and published by this chunk or a later one)
 * or after the chunk committed (it sees the new snapshot_upto: its changes
 * up to it are published by the stream, those above by a later chunk).  A
 * row therefore reaches Kafka from the chunk that covers its key, then
 * from the stream for every change committed after that chunk.
 *
 * DELETE events are always published: for a row already covered they are
 * needed; for one not covered yet, the row is gone before any chunk reads
 * it, and the DELETE only deletes what consumers do not have (or, for a
 * snapshot() of a table published before, what they had).
 *
 * Order in a partition: chunks run only when decoding has produced every
 * transaction committed before the position D it reached, and none after;
 * the chunk's records carry lsn D - 1 (above every commit LSN produced
 * before, below every one to come) and their number in the chunk, so the
 * appliers' replay marks (per partition and origin, increasing (lsn, seq))
 * never take a snapshot record for a replay of the stream, nor the
 * reverse.  Each chunk first writes and flushes a small WAL record, so
 * that the next chunk, even after a failure or a restart, has a higher D.
 *
 * A table keyed by all its columns (REPLICA IDENTITY FULL without a
 * primary key) has no key to resume from: its snapshot is one chunk, which
 * holds the lock, and blocks writers, for as long as it takes.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/commit_ts.h"
#include "access/htup_details.h"
#include "access/relation.h"
#include "access/stratnum.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_index.h"
#include "catalog/pg_inherits.h"
#include "catalog/pg_operator.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "nodes/params.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "replication/message.h"
#include "storage/lmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/datum.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/ruleutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/typcache.h"

#include "event_codec.h"
#include "kafka_bridge.h"

/* how often a chunk looks at the clock (and for interrupts), in rows */
#define KB_SNAPSHOT_CHECK_ROWS 1000
/* how long a chunk waits for the lock */
#define KB_SNAPSHOT_LOCK_TIMEOUT "100ms"
/* how many chunks may wait for their acknowledgements at once */
#define KB_SNAPSHOT_MAX_IN_FLIGHT 3
/*
 * how often the publisher looks for a snapshot to run when there is none;
 * after a commit woke it, at most this often
 */
#define KB_SNAPSHOT_LOOK_MS 1000
#define KB_SNAPSHOT_WOKEN_LOOK_MS 100
/* the WAL record each chunk writes first (ignored by the output plugin) */
#define KB_SNAPSHOT_MESSAGE_PREFIX "kafka_bridge.snapshot"

/* The key a snapshot goes by: the columns of the index that keys events. */
typedef struct SnapshotKey
{
	int			nkeys;			/* 0: keyed by every column, no order */
	AttrNumber *attnums;		/* in index column order */
	Bitmapset  *columns;		/* the same, for kb_row_shape_create */
	bool		all_key;
} SnapshotKey;

struct KbSnapshotFilter
{
	int			nkeys;
	AttrNumber *attnums;
	FmgrInfo   *cmp;			/* btree comparison of each key column */
	Oid		   *collations;
	bool	   *varlena;
	Datum	   *upto;			/* NULL: no chunk done yet */
};

/*
 * The key of rel, as the output plugin keys its events (decoder.c): the
 * replica identity index, or with REPLICA IDENTITY FULL the primary key,
 * else every column.
 */
static void
snapshot_key(Relation rel, SnapshotKey *key)
{
	Oid			index;
	HeapTuple	tuple;
	Form_pg_index form;

	memset(key, 0, sizeof(*key));
	if (rel->rd_rel->relreplident == REPLICA_IDENTITY_FULL)
		index = RelationGetPrimaryKeyIndex(rel);
	else
		index = RelationGetReplicaIndex(rel);
	if (!OidIsValid(index))
	{
		key->all_key = rel->rd_rel->relreplident == REPLICA_IDENTITY_FULL;
		return;
	}
	tuple = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(index));
	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "cache lookup failed for index %u", index);
	form = (Form_pg_index) GETSTRUCT(tuple);
	key->attnums = palloc(sizeof(AttrNumber) * Max(form->indnkeyatts, 1));
	for (int i = 0; i < form->indnkeyatts; i++)
	{
		AttrNumber	attnum = form->indkey.values[i];

		/* identity and primary key indexes have no expression columns */
		if (attnum <= 0)
			elog(ERROR, "index %u of a published table has an expression column", index);
		key->attnums[key->nkeys++] = attnum;
		key->columns = bms_add_member(key->columns, attnum - FirstLowInvalidHeapAttributeNumber);
	}
	ReleaseSysCache(tuple);
}

/* ---- the output plugin's side ---- */

/*
 * The filter of the changes of a published table (target) while its
 * snapshot runs, in the current memory context; NULL when none runs.
 * Called under the historic snapshot of the change being decoded.
 */
KbSnapshotFilter *
kb_snapshot_filter_create(Relation target, const KbPublication *pub)
{
	KbSnapshotFilter *filter;
	SnapshotKey key;
	TupleDesc	desc = RelationGetDescr(target);

	if (!pub->snapshot_active)
		return NULL;
	snapshot_key(target, &key);
	filter = palloc0(sizeof(KbSnapshotFilter));
	filter->nkeys = key.nkeys;
	filter->attnums = key.attnums;
	filter->cmp = palloc0(sizeof(FmgrInfo) * Max(key.nkeys, 1));
	filter->collations = palloc0(sizeof(Oid) * Max(key.nkeys, 1));
	filter->varlena = palloc0(sizeof(bool) * Max(key.nkeys, 1));
	for (int i = 0; i < key.nkeys; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, key.attnums[i] - 1);
		TypeCacheEntry *type = lookup_type_cache(att->atttypid, TYPECACHE_CMP_PROC_FINFO);

		if (!OidIsValid(type->cmp_proc))
			elog(ERROR, "key column \"%s\" has no btree comparison function",
				 NameStr(att->attname));
		fmgr_info_copy(&filter->cmp[i], &type->cmp_proc_finfo, CurrentMemoryContext);
		filter->collations[i] = att->attcollation;
		filter->varlena[i] = att->attlen == -1;
	}

	/* a key that changed shape since (ALTER TABLE) starts the snapshot over */
	if (key.nkeys > 0 && pub->nupto == key.nkeys)
	{
		filter->upto = palloc(sizeof(Datum) * key.nkeys);
		for (int i = 0; i < key.nkeys; i++)
		{
			Form_pg_attribute att = TupleDescAttr(desc, key.attnums[i] - 1);
			Oid			input;
			Oid			ioparam;

			if (pub->upto[i] == NULL)
			{
				filter->upto = NULL;
				break;
			}
			getTypeInputInfo(att->atttypid, &input, &ioparam);
			filter->upto[i] = OidInputFunctionCall(input, pub->upto[i], ioparam,
												   att->atttypmod);
		}
	}
	return filter;
}

/*
 * Whether a PUT of the row values (in the published table's descriptor)
 * is dropped: its key is above the last one the snapshot covered.  A key
 * that cannot be compared (a key column left out of the WAL as an
 * unchanged TOAST value) is published: at worst the row goes twice.
 */
bool
kb_snapshot_filter_skips(KbSnapshotFilter *filter, Datum *values, bool *nulls)
{
	if (filter->nkeys == 0 || filter->upto == NULL)
		return true;
	for (int i = 0; i < filter->nkeys; i++)
	{
		int			n = filter->attnums[i] - 1;
		int32		cmp;

		if (nulls[n] ||
			(filter->varlena[i] && VARATT_IS_EXTERNAL_ONDISK(DatumGetPointer(values[n]))))
			return false;
		cmp = DatumGetInt32(FunctionCall2Coll(&filter->cmp[i], filter->collations[i],
											  values[n], filter->upto[i]));
		if (cmp != 0)
			return cmp > 0;
	}
	return false;
}

/* ---- the publisher's side: one chunk ---- */

/* What a chunk knows of its table and its records. */
typedef struct Chunk
{
	Relation	rel;
	char	   *relname;
	SnapshotKey key;
	KbRowShape *shape;
	/* the publication, as the chunk's transaction reads it */
	char	   *topic;
	KbEventFormat format;
	char	   *event;			/* <PREFIX>-PUT */
	int			nupto;
	char	  **upto;
	int64		rows_before;
	int64		estimate;
	TimestampTz started_at;		/* tells this snapshot from a later one */
	/* the records */
	char		lsn[32];
	StringInfoData head;		/* the envelope up to the row */
	StringInfoData value;
	StringInfoData key_json;
	KbPublishBatch *batch;
	int64		rows;
	int			limit;			/* rows read at most (the setting may change) */
	bool		exhausted;		/* no row is left after this chunk */
	/* the commit_time header of the last xmin seen (rows come in runs) */
	TransactionId time_xmin;
	char		commit_time[MAXDATELEN + 1];
} Chunk;

/*
 * The oldest snapshot to run, or InvalidOid (in a transaction, SPI
 * connected); *topic is its topic, *flat whether its format is flat.
 */
static Oid
next_snapshot(char **topic, bool *flat)
{
	bool		isnull;

	if (SPI_execute("SELECT relid::pg_catalog.oid, topic, format FROM kafka_bridge.publications "
					"WHERE snapshot_state IN ('pending', 'running') "
					"ORDER BY snapshot_started_at LIMIT 1", true, 1) != SPI_OK_SELECT)
		elog(ERROR, "reading kafka_bridge.publications failed");
	if (SPI_processed == 0)
		return InvalidOid;
	*topic = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
	*flat = strcmp(SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3), "flat") == 0;
	return DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/* Read the publication of the chunk's table; false when no snapshot is due. */
static bool
read_publication(Chunk *c, Oid relid)
{
	Oid			types[1] = {OIDOID};
	Datum		values[1] = {ObjectIdGetDatum(relid)};
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	Datum		d;
	char	   *state;

	if (SPI_execute_with_args("SELECT topic, event_prefix, format, snapshot_state, snapshot_upto, "
							  "snapshot_rows, snapshot_estimate, snapshot_started_at FROM kafka_bridge.publications "
							  "WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1",
							  1, types, values, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "reading kafka_bridge.publications failed");
	if (SPI_processed == 0)
		return false;
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	state = SPI_getvalue(tup, desc, 4);
	if (strcmp(state, "pending") != 0 && strcmp(state, "running") != 0)
		return false;
	c->topic = SPI_getvalue(tup, desc, 1);
	c->event = psprintf("%s-%s", SPI_getvalue(tup, desc, 2), KB_EVENT_PUT);
	c->format = kb_parse_format(SPI_getvalue(tup, desc, 3));
	d = SPI_getbinval(tup, desc, 5, &isnull);
	if (!isnull)
		c->upto = kb_snapshot_key_strings(d, &c->nupto);
	c->rows_before = DatumGetInt64(SPI_getbinval(tup, desc, 6, &isnull));
	c->estimate = DatumGetInt64(SPI_getbinval(tup, desc, 7, &isnull));
	c->started_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 8, &isnull));
	return true;
}

/*
 * The envelope fields every record of the chunk shares, as the output
 * plugin writes them for a transaction, with "snapshot":true.
 */
static void
build_head(Chunk *c, XLogRecPtr boundary)
{
	StringInfo	head = &c->head;
	char	   *table = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(c->rel)),
												   RelationGetRelationName(c->rel));

	snprintf(c->lsn, sizeof(c->lsn), "%X/%X", LSN_FORMAT_ARGS(boundary - 1));
	initStringInfo(head);
	appendStringInfoString(head, "{\"event\":");
	kb_append_json_string(head, c->event);
	appendStringInfoString(head, ",\"table\":");
	kb_append_json_string(head, table);
	appendStringInfoString(head, ",\"origin\":");
	kb_append_json_string(head, kb_instance_id());
	appendStringInfo(head, ",\"lsn\":\"%s\",\"commit_time\":", c->lsn);
	kb_append_timestamptz(head, GetCurrentTransactionStartTimestamp());
	appendStringInfo(head, ",\"xid\":%u,\"snapshot\":true,\"row\":", GetTopTransactionId());
}

/*
 * The commit_time header of a row: the commit time of the transaction that
 * wrote it (its version, which subscribers compare under last_write_wins),
 * or the Unix epoch, older than anything, when it is not known (a frozen
 * row, one written while track_commit_timestamp was off, or any row while
 * it is off).
 */
static void
row_commit_time(TransactionId xmin, char *text)
{
	TimestampTz ts = 0;
	RepOriginId nodeid;
	int			utc = 0;

	/* (asking while track_commit_timestamp is off raises an error) */
	if (!track_commit_timestamp || !TransactionIdIsNormal(xmin) ||
		!TransactionIdGetCommitTsData(xmin, &ts, &nodeid))
		ts = -((TimestampTz) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY);
	JsonEncodeDateTime(text, TimestampTzGetDatum(ts), TIMESTAMPTZOID, &utc);
}

/*
 * Produce one row (whose xmin is given) as a PUT record of the chunk.
 * False when the producer had no room for it by give_up_at (if not 0):
 * the row is then not produced, nor counted.
 */
static bool
produce_row(KbPublisher *pub, Chunk *c, Datum *values, bool *nulls, TransactionId xmin,
			TimestampTz give_up_at)
{
	bool		produced;
	StringInfo	value = &c->value;
	char		seq[MAXINT8LEN + 1];
	KbEventHeaders headers;

	if (c->format == KB_FORMAT_ENVELOPE)
	{
		resetStringInfo(&c->key_json);
		(void) kb_append_row(&c->key_json, c->shape, values, nulls, KB_ROW_KEY, NULL);
	}
	resetStringInfo(value);
	if (c->format == KB_FORMAT_ENVELOPE)
		appendBinaryStringInfo(value, c->head.data, c->head.len);
	(void) kb_append_row(value, c->shape, values, nulls, KB_ROW_ALL, NULL);
	if (c->format == KB_FORMAT_ENVELOPE)
		appendStringInfoChar(value, '}');

	headers.seq_len = pg_lltoa(++c->rows, seq);
	if (xmin != c->time_xmin || c->commit_time[0] == '\0')
	{
		row_commit_time(xmin, c->commit_time);
		c->time_xmin = xmin;
	}
	headers.event = c->event;
	headers.event_len = strlen(c->event);
	headers.origin = kb_instance_id();
	headers.origin_len = strlen(headers.origin);
	headers.lsn = c->lsn;
	headers.lsn_len = strlen(c->lsn);
	headers.seq = seq;
	headers.commit_time = c->commit_time;
	headers.commit_time_len = strlen(c->commit_time);
	/* a flat record is keyed by its event type */
	if (c->format == KB_FORMAT_FLAT)
		produced = kb_publisher_produce(pub, c->batch, c->topic, strlen(c->topic),
										c->event, strlen(c->event),
										value->data, value->len, &headers, give_up_at);
	else
		produced = kb_publisher_produce(pub, c->batch, c->topic, strlen(c->topic),
										c->key_json.data, c->key_json.len,
										value->data, value->len, &headers, give_up_at);
	if (!produced)
		c->rows--;
	return produced;
}

/*
 * The key of a row (its key columns' values) as text: the new
 * snapshot_upto, written with the settings text forms follow fixed, so
 * that the next chunk reads it back as the same values, whatever the
 * worker's settings (extra_float_digits = 0 would round a float key, and
 * the next chunk could pass over rows).
 */
static char **
key_text(Chunk *c, Datum *key)
{
	char	  **text = palloc(sizeof(char *) * c->key.nkeys);
	TupleDesc	desc = RelationGetDescr(c->rel);
	int			guc_level = kb_fix_text_settings();

	for (int i = 0; i < c->key.nkeys; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, c->key.attnums[i] - 1);
		Oid			output;
		bool		varlena;

		getTypeOutputInfo(att->atttypid, &output, &varlena);
		text[i] = OidOutputFunctionCall(output, key[i]);
	}
	AtEOXact_GUC(false, guc_level);
	return text;
}

/*
 * The operator of strategy (BTGreaterStrategyNumber, ...) in the default
 * btree operator class of a key column's type, the one by which ORDER BY
 * sorts the column, written OPERATOR(schema.name): the name alone would be
 * looked up through search_path, where another schema could hold an
 * operator of that name for the type.
 */
static char *
key_operator(Form_pg_attribute att, int16 strategy)
{
	TypeCacheEntry *tc = lookup_type_cache(att->atttypid, TYPECACHE_BTREE_OPFAMILY);
	Oid			opr = InvalidOid;
	HeapTuple	tuple;
	Form_pg_operator form;
	char	   *result;

	if (OidIsValid(tc->btree_opf))
		opr = get_opfamily_member(tc->btree_opf, tc->btree_opintype, tc->btree_opintype,
								  strategy);
	if (!OidIsValid(opr))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("cannot snapshot table \"%s\" in key order",
						get_rel_name(att->attrelid)),
				 errdetail("The type %s of its key column \"%s\" has no default btree operator class.",
						   format_type_be(att->atttypid), NameStr(att->attname))));
	tuple = SearchSysCache1(OPEROID, ObjectIdGetDatum(opr));
	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "cache lookup failed for operator %u", opr);
	form = (Form_pg_operator) GETSTRUCT(tuple);
	result = psprintf("OPERATOR(%s.%s)", quote_identifier(get_namespace_name(form->oprnamespace)),
					  NameStr(form->oprname));
	ReleaseSysCache(tuple);
	return result;
}

/*
 * The condition "key above the parameters": a row comparison with one
 * qualified operator when every key column's greater-than operator has
 * the same schema and name (nearly always pg_catalog.>); else spelled out
 * column by column, (a > $1) OR (a = $1 AND (b > $2)), under a >= on the
 * first column, which an index scan can start from.
 */
static void
append_key_above(StringInfo sql, TupleDesc desc, SnapshotKey *key, char **params)
{
	char	  **gt = palloc(sizeof(char *) * key->nkeys);
	bool		one_operator = true;
	StringInfoData cols;
	StringInfoData args;
	StringInfoData expanded;

	for (int i = 0; i < key->nkeys; i++)
	{
		gt[i] = key_operator(TupleDescAttr(desc, key->attnums[i] - 1), BTGreaterStrategyNumber);
		one_operator &= strcmp(gt[i], gt[0]) == 0;
	}
	if (one_operator)
	{
		initStringInfo(&cols);
		initStringInfo(&args);
		for (int i = 0; i < key->nkeys; i++)
		{
			appendStringInfo(&cols, "%s%s", i ? ", " : "",
							 quote_identifier(NameStr(TupleDescAttr(desc, key->attnums[i] - 1)->attname)));
			appendStringInfo(&args, "%s%s", i ? ", " : "", params[i]);
		}
		/* a row comparison, even of one column: the same path for all */
		appendStringInfo(sql, " WHERE ROW(%s) %s ROW(%s)", cols.data, gt[0], args.data);
		return;
	}

	/* from the last column back: (c_i > p_i) OR (c_i = p_i AND (...)) */
	initStringInfo(&expanded);
	for (int i = key->nkeys - 1; i >= 0; i--)
	{
		Form_pg_attribute att = TupleDescAttr(desc, key->attnums[i] - 1);
		const char *col = quote_identifier(NameStr(att->attname));
		char	   *inner = pstrdup(expanded.data);

		resetStringInfo(&expanded);
		if (inner[0] == '\0')
			appendStringInfo(&expanded, "%s %s %s", col, gt[i], params[i]);
		else
			appendStringInfo(&expanded, "%s %s %s OR (%s %s %s AND (%s))",
							 col, gt[i], params[i],
							 col, key_operator(att, BTEqualStrategyNumber), params[i], inner);
	}
	appendStringInfo(sql, " WHERE %s %s %s AND (%s)",
					 quote_identifier(NameStr(TupleDescAttr(desc, key->attnums[0] - 1)->attname)),
					 key_operator(TupleDescAttr(desc, key->attnums[0] - 1),
								  BTGreaterEqualStrategyNumber),
					 params[0], expanded.data);
}

/*
 * The query of a chunk: the rows above snapshot_upto, in key order, each
 * column the table has (in *columns, its attribute numbers) then the row's
 * xmin.  Fills the parameters from snapshot_upto.
 */
static char *
chunk_query(Chunk *c, int *ncolumns, AttrNumber **columns, ParamListInfo *params_out)
{
	TupleDesc	desc = RelationGetDescr(c->rel);
	StringInfoData sql;
	StringInfoData cols;
	char	  **params;
	int			guc_level = -1;
	bool		from_start = c->nupto != c->key.nkeys;

	for (int i = 0; i < c->nupto && !from_start; i++)
		from_start = c->upto[i] == NULL;

	initStringInfo(&sql);
	appendStringInfoString(&sql, "SELECT ");
	*columns = palloc(sizeof(AttrNumber) * Max(desc->natts, 1));
	*ncolumns = 0;
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (att->attisdropped)
			continue;
		appendStringInfo(&sql, "kb_row.%s, ", quote_identifier(NameStr(att->attname)));
		(*columns)[(*ncolumns)++] = att->attnum;
	}
	/*
	 * A plain table's inheritance children are tables of their own, whose
	 * changes are not the parent's: ONLY (a partitioned table's rows are in
	 * its partitions)
	 */
	appendStringInfo(&sql, "kb_row.xmin FROM %s%s kb_row",
					 c->rel->rd_rel->relkind == RELKIND_PARTITIONED_TABLE ? "" : "ONLY ",
					 quote_qualified_identifier(get_namespace_name(RelationGetNamespace(c->rel)),
												RelationGetRelationName(c->rel)));
	*params_out = NULL;
	if (c->key.nkeys == 0)
		return sql.data;

	initStringInfo(&cols);
	params = palloc(sizeof(char *) * c->key.nkeys);
	if (!from_start)
	{
		*params_out = makeParamList(c->key.nkeys);
		/* snapshot_upto is read under the settings it was written with */
		guc_level = kb_fix_text_settings();
	}
	for (int i = 0; i < c->key.nkeys; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, c->key.attnums[i] - 1);

		appendStringInfo(&cols, "%s%s", i ? ", " : "", quote_identifier(NameStr(att->attname)));
		/* compared under the column's collation, as the output plugin does */
		params[i] = OidIsValid(att->attcollation)
			? psprintf("$%d COLLATE %s", i + 1, generate_collation_name(att->attcollation))
			: psprintf("$%d", i + 1);
		if (!from_start)
		{
			Oid			input;
			Oid			ioparam;

			getTypeInputInfo(att->atttypid, &input, &ioparam);
			(*params_out)->params[i].ptype = att->atttypid;
			(*params_out)->params[i].pflags = PARAM_FLAG_CONST;
			(*params_out)->params[i].isnull = false;
			(*params_out)->params[i].value = OidInputFunctionCall(input, c->upto[i], ioparam,
																 att->atttypmod);
		}
	}
	if (!from_start)
	{
		AtEOXact_GUC(false, guc_level);
		append_key_above(&sql, desc, &c->key, params);
	}
	/* sorted by the types' default btree classes, found by type, not by name */
	c->limit = kb_snapshot_chunk_rows;
	appendStringInfo(&sql, " ORDER BY %s LIMIT %d", cols.data, c->limit);
	return sql.data;
}

/*
 * Where the chunk's query sends its rows: each is produced as it comes,
 * without SPI's copy of the result.
 */
typedef struct ChunkReceiver
{
	DestReceiver dest;			/* first: the executor's view */
	KbPublisher *pub;
	Chunk	   *c;
	int			ncolumns;		/* the query's columns but xmin ... */
	AttrNumber *columns;		/* ... and their attribute numbers */
	Datum	   *values;			/* the row by attribute number (a dropped */
	bool	   *nulls;			/* column stays null) */
	MemoryContext row_cxt;
	/* the key of the last row, for snapshot_upto */
	MemoryContext key_cxt;
	Datum	   *last_key;
	TimestampTz deadline;
	bool		stopped;		/* at the deadline, rows left behind */
} ChunkReceiver;

/*
 * How a chunk ended: done (committed, maybe with rows left for the next);
 * or given up with nothing read, for the lock (writers hold the table) or
 * for room in the producer (the broker is slow or away).
 */
typedef enum ChunkOutcome
{
	CHUNK_DONE,
	CHUNK_NO_LOCK,
	CHUNK_NO_ROOM
} ChunkOutcome;

static bool
chunk_receive(TupleTableSlot *slot, DestReceiver *self)
{
	ChunkReceiver *r = (ChunkReceiver *) self;
	Chunk	   *c = r->c;
	MemoryContext old;

	slot_getallattrs(slot);
	for (int i = 0; i < r->ncolumns; i++)
	{
		r->values[r->columns[i] - 1] = slot->tts_values[i];
		r->nulls[r->columns[i] - 1] = slot->tts_isnull[i];
	}
	/*
	 * While the producer has no room (the broker is slow or away), the
	 * chunk waits for it no longer than its time, with the table locked;
	 * it then ends before this row.  A table without a key cannot stop
	 * half-way.
	 */
	old = MemoryContextSwitchTo(r->row_cxt);
	if (!produce_row(r->pub, c, r->values, r->nulls,
					 DatumGetTransactionId(slot->tts_values[r->ncolumns]),
					 c->key.nkeys > 0 ? r->deadline : 0))
	{
		MemoryContextSwitchTo(old);
		MemoryContextReset(r->row_cxt);
		r->stopped = true;
		return false;
	}
	MemoryContextSwitchTo(old);
	MemoryContextReset(r->row_cxt);
	if (c->key.nkeys > 0)
	{
		MemoryContextReset(r->key_cxt);
		old = MemoryContextSwitchTo(r->key_cxt);
		for (int i = 0; i < c->key.nkeys; i++)
		{
			Form_pg_attribute att = TupleDescAttr(RelationGetDescr(c->rel),
												  c->key.attnums[i] - 1);

			r->last_key[i] = datumCopy(r->values[c->key.attnums[i] - 1],
									   att->attbyval, att->attlen);
		}
		MemoryContextSwitchTo(old);
	}
	if (c->rows % KB_SNAPSHOT_CHECK_ROWS == 0)
	{
		CHECK_FOR_INTERRUPTS();
		/* a table without a key cannot stop half-way */
		if (c->key.nkeys > 0 && GetCurrentTimestamp() >= r->deadline)
		{
			r->stopped = true;
			return false;
		}
	}
	return true;
}

static void
chunk_startup(DestReceiver *self, int operation, TupleDesc typeinfo)
{
}

static void
chunk_shutdown(DestReceiver *self)
{
}

/* Read the chunk's rows and produce them; sets c->rows and c->exhausted. */
static char **
produce_chunk(KbPublisher *pub, Chunk *c)
{
	TupleDesc	desc = RelationGetDescr(c->rel);
	ChunkReceiver r = {0};
	SPIExecuteOptions options = {0};
	char	   *sql;
	char	  **upto;

	sql = chunk_query(c, &r.ncolumns, &r.columns, &options.params);
	r.dest.receiveSlot = chunk_receive;
	r.dest.rStartup = chunk_startup;
	r.dest.rShutdown = chunk_shutdown;
	r.dest.rDestroy = chunk_shutdown;
	r.dest.mydest = DestNone;
	r.pub = pub;
	r.c = c;
	r.values = palloc0(sizeof(Datum) * Max(desc->natts, 1));
	r.nulls = palloc(sizeof(bool) * Max(desc->natts, 1));
	memset(r.nulls, true, sizeof(bool) * Max(desc->natts, 1));
	r.row_cxt = AllocSetContextCreate(CurrentMemoryContext, "kafka_bridge snapshot row",
									  ALLOCSET_DEFAULT_SIZES);
	r.key_cxt = AllocSetContextCreate(CurrentMemoryContext, "kafka_bridge snapshot key",
									  ALLOCSET_SMALL_SIZES);
	r.last_key = palloc(sizeof(Datum) * Max(c->key.nkeys, 1));
	r.deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), kb_snapshot_chunk_time);

	options.read_only = true;
	options.dest = &r.dest;
	if (SPI_execute_extended(sql, &options) < 0)
		elog(ERROR, "reading a snapshot chunk of table \"%s\" failed", c->relname);

	/* a chunk that read its LIMIT may have left rows behind */
	c->exhausted = !r.stopped && (c->key.nkeys == 0 || c->rows < c->limit);
	upto = c->rows > 0 && c->key.nkeys > 0 ? key_text(c, r.last_key) : NULL;
	MemoryContextDelete(r.row_cxt);
	MemoryContextDelete(r.key_cxt);
	return upto;
}

/* A chunk committed, whose records Kafka has not all acknowledged yet. */
typedef struct InFlight
{
	Oid			relid;
	KbPublishBatch *batch;
	Datum		upto;			/* text[] in snapshot_cxt; 0 for none */
	bool		exhausted;		/* the snapshot's last chunk */
	TimestampTz started_at;		/* of its snapshot (snapshot() starts over) */
} InFlight;

static MemoryContext snapshot_cxt = NULL;
static List *in_flight = NIL;	/* InFlight, oldest first, in snapshot_cxt */
static bool need_reset = true;
static bool woken = false;
/* a chunk gave up (lock, room): no other before this, woken or not */
static TimestampTz retry_at = 0;

/* the last chunk acknowledged, not yet recorded in snapshot_acked */
static Oid	acked_relid = InvalidOid;
static Datum acked_upto = (Datum) 0;
static TimestampTz acked_started_at = 0;

/* A commit woke the publisher: it may have asked for a snapshot. */
void
kb_snapshot_wake(void)
{
	woken = true;
}

/*
 * The publisher starts (again): the records of the chunks in flight may
 * be lost with the producer it had, so the snapshots go back to what Kafka
 * acknowledged (see reset_unacknowledged).
 */
void
kb_snapshot_forget(void)
{
	if (snapshot_cxt == NULL)
		snapshot_cxt = AllocSetContextCreate(TopMemoryContext, "kafka_bridge snapshots",
											 ALLOCSET_SMALL_SIZES);
	MemoryContextReset(snapshot_cxt);
	in_flight = NIL;
	acked_relid = InvalidOid;
	acked_upto = (Datum) 0;
	need_reset = true;
}

/* The key of a row as a text[] datum, for snapshot_upto; 0 when keyless. */
static Datum
key_array(Chunk *c, char **upto)
{
	Datum	   *elems;

	if (upto == NULL)
		return (Datum) 0;
	elems = palloc(sizeof(Datum) * c->key.nkeys);
	for (int i = 0; i < c->key.nkeys; i++)
		elems[i] = CStringGetTextDatum(upto[i]);
	return PointerGetDatum(construct_array(elems, c->key.nkeys, TEXTOID, -1, false,
										   TYPALIGN_INT));
}

/*
 * Record the chunk in the catalog: the output plugin sees it at its
 * commit.  Also records the last chunk of the table Kafka acknowledged.
 */
static void
store_progress(Chunk *c, Datum upto)
{
	Oid			types[6] = {OIDOID, TEXTOID, TEXTARRAYOID, INT8OID, TEXTARRAYOID, TIMESTAMPTZOID};
	Datum		values[6];
	char		nulls[6] = "      ";

	values[0] = ObjectIdGetDatum(RelationGetRelid(c->rel));
	values[1] = CStringGetTextDatum(c->exhausted ? "finishing" : "running");
	values[2] = upto;
	nulls[2] = upto == (Datum) 0 ? 'n' : ' ';
	values[3] = Int64GetDatum(c->rows);
	/* only a key acknowledged in this very snapshot, not in one before */
	values[4] = acked_upto;
	nulls[4] = (acked_relid == RelationGetRelid(c->rel) && acked_started_at == c->started_at)
		? ' ' : 'n';
	values[5] = TimestampTzGetDatum(c->started_at);
	if (SPI_execute_with_args("UPDATE kafka_bridge.publications SET snapshot_state = $2, snapshot_upto = $3, "
							  "snapshot_rows = snapshot_rows OPERATOR(pg_catalog.+) $4, "
							  "snapshot_acked = CASE WHEN $5 IS NULL THEN snapshot_acked ELSE $5 END "
							  "WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1 "
							  "AND snapshot_started_at OPERATOR(pg_catalog.=) $6",
							  6, types, values, nulls, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "updating kafka_bridge.publications failed");
	kb_invalidate_publication(c->rel);
}

static void
report(int status_slot, const char *fmt,...) pg_attribute_printf(2, 3);

static void
report(int status_slot, const char *fmt,...)
{
	char		activity[128];
	va_list		args;

	va_start(args, fmt);
	vsnprintf(activity, sizeof(activity), fmt, args);
	va_end(args);
	kb_status_set(status_slot, kb_status_slot(status_slot)->state, activity);
}

/*
 * Run one chunk of the snapshot of table relid, in the current
 * transaction (SPI connected).  Unless it is done, the caller rolls back.
 */
static ChunkOutcome
run_chunk(KbPublisher *pub, int status_slot, Oid relid, XLogRecPtr boundary)
{
	Chunk		c = {0};
	Datum		upto;
	XLogRecPtr	mark;
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool locked = true;
	TimestampTz locked_at;
	InFlight   *f;
	MemoryContext old;

	(void) set_config_option("lock_timeout", KB_SNAPSHOT_LOCK_TIMEOUT, PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
	PG_TRY();
	{
		/* the table and, for a partitioned one, every partition */
		LockRelationOid(relid, ShareLock);
		(void) find_all_inheritors(relid, ShareLock, NULL);
	}
	PG_CATCH();
	{
		if (geterrcode() != ERRCODE_LOCK_NOT_AVAILABLE)
			PG_RE_THROW();
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		locked = false;
	}
	PG_END_TRY();
	if (!locked)
		return CHUNK_NO_LOCK;
	locked_at = GetCurrentTimestamp();
	(void) set_config_option("lock_timeout", "0", PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);

	/* what committed before the lock: a new snapshot */
	PushActiveSnapshot(GetTransactionSnapshot());
	if (!read_publication(&c, relid))
	{
		PopActiveSnapshot();
		return CHUNK_DONE;
	}
	c.rel = relation_open(relid, NoLock);
	c.relname = pstrdup(RelationGetRelationName(c.rel));
	snapshot_key(c.rel, &c.key);
	c.shape = kb_row_shape_create(RelationGetDescr(c.rel), c.key.columns, c.key.all_key,
								  CurrentMemoryContext);
	initStringInfo(&c.value);
	initStringInfo(&c.key_json);
	c.batch = kb_publisher_batch_new(pub);

	/* the next chunk's boundary will be past this (see the file header) */
	mark = LogLogicalMessage(KB_SNAPSHOT_MESSAGE_PREFIX, "", 0, false);
	XLogFlush(mark);

	build_head(&c, boundary);
	pgstat_report_activity(STATE_RUNNING, psprintf("publishing a snapshot chunk of table \"%s\"",
												   c.relname));
	upto = key_array(&c, produce_chunk(pub, &c));
	kb_publisher_flush(pub);
	if (c.rows == 0 && !c.exhausted)
	{
		/* no room for its first row in time: nothing done */
		PopActiveSnapshot();
		relation_close(c.rel, NoLock);
		kb_publisher_batch_free(c.batch);
		return CHUNK_NO_ROOM;
	}
	/* rows not produced must not count as read */
	if (kb_publisher_failed(pub))
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("the snapshot chunk of table \"%s\" could not be produced", c.relname),
				 errdetail("The publisher connects to Kafka again, then reads the rows again.")));
	store_progress(&c, upto);
	ereport(DEBUG1,
			(errmsg_internal("kafka_bridge snapshot chunk of table \"%s\": %lld rows in %ld ms",
							 c.relname, (long long) c.rows,
							 TimestampDifferenceMilliseconds(locked_at, GetCurrentTimestamp()))));
	PopActiveSnapshot();
	relation_close(c.rel, NoLock);

	/* waits for its acknowledgements once committed, with the lock released */
	f = MemoryContextAllocZero(snapshot_cxt, sizeof(InFlight));
	f->relid = relid;
	f->batch = c.batch;
	if (upto)
	{
		Size		len = VARSIZE(DatumGetPointer(upto));

		f->upto = PointerGetDatum(MemoryContextAlloc(snapshot_cxt, len));
		memcpy(DatumGetPointer(f->upto), DatumGetPointer(upto), len);
	}
	f->exhausted = c.exhausted;
	f->started_at = c.started_at;
	old = MemoryContextSwitchTo(snapshot_cxt);
	in_flight = lappend(in_flight, f);	/* taken back if the commit fails */
	MemoryContextSwitchTo(old);
	report(status_slot, "snapshot of table \"%s\": %lld of about %lld rows",
		   c.relname, (long long) (c.rows_before + c.rows),
		   (long long) Max(c.estimate, c.rows_before + c.rows));
	return CHUNK_DONE;
}

/*
 * After the publisher started again: a chunk whose records Kafka may not
 * have acknowledged is read again.  Moving snapshot_upto back is safe: the
 * output plugin then holds back the changes of those keys again, and the
 * next chunk reads their rows as they are.
 */
static void
reset_unacknowledged(int status_slot)
{
	uint64		n;

	if (SPI_execute("UPDATE kafka_bridge.publications SET snapshot_state = 'running', "
					"snapshot_upto = snapshot_acked "
					"WHERE snapshot_state IN ('running', 'finishing') "
					"RETURNING relid::pg_catalog.oid", false, 0) != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "updating kafka_bridge.publications failed");
	n = SPI_processed;
	for (uint64 i = 0; i < n; i++)
	{
		bool		isnull;
		Oid			relid = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[i],
														   SPI_tuptable->tupdesc, 1, &isnull));
		Relation	rel = try_relation_open(relid, AccessShareLock);

		if (rel == NULL)
			continue;
		kb_invalidate_publication(rel);
		relation_close(rel, AccessShareLock);
	}
}

/* The last chunk of a table's snapshot is acknowledged: it is done. */
static void
finish_snapshot(int status_slot, InFlight *f)
{
	Oid			types[2] = {OIDOID, TIMESTAMPTZOID};
	Datum		values[2] = {ObjectIdGetDatum(f->relid), TimestampTzGetDatum(f->started_at)};
	bool		isnull;
	char	   *table;
	long long	rows;

	if (SPI_execute_with_args("UPDATE kafka_bridge.publications SET snapshot_state = 'done', "
							  "snapshot_acked = snapshot_upto, snapshot_done_at = pg_catalog.now() "
							  "WHERE relid::pg_catalog.oid OPERATOR(pg_catalog.=) $1 "
							  "AND snapshot_state = 'finishing' AND snapshot_started_at OPERATOR(pg_catalog.=) $2 "
							  "RETURNING relid::pg_catalog.text, snapshot_rows",
							  2, types, values, NULL, false, 0) != SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "updating kafka_bridge.publications failed");
	if (SPI_processed != 1)
		return;
	table = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	rows = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	/* by its name alone, as the progress before (the log qualifies it) */
	report(status_slot, "snapshot of table \"%s\" done: %lld rows",
		   get_rel_name(f->relid) ? get_rel_name(f->relid) : table, rows);
	ereport(LOG,
			(errmsg("kafka_bridge published the snapshot of table %s: %lld rows", table, rows)));
}

/* What one transaction of kb_snapshot_step does. */
typedef enum StepWork
{
	STEP_RESET,
	STEP_FINISH,
	STEP_CHUNK
} StepWork;

/*
 * Run one piece of work in a transaction of its own.  Errors are logged
 * and shown in kafka_bridge.status, and the work is tried again later;
 * returns false then.
 */
static bool
run_step(StepWork work, KbPublisher *pub, int status_slot, InFlight *f, XLogRecPtr boundary,
		 bool *busy)
{
	MemoryContext cxt = CurrentMemoryContext;
	int			in_flight_before = list_length(in_flight);
	volatile bool ok = true;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		bool		commit = true;

		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		if (work != STEP_CHUNK)
		{
			PushActiveSnapshot(GetTransactionSnapshot());
			if (work == STEP_RESET)
				reset_unacknowledged(status_slot);
			else
				finish_snapshot(status_slot, f);
			PopActiveSnapshot();
		}
		else
		{
			char	   *topic = NULL;
			bool		flat = false;
			Oid			relid;

			PushActiveSnapshot(GetTransactionSnapshot());
			relid = next_snapshot(&topic, &flat);
			PopActiveSnapshot();
			*busy = OidIsValid(relid);
			/* the topic first, while the table's writers need not wait */
			if (*busy && !kb_publisher_prepare_topic(pub, topic, !flat))
				commit = false;
			else if (*busy)
			{
				ChunkOutcome outcome = run_chunk(pub, status_slot, relid, boundary);

				commit = outcome == CHUNK_DONE;
				/*
				 * Writers held the table: the next try a second later, even if
				 * commits wake the worker before.  (No room for a first row:
				 * the next try once librdkafka's queue has room again, see
				 * kb_snapshot_step.)
				 */
				if (outcome == CHUNK_NO_LOCK)
				{
					*busy = false;
					retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), KB_SNAPSHOT_LOOK_MS);
				}
			}
		}
		SPI_finish();
		if (commit)
			CommitTransactionCommand();
		else
		{
			/* writers hold the table, or the broker is slow: try later */
			AbortCurrentTransaction();
			in_flight = list_truncate(in_flight, in_flight_before);
		}
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		/* a chunk that did not commit is not waited for */
		in_flight = list_truncate(in_flight, in_flight_before);

		/*
		 * Reloaded Kafka settings, met while the chunk waited for room in
		 * the producer: the publisher must start over with them, not go on
		 * producing with the old ones
		 */
		if (edata->sqlerrcode == ERRCODE_CONFIG_FILE_ERROR)
		{
			FreeErrorData(edata);
			PG_RE_THROW();
		}
		FlushErrorState();
		AbortCurrentTransaction();
		kb_status_set_error(status_slot, kb_status_slot(status_slot)->state,
							"snapshot: %s", edata->message);
		ereport(LOG,
				(errmsg("kafka_bridge could not go on with a snapshot: %s", edata->message),
				 edata->detail ? errdetail("%s", edata->detail) : 0,
				 errhint("It is tried again in a few seconds.")));
		FreeErrorData(edata);
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
	return ok;
}

/*
 * The snapshot work of one turn of the publisher's loop: take note of the
 * chunks Kafka acknowledged, then run the next chunk of a pending snapshot
 * if decoding stands at a boundary (kb_publisher_boundary) and not too
 * many chunks wait for acknowledgements.  Says what the loop should do
 * next: come back at once (a chunk may run), wait for acknowledgements
 * (without spinning: the broker and the producer's threads need the CPU),
 * or nothing.
 */
KbSnapshotWork
kb_snapshot_step(KbPublisher *pub, int status_slot)
{
	static TimestampTz next_look = 0;
	static TimestampTz last_look = 0;
	static bool busy = false;
	XLogRecPtr	boundary;
	TimestampTz now;
	KbSnapshotWork idle;

	if (snapshot_cxt == NULL)
		kb_snapshot_forget();
	/* records may be lost: nothing counts as acknowledged until it restarts */
	if (kb_publisher_failed(pub))
		return KB_SNAPSHOT_NONE;
	if (need_reset)
	{
		if (!run_step(STEP_RESET, pub, status_slot, NULL, InvalidXLogRecPtr, &busy))
			return KB_SNAPSHOT_NONE;
		need_reset = false;
	}

	while (in_flight != NIL)
	{
		InFlight   *f = linitial(in_flight);

		if (!kb_publisher_batch_acknowledged(f->batch))
			break;
		if (f->exhausted &&
			!run_step(STEP_FINISH, pub, status_slot, f, InvalidXLogRecPtr, &busy))
			break;
		in_flight = list_delete_first(in_flight);
		if (!f->exhausted && f->upto)
		{
			if (acked_upto)
				pfree(DatumGetPointer(acked_upto));
			acked_relid = f->relid;
			acked_upto = f->upto;
			acked_started_at = f->started_at;
		}
		else if (f->upto)
			pfree(DatumGetPointer(f->upto));
		kb_publisher_batch_free(f->batch);
		pfree(f);
	}
	idle = in_flight != NIL ? KB_SNAPSHOT_WAITING : KB_SNAPSHOT_NONE;
	if (list_length(in_flight) >= KB_SNAPSHOT_MAX_IN_FLIGHT)
		return KB_SNAPSHOT_WAITING;

	now = GetCurrentTimestamp();
	if (now < retry_at)
		return idle;
	if (now < next_look && !woken)
		return idle;
	/* woken too soon after the last look: come back shortly, not at next_look */
	if (now < next_look && now < TimestampTzPlusMilliseconds(last_look, KB_SNAPSHOT_WOKEN_LOOK_MS))
		return KB_SNAPSHOT_WAITING;
	boundary = kb_publisher_boundary(pub);
	if (boundary == InvalidXLogRecPtr)
		return busy ? KB_SNAPSHOT_READY : idle;
	/*
	 * Not while librdkafka's queue is full (the broker is slow, or away): a
	 * chunk would wait for room with its table locked.  Acknowledgements
	 * make room; the loop comes back after a short nap.
	 */
	if (kb_publisher_congested(pub))
		return KB_SNAPSHOT_WAITING;
	woken = false;
	last_look = now;
	if (!run_step(STEP_CHUNK, pub, status_slot, NULL, boundary, &busy))
	{
		next_look = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 5000);
		busy = false;
	}
	if (busy)
	{
		/* while a snapshot runs, its next chunk is due at once */
		next_look = 0;
		return list_length(in_flight) >= KB_SNAPSHOT_MAX_IN_FLIGHT ? KB_SNAPSHOT_WAITING : KB_SNAPSHOT_READY;
	}
	next_look = Max(next_look, TimestampTzPlusMilliseconds(GetCurrentTimestamp(), KB_SNAPSHOT_LOOK_MS));
	return in_flight != NIL ? KB_SNAPSHOT_WAITING : KB_SNAPSHOT_NONE;
}
