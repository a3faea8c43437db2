/*-------------------------------------------------------------------------
 * decoder.c
 *	  The kafka_bridge logical decoding output plugin: one Kafka record per
 *	  committed row change of a published table.
 *
 * A slot made with pg_create_logical_replication_slot('s', 'kafka_bridge')
 * (or pg_recvlogical -P kafka_bridge) gives, per change, the record that
 * goes to Kafka: topic, key, value and headers.  docs/events.md describes
 * the records; kafka_bridge.publications (publish.c) says which tables are
 * published, under which topic and event names, in which format.
 *
 * Options, all parsed strictly (an unknown, repeated or bad one is an error
 * naming it):
 *	output				json (default): each record as one line of JSON text,
 *						for pg_recvlogical and pg_logical_slot_get_changes;
 *						kafka: the binary frames below, for the publisher
 *	include-xids		put the transaction id in events (default true)
 *	include-timestamp	put the commit time in events (default true)
 *	include-lsn			put the commit LSN in events and headers (default true)
 *	all-tables			also emit unpublished tables, with the default topic
 *						and prefix and the envelope format (default false)
 *	include-origins		also emit changes that carry a replication origin,
 *						as those kafka_bridge applies from Kafka do
 *						(default false: they are filtered out, so no echo)
 *
 * Frames of output 'kafka' (constants in event_codec.h), one
 * OutputPluginWrite each, integers in network byte order:
 *
 *	record	byte 'R'
 *			int32 topic length, topic bytes
 *			int32 key length or -1 for a null key, key bytes
 *			int32 value length or -1 for a null value (tombstone), value bytes
 *			int16 header count, then per header: int16 name length, name
 *			bytes, int32 value length, value bytes
 *	send	byte 'S', then as a record: a record of kafka_bridge.send()
 *	commit	byte 'C'
 *			int64 end LSN of the commit record (confirm the slot up to here
 *			once Kafka has acknowledged every record before it)
 *			int64 LSN of the commit record
 *			int64 commit timestamp (TimestampTz)
 *			int32 transaction id
 *
 * A commit frame ends each transaction that produced at least one record;
 * a transaction without any published change produces nothing at all.
 * When it decodes for kafka_bridge's publisher (kb_publisher_of()), in the
 * publisher's process, the plugin writes no frames: it hands the same
 * records and commits to the publisher directly.
 *
 * Which tables are published is cached per relation and invalidated by the
 * relcache invalidations that publish() and unpublish() send, and that
 * decoding replays at their place in the WAL.
 *
 * Large transactions: for the publisher, with
 * kafka_bridge.stream_large_transactions on (the default), the plugin
 * takes the changes of a transaction that outgrows
 * logical_decoding_work_mem as PostgreSQL streams them, before the commit,
 * and keeps their records in a spool (spool.c) until the commit replays
 * them or the abort drops them; the commit LSN and time, unknown until
 * then, go into the records at replay.
 * Otherwise, and for the other consumers (json and kafka frames), such a
 * transaction spills to disk and is decoded at commit, as PostgreSQL does
 * by default.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/tupconvert.h"
#include "catalog/namespace.h"
#include "catalog/partition.h"
#include "catalog/pg_index.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_type.h"
#include "lib/ilist.h"
#include "libpq/pqformat.h"
#include "miscadmin.h"
#include "replication/logical.h"
#include "replication/origin.h"
#include "replication/output_plugin.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/datetime.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/syscache.h"

#include "event_codec.h"
#include "kafka_bridge.h"
#include "spool.h"

extern PGDLLEXPORT void _PG_output_plugin_init(OutputPluginCallbacks *cb);

/* How often a long run of changes lets the walsender send a keepalive. */
#define KB_CHANGES_PER_PROGRESS 100

typedef enum KbOutput
{
	KB_OUTPUT_JSON,
	KB_OUTPUT_KAFKA
} KbOutput;

typedef enum KbEvent
{
	KB_PUT,
	KB_DELETE,
	KB_TRUNCATE,
	KB_NUM_EVENTS
} KbEvent;

static const char *const event_suffix[KB_NUM_EVENTS] = {
	KB_EVENT_PUT, KB_EVENT_DELETE, KB_EVENT_TRUNCATE
};

/* A transaction PostgreSQL streams to the publisher before its commit. */
typedef struct KbStreamedTxn
{
	TransactionId xid;			/* the top transaction */
	KbSpool    *spool;
} KbStreamedTxn;

/*
 * A record of a streamed transaction in its spool: this header, then the
 * topic, the event name, the key (key_len -1: null) and the value
 * (value_len -1: null).  An envelope's transaction fields go in the value
 * at meta_at at replay (-1: none).  A kafka_bridge.send() record is the
 * kind byte KB_SPOOL_SEND and its frame.
 */
typedef struct KbSpooledRecord
{
	char		kind;
	bool		tombstone;		/* shares the number of the DELETE before it */
	int16		event_len;
	int32		topic_len;
	int32		key_len;
	int32		value_len;
	int32		meta_at;
} KbSpooledRecord;

#define KB_SPOOL_ROW	'R'
#define KB_SPOOL_SEND	'S'

/* How many records a commit replays from a spool between interrupt checks */
#define KB_REPLAY_BATCH 1024

/* The plugin's state for one decoding session. */
typedef struct KbDecodingData
{
	MemoryContext cache_cxt;	/* the relation cache */
	MemoryContext change_cxt;	/* reset after each change */

	/* options */
	KbOutput	output;
	bool		include_xids;
	bool		include_timestamp;
	bool		include_lsn;
	bool		all_tables;
	bool		include_origins;

	/* decoding for the publisher: records go to it, not to frames */
	KbPublisher *publisher;

	/* the transaction being decoded */
	bool		txn_has_records;
	bool		txn_meta_ready;
	int			changes_since_progress;
	char		origin[128];	/* instance id */
	int			origin_len;
	StringInfoData origin_json;
	char		lsn[32];		/* commit LSN as %X/%X */
	int			lsn_len;
	uint32		seq;			/* the record's number in the transaction */
	char		seq_text[16];
	int			seq_len;
	char		commit_time[MAXDATELEN + 1];	/* ISO 8601, UTC */
	int			commit_time_len;
	StringInfoData txn_meta;	/* the transaction's envelope fields */

	/* scratch */
	StringInfoData key;
	StringInfoData old_key;
	int			value_start;	/* where the value length goes in a frame */
	const char *record_key;		/* the record's key, for the publisher */
	int			record_key_len;
	int			meta_at;		/* where the envelope's transaction fields go */
	bool		record_tombstone;	/* the record is a tombstone (its seq is shared) */

	/* streamed transactions (publisher only) */
	bool		can_stream;		/* PostgreSQL offered to stream, for a publisher */
	List	   *streams;		/* of KbStreamedTxn, in ctx->context */
	KbStreamedTxn *stream;		/* the one being streamed, or NULL */
	XLogRecPtr	stream_lsn;		/* the change being streamed */
	TransactionId stream_xid;	/* its subtransaction, when known */
	StringInfoData spool_rec;

	/* the relation cache (KbRelEntry by relid), in cache_cxt */
	HTAB	   *relations;
	dlist_node	live;			/* in live_sessions while cache_cxt exists */
} KbDecodingData;

/* What the plugin knows about one relation whose changes it decodes. */
typedef struct KbRelEntry
{
	Oid			relid;			/* hash key */
	bool		valid;			/* false once invalidated */
	bool		published;
	MemoryContext cxt;			/* everything below */

	Oid			target_relid;	/* the published table: relid or an ancestor */
	TupleConversionMap *map;	/* partition row to ancestor row, or NULL */
	TupleDesc	target_desc;	/* the ancestor's descriptor, when mapped */
	int			natts;			/* of the relation, when not mapped */
	bool		identity_full;	/* old rows carry every column */

	KbEventFormat format;
	bool		tombstones;
	char	   *topic;
	int			topic_len;
	char	   *topic_json;
	char	   *table_json;		/* quoted schema-qualified name, as JSON */
	char	   *event[KB_NUM_EVENTS];
	int			event_len[KB_NUM_EVENTS];
	char	   *event_json[KB_NUM_EVENTS];
	/* an envelope's start, {"event":...,"table":..., for each event */
	char	   *envelope_head[KB_NUM_EVENTS];
	int			envelope_head_len[KB_NUM_EVENTS];
	KbRowShape *shape;
	KbSnapshotFilter *snapshot; /* while a snapshot of the table runs */
} KbRelEntry;

/*
 * The decoding sessions of this process whose relation caches exist, for
 * the invalidation callbacks, which are registered once per process.  A
 * session leaves the list when its cache's memory context goes, with
 * ctx->context, even on error.  There is normally one (a walsender, a
 * pg_logical_slot_*_changes() call); a worker that decodes in-process may
 * briefly have another while it creates a slot.
 */
static dlist_head live_sessions = DLIST_STATIC_INIT(live_sessions);
static bool kb_callbacks_registered = false;

static void kb_startup(LogicalDecodingContext *ctx, OutputPluginOptions *opt,
					   bool is_init);
static void kb_begin(LogicalDecodingContext *ctx, ReorderBufferTXN *txn);
static void kb_commit(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
					  XLogRecPtr commit_lsn);
static void kb_change(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
					  Relation relation, ReorderBufferChange *change);
static void kb_truncate(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
						int nrelations, Relation relations[],
						ReorderBufferChange *change);
static void kb_message(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
					   XLogRecPtr message_lsn, bool transactional,
					   const char *prefix, Size message_size,
					   const char *message);
static void update_streaming(LogicalDecodingContext *ctx, KbDecodingData *data);
static void end_stream(LogicalDecodingContext *ctx, KbStreamedTxn *st);
static void kb_shutdown(LogicalDecodingContext *ctx);
static void kb_stream_start(LogicalDecodingContext *ctx, ReorderBufferTXN *txn);
static void kb_stream_stop(LogicalDecodingContext *ctx, ReorderBufferTXN *txn);
static void kb_stream_abort(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
							XLogRecPtr abort_lsn);
static void kb_stream_commit(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
							 XLogRecPtr commit_lsn);
static void kb_stream_change(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
							 Relation relation, ReorderBufferChange *change);
static void kb_stream_truncate(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
							   int nrelations, Relation relations[],
							   ReorderBufferChange *change);
static void kb_stream_message(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
							  XLogRecPtr message_lsn, bool transactional,
							  const char *prefix, Size message_size,
							  const char *message);
static bool kb_filter_by_origin(LogicalDecodingContext *ctx,
								RepOriginId origin_id);

void
_PG_output_plugin_init(OutputPluginCallbacks *cb)
{
	cb->startup_cb = kb_startup;
	cb->begin_cb = kb_begin;
	cb->change_cb = kb_change;
	cb->truncate_cb = kb_truncate;
	cb->commit_cb = kb_commit;
	cb->message_cb = kb_message;
	cb->filter_by_origin_cb = kb_filter_by_origin;
	cb->shutdown_cb = kb_shutdown;
	cb->stream_start_cb = kb_stream_start;
	cb->stream_stop_cb = kb_stream_stop;
	cb->stream_abort_cb = kb_stream_abort;
	cb->stream_commit_cb = kb_stream_commit;
	cb->stream_change_cb = kb_stream_change;
	cb->stream_truncate_cb = kb_stream_truncate;
	cb->stream_message_cb = kb_stream_message;
}

/* ---- options ---- */

static void
option_given_twice(const char *name)
{
	ereport(ERROR,
			(errcode(ERRCODE_SYNTAX_ERROR),
			 errmsg("kafka_bridge option \"%s\" is given more than once", name)));
}

static void
parse_options(List *options, KbDecodingData *data)
{
	struct
	{
		const char *name;
		bool	   *value;
		bool		seen;
	}			flags[] = {
		{"include-xids", &data->include_xids, false},
		{"include-timestamp", &data->include_timestamp, false},
		{"include-lsn", &data->include_lsn, false},
		{"all-tables", &data->all_tables, false},
		{"include-origins", &data->include_origins, false},
	};
	bool		output_seen = false;
	ListCell   *lc;

	data->output = KB_OUTPUT_JSON;
	data->include_xids = true;
	data->include_timestamp = true;
	data->include_lsn = true;
	data->all_tables = false;
	data->include_origins = false;

	foreach(lc, options)
	{
		DefElem    *elem = lfirst(lc);
		const char *value = elem->arg ? strVal(elem->arg) : NULL;
		bool		known = false;

		if (strcmp(elem->defname, "output") == 0)
		{
			if (output_seen)
				option_given_twice(elem->defname);
			output_seen = true;
			if (value != NULL && strcmp(value, "json") == 0)
				data->output = KB_OUTPUT_JSON;
			else if (value != NULL && strcmp(value, "kafka") == 0)
				data->output = KB_OUTPUT_KAFKA;
			else
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 value == NULL ?
						 errmsg("kafka_bridge option \"%s\" needs a value", elem->defname) :
						 errmsg("invalid value \"%s\" for kafka_bridge option \"%s\"",
								value, elem->defname),
						 errhint("Option \"output\" takes \"json\" or \"kafka\".")));
			continue;
		}

		for (int i = 0; i < lengthof(flags); i++)
		{
			if (strcmp(elem->defname, flags[i].name) != 0)
				continue;
			if (flags[i].seen)
				option_given_twice(elem->defname);
			flags[i].seen = true;
			known = true;
			/* a boolean option without a value means true */
			if (value == NULL)
				*flags[i].value = true;
			else if (!parse_bool(value, flags[i].value))
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("invalid value \"%s\" for kafka_bridge option \"%s\"",
								value, elem->defname),
						 errhint("Option \"%s\" takes a boolean value, such as on or off.",
								 elem->defname)));
			break;
		}
		if (!known)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unrecognized kafka_bridge option \"%s\"", elem->defname),
					 errhint("The options are \"output\", \"include-xids\", \"include-timestamp\", "
							 "\"include-lsn\", \"all-tables\" and \"include-origins\".")));
	}
}

/* ---- relation cache ---- */

static void
invalidate_relation(Datum arg, Oid relid)
{
	dlist_iter	iter;

	dlist_foreach(iter, &live_sessions)
	{
		KbDecodingData *data = dlist_container(KbDecodingData, live, iter.cur);
		HASH_SEQ_STATUS status;
		KbRelEntry *entry;

		/*
		 * A partition's entry depends on its published ancestor too, so look
		 * at every entry; there are as many as tables with decoded changes.
		 */
		hash_seq_init(&status, data->relations);
		while ((entry = hash_seq_search(&status)) != NULL)
		{
			if (!OidIsValid(relid) || entry->relid == relid ||
				entry->target_relid == relid)
				entry->valid = false;
		}
	}
}

/* A schema renamed: every cached table name may be stale. */
static void
invalidate_namespaces(Datum arg, int cacheid, uint32 hashvalue)
{
	invalidate_relation(arg, InvalidOid);
}

static void
forget_relation_cache(void *arg)
{
	KbDecodingData *data = arg;

	dlist_delete(&data->live);
	data->relations = NULL;
}

static void
create_relation_cache(KbDecodingData *data)
{
	HASHCTL		ctl;
	MemoryContextCallback *forget;

	ctl.keysize = sizeof(Oid);
	ctl.entrysize = sizeof(KbRelEntry);
	ctl.hcxt = data->cache_cxt;
	data->relations = hash_create("kafka_bridge relation cache", 64, &ctl,
								  HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	/* data lives in ctx->context, the parent: still there when this runs */
	forget = MemoryContextAlloc(data->cache_cxt, sizeof(MemoryContextCallback));
	forget->func = forget_relation_cache;
	forget->arg = data;
	MemoryContextRegisterResetCallback(data->cache_cxt, forget);
	dlist_push_tail(&live_sessions, &data->live);

	if (!kb_callbacks_registered)
	{
		CacheRegisterRelcacheCallback(invalidate_relation, (Datum) 0);
		CacheRegisterSyscacheCallback(NAMESPACEOID, invalidate_namespaces, (Datum) 0);
		kb_callbacks_registered = true;
	}
}

/* The key columns of an index, as a set offset like the relcache's. */
static Bitmapset *
index_key_columns(Oid indexoid)
{
	HeapTuple	tuple = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(indexoid));
	Form_pg_index index;
	Bitmapset  *columns = NULL;

	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "cache lookup failed for index %u", indexoid);
	index = (Form_pg_index) GETSTRUCT(tuple);
	for (int i = 0; i < index->indnkeyatts; i++)
	{
		AttrNumber	attnum = index->indkey.values[i];

		if (attnum > 0)
			columns = bms_add_member(columns, attnum - FirstLowInvalidHeapAttributeNumber);
	}
	ReleaseSysCache(tuple);
	return columns;
}

static char *
json_string(const char *str)
{
	StringInfoData buf;

	initStringInfo(&buf);
	kb_append_json_string(&buf, str);
	return buf.data;
}

/*
 * Fill entry for relation: is it published, as which table, under which
 * names, with which columns and key.  Runs under the historic snapshot of
 * the change being decoded, so it sees the catalog as of that change.
 */
static void
build_entry(KbDecodingData *data, KbRelEntry *entry, Relation relation)
{
	Oid			relid = RelationGetRelid(relation);
	Oid			own_schema;
	KbPublication pub = {0};
	bool		found;
	Relation	target;
	Bitmapset  *key_columns = NULL;
	bool		all_key = false;
	MemoryContext old;

	if (entry->cxt)
		MemoryContextDelete(entry->cxt);
	entry->cxt = AllocSetContextCreate(data->cache_cxt, "kafka_bridge relation",
									   ALLOCSET_SMALL_SIZES);
	entry->published = false;
	entry->target_relid = relid;
	entry->map = NULL;
	entry->target_desc = NULL;
	entry->snapshot = NULL;

	/*
	 * Valid from now on: an invalidation that arrives while this runs (catalog
	 * access can accept some) makes the next change build the entry again.
	 */
	entry->valid = true;

	old = MemoryContextSwitchTo(entry->cxt);

	/* kafka_bridge's own tables are never events, even with all-tables */
	own_schema = get_namespace_oid(KB_SCHEMA_NAME, true);
	if (OidIsValid(own_schema) && RelationGetNamespace(relation) == own_schema)
	{
		MemoryContextSwitchTo(old);
		return;
	}

	/* the table itself, else its nearest published ancestor */
	found = kb_lookup_publication(relid, &pub);
	if (!found && relation->rd_rel->relispartition)
	{
		ListCell   *lc;

		foreach(lc, get_partition_ancestors(relid))
		{
			if (kb_lookup_publication(lfirst_oid(lc), &pub))
			{
				entry->target_relid = lfirst_oid(lc);
				found = true;
				break;
			}
		}
	}
	if (!found && data->all_tables)
	{
		pub.topic = kb_default_topic(RelationGetRelationName(relation));
		pub.event_prefix = kb_default_event_prefix(RelationGetRelationName(relation));
		pub.format = KB_FORMAT_ENVELOPE;
		pub.tombstones = true;
		found = true;
	}
	if (!found)
	{
		MemoryContextSwitchTo(old);
		return;
	}

	if (entry->target_relid == relid)
		target = relation;
	else
	{
		target = RelationIdGetRelation(entry->target_relid);
		if (!RelationIsValid(target))
			elog(ERROR, "could not open relation with OID %u", entry->target_relid);
		entry->target_desc = CreateTupleDescCopyConstr(RelationGetDescr(target));
		entry->map = convert_tuples_by_name(CreateTupleDescCopyConstr(RelationGetDescr(relation)),
											entry->target_desc);
	}
	entry->natts = RelationGetDescr(relation)->natts;
	entry->identity_full = relation->rd_rel->relreplident == REPLICA_IDENTITY_FULL;

	/*
	 * The key: the replica identity index, or with REPLICA IDENTITY FULL the
	 * primary key if there is one (a stable key keeps a row's events in one
	 * partition and lets compaction work), else every column.
	 */
	if (target->rd_rel->relreplident == REPLICA_IDENTITY_FULL)
	{
		Oid			pkey = RelationGetPrimaryKeyIndex(target);

		if (OidIsValid(pkey))
			key_columns = index_key_columns(pkey);
		else
			all_key = true;
	}
	else if (OidIsValid(RelationGetReplicaIndex(target)))
		key_columns = index_key_columns(RelationGetReplicaIndex(target));
	entry->shape = kb_row_shape_create(RelationGetDescr(target), key_columns,
									   all_key, entry->cxt);
	entry->snapshot = kb_snapshot_filter_create(target, &pub);

	entry->format = pub.format;
	entry->tombstones = pub.tombstones && pub.format == KB_FORMAT_ENVELOPE;
	entry->topic = pub.topic;
	entry->topic_len = strlen(pub.topic);
	entry->topic_json = json_string(pub.topic);
	entry->table_json =
		json_string(quote_qualified_identifier(get_namespace_name(RelationGetNamespace(target)),
											   RelationGetRelationName(target)));
	for (int i = 0; i < KB_NUM_EVENTS; i++)
	{
		entry->event[i] = psprintf("%s-%s", pub.event_prefix, event_suffix[i]);
		entry->event_len[i] = strlen(entry->event[i]);
		entry->event_json[i] = json_string(entry->event[i]);
		entry->envelope_head[i] = psprintf("{\"event\":%s,\"table\":%s",
										   entry->event_json[i], entry->table_json);
		entry->envelope_head_len[i] = strlen(entry->envelope_head[i]);
	}

	if (target != relation)
		RelationClose(target);
	entry->published = true;
	MemoryContextSwitchTo(old);
}

static KbRelEntry *
get_entry(KbDecodingData *data, Relation relation)
{
	Oid			relid = RelationGetRelid(relation);
	KbRelEntry *entry;
	bool		found;

	entry = hash_search(data->relations, &relid, HASH_ENTER, &found);
	if (!found)
	{
		entry->valid = false;
		entry->published = false;
		entry->cxt = NULL;
		entry->target_relid = InvalidOid;
	}

	/* the descriptor check is a safety net; invalidations should suffice */
	if (!entry->valid ||
		(entry->published && entry->map == NULL &&
		 entry->natts != RelationGetDescr(relation)->natts))
		build_entry(data, entry, relation);
	return entry;
}

/* ---- records ---- */

/*
 * The per-transaction parts of events, made when a transaction's first
 * record is: the commit LSN and time, known at BEGIN since decoding only
 * starts at the commit record.
 */
static void
prepare_transaction(KbDecodingData *data, ReorderBufferTXN *txn)
{
	StringInfo	meta = &data->txn_meta;

	/* a streamed record gets these at replay, when they are known */
	if (data->txn_meta_ready || data->stream)
		return;

	strlcpy(data->origin, kb_instance_id(), sizeof(data->origin));
	data->origin_len = strlen(data->origin);
	resetStringInfo(&data->origin_json);
	kb_append_json_string(&data->origin_json, data->origin);
	data->lsn_len = snprintf(data->lsn, sizeof(data->lsn), "%X/%X",
							 LSN_FORMAT_ARGS(txn->final_lsn));
	{
		int			utc = 0;

		JsonEncodeDateTime(data->commit_time, TimestampTzGetDatum(txn->xact_time.commit_time),
						   TIMESTAMPTZOID, &utc);
		data->commit_time_len = strlen(data->commit_time);
	}

	resetStringInfo(meta);
	appendStringInfoString(meta, ",\"origin\":");
	appendBinaryStringInfo(meta, data->origin_json.data, data->origin_json.len);
	if (data->include_lsn)
		appendStringInfo(meta, ",\"lsn\":\"%s\"", data->lsn);
	if (data->include_timestamp)
	{
		appendStringInfoString(meta, ",\"commit_time\":");
		kb_append_timestamptz(meta, txn->xact_time.commit_time);
	}
	if (data->include_xids)
		appendStringInfo(meta, ",\"xid\":%u", txn->xid);
	data->txn_meta_ready = true;
}

/*
 * Start a record in ctx->out: everything up to the value, which the caller
 * then appends unless it is null.  key NULL means a null key; flat records
 * are keyed by event type whatever key says.  A tombstone shares the
 * number (seq) of the DELETE it follows; every other record, null value or
 * not (a flat TRUNCATE), takes the next.
 */
static void
record_begin(LogicalDecodingContext *ctx, KbDecodingData *data,
			 KbRelEntry *entry, KbEvent event, StringInfo key,
			 bool null_value, bool tombstone, bool last_write)
{
	StringInfo	out = ctx->out;

	if (!tombstone || data->seq == 0)
	{
		data->seq_len = pg_ultoa_n(++data->seq, data->seq_text);
		data->seq_text[data->seq_len] = '\0';
	}
	data->record_tombstone = tombstone;

	if (data->publisher)
	{
		/* out holds the value alone; the key waits for record_end */
		resetStringInfo(out);
		data->meta_at = -1;
		if (entry->format == KB_FORMAT_FLAT)
		{
			data->record_key = entry->event[event];
			data->record_key_len = entry->event_len[event];
		}
		else
		{
			data->record_key = key ? key->data : NULL;
			data->record_key_len = key ? key->len : 0;
		}
		return;
	}

	OutputPluginPrepareWrite(ctx, last_write);
	if (data->output == KB_OUTPUT_KAFKA)
	{
		pq_sendbyte(out, KB_FRAME_RECORD);
		kb_send_bytes(out, entry->topic, entry->topic_len);
		if (entry->format == KB_FORMAT_FLAT)
			kb_send_bytes(out, entry->event[event], entry->event_len[event]);
		else if (key != NULL)
			kb_send_bytes(out, key->data, key->len);
		else
			pq_sendint32(out, -1);
		data->value_start = out->len;
		pq_sendint32(out, -1);	/* the value's length, once known */
		return;
	}

	appendStringInfoString(out, "{\"topic\":");
	appendStringInfoString(out, entry->topic_json);
	appendStringInfoString(out, ",\"key\":");
	if (entry->format == KB_FORMAT_FLAT)
		appendStringInfoString(out, entry->event_json[event]);
	else if (key != NULL)
		appendBinaryStringInfo(out, key->data, key->len);
	else
		appendStringInfoString(out, "null");
	appendStringInfoString(out, ",\"headers\":{\"event\":");
	appendStringInfoString(out, entry->event_json[event]);
	appendStringInfoString(out, ",\"origin\":");
	appendBinaryStringInfo(out, data->origin_json.data, data->origin_json.len);
	if (data->include_lsn)
	{
		appendStringInfoString(out, ",\"lsn\":\"");
		appendStringInfoString(out, data->lsn);
		appendStringInfoString(out, "\",\"seq\":\"");
		appendStringInfoString(out, data->seq_text);
		appendStringInfoChar(out, '"');
	}
	if (data->include_timestamp)
	{
		appendStringInfoString(out, ",\"commit_time\":\"");
		appendStringInfoString(out, data->commit_time);
		appendStringInfoChar(out, '"');
	}
	appendStringInfoString(out, "},\"value\":");
	if (null_value)
		appendStringInfoString(out, "null");
}

/* Append a row record to the spool of the transaction being streamed. */
static void
spool_row(KbDecodingData *data, const char *topic, int topic_len,
		  const char *event, int event_len, const char *key, int key_len,
		  const char *value, int value_len)
{
	StringInfo	rec = &data->spool_rec;
	KbSpooledRecord head = {
		.kind = KB_SPOOL_ROW,
		.tombstone = data->record_tombstone,
		.event_len = event_len,
		.topic_len = topic_len,
		.key_len = key ? key_len : -1,
		.value_len = value ? value_len : -1,
		.meta_at = data->meta_at
	};

	resetStringInfo(rec);
	appendBinaryStringInfo(rec, (const char *) &head, sizeof(head));
	appendBinaryStringInfo(rec, topic, topic_len);
	appendBinaryStringInfo(rec, event, event_len);
	if (key)
		appendBinaryStringInfo(rec, key, key_len);
	if (value)
		appendBinaryStringInfo(rec, value, value_len);
	kb_spool_append(data->stream->spool, data->stream_lsn, data->stream_xid,
					rec->data, rec->len);
}

/* Finish and write the record record_begin started. */
static void
record_end(LogicalDecodingContext *ctx, KbDecodingData *data,
		   KbRelEntry *entry, KbEvent event, bool null_value, bool last_write)
{
	StringInfo	out = ctx->out;

	if (data->stream)
	{
		spool_row(data, entry->topic, entry->topic_len,
				  entry->event[event], entry->event_len[event],
				  data->record_key, data->record_key_len,
				  null_value ? NULL : out->data, out->len);
		data->txn_has_records = true;
		return;
	}
	if (data->publisher)
	{
		KbEventHeaders headers = {
			.event = entry->event[event],
			.origin = data->origin,
			.lsn = data->include_lsn ? data->lsn : NULL,
			.seq = data->seq_text,
			.commit_time = data->include_timestamp ? data->commit_time : NULL,
			.event_len = entry->event_len[event],
			.origin_len = data->origin_len,
			.lsn_len = data->lsn_len,
			.seq_len = data->seq_len,
			.commit_time_len = data->commit_time_len
		};

		kb_publisher_produce(data->publisher, NULL, entry->topic, entry->topic_len,
							 data->record_key, data->record_key_len,
							 null_value ? NULL : out->data, out->len, &headers, 0);
		data->txn_has_records = true;
		return;
	}
	if (data->output == KB_OUTPUT_KAFKA)
	{
		if (!null_value)
		{
			uint32		len = pg_hton32(out->len - data->value_start - 4);

			memcpy(out->data + data->value_start, &len, sizeof(len));
		}
		pq_sendint16(out, 2 + (data->include_lsn ? 2 : 0) + (data->include_timestamp ? 1 : 0));
		kb_send_header(out, KB_HEADER_EVENT, entry->event[event]);
		kb_send_header(out, KB_HEADER_ORIGIN, data->origin);
		if (data->include_lsn)
		{
			kb_send_header(out, KB_HEADER_LSN, data->lsn);
			kb_send_header(out, KB_HEADER_SEQ, data->seq_text);
		}
		if (data->include_timestamp)
			kb_send_header(out, KB_HEADER_COMMIT_TIME, data->commit_time);
	}
	else
		appendStringInfoChar(out, '}');
	OutputPluginWrite(ctx, last_write);
	data->txn_has_records = true;
}

/* The envelope up to its row: {"event":...,"table":...,...,"row": */
static void
envelope_begin(StringInfo out, KbDecodingData *data, KbRelEntry *entry,
			   KbEvent event)
{
	appendBinaryStringInfo(out, entry->envelope_head[event], entry->envelope_head_len[event]);
	if (data->stream)
		data->meta_at = out->len;	/* the fields are not known yet */
	else
		appendBinaryStringInfo(out, data->txn_meta.data, data->txn_meta.len);
	appendBinaryStringInfo(out, ",\"row\":", 7);
}

/*
 * Deform a tuple of the decoded relation into values and nulls of the
 * published table (converting a partition's row to its ancestor's).
 */
static void
deform_row(KbRelEntry *entry, Relation relation, HeapTuple tuple,
		   Datum **values, bool **nulls)
{
	TupleDesc	desc = RelationGetDescr(relation);

	if (entry->map)
	{
		tuple = execute_attr_map_tuple(tuple, entry->map);
		desc = entry->target_desc;
	}
	*values = palloc(sizeof(Datum) * Max(desc->natts, 1));
	*nulls = palloc(sizeof(bool) * Max(desc->natts, 1));
	heap_deform_tuple(tuple, desc, *values, *nulls);
}

/* The event key of a row in buf; false when it has none (key is null). */
static bool
build_key(KbRelEntry *entry, StringInfo buf, Datum *values, bool *nulls)
{
	resetStringInfo(buf);
	if (values == NULL || entry->shape->nkeys == 0)
		return false;
	/* a key column that is an unchanged TOAST pointer leaves no key */
	return kb_append_row(buf, entry->shape, values, nulls, KB_ROW_KEY, NULL) == 0;
}

static void
emit_put(LogicalDecodingContext *ctx, KbDecodingData *data, KbRelEntry *entry,
		 StringInfo key, Datum *values, bool *nulls)
{
	StringInfo	out = ctx->out;

	/*
	 * A row the running snapshot has not reached yet: it will publish it.
	 * Not for a streamed change: the snapshot may pass the row before the
	 * commit, reading it without this change; published anyway, the row
	 * goes at worst twice.
	 */
	if (entry->snapshot && !data->stream &&
		kb_snapshot_filter_skips(entry->snapshot, values, nulls))
		return;

	record_begin(ctx, data, entry, KB_PUT, key, false, false, true);
	if (entry->format == KB_FORMAT_ENVELOPE)
	{
		int		   *unchanged = palloc(sizeof(int) * Max(entry->shape->ncolumns, 1));
		int			nunchanged;

		envelope_begin(out, data, entry, KB_PUT);
		nunchanged = kb_append_row(out, entry->shape, values, nulls,
								   KB_ROW_ALL, unchanged);
		if (nunchanged > 0)
		{
			appendStringInfoString(out, ",\"unchanged\":[");
			for (int i = 0; i < nunchanged; i++)
			{
				KbColumn   *col = &entry->shape->columns[unchanged[i]];

				if (i > 0)
					appendStringInfoChar(out, ',');
				appendBinaryStringInfo(out, col->json_name, col->json_name_len);
			}
			appendStringInfoChar(out, ']');
		}
		appendStringInfoChar(out, '}');
	}
	else
		(void) kb_append_row(out, entry->shape, values, nulls, KB_ROW_ALL, NULL);
	record_end(ctx, data, entry, KB_PUT, false, true);
}

/*
 * A DELETE event, then (envelope format, tombstones on, a key) its
 * tombstone.  values is the old row: its identity columns, or every column
 * with REPLICA IDENTITY FULL; NULL when the table has no replica identity,
 * and then the event has a null key and row.
 */
static void
emit_delete(LogicalDecodingContext *ctx, KbDecodingData *data,
			KbRelEntry *entry, StringInfo key, Datum *values, bool *nulls,
			bool last_write)
{
	StringInfo	out = ctx->out;
	KbRowPart	part = entry->identity_full ? KB_ROW_ALL : KB_ROW_KEY;
	bool		tombstone = entry->tombstones && key != NULL;
	bool		flat_null = entry->format == KB_FORMAT_FLAT && values == NULL;

	record_begin(ctx, data, entry, KB_DELETE, key, flat_null, false,
				 last_write && !tombstone);
	if (entry->format == KB_FORMAT_ENVELOPE)
	{
		envelope_begin(out, data, entry, KB_DELETE);
		if (values != NULL)
			(void) kb_append_row(out, entry->shape, values, nulls, part, NULL);
		else
			appendStringInfoString(out, "null");
		appendStringInfoChar(out, '}');
	}
	else if (values != NULL)
		(void) kb_append_row(out, entry->shape, values, nulls, part, NULL);
	record_end(ctx, data, entry, KB_DELETE, flat_null, last_write && !tombstone);

	if (tombstone)
	{
		record_begin(ctx, data, entry, KB_DELETE, key, true, true, last_write);
		record_end(ctx, data, entry, KB_DELETE, true, last_write);
	}
}

/* ---- callbacks ---- */

static void
kb_startup(LogicalDecodingContext *ctx, OutputPluginOptions *opt, bool is_init)
{
	KbDecodingData *data;
	MemoryContext old;

	data = MemoryContextAllocZero(ctx->context, sizeof(KbDecodingData));
	data->cache_cxt = AllocSetContextCreate(ctx->context,
											"kafka_bridge relation cache",
											ALLOCSET_DEFAULT_SIZES);
	data->change_cxt = AllocSetContextCreate(ctx->context,
											 "kafka_bridge change",
											 ALLOCSET_DEFAULT_SIZES);
	parse_options(ctx->output_plugin_options, data);

	old = MemoryContextSwitchTo(ctx->context);
	initStringInfo(&data->origin_json);
	initStringInfo(&data->txn_meta);
	initStringInfo(&data->key);
	initStringInfo(&data->old_key);
	initStringInfo(&data->spool_rec);
	MemoryContextSwitchTo(old);

	create_relation_cache(data);

	opt->output_type = data->output == KB_OUTPUT_KAFKA ?
		OUTPUT_PLUGIN_BINARY_OUTPUT : OUTPUT_PLUGIN_TEXTUAL_OUTPUT;
	opt->receive_rewrites = false;
	/* streaming, for the publisher alone: see the file's head */
	data->can_stream = ctx->streaming && kb_publisher_decodes(ctx);
	update_streaming(ctx, data);
	ctx->output_plugin_private = data;
}

/*
 * Whether PostgreSQL may stream the next transaction that outgrows
 * logical_decoding_work_mem, as kafka_bridge.stream_large_transactions
 * says now; never off while a streamed transaction is open, whose end
 * comes through the stream callbacks.  Looked at when a transaction
 * begins, and by the publisher before each round of decoding (a
 * transaction that outgrows the memory does so before its begin).
 */
static void
update_streaming(LogicalDecodingContext *ctx, KbDecodingData *data)
{
	bool		stream = data->can_stream &&
		(kb_stream_large_transactions || data->streams != NIL);

	/*
	 * On only while no transaction is being decoded: PostgreSQL notes that
	 * a transaction stands between a TOAST chunk or a speculative insert
	 * and the change that completes it (which must not be streamed apart)
	 * only while streaming is on, so one begun with it off could be
	 * streamed at the wrong place.  Off at any time: a transaction already
	 * streamed goes on through the stream callbacks (data->streams).
	 */
	if (stream && !ctx->streaming && !dlist_is_empty(&ctx->reorder->toplevel_by_lsn))
		return;
	ctx->streaming = stream;
}

/*
 * Between two rounds of decoding.  A transaction cut short by a crash ends
 * with no abort record: PostgreSQL forgets it once the WAL shows it no
 * longer runs.  15.20 calls stream_abort then (TAP 016 passes without what
 * follows), older releases of PostgreSQL did not: a spool whose
 * transaction the reorder buffer no longer knows is dropped here.  Then a
 * reload of stream_large_transactions applies.
 */
void
kb_decoder_next_round(LogicalDecodingContext *ctx)
{
	KbDecodingData *data = ctx->output_plugin_private;
	ListCell   *lc;

	foreach(lc, data->streams)
	{
		KbStreamedTxn *st = lfirst(lc);
		bool		found;

		(void) hash_search(ctx->reorder->by_txn, &st->xid, HASH_FIND, &found);
		if (!found)
		{
			end_stream(ctx, st);
			break;				/* the list changed; the next round sees the rest */
		}
	}
	update_streaming(ctx, data);
}

/* Whether a transaction streamed to ctx's plugin waits for its end. */
bool
kb_decoder_stream_open(LogicalDecodingContext *ctx)
{
	KbDecodingData *data = ctx->output_plugin_private;

	return data != NULL && data->streams != NIL;
}

static void
kb_begin(LogicalDecodingContext *ctx, ReorderBufferTXN *txn)
{
	KbDecodingData *data = ctx->output_plugin_private;

	update_streaming(ctx, data);

	/* nothing is written until the transaction has a record */
	data->publisher = data->output == KB_OUTPUT_KAFKA ? kb_publisher_of(ctx) : NULL;
	data->txn_has_records = false;
	data->txn_meta_ready = false;
	data->seq = 0;
}

static void
kb_commit(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
		  XLogRecPtr commit_lsn)
{
	KbDecodingData *data = ctx->output_plugin_private;

	/* lets the walsender confirm and keep alive past skipped transactions */
	OutputPluginUpdateProgress(ctx, !data->txn_has_records);
	data->changes_since_progress = 0;

	if (data->txn_has_records && data->publisher)
		kb_publisher_commit(data->publisher, txn->end_lsn);
	else if (data->txn_has_records && data->output == KB_OUTPUT_KAFKA)
	{
		OutputPluginPrepareWrite(ctx, true);
		pq_sendbyte(ctx->out, KB_FRAME_COMMIT);
		pq_sendint64(ctx->out, txn->end_lsn);
		pq_sendint64(ctx->out, commit_lsn);
		pq_sendint64(ctx->out, txn->xact_time.commit_time);
		pq_sendint32(ctx->out, txn->xid);
		OutputPluginWrite(ctx, true);
	}
	data->txn_has_records = false;
	data->txn_meta_ready = false;
	data->seq = 0;
}

/*
 * In a long run of changes that produce nothing, let the walsender send a
 * keepalive now and then, so the receiver does not time out.
 */
static void
update_progress(LogicalDecodingContext *ctx, KbDecodingData *data)
{
	if (++data->changes_since_progress >= KB_CHANGES_PER_PROGRESS)
	{
		OutputPluginUpdateProgress(ctx, false);
		data->changes_since_progress = 0;
	}
}

static void
kb_change(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
		  Relation relation, ReorderBufferChange *change)
{
	KbDecodingData *data = ctx->output_plugin_private;
	KbRelEntry *entry;
	HeapTuple	newtuple;
	HeapTuple	oldtuple;
	Datum	   *newvalues = NULL;
	bool	   *newnulls = NULL;
	Datum	   *oldvalues = NULL;
	bool	   *oldnulls = NULL;
	bool		has_key;
	MemoryContext old;

	update_progress(ctx, data);
	entry = get_entry(data, relation);
	if (!entry->published)
		return;

	old = MemoryContextSwitchTo(data->change_cxt);
	prepare_transaction(data, txn);

	newtuple = change->data.tp.newtuple ? &change->data.tp.newtuple->tuple : NULL;
	oldtuple = change->data.tp.oldtuple ? &change->data.tp.oldtuple->tuple : NULL;
	if (newtuple)
		deform_row(entry, relation, newtuple, &newvalues, &newnulls);
	if (oldtuple)
		deform_row(entry, relation, oldtuple, &oldvalues, &oldnulls);

	switch (change->action)
	{
		case REORDER_BUFFER_CHANGE_INSERT:
			if (newtuple == NULL)
				break;
			has_key = build_key(entry, &data->key, newvalues, newnulls);
			emit_put(ctx, data, entry, has_key ? &data->key : NULL,
					 newvalues, newnulls);
			break;

		case REORDER_BUFFER_CHANGE_UPDATE:
			if (newtuple == NULL)
				break;
			if (oldtuple)
			{
				/*
				 * The old row is logged when the key changed, when it has
				 * TOASTed key columns, and always with REPLICA IDENTITY FULL.
				 * An unchanged TOASTed column of the new row then has its
				 * value there.
				 */
				for (int i = 0; i < entry->shape->ncolumns; i++)
				{
					KbColumn   *col = &entry->shape->columns[i];
					int			n = col->attnum - 1;

					if (!newnulls[n] && !oldnulls[n] &&
						kb_datum_is_unchanged_toast(newvalues[n], col) &&
						!kb_datum_is_unchanged_toast(oldvalues[n], col))
						newvalues[n] = oldvalues[n];
				}
			}
			has_key = build_key(entry, &data->key, newvalues, newnulls);

			/*
			 * A new key is a new Kafka record key: delete the row under its
			 * old key first, or consumers and compacted topics would keep it.
			 */
			if (oldtuple &&
				build_key(entry, &data->old_key, oldvalues, oldnulls) &&
				(!has_key || strcmp(data->key.data, data->old_key.data) != 0))
				emit_delete(ctx, data, entry, &data->old_key, oldvalues,
							oldnulls, false);
			emit_put(ctx, data, entry, has_key ? &data->key : NULL,
					 newvalues, newnulls);
			break;

		case REORDER_BUFFER_CHANGE_DELETE:
			has_key = build_key(entry, &data->key, oldvalues, oldnulls);
			emit_delete(ctx, data, entry, has_key ? &data->key : NULL,
						oldvalues, oldnulls, true);
			break;

		default:
			elog(ERROR, "unexpected change type %d", (int) change->action);
	}

	MemoryContextSwitchTo(old);
	MemoryContextReset(data->change_cxt);
}

/*
 * One TRUNCATE event per truncated published table.  A partition whose
 * events go out as its ancestor's is skipped: truncating the ancestor lists
 * the ancestor too, and a partition truncated alone must not look like its
 * whole ancestor truncated.
 */
static void
kb_truncate(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
			int nrelations, Relation relations[], ReorderBufferChange *change)
{
	KbDecodingData *data = ctx->output_plugin_private;
	KbRelEntry **targets;
	int			ntargets = 0;
	MemoryContext old;

	/*
	 * Keyed {}, which no row has: compacted topics refuse records without a
	 * key, and keep the latest TRUNCATE after the rows it removed.
	 */
	StringInfoData truncate_key = {.data = "{}",.len = 2,.maxlen = 3};

	update_progress(ctx, data);
	targets = MemoryContextAlloc(data->change_cxt, sizeof(KbRelEntry *) * nrelations);
	for (int i = 0; i < nrelations; i++)
	{
		KbRelEntry *entry = get_entry(data, relations[i]);

		if (entry->published && entry->target_relid == entry->relid)
			targets[ntargets++] = entry;
	}
	old = MemoryContextSwitchTo(data->change_cxt);
	if (ntargets > 0)
		prepare_transaction(data, txn);
	for (int i = 0; i < ntargets; i++)
	{
		KbRelEntry *entry = targets[i];
		bool		last = (i == ntargets - 1);
		bool		flat = entry->format == KB_FORMAT_FLAT;

		record_begin(ctx, data, entry, KB_TRUNCATE, &truncate_key, flat, false, last);
		if (!flat)
		{
			envelope_begin(ctx->out, data, entry, KB_TRUNCATE);
			appendStringInfoString(ctx->out, "null}");
		}
		record_end(ctx, data, entry, KB_TRUNCATE, flat, last);
	}
	MemoryContextSwitchTo(old);
	MemoryContextReset(data->change_cxt);
}

/*
 * Why a logical message with kafka_bridge's prefix is not a record frame
 * as kafka_bridge.send() writes one, or NULL.  Whoever may call
 * pg_logical_emit_message() can write such a message: one that does not
 * parse would stop the publisher at it for good, and one that carries the
 * headers appliers trust (origin, lsn, seq, commit_time) could hide an
 * instance's changes from them.
 */
static const char *
send_frame_problem(const char *message, Size size)
{
	const char *p = message;
	const char *end = message + size;
	uint32		u32;
	uint16		u16;
	int32		len;

#define FRAME_NEED(n) \
	do { if ((Size) (end - p) < (Size) (n)) return "it ends in the middle of its record"; } while (0)
#define FRAME_INT32(v) \
	do { FRAME_NEED(4); memcpy(&u32, p, 4); p += 4; (v) = (int32) pg_ntoh32(u32); } while (0)
#define FRAME_INT16(v) \
	do { FRAME_NEED(2); memcpy(&u16, p, 2); p += 2; (v) = pg_ntoh16(u16); } while (0)
/* bytes after their int32 length, -1 for null */
#define FRAME_SKIP_BYTES() \
	do { \
		FRAME_INT32(len); \
		if (len < -1) \
			return "a length in it is negative"; \
		if (len > 0) \
		{ \
			FRAME_NEED(len); \
			p += len; \
		} \
	} while (0)

	FRAME_NEED(1);
	if (*p != KB_VALUE_KIND_JSON && *p != KB_VALUE_KIND_TEXT && *p != KB_VALUE_KIND_BYTES)
		return "its value kind is unknown";
	p++;
	FRAME_INT32(len);
	if (len < 0)
		return "its topic length is negative";
	FRAME_NEED(len);
	if (kb_topic_problem(p, len))
		return "its topic is no valid Kafka topic name";
	p += len;
	FRAME_SKIP_BYTES();			/* the key */
	FRAME_SKIP_BYTES();			/* the value */
	{
		int			nheaders;

		FRAME_INT16(nheaders);
		for (int i = 0; i < nheaders; i++)
		{
			int			name_len;

			FRAME_INT16(name_len);
			if (name_len == 0)
				return "a header name in it is empty";
			FRAME_NEED(name_len);
			if (kb_reserved_header(p, name_len))
				return "it carries a header that kafka_bridge keeps for its own (origin, lsn, seq or commit_time)";
			p += name_len;
			FRAME_SKIP_BYTES();	/* its value */
		}
	}
	if (p != end)
		return "it has bytes after its record";
	return NULL;
#undef FRAME_NEED
#undef FRAME_INT32
#undef FRAME_INT16
#undef FRAME_SKIP_BYTES
}

/*
 * Logical messages: those with prefix kafka_bridge are the records of
 * kafka_bridge.send(); any other is none of ours.
 */
static void
kb_message(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
		   XLogRecPtr message_lsn, bool transactional, const char *prefix,
		   Size message_size, const char *message)
{
	KbDecodingData *data = ctx->output_plugin_private;
	StringInfoData in;
	StringInfo	out = ctx->out;
	char		kind;
	int			len;
	int			nheaders;

	/* only kafka_bridge.send(), which is always transactional */
	if (!transactional || strcmp(prefix, KB_MESSAGE_PREFIX) != 0)
		return;
	{
		const char *problem = send_frame_problem(message, message_size);

		if (problem)
		{
			ereport(WARNING,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("kafka_bridge skips a logical message with the prefix \"%s\" that is no Kafka record: %s",
							KB_MESSAGE_PREFIX, problem),
					 errdetail("The message at %X/%X was not written by kafka_bridge.send().",
							   LSN_FORMAT_ARGS(message_lsn)),
					 errhint("Messages with the prefix \"%s\" become Kafka records: write them with kafka_bridge.send() only.",
							 KB_MESSAGE_PREFIX)));
			return;
		}
	}

	/* the message is a record frame but for its first byte */
	if (data->stream)
	{
		resetStringInfo(&data->spool_rec);
		appendStringInfoChar(&data->spool_rec, KB_SPOOL_SEND);
		appendBinaryStringInfo(&data->spool_rec, message + 1, message_size - 1);
		kb_spool_append(data->stream->spool, data->stream_lsn, data->stream_xid,
						data->spool_rec.data, data->spool_rec.len);
		data->txn_has_records = true;
		return;
	}
	if (data->publisher)
	{
		kb_publisher_produce_send(data->publisher, message + 1, message_size - 1);
		data->txn_has_records = true;
		return;
	}

	OutputPluginPrepareWrite(ctx, true);
	if (data->output == KB_OUTPUT_KAFKA)
	{
		pq_sendbyte(out, KB_FRAME_SEND_RECORD);
		pq_sendbytes(out, message + 1, message_size - 1);
		OutputPluginWrite(ctx, true);
		data->txn_has_records = true;
		return;
	}

	/* json output: {"topic":...,"key":...,"headers":{...},"value":...} */
	in.data = (char *) message;
	in.len = message_size;
	in.maxlen = message_size;
	in.cursor = 0;
	kind = pq_getmsgbyte(&in);

	appendStringInfoString(out, "{\"topic\":");
	len = pq_getmsgint(&in, 4);
	kb_append_json_string(out, pnstrdup(pq_getmsgbytes(&in, len), len));
	appendStringInfoString(out, ",\"key\":");
	len = pq_getmsgint(&in, 4);
	if (len < 0)
		appendStringInfoString(out, "null");
	else
		kb_append_json_string(out, pnstrdup(pq_getmsgbytes(&in, len), len));

	/* the value comes before the headers in the message */
	len = pq_getmsgint(&in, 4);
	{
		const char *value = len >= 0 ? pq_getmsgbytes(&in, len) : NULL;
		int			value_len = len;

		appendStringInfoString(out, ",\"headers\":{");
		nheaders = pq_getmsgint(&in, 2);
		for (int i = 0; i < nheaders; i++)
		{
			int			name_len = pq_getmsgint(&in, 2);
			const char *name = pq_getmsgbytes(&in, name_len);
			int			hv_len;

			if (i > 0)
				appendStringInfoChar(out, ',');
			kb_append_json_string(out, pnstrdup(name, name_len));
			appendStringInfoChar(out, ':');
			hv_len = pq_getmsgint(&in, 4);
			if (hv_len < 0)
				appendStringInfoString(out, "null");
			else
				kb_append_json_string(out, pnstrdup(pq_getmsgbytes(&in, hv_len), hv_len));
		}
		appendStringInfoString(out, "},\"value\":");
		if (value == NULL)
			appendStringInfoString(out, "null");
		else if (kind == KB_VALUE_KIND_JSON)
			appendBinaryStringInfo(out, value, value_len);
		else if (kind == KB_VALUE_KIND_BYTES)
		{
			appendStringInfoString(out, "\"\\\\x");
			for (int i = 0; i < value_len; i++)
				appendStringInfo(out, "%02x", (unsigned char) value[i]);
			appendStringInfoChar(out, '"');
		}
		else
			kb_append_json_string(out, pnstrdup(value, value_len));
	}
	appendStringInfoChar(out, '}');
	OutputPluginWrite(ctx, true);
	data->txn_has_records = true;
}

/* ---- streamed transactions (publisher only) ---- */

static KbStreamedTxn *
find_stream(KbDecodingData *data, TransactionId xid)
{
	ListCell   *lc;

	foreach(lc, data->streams)
	{
		KbStreamedTxn *st = lfirst(lc);

		if (st->xid == xid)
			return st;
	}
	return NULL;
}

static void
drop_stream(KbDecodingData *data, KbStreamedTxn *st)
{
	data->streams = list_delete_ptr(data->streams, st);
	kb_spool_close(st->spool);
	pfree(st);
}

/* A streamed transaction ended: its spool goes, the status shows what it did before. */
static void
end_stream(LogicalDecodingContext *ctx, KbStreamedTxn *st)
{
	drop_stream(ctx->output_plugin_private, st);
	if (kb_publisher_of(ctx))
		kb_publisher_report_end(kb_publisher_of(ctx));
}

static void
kb_shutdown(LogicalDecodingContext *ctx)
{
	KbDecodingData *data = ctx->output_plugin_private;

	while (data->streams != NIL)
		drop_stream(data, linitial(data->streams));
}

/* A block of changes of txn comes: its records go to its spool. */
static void
kb_stream_start(LogicalDecodingContext *ctx, ReorderBufferTXN *txn)
{
	KbDecodingData *data = ctx->output_plugin_private;
	KbStreamedTxn *st = find_stream(data, txn->xid);

	if (st == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(ctx->context);

		st = palloc(sizeof(KbStreamedTxn));
		st->xid = txn->xid;
		st->spool = kb_spool_create(ctx->context);
		data->streams = lappend(data->streams, st);
		MemoryContextSwitchTo(old);
	}
	data->publisher = kb_publisher_of(ctx);
	data->stream = st;
}

static void
kb_stream_stop(LogicalDecodingContext *ctx, ReorderBufferTXN *txn)
{
	KbDecodingData *data = ctx->output_plugin_private;

	/* a transaction streamed for minutes shows how far it got */
	if (data->publisher && data->stream)
		kb_publisher_report(data->publisher,
							"keeping the records of transaction %u until its end: " UINT64_FORMAT " so far",
							data->stream->xid, kb_spool_records(data->stream->spool));
	data->stream = NULL;
}

/*
 * txn rolled back: a top transaction drops its spool, a subtransaction
 * the records from its first change on.
 */
static void
kb_stream_abort(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
				XLogRecPtr abort_lsn)
{
	KbDecodingData *data = ctx->output_plugin_private;
	KbStreamedTxn *st = find_stream(data, txn->toptxn ? txn->toptxn->xid : txn->xid);

	if (st == NULL)
		return;
	if (txn->toptxn)
		kb_spool_cut(st->spool, txn->first_lsn);
	else
		end_stream(ctx, st);
}

static void
kb_stream_change(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
				 Relation relation, ReorderBufferChange *change)
{
	KbDecodingData *data = ctx->output_plugin_private;

	data->stream_lsn = change->lsn;
	data->stream_xid = change->txn->xid;
	kb_change(ctx, txn, relation, change);
}

static void
kb_stream_truncate(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
				   int nrelations, Relation relations[],
				   ReorderBufferChange *change)
{
	KbDecodingData *data = ctx->output_plugin_private;

	data->stream_lsn = change->lsn;
	data->stream_xid = change->txn->xid;
	kb_truncate(ctx, txn, nrelations, relations, change);
}

/* PostgreSQL does not say which subtransaction sent a message. */
static void
kb_stream_message(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
				  XLogRecPtr message_lsn, bool transactional,
				  const char *prefix, Size message_size, const char *message)
{
	KbDecodingData *data = ctx->output_plugin_private;

	data->stream_lsn = message_lsn;
	data->stream_xid = InvalidTransactionId;
	kb_message(ctx, txn, message_lsn, transactional, prefix, message_size, message);
}

/* Produce a row record read back from a spool, its transaction now known. */
static void
replay_row(KbDecodingData *data, StringInfo rec, StringInfo value)
{
	KbSpooledRecord head;
	const char *p = rec->data + sizeof(head);
	const char *topic,
			   *event,
			   *key = NULL,
			   *v = NULL;
	int			value_len = 0;
	KbEventHeaders headers;

	memcpy(&head, rec->data, sizeof(head));
	topic = p;
	p += head.topic_len;
	event = p;
	p += head.event_len;
	if (head.key_len >= 0)
	{
		key = p;
		p += head.key_len;
	}
	if (head.value_len >= 0)
	{
		v = p;
		value_len = head.value_len;
		if (head.meta_at >= 0)
		{
			resetStringInfo(value);
			appendBinaryStringInfo(value, v, head.meta_at);
			appendBinaryStringInfo(value, data->txn_meta.data, data->txn_meta.len);
			appendBinaryStringInfo(value, v + head.meta_at, head.value_len - head.meta_at);
			v = value->data;
			value_len = value->len;
		}
	}

	/*
	 * numbered as record_begin numbers a decoded record: only a tombstone
	 * shares a number, not any null value (a flat TRUNCATE or DELETE)
	 */
	if (!head.tombstone || data->seq == 0)
	{
		data->seq_len = pg_ultoa_n(++data->seq, data->seq_text);
		data->seq_text[data->seq_len] = '\0';
	}
	headers = (KbEventHeaders) {
		.event = event,
		.origin = data->origin,
		.lsn = data->include_lsn ? data->lsn : NULL,
		.seq = data->seq_text,
		.commit_time = data->include_timestamp ? data->commit_time : NULL,
		.event_len = head.event_len,
		.origin_len = data->origin_len,
		.lsn_len = data->lsn_len,
		.seq_len = data->seq_len,
		.commit_time_len = data->commit_time_len
	};
	kb_publisher_produce(data->publisher, NULL, topic, head.topic_len,
						 key, Max(head.key_len, 0), v, value_len, &headers, 0);
}

/*
 * A streamed transaction committed: produce its records from its spool,
 * in order, then commit as a decoded transaction does.  PostgreSQL has
 * streamed its last changes just before.
 */
static void
kb_stream_commit(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
				 XLogRecPtr commit_lsn)
{
	KbDecodingData *data = ctx->output_plugin_private;
	KbStreamedTxn *st = find_stream(data, txn->xid);

	kb_begin(ctx, txn);
	Assert(data->publisher != NULL);
	if (st != NULL && kb_spool_records(st->spool) > 0)
	{
		MemoryContext old = MemoryContextSwitchTo(data->change_cxt);
		StringInfoData value;
		uint64		n = 0;

		initStringInfo(&value);
		prepare_transaction(data, txn);
		kb_publisher_report(data->publisher,
							"producing the " UINT64_FORMAT " records of transaction %u, committed",
							kb_spool_records(st->spool), st->xid);
		kb_spool_rewind(st->spool);
		while (kb_spool_next(st->spool, &data->spool_rec))
		{
			if (data->spool_rec.data[0] == KB_SPOOL_SEND)
				kb_publisher_produce_send(data->publisher, data->spool_rec.data + 1,
										  data->spool_rec.len - 1);
			else
				replay_row(data, &data->spool_rec, &value);
			if ((++n % KB_REPLAY_BATCH) == 0)
			{
				CHECK_FOR_INTERRUPTS();

				/*
				 * A delivery failed: nothing more is produced, and the
				 * publisher starts again from the confirmed position, so
				 * the rest of the spool need not be read.
				 */
				if (kb_publisher_failed(data->publisher))
					break;
			}
		}
		data->txn_has_records = true;
		MemoryContextSwitchTo(old);
		MemoryContextReset(data->change_cxt);
	}
	if (st != NULL)
		end_stream(ctx, st);
	kb_commit(ctx, txn, commit_lsn);
}

/* Changes kafka_bridge applied from Kafka carry an origin: no echo. */
static bool
kb_filter_by_origin(LogicalDecodingContext *ctx, RepOriginId origin_id)
{
	KbDecodingData *data = ctx->output_plugin_private;

	return origin_id != InvalidRepOriginId && !data->include_origins;
}
