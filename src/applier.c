/*-------------------------------------------------------------------------
 * applier.c
 *	  The applier worker: consumes the subscribed topics and applies their
 *	  events to the tables, storing in PostgreSQL, in the same transaction,
 *	  how far it got in each partition.
 *
 * Exactly-once effect.  The consumer assigns itself every partition of the
 * subscribed topics, starting at the offsets kafka_bridge.apply_progress
 * holds, and each batch of records commits its rows together with the next
 * offsets: a crash anywhere means starting again from the last commit,
 * with nothing applied twice and nothing skipped.  Kafka's consumer group
 * (kafka_bridge.<instance_id>.<database>) gets the offsets afterwards, only
 * so that Kafka's tools show the progress.
 *
 * Replays.  The publisher delivers at least once: after a crash or an
 * outage it sends again records the broker had, at new offsets.  Every
 * record carries its origin instance, the LSN of its transaction's commit
 * and its number in that transaction; kafka_bridge.apply_origins keeps the
 * last one applied per partition and origin, and anything at or before it
 * is skipped.
 *
 * No echo.  The applier's transactions run under a replication origin,
 * which the output plugin filters out, so applied rows are never published
 * again; records whose origin is this instance are skipped.
 *
 * Bad records.  A batch is first applied in one go.  If PostgreSQL refuses
 * something, the batch is applied again record by record, each in a
 * subtransaction, and a record that fails goes to kafka_bridge.dead_letters
 * with the reason while the others are applied.  Errors that are no
 * record's fault (deadlock, lack of resources, shutdown) instead roll the
 * batch back and retry it after a pause.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "replication/origin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/pg_lsn.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/datetime.h"
#include "utils/lsyscache.h"
#include "storage/lmgr.h"
#include "access/commit_ts.h"
#include "catalog/namespace.h"

#include "apply.h"
#include "kafka_bridge.h"

/* how long one batch may gather records while they keep coming */
#define KB_BATCH_MS 100
/* longest wait for a record, so the loop still sees signals and reloads */
#define KB_POLL_MS 100
/* metadata (partitions of the subscribed topics) refresh */
#define KB_METADATA_MS 5000
#define KB_METADATA_TIMEOUT_MS 2000

/* The last record applied from one origin in one partition. */
typedef struct OriginMark
{
	char	   *origin;
	XLogRecPtr	lsn;			/* committed */
	uint32		seq;
	XLogRecPtr	new_lsn;		/* in the batch being applied */
	uint32		new_seq;
} OriginMark;

/* The replication origin a source instance's changes are applied under. */
typedef struct InstanceOrigin
{
	char	   *instance;
	RepOriginId id;
} InstanceOrigin;

typedef struct TopicPartition
{
	char		topic[256];
	int32		partition;
} TopicPartition;

typedef struct PartitionProgress
{
	TopicPartition key;			/* hash key */
	KbSubscription *sub;
	int64		next_offset;	/* committed; -1 when none stored yet */
	int64		high;			/* end of the partition, last seen */
	List	   *origins;		/* OriginMark */
	/* the batch being applied */
	bool		touched;
	int64		new_next;
	int64		consumed;
	int64		applied;
	int64		skipped;
	int64		dead;
	char	   *last_error;
} PartitionProgress;

typedef struct Applier
{
	int			slot;
	const char *dbname;
	char	   *group_id;
	KbKafkaClient *client;
	bool		have_extension;
	MemoryContext subs_cxt;		/* subscriptions */
	MemoryContext partitions_cxt;	/* partition states, reset with them */
	List	   *subs;			/* KbSubscription */
	char	   *subs_signature;
	HTAB	   *partitions;
	int			npartitions;
	bool		reassign;		/* the assignment must be (re)made */
	TimestampTz next_check;
	TimestampTz next_metadata;
	TimestampTz retry_at;
	int			backoff_ms;
	RepOriginId origin;			/* for events that carry no version */
	List	   *origins;		/* InstanceOrigin, in TopMemoryContext */
	Oid			subs_relid;		/* kafka_bridge.subscriptions */
	uint32		subs_version;	/* kb_status_subscriptions_version() last read */
	TimestampTz next_prune;
	MemoryContext record_cxt;	/* reset after each record */
	bool		busy;			/* the last batch had records */
	bool		subs_changed;	/* a batch met new subscriptions */
} Applier;

static Applier ap;

static void
report(KbWorkerState state, const char *activity)
{
	kb_status_set(ap.slot, state, activity);
	pgstat_report_activity(STATE_IDLE, activity);
}

static void
begin_work(const char *what)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	pgstat_report_activity(STATE_RUNNING, what);
}

static void
end_work(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
}

/* Forget the partitions; they are loaded again from the tables. */
static void
forget_partitions(void)
{
	if (ap.partitions)
		hash_destroy(ap.partitions);
	ap.partitions = NULL;
	/* their origin marks and errors too, read again from the tables */
	MemoryContextReset(ap.partitions_cxt);
	ap.npartitions = 0;
	ap.reassign = true;
	ap.next_metadata = 0;
}

static void
drop_consumer(void)
{
	if (ap.client)
	{
		rd_kafka_t *rk = kb_kafka_client_handle(ap.client);

		rd_kafka_assign(rk, NULL);
		rd_kafka_consumer_close(rk);
		kb_kafka_client_destroy(ap.client);
	}
	ap.client = NULL;
	forget_partitions();
}

/*
 * The subscriptions the applier can serve (in a transaction, SPI
 * connected): one refused (its apply role dropped, or the table's owner
 * not a member of it) waits, with an error in the status, and nothing of
 * its topic is lost.
 */
static List *
read_subscriptions(bool lock)
{
	List	   *subs = kb_load_subscriptions(lock);
	ListCell   *lc;

	foreach(lc, subs)
	{
		KbSubscription *s = lfirst(lc);
		char	   *refusal = kb_subscription_refusal(s);

		if (refusal)
		{
			kb_status_set_error(ap.slot, KB_STATE_ERROR, "%s", refusal);
			subs = foreach_delete_current(subs, lc);
		}
		else if (s->policy != KB_POLICY_APPLY_REMOTE && !track_commit_timestamp)
		{
			kb_status_set_error(ap.slot, KB_STATE_ERROR,
								"topic \"%s\" is not applied: its conflict_policy %s needs track_commit_timestamp, which is off; set track_commit_timestamp = on and restart, or subscribe with conflict_policy => 'apply_remote'",
								s->topic, kb_conflict_policy_name(s->policy));
			subs = foreach_delete_current(subs, lc);
		}
	}
	return subs;
}

/* What the applier's assignment and plans depend on, as one string. */
static char *
subscriptions_signature(List *subs)
{
	StringInfoData sig;
	ListCell   *lc;

	initStringInfo(&sig);
	foreach(lc, subs)
	{
		KbSubscription *s = lfirst(lc);

		/*
		 * The row's xmin too: an unsubscribe() and a subscribe() of the
		 * same table and topic between two looks (or in one transaction)
		 * dropped its progress, and the offsets and replay marks kept in
		 * memory must go with it
		 */
		appendStringInfo(&sig, "%u|%s|%d|%s|%u|%d|%u;", s->relid, s->topic, (int) s->format,
						 s->event_prefix, s->apply_role, (int) s->policy, s->row_xmin);
	}
	return sig.data;
}

/*
 * Read the subscriptions; when they changed, start over with a new
 * assignment.  Also makes sure the replication origin exists.
 */
static void
check_subscriptions(void)
{
	List	   *subs = NIL;
	char	   *sig;
	ListCell   *lc;
	MemoryContext cxt = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	pgstat_report_activity(STATE_RUNNING, "reading kafka_bridge.subscriptions");
	ap.have_extension = OidIsValid(get_extension_oid(KB_EXTENSION_NAME, true));
	if (!ap.have_extension)
		ap.subs_version = kb_status_subscriptions_version();
	else
	{
		ap.subs_relid = get_relname_relid("subscriptions",
										  get_namespace_oid(KB_SCHEMA_NAME, false));

		/*
		 * The version, then the snapshot, under the lock subscribe() and
		 * unsubscribe() conflict with: a change that bumped the version
		 * but has not committed yet would else leave its new version with
		 * the old list, and the next batch would be applied by the list
		 * the change replaced.
		 */
		LockRelationOid(ap.subs_relid, RowShareLock);
		ap.subs_version = kb_status_subscriptions_version();
		PushActiveSnapshot(GetTransactionSnapshot());
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		MemoryContextSwitchTo(cxt);
		subs = read_subscriptions(false);
		SPI_finish();
		PopActiveSnapshot();
		if (ap.origin == InvalidRepOriginId)
		{
			char		name[NAMEDATALEN];

			snprintf(name, sizeof(name), "kafka_bridge_%u", MyDatabaseId);
			ap.origin = replorigin_by_name(name, true);
			if (ap.origin == InvalidRepOriginId)
				ap.origin = replorigin_create(name);
		}
	}
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
	pgstat_report_activity(STATE_IDLE, NULL);


	sig = subscriptions_signature(subs);
	if (ap.subs_signature && strcmp(sig, ap.subs_signature) == 0)
		return;

	/* changed: keep the new list, and rebuild everything that hangs on it */
	drop_consumer();
	kb_apply_reset();
	MemoryContextReset(ap.subs_cxt);
	ap.subs = NIL;
	MemoryContextSwitchTo(ap.subs_cxt);
	foreach(lc, subs)
	{
		KbSubscription *s = lfirst(lc);
		KbSubscription *copy = palloc(sizeof(KbSubscription));

		*copy = *s;
		copy->topic = pstrdup(s->topic);
		copy->event_prefix = pstrdup(s->event_prefix);
		ap.subs = lappend(ap.subs, copy);
	}
	ap.subs_signature = pstrdup(sig);
	MemoryContextSwitchTo(cxt);
	if (ap.subs != NIL)
		ereport(LOG,
				(errmsg_plural("kafka_bridge applier for database \"%s\" applies %d subscribed topic",
							   "kafka_bridge applier for database \"%s\" applies %d subscribed topics",
							   list_length(ap.subs), ap.dbname, list_length(ap.subs))));
}

/* Load a partition's stored offset and origin marks (SPI connected). */
static void
load_partition(PartitionProgress *ps)
{
	Oid			types[2] = {TEXTOID, INT4OID};
	Datum		values[2];
	MemoryContext old;

	values[0] = CStringGetTextDatum(ps->key.topic);
	values[1] = Int32GetDatum(ps->key.partition);
	ps->next_offset = -1;
	if (SPI_execute_with_args("SELECT next_offset, high_watermark FROM kafka_bridge.apply_progress "
							  "WHERE topic = $1 AND partition = $2",
							  2, types, values, NULL, true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
	{
		bool		isnull;

		ps->next_offset = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		ps->high = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	}
	if (SPI_execute_with_args("SELECT origin, lsn, seq FROM kafka_bridge.apply_origins "
							  "WHERE topic = $1 AND partition = $2",
							  2, types, values, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "reading kafka_bridge.apply_origins failed");
	old = MemoryContextSwitchTo(ap.partitions_cxt);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		OriginMark *m = palloc0(sizeof(OriginMark));
		bool		isnull;

		m->origin = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		m->lsn = DatumGetLSN(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull));
		m->seq = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 3, &isnull));
		ps->origins = lappend(ps->origins, m);
	}
	MemoryContextSwitchTo(old);
}

/*
 * Find the partitions of every subscribed topic; assign them all to the
 * consumer, each at its stored offset, when the set changed.  Returns
 * false with *error when the brokers did not answer.
 */
static bool
refresh_assignment(char *error, size_t error_size, char *waiting, size_t waiting_size)
{
	rd_kafka_t *rk = kb_kafka_client_handle(ap.client);
	ListCell   *lc;
	List	   *found = NIL;	/* TopicPartition */
	rd_kafka_topic_partition_list_t *list;

	waiting[0] = '\0';
	pgstat_report_activity(STATE_RUNNING, "reading the partitions of the subscribed topics");
	foreach(lc, ap.subs)
	{
		KbSubscription *s = lfirst(lc);
		rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, s->topic, NULL);
		const struct rd_kafka_metadata *md = NULL;
		rd_kafka_resp_err_t err;

		err = rd_kafka_metadata(rk, 0, rkt, &md, KB_METADATA_TIMEOUT_MS);
		rd_kafka_topic_destroy(rkt);
		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			const char *last = kb_kafka_client_last_error(ap.client);

			snprintf(error, error_size, "cannot read the partitions of topic \"%s\" at \"%s\": %s%s%s",
					 s->topic, kb_bootstrap_servers, rd_kafka_err2str(err),
					 last[0] ? ": " : "", last);
			return false;
		}
		if (md->topic_cnt != 1 || md->topics[0].err != RD_KAFKA_RESP_ERR_NO_ERROR ||
			md->topics[0].partition_cnt == 0)
		{
			if (waiting[0] == '\0')
				snprintf(waiting, waiting_size, "waiting for topic \"%s\" to exist", s->topic);
		}
		else
		{
			for (int p = 0; p < md->topics[0].partition_cnt; p++)
			{
				TopicPartition *k = palloc0(sizeof(TopicPartition));

				strlcpy(k->topic, s->topic, sizeof(k->topic));
				k->partition = md->topics[0].partitions[p].id;
				found = lappend(found, k);
			}
		}
		rd_kafka_metadata_destroy(md);
	}
	pgstat_report_activity(STATE_IDLE, NULL);

	if (ap.partitions == NULL)
	{
		HASHCTL		ctl = {0};

		ctl.keysize = sizeof(TopicPartition);
		ctl.entrysize = sizeof(PartitionProgress);
		ctl.hcxt = ap.partitions_cxt;
		ap.partitions = hash_create("kafka_bridge partitions", 64, &ctl,
									HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}

	/* new partitions: read where we stand in them */
	foreach(lc, found)
	{
		TopicPartition *k = lfirst(lc);
		ListCell   *sc;
		bool		exists;
		PartitionProgress *ps = hash_search(ap.partitions, k, HASH_ENTER, &exists);

		if (exists)
			continue;
		memset(((char *) ps) + sizeof(TopicPartition), 0, sizeof(PartitionProgress) - sizeof(TopicPartition));
		foreach(sc, ap.subs)
			if (strcmp(((KbSubscription *) lfirst(sc))->topic, k->topic) == 0)
				ps->sub = lfirst(sc);
		begin_work("reading where the applier stands in the subscribed topics");
		load_partition(ps);
		end_work();
		ap.npartitions++;
		ap.reassign = true;
	}
	if (!ap.reassign)
		return true;

	list = rd_kafka_topic_partition_list_new(Max(ap.npartitions, 1));
	{
		HASH_SEQ_STATUS status;
		PartitionProgress *ps;

		hash_seq_init(&status, ap.partitions);
		while ((ps = hash_seq_search(&status)) != NULL)
			rd_kafka_topic_partition_list_add(list, ps->key.topic, ps->key.partition)->offset =
				ps->next_offset >= 0 ? ps->next_offset : RD_KAFKA_OFFSET_BEGINNING;
	}
	rd_kafka_assign(rk, list);
	rd_kafka_topic_partition_list_destroy(list);
	ap.reassign = false;
	return true;
}

/* ---- One batch ---- */

static char *
header_text(rd_kafka_headers_t *hdrs, const char *name)
{
	const void *value;
	size_t		size;

	if (hdrs == NULL || rd_kafka_header_get_last(hdrs, name, &value, &size) != RD_KAFKA_RESP_ERR_NO_ERROR ||
		value == NULL)
		return NULL;
	return pnstrdup(value, size);
}

/* ---- Source transactions ---- */

/* What the records of one source transaction share. */
typedef struct UnitVersion
{
	char	   *origin;			/* NULL: the records carry no version */
	char	   *commit_time_text;
	TimestampTz commit_time;
} UnitVersion;

/*
 * A commit time as the publisher writes it: ISO 8601 in UTC,
 * "2026-03-01T09:30:00.123456+00:00"; 0 when it is no such thing.
 */
static TimestampTz
parse_commit_time(const char *text)
{
	struct pg_tm tm = {0};
	int			len = 0;
	fsec_t		fsec = 0;
	Timestamp	result;

	if (text == NULL ||
		sscanf(text, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday,
			   &tm.tm_hour, &tm.tm_min, &tm.tm_sec, &len) != 6 || len != 19)
		return DT_NOBEGIN;
	text += len;
	if (*text == '.')
	{
		int			digits = 0;

		for (text++; isdigit((unsigned char) *text); text++, digits++)
			if (digits < 6)
				fsec = fsec * 10 + (*text - '0');
		if (digits == 0)
			return DT_NOBEGIN;
		for (; digits < 6; digits++)
			fsec *= 10;
	}
	if (strcmp(text, "+00:00") != 0 || tm2timestamp(&tm, fsec, NULL, &result) != 0 ||
		TIMESTAMP_NOT_FINITE(result))
		return DT_NOBEGIN;
	return result;
}

static void
record_version(rd_kafka_message_t *msg, char **origin, char **commit_time)
{
	rd_kafka_headers_t *hdrs = NULL;

	*origin = *commit_time = NULL;
	if (rd_kafka_message_headers(msg, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		*origin = header_text(hdrs, KB_HEADER_ORIGIN);
		*commit_time = header_text(hdrs, KB_HEADER_COMMIT_TIME);
	}
}

/*
 * Where the records from start on stop sharing a source transaction's
 * version (origin and commit time); records of this instance, which are
 * skipped, go with any.  A version is a row's commit timestamp and origin,
 * and a transaction has one of each: several source transactions in one
 * local transaction would give their rows the wrong version.
 */
static int
unit_end(rd_kafka_message_t **msgs, int start, int n, UnitVersion *uv)
{
	const char *self = kb_instance_id();
	bool		keyed = false;
	int			i;

	memset(uv, 0, sizeof(*uv));
	for (i = start; i < n; i++)
	{
		char	   *origin;
		char	   *commit_time;

		record_version(msgs[i], &origin, &commit_time);
		if (origin && strcmp(origin, self) == 0)
			continue;
		if (!keyed)
		{
			uv->origin = origin;
			uv->commit_time_text = commit_time;
			keyed = true;
			continue;
		}
		if ((origin == NULL) != (uv->origin == NULL) ||
			(commit_time == NULL) != (uv->commit_time_text == NULL) ||
			(origin && strcmp(origin, uv->origin) != 0) ||
			(commit_time && strcmp(commit_time, uv->commit_time_text) != 0))
			break;
	}
	uv->commit_time = parse_commit_time(uv->commit_time_text);
	if (uv->origin == NULL || TIMESTAMP_IS_NOBEGIN(uv->commit_time))
		uv->origin = NULL;
	return i;
}

/* Make the session's replication origin this one. */
static void
use_origin(RepOriginId id)
{
	if (replorigin_session_origin == id)
		return;
	if (replorigin_session_origin != InvalidRepOriginId)
		replorigin_session_reset();
	replorigin_session_origin = InvalidRepOriginId;
	replorigin_session_setup(id);
	replorigin_session_origin = id;
}

/*
 * The next transaction commits with the source's version: under the
 * replication origin of the source instance (created at first sight), with
 * the source's commit time as commit timestamp.  Records without a version
 * go under the applier's own origin, at the local time.
 */
static void
use_unit_version(UnitVersion *uv)
{
	RepOriginId id = ap.origin;
	ListCell   *lc;

	if (uv->origin != NULL)
	{
		id = InvalidRepOriginId;
		foreach(lc, ap.origins)
			if (strcmp(((InstanceOrigin *) lfirst(lc))->instance, uv->origin) == 0)
				id = ((InstanceOrigin *) lfirst(lc))->id;
		if (id == InvalidRepOriginId)
		{
			MemoryContext cxt = CurrentMemoryContext;
			InstanceOrigin *io;

			StartTransactionCommand();
			id = kb_origin_for_instance(uv->origin, false);
			CommitTransactionCommand();
			MemoryContextSwitchTo(TopMemoryContext);
			io = palloc(sizeof(InstanceOrigin));
			io->instance = pstrdup(uv->origin);
			io->id = id;
			ap.origins = lappend(ap.origins, io);
			MemoryContextSwitchTo(cxt);
		}
	}
	if (id == InvalidRepOriginId)
		return;					/* no extension yet: nothing is applied */
	use_origin(id);
	replorigin_session_origin_timestamp = uv->origin ? uv->commit_time : 0;
	replorigin_session_origin_lsn = InvalidXLogRecPtr;
}

/* The record's headers as a JSON object (binary values as \x hex). */
static char *
headers_json(rd_kafka_message_t *msg)
{
	rd_kafka_headers_t *hdrs = NULL;
	StringInfoData buf;
	const char *name;
	const void *value;
	size_t		size;

	if (rd_kafka_message_headers(msg, &hdrs) != RD_KAFKA_RESP_ERR_NO_ERROR || hdrs == NULL)
		return NULL;
	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	for (size_t i = 0; rd_kafka_header_get_all(hdrs, i, &name, &value, &size) == RD_KAFKA_RESP_ERR_NO_ERROR; i++)
	{
		char	   *text;

		if (i > 0)
			appendStringInfoChar(&buf, ',');
		escape_json(&buf, name);
		appendStringInfoChar(&buf, ':');
		if (value == NULL)
		{
			appendStringInfoString(&buf, "null");
			continue;
		}
		if (pg_verifymbstr(value, size, true) && memchr(value, '\0', size) == NULL)
			text = pnstrdup(value, size);
		else
		{
			text = palloc(2 * size + 3);
			strcpy(text, "\\x");
			hex_encode(value, size, text + 2);
			text[2 * size + 2] = '\0';
		}
		escape_json(&buf, text);
	}
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

/*
 * A row of kafka_bridge.dead_letters: a record at offset of the partition
 * (msg: its key, value and headers; NULL for records no longer there).
 */
static void
insert_dead_letter(PartitionProgress *ps, int64 offset, rd_kafka_message_t *msg,
				   const char *reason)
{
	Oid			types[8] = {OIDOID, TEXTOID, INT4OID, INT8OID, BYTEAOID, BYTEAOID, TEXTOID, TEXTOID};
	Datum		values[8];
	char		nulls[8] = "        ";
	char	   *headers = msg ? headers_json(msg) : NULL;

	values[0] = ObjectIdGetDatum(ps->sub->relid);
	values[1] = CStringGetTextDatum(ps->key.topic);
	values[2] = Int32GetDatum(ps->key.partition);
	values[3] = Int64GetDatum(offset);
	/* the raw bytes: text and bytea share their layout, without a check */
	if (msg && msg->key)
		values[4] = PointerGetDatum(cstring_to_text_with_len(msg->key, msg->key_len));
	else
		nulls[4] = 'n';
	if (msg && msg->payload)
		values[5] = PointerGetDatum(cstring_to_text_with_len(msg->payload, msg->len));
	else
		nulls[5] = 'n';
	if (headers)
		values[6] = CStringGetTextDatum(headers);
	else
		nulls[6] = 'n';
	values[7] = CStringGetTextDatum(reason);

	if (SPI_execute_with_args("INSERT INTO kafka_bridge.dead_letters "
							  "(table_name, topic, partition, \"offset\", key, value, headers, reason) "
							  "VALUES ($1, $2, $3, $4, $5, $6, $7::pg_catalog.jsonb, $8)",
							  8, types, values, nulls, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not insert into kafka_bridge.dead_letters");
	ps->dead++;
	if (ps->last_error)
		pfree(ps->last_error);
	ps->last_error = MemoryContextStrdup(ap.partitions_cxt, reason);
}

static void
store_dead_letter(PartitionProgress *ps, rd_kafka_message_t *msg, const char *reason)
{
	insert_dead_letter(ps, msg->offset, msg, reason);
}

/*
 * A record past the next one expected: compaction removed the records in
 * between (later ones with the same keys follow), unless the partition now
 * starts past the offset expected.  Then records were deleted (by the
 * topic's retention, or on request) before this instance applied them,
 * and the consumer went on from the first one left: the changes they
 * carried are missing here.  Nothing can bring them back, but it is said,
 * once, where a loss is looked for: a dead letter at the first offset
 * missed, and the log.
 */
static void
check_records_deleted(PartitionProgress *ps, rd_kafka_message_t *msg)
{
	rd_kafka_t *rk = kb_kafka_client_handle(ap.client);
	int64		low;
	int64		high;
	int64		last;
	char	   *reason;

	if (rd_kafka_get_watermark_offsets(rk, ps->key.topic, ps->key.partition,
									   &low, &high) != RD_KAFKA_RESP_ERR_NO_ERROR ||
		low <= ps->new_next)
		return;
	last = Min(low, msg->offset) - 1;
	reason = psprintf("the records at offsets %lld to %lld were deleted from the topic "
					  "(by its retention, or on request) before this instance applied them; "
					  "the changes they carried are missing from the table",
					  (long long) ps->new_next, (long long) last);
	insert_dead_letter(ps, ps->new_next, NULL, reason);
	ereport(LOG,
			(errmsg("kafka_bridge applier: %lld records of partition %d of topic \"%s\" were deleted before they were applied",
					(long long) (last - ps->new_next + 1), ps->key.partition, ps->key.topic),
			 errdetail("Offsets %lld to %lld; the partition now starts at offset %lld.",
					   (long long) ps->new_next, (long long) last, (long long) low),
			 errhint("Raise the topic's retention.ms above the longest time an instance may be stopped; to bring table \"%s\" up to date, run kafka_bridge.snapshot() on the instance that publishes it.",
					 get_rel_name(ps->sub->relid) ? get_rel_name(ps->sub->relid) : "?")));
}

/*
 * Run a statement through a plan prepared once and kept: the progress is
 * written by every transaction, one per source transaction.
 */
static int
execute_kept(SPIPlanPtr *plan, const char *sql, int nargs, Oid *types,
			 Datum *values, const char *nulls)
{
	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare(sql, nargs, types);

		if (p == NULL)
			elog(ERROR, "could not prepare \"%s\": %s", sql, SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*plan = p;
	}
	return SPI_execute_plan(*plan, values, nulls, false, 0);
}

/* Write the progress of the touched partitions (same transaction as the rows). */
static void
store_progress(void)
{
	static SPIPlanPtr progress_plan = NULL;
	static SPIPlanPtr origins_plan = NULL;
	HASH_SEQ_STATUS status;
	PartitionProgress *ps;

	hash_seq_init(&status, ap.partitions);
	while ((ps = hash_seq_search(&status)) != NULL)
	{
		Oid			types[9] = {TEXTOID, INT4OID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID, INT8OID, TEXTOID};
		Datum		values[9];
		char		nulls[9] = "         ";
		ListCell   *lc;

		if (!ps->touched)
			continue;
		values[0] = CStringGetTextDatum(ps->key.topic);
		values[1] = Int32GetDatum(ps->key.partition);
		values[2] = Int64GetDatum(ps->new_next);
		values[3] = Int64GetDatum(Max(ps->high, ps->new_next));
		values[4] = Int64GetDatum(ps->consumed);
		values[5] = Int64GetDatum(ps->applied);
		values[6] = Int64GetDatum(ps->skipped);
		values[7] = Int64GetDatum(ps->dead);
		if (ps->last_error)
			values[8] = CStringGetTextDatum(ps->last_error);
		else
			nulls[8] = 'n';
		if (execute_kept(&progress_plan, "INSERT INTO kafka_bridge.apply_progress AS p "
								  "(topic, partition, next_offset, high_watermark, consumed, applied, skipped, dead_letters, last_error, last_error_at) "
								  "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, CASE WHEN $9 IS NOT NULL THEN pg_catalog.now() END) "
								  "ON CONFLICT (topic, partition) DO UPDATE SET "
								  "next_offset = excluded.next_offset, high_watermark = excluded.high_watermark, "
								  "consumed = p.consumed OPERATOR(pg_catalog.+) excluded.consumed, "
								  "applied = p.applied OPERATOR(pg_catalog.+) excluded.applied, "
								  "skipped = p.skipped OPERATOR(pg_catalog.+) excluded.skipped, "
								  "dead_letters = p.dead_letters OPERATOR(pg_catalog.+) excluded.dead_letters, "
								  "last_error = coalesce(excluded.last_error, p.last_error), "
								  "last_error_at = coalesce(excluded.last_error_at, p.last_error_at), "
								  "updated_at = pg_catalog.now()",
								  9, types, values, nulls) != SPI_OK_INSERT)
			elog(ERROR, "could not write kafka_bridge.apply_progress");

		foreach(lc, ps->origins)
		{
			OriginMark *m = lfirst(lc);
			Oid			otypes[5] = {TEXTOID, INT4OID, TEXTOID, PG_LSNOID, INT4OID};
			Datum		ovalues[5];

			if (m->new_lsn == m->lsn && m->new_seq == m->seq)
				continue;
			ovalues[0] = values[0];
			ovalues[1] = values[1];
			ovalues[2] = CStringGetTextDatum(m->origin);
			ovalues[3] = LSNGetDatum(m->new_lsn);
			ovalues[4] = Int32GetDatum((int32) m->new_seq);
			if (execute_kept(&origins_plan, "INSERT INTO kafka_bridge.apply_origins (topic, partition, origin, lsn, seq) "
							 "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (topic, partition, origin) "
							 "DO UPDATE SET lsn = excluded.lsn, seq = excluded.seq",
							 5, otypes, ovalues, NULL) != SPI_OK_INSERT)
				elog(ERROR, "could not write kafka_bridge.apply_origins");
		}
	}
}

/* Start a batch: nothing touched, marks as committed. */
static void
batch_reset(void)
{
	HASH_SEQ_STATUS status;
	PartitionProgress *ps;

	hash_seq_init(&status, ap.partitions);
	while ((ps = hash_seq_search(&status)) != NULL)
	{
		ListCell   *lc;

		ps->touched = false;
		ps->new_next = ps->next_offset;
		ps->consumed = ps->applied = ps->skipped = ps->dead = 0;
		if (ps->last_error)
			pfree(ps->last_error);
		ps->last_error = NULL;
		foreach(lc, ps->origins)
		{
			OriginMark *m = lfirst(lc);

			m->new_lsn = m->lsn;
			m->new_seq = m->seq;
		}
	}
}

/* The batch committed: its marks and offsets are the stored ones now. */
static int64
batch_done(rd_kafka_topic_partition_list_t *commit)
{
	HASH_SEQ_STATUS status;
	PartitionProgress *ps;
	int64		applied = 0;

	hash_seq_init(&status, ap.partitions);
	while ((ps = hash_seq_search(&status)) != NULL)
	{
		ListCell   *lc;

		if (!ps->touched)
			continue;
		ps->next_offset = ps->new_next;
		applied += ps->applied;
		foreach(lc, ps->origins)
		{
			OriginMark *m = lfirst(lc);

			m->lsn = m->new_lsn;
			m->seq = m->new_seq;
		}
		{
			rd_kafka_topic_partition_t *tp = rd_kafka_topic_partition_list_find(commit, ps->key.topic,
																				ps->key.partition);

			if (tp == NULL)
				tp = rd_kafka_topic_partition_list_add(commit, ps->key.topic, ps->key.partition);
			tp->offset = ps->next_offset;
		}
	}
	return applied;
}

/*
 * Whether the record was applied before (a replay of the publisher), by
 * its origin's mark in the partition; else advance the mark past it.
 */
static bool
seen_before(PartitionProgress *ps, KbRecord *rec)
{
	ListCell   *lc;
	OriginMark *m = NULL;

	if (rec->origin == NULL || rec->lsn == InvalidXLogRecPtr)
		return false;
	foreach(lc, ps->origins)
		if (strcmp(((OriginMark *) lfirst(lc))->origin, rec->origin) == 0)
			m = lfirst(lc);
	if (m == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(ap.partitions_cxt);

		m = palloc0(sizeof(OriginMark));
		m->origin = pstrdup(rec->origin);
		ps->origins = lappend(ps->origins, m);
		MemoryContextSwitchTo(old);
	}
	if (rec->lsn < m->new_lsn || (rec->lsn == m->new_lsn && rec->seq <= m->new_seq))
		return true;
	m->new_lsn = rec->lsn;
	m->new_seq = rec->seq;
	return false;
}

/* Errors no record is to blame for: retry the batch later. */
static bool
is_transient(int sqlerrcode)
{
	switch (ERRCODE_TO_CATEGORY(sqlerrcode))
	{
		case ERRCODE_TO_CATEGORY(ERRCODE_TRANSACTION_ROLLBACK):	/* deadlock, serialization */
		case ERRCODE_TO_CATEGORY(ERRCODE_INSUFFICIENT_RESOURCES):
		case ERRCODE_TO_CATEGORY(ERRCODE_OPERATOR_INTERVENTION):
		case ERRCODE_TO_CATEGORY(ERRCODE_SYSTEM_ERROR):
		case ERRCODE_TO_CATEGORY(ERRCODE_CONNECTION_EXCEPTION):
			return true;
	}
	return sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE ||
		sqlerrcode == ERRCODE_OBJECT_IN_USE;
}

/* Apply one record; careful: in a subtransaction, failures become dead letters. */
static void
apply_one(PartitionProgress *ps, rd_kafka_message_t *msg, bool careful)
{
	KbRecord	rec = {0};
	rd_kafka_headers_t *hdrs = NULL;
	char	   *text;
	char	   *seq_text;
	char	   *reason = NULL;
	KbApplyOutcome outcome;
	MemoryContext cxt = CurrentMemoryContext;
	Oid			save_userid;
	int			save_sec;

	ps->touched = true;
	ps->consumed++;
	ps->new_next = msg->offset + 1;

	rec.msg = msg;
	rec.commit_time = DT_NOBEGIN;
	rec.applied_count = &ps->applied;
	rec.skipped_count = &ps->skipped;
	if (rd_kafka_message_headers(msg, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		uint32		hi,
					lo;

		rec.origin = header_text(hdrs, KB_HEADER_ORIGIN);
		rec.commit_time = parse_commit_time(header_text(hdrs, KB_HEADER_COMMIT_TIME));
		text = header_text(hdrs, KB_HEADER_LSN);
		seq_text = header_text(hdrs, KB_HEADER_SEQ);
		/* a position is both: without its number a replay cannot be told */
		if (text && seq_text && sscanf(text, "%X/%X", &hi, &lo) == 2)
		{
			rec.lsn = ((uint64) hi << 32) | lo;
			rec.seq = (uint32) strtoul(seq_text, NULL, 10);
		}
	}

	if (rec.origin && strcmp(rec.origin, kb_instance_id()) == 0)
	{
		ps->skipped++;			/* this instance's own change, back */
		return;
	}
	/*
	 * A replay is told by its position whatever it carries, a flat
	 * TRUNCATE's null value included (applied again, it would empty the
	 * table of the rows put after it, whose replays are skipped).  Only an
	 * envelope's tombstone shares the position of its DELETE, and does
	 * nothing anyway.
	 */
	if (!(msg->payload == NULL && ps->sub->format == KB_FORMAT_ENVELOPE) &&
		seen_before(ps, &rec))
	{
		ps->skipped++;
		return;
	}
	if ((size_t) msg->len + msg->key_len > (size_t) kb_max_event_size * 1024)
	{
		store_dead_letter(ps, msg,
						  psprintf("the record has %zu bytes, more than kafka_bridge.max_event_size (%d kB): raise the setting to apply it",
								   msg->len + msg->key_len, kb_max_event_size));
		return;
	}

	GetUserIdAndSecContext(&save_userid, &save_sec);
	if (!careful)
	{
		/* an error here rolls the whole batch back, and the user with it */
		SetUserIdAndSecContext(ps->sub->apply_role, save_sec | KB_APPLY_SEC_CONTEXT);
		outcome = kb_apply_record(ps->sub, &rec, true, &reason);
		SetUserIdAndSecContext(save_userid, save_sec);
	}
	else
	{
		BeginInternalSubTransaction(NULL);
		MemoryContextSwitchTo(cxt);
		PG_TRY();
		{
			SetUserIdAndSecContext(ps->sub->apply_role, save_sec | KB_APPLY_SEC_CONTEXT);
			outcome = kb_apply_record(ps->sub, &rec, false, &reason);
			SetUserIdAndSecContext(save_userid, save_sec);
			ReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(cxt);
		}
		PG_CATCH();
		{
			ErrorData  *edata;
			const char *column = kb_apply_current_column();

			MemoryContextSwitchTo(cxt);
			edata = CopyErrorData();
			if (is_transient(edata->sqlerrcode))
				PG_RE_THROW();
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			MemoryContextSwitchTo(cxt);
			outcome = KB_APPLY_REJECTED;
			reason = column ? psprintf("column \"%s\": %s", column, edata->message)
				: pstrdup(edata->message);
			if (edata->detail)
				reason = psprintf("%s (%s)", reason, edata->detail);
		}
		PG_END_TRY();
	}

	if (outcome == KB_APPLY_APPLIED)
		ps->applied++;
	else if (outcome == KB_APPLY_SKIPPED)
		ps->skipped++;
	else
		store_dead_letter(ps, msg, reason);
}

/*
 * Apply a batch in one transaction.  Returns false (the transaction rolled
 * back) when PostgreSQL raised an error; *edata then says which.
 */
static bool
apply_batch(rd_kafka_message_t **msgs, int n, bool careful, ErrorData **edata)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = true;
	uint64		conflicts = kb_conflicts_counted;

	batch_reset();
	kb_apply_discard();
	PG_TRY();
	{
		MemoryContext spi_cxt;
		int			guc_level;

		begin_work(careful ? "applying records one by one after an error" : "applying records");
		spi_cxt = CurrentMemoryContext;

		/*
		 * One by one, a deferred constraint trigger of the table fires with
		 * its record, in the record's subtransaction: at the commit, its
		 * error would have no record to set aside, and the unit would be
		 * tried again forever.
		 */
		if (careful && SPI_execute("SET CONSTRAINTS ALL IMMEDIATE", false, 0) != SPI_OK_UTILITY)
			elog(ERROR, "SET CONSTRAINTS ALL IMMEDIATE failed");

		/*
		 * The subscriptions must be the ones the records were fetched for,
		 * and stay so until this batch commits (subscribe() and
		 * unsubscribe() wait for it): else start over without applying.
		 */
		if (OidIsValid(ap.subs_relid))
		{
			uint32		version;

			/* subscribe() and unsubscribe() lock it EXCLUSIVE, and bump the version */
			LockRelationOid(ap.subs_relid, RowShareLock);
			version = kb_status_subscriptions_version();
			if (version != ap.subs_version)
			{
				if (strcmp(subscriptions_signature(read_subscriptions(true)),
						   ap.subs_signature ? ap.subs_signature : "") != 0)
				{
					ap.subs_changed = true;
					ereport(ERROR,
							(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
							 errmsg("the subscriptions changed while records were being applied"),
							 errdetail("The records are applied again with the new subscriptions.")));
				}
				ap.subs_version = version;
			}
		}
		/*
		 * What the tables' code (triggers, defaults, checks, policies)
		 * changes in the settings, even for the session, is undone at the
		 * end of the batch: else a set_config() of a trigger, say
		 * default_transaction_read_only, would rule every later batch.
		 */
		guc_level = NewGUCNestLevel();
		for (int i = 0; i < n; i++)
		{
			TopicPartition key = {0};
			PartitionProgress *ps;

			strlcpy(key.topic, rd_kafka_topic_name(msgs[i]->rkt), sizeof(key.topic));
			key.partition = msgs[i]->partition;
			ps = hash_search(ap.partitions, &key, HASH_FIND, NULL);
			if (ps == NULL || ps->sub == NULL)
				continue;		/* no longer assigned */
			if (msgs[i]->offset < ps->new_next && !careful)
				ereport(LOG,
						(errmsg("kafka_bridge applier reads partition %d of topic \"%s\" again from offset %lld, before its stored offset %lld",
								key.partition, key.topic, (long long) msgs[i]->offset,
								(long long) ps->new_next),
						 errdetail("The topic was deleted and created again, or its records were deleted; records already applied are recognised by their origin and position.")));
			if (ps->new_next >= 0 && msgs[i]->offset > ps->new_next)
				check_records_deleted(ps, msgs[i]);
			MemoryContextSwitchTo(ap.record_cxt);
			apply_one(ps, msgs[i], careful);
			MemoryContextSwitchTo(spi_cxt);
			MemoryContextReset(ap.record_cxt);
		}
		kb_apply_flush();
		AtEOXact_GUC(false, guc_level);
		store_progress();
		end_work();
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		*edata = CopyErrorData();
		AbortOutOfAnyTransaction();
		FlushErrorState();
		kb_apply_discard();
		kb_conflicts_counted = conflicts;
		RESUME_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		ok = false;
	}
	PG_END_TRY();
	return ok;
}

/* Consumer lag over every partition, for kafka_bridge.status. */
static void
update_lag(rd_kafka_t *rk)
{
	HASH_SEQ_STATUS status;
	PartitionProgress *ps;
	uint64		lag = 0;

	hash_seq_init(&status, ap.partitions);
	while ((ps = hash_seq_search(&status)) != NULL)
	{
		int64		low,
					high;

		if (rd_kafka_get_watermark_offsets(rk, ps->key.topic, ps->key.partition,
										   &low, &high) == RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
			ps->high = high;
		if (ps->high > Max(ps->next_offset, 0))
			lag += ps->high - Max(ps->next_offset, 0);
	}
	pg_atomic_write_u64(&kb_status_slot(ap.slot)->consumer_lag, lag);
}

/*
 * Gather a batch of records and apply it.  Returns how many records it
 * consumed (0: none came within the poll time).
 */
static int
consume_batch(void)
{
	rd_kafka_t *rk = kb_kafka_client_handle(ap.client);
	int			max = kb_apply_batch_size;
	rd_kafka_message_t **msgs = palloc(sizeof(rd_kafka_message_t *) * max);
	int			n = 0;
	TimestampTz deadline = 0;
	ErrorData  *edata = NULL;
	bool		ok;
	int64		applied = 0;
	rd_kafka_topic_partition_list_t *commit;

	/* until the batch is full, old enough, or no record is coming */
	while (n < max && (n == 0 || GetCurrentTimestamp() < deadline))
	{
		rd_kafka_message_t *msg = rd_kafka_consumer_poll(rk, n == 0 ? KB_POLL_MS : 0);

		if (msg == NULL)
		{
			if (n == 0)
				break;
			/* more may be on their way: a millisecond, then apply what came */
			msg = rd_kafka_consumer_poll(rk, 1);
			if (msg == NULL)
				break;
		}
		if (msg->err)
		{
			if (msg->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
			{
				kb_status_set_error(ap.slot, KB_STATE_ERROR, "consuming %s [%d]: %s",
									msg->rkt ? rd_kafka_topic_name(msg->rkt) : "?",
									msg->partition, rd_kafka_message_errstr(msg));
				/* the topic may have gone or come: look again */
				ap.next_metadata = 0;
			}
			rd_kafka_message_destroy(msg);
			if (n == 0)
				break;
			continue;
		}
		if (n == 0)
			deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), KB_BATCH_MS);
		msgs[n++] = msg;
	}
	if (n == 0)
		return 0;

	/* each source transaction's records in a transaction of their own */
	commit = rd_kafka_topic_partition_list_new(8);
	ok = true;
	for (int start = 0, end; ok && start < n; start = end)
	{
		UnitVersion uv;

		end = unit_end(msgs, start, n, &uv);
		use_unit_version(&uv);
		ok = apply_batch(msgs + start, end - start, false, &edata);
		if (!ok && !is_transient(edata->sqlerrcode))
		{
			/* some record is refused: again one by one, the bad ones set aside */
			ereport(DEBUG1,
					(errmsg_internal("kafka_bridge applier applies %d records one by one", end - start),
					 errdetail_internal("%s", edata->message)));
			ok = apply_batch(msgs + start, end - start, true, &edata);
		}
		if (ok)
			applied += batch_done(commit);
	}
	pg_atomic_add_fetch_u64(&kb_status_slot(ap.slot)->events_applied, applied);
	pg_atomic_write_u64(&kb_status_slot(ap.slot)->conflicts, kb_conflicts_counted);
	if (commit->cnt > 0)
		(void) rd_kafka_commit(rk, commit, 1);
	rd_kafka_topic_partition_list_destroy(commit);
	if (ok)
	{
		update_lag(rk);
		ap.backoff_ms = 0;
		if (kb_status_slot(ap.slot)->state != KB_STATE_CONNECTED)
			report(KB_STATE_CONNECTED, "applying records");
	}
	else if (ap.subs_changed)
	{
		/* nothing wrong: read the subscriptions now, and start over */
		ap.subs_changed = false;
		ap.next_check = 0;
		forget_partitions();
	}
	else
	{
		/* start again from the stored offsets after a pause */
		ap.backoff_ms = Min(Max(ap.backoff_ms * 2, 1000), 30000);
		kb_status_set_error(ap.slot, KB_STATE_ERROR, "%s", edata->message);
		report(KB_STATE_ERROR, "applying again from the stored offsets after an error");
		ereport(LOG,
				(errmsg("kafka_bridge applier for database \"%s\" retries a batch of %d records in %d ms",
						ap.dbname, n, ap.backoff_ms),
				 errdetail("%s", edata->message)));
		forget_partitions();
		ap.retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ap.backoff_ms);
	}
	for (int i = 0; i < n; i++)
		rd_kafka_message_destroy(msgs[i]);
	return n;
}

void
kb_applier_loop(int status_slot, const char *dbname)
{
	char	   *fingerprint = kb_kafka_settings_fingerprint();
	MemoryContext loop_cxt = AllocSetContextCreate(TopMemoryContext,
												   "kafka_bridge applier loop",
												   ALLOCSET_DEFAULT_SIZES);

	memset(&ap, 0, sizeof(ap));
	ap.slot = status_slot;
	ap.dbname = dbname;
	ap.group_id = psprintf("kafka_bridge.%s.%s", kb_instance_id(), dbname);
	ap.subs_cxt = AllocSetContextCreate(TopMemoryContext, "kafka_bridge subscriptions",
										ALLOCSET_DEFAULT_SIZES);
	ap.partitions_cxt = AllocSetContextCreate(TopMemoryContext, "kafka_bridge partitions",
											  ALLOCSET_DEFAULT_SIZES);
	ap.origin = InvalidRepOriginId;
	ap.record_cxt = AllocSetContextCreate(TopMemoryContext, "kafka_bridge record",
										  ALLOCSET_DEFAULT_SIZES);

	/* like core's apply workers: ordinary triggers and rules do not fire */
	SetConfigOption("session_replication_role", "replica", PGC_SUSET, PGC_S_OVERRIDE);
	/* a commit lost in a crash is applied again from Kafka, as core's apply workers do */
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_OVERRIDE);
	kb_conflict_writer = GetUserId();

	for (;;)
	{
		TimestampTz now;
		int			consumed = 0;
		char		error[512];
		char		waiting[300];

		CHECK_FOR_INTERRUPTS();
		/* what the last rounds did, for pg_stat_* and autovacuum (at most once a second) */
		pgstat_report_stat(false);
		MemoryContextReset(loop_cxt);
		MemoryContextSwitchTo(loop_cxt);

		if (ConfigReloadPending && kb_reload_settings(&fingerprint))
		{
			ereport(LOG,
					(errmsg("kafka_bridge applier for database \"%s\" is reconnecting with the reloaded Kafka settings",
							dbname)));
			drop_consumer();
		}

		now = GetCurrentTimestamp();
		if (now >= ap.next_check)
		{
			check_subscriptions();
			ap.next_check = TimestampTzPlusMilliseconds(now, 1000);
		}

		if (ap.have_extension && now >= ap.next_prune)
		{
			uint64		pruned;

			begin_work("pruning kafka_bridge.tombstones and kafka_bridge.conflicts");
			pruned = kb_prune_conflicts();
			end_work();
			if (pruned > 0)
				ereport(DEBUG1,
						(errmsg_internal("kafka_bridge applier pruned " UINT64_FORMAT " tombstones and conflicts", pruned)));
			ap.next_prune = TimestampTzPlusMilliseconds(now, 60 * 1000);
		}

		if (!ap.have_extension)
			report(KB_STATE_IDLE, "extension kafka_bridge is not installed in this database");
		else if (ap.subs == NIL)
			report(KB_STATE_IDLE, "no subscribed tables");
		else if (kb_bootstrap_servers[0] == '\0')
			report(KB_STATE_UNCONFIGURED, "waiting for kafka_bridge.bootstrap_servers to be set");
		else if (now >= ap.retry_at)
		{
			if (ap.client == NULL)
			{
				char	   *detail;

				ap.client = kb_kafka_client_create(KB_CLIENT_CONSUMER, ap.group_id, NULL, &detail);
				if (ap.client == NULL)
				{
					kb_status_set_error(ap.slot, KB_STATE_ERROR, "%s", detail);
					report(KB_STATE_ERROR, "waiting for a usable Kafka configuration");
					ap.retry_at = TimestampTzPlusMilliseconds(now, 5000);
				}
				else
				{
					report(KB_STATE_CONNECTING, "connecting to Kafka");
					forget_partitions();
				}
			}
			if (ap.client && now >= ap.next_metadata)
			{
				if (refresh_assignment(error, sizeof(error), waiting, sizeof(waiting)))
				{
					ap.next_metadata = TimestampTzPlusMilliseconds(now, ap.npartitions > 0 ? KB_METADATA_MS : 1000);
					if (waiting[0] && ap.npartitions == 0)
						report(KB_STATE_CONNECTED, waiting);
					else if (kb_status_slot(ap.slot)->state != KB_STATE_CONNECTED)
						report(KB_STATE_CONNECTED, "applying records");
				}
				else
				{
					kb_status_set_error(ap.slot, KB_STATE_ERROR, "%s", error);
					report(KB_STATE_ERROR, "waiting for Kafka");
					ap.next_metadata = TimestampTzPlusMilliseconds(now, 1000);
				}
			}
			if (ap.client && ap.npartitions > 0)
			{
				consumed = consume_batch();
				if (consumed > 0 && !ap.busy)
					report(kb_status_slot(ap.slot)->state, "applying records");
				else if (consumed == 0 && ap.busy &&
						 kb_status_slot(ap.slot)->state == KB_STATE_CONNECTED)
					report(KB_STATE_CONNECTED,
						   psprintf("waiting for records in %d partitions of %d topics",
									ap.npartitions, list_length(ap.subs)));
				ap.busy = (consumed > 0);
			}
		}
		if (ap.client)
			kb_kafka_client_poll(ap.client, 0);

		/* idle: sleep until woken; busy: only look whether a subscription changed */
		if (WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					  consumed == 0 && (ap.client == NULL || ap.npartitions == 0) ? 1000L : 0L,
					  PG_WAIT_EXTENSION) & WL_LATCH_SET)
			ap.next_check = 0;
		ResetLatch(MyLatch);
	}
}
