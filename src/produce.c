/*-------------------------------------------------------------------------
 * produce.c
 *	  kafka_bridge.produce(): send one record to Kafka now, whatever becomes
 *	  of the calling transaction, and return where the broker stored it.
 *
 * Unlike kafka_bridge.send(), which goes through the WAL and reaches Kafka
 * only if the transaction commits, produce() hands the record to a producer
 * of the calling backend and waits for the brokers' acknowledgement: once it
 * returns, the record is in the topic, even if the transaction then rolls
 * back.
 *
 * The producer is created on first use from the kafka_bridge.* settings,
 * kept for the backend's life, rebuilt when those settings change, and
 * destroyed when the backend exits.  Like the publisher's, it is idempotent
 * with acks=all.
 *
 * Timeouts: librdkafka 2.0.2 has no per-record timeout, but
 * message.timeout.ms is a topic property, and this producer only ever sends
 * through topic handles it creates itself.  Each topic handle gets
 * message.timeout.ms = 30 s (or the lower value of the settings), so that
 * librdkafka gives a record up after that time at the latest; the wait
 * loop serves interrupts, so statement_timeout or a cancel ends the wait
 * earlier.  The effective limit is thus the lower of statement_timeout and
 * 30 s.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "event_codec.h"
#include "kafka_bridge.h"

/* Longest a record may wait for the brokers' acknowledgement. */
#define KB_PRODUCE_TIMEOUT_MS	30000

/*
 * Extra time the wait loop grants librdkafka beyond the record's timeout
 * before giving up by itself (a record already sent waits for its request).
 */
#define KB_PRODUCE_GRACE_MS		30000

/* The backend's producer, its settings, and whether exit cleans it up. */
static KbKafkaClient *producer = NULL;
static char *producer_fingerprint = NULL;
static bool exit_callback_registered = false;

/*
 * The record produce() waits for.  Records are told apart by a sequence
 * number passed as their opaque: a record of an earlier call that was
 * interrupted may be acknowledged (or fail) while a later call waits.
 */
static uintptr_t last_record_id = 0;
static struct
{
	uintptr_t	id;				/* 0: nobody waits */
	bool		done;
	rd_kafka_resp_err_t err;
	rd_kafka_msg_status_t status;	/* persisted, possibly, or not */
	int32		partition;
	int64		offset;
} awaited;

/* A header of the record, checked and copied before librdkafka sees it. */

/*
 * Delivery callback of the producer, called from rd_kafka_poll() on the
 * backend's own thread.  It only records the outcome: raising an error here
 * would unwind through librdkafka.
 */
static void
produce_delivery_report(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque)
{
	if ((uintptr_t) msg->_private != awaited.id || awaited.id == 0)
		return;
	awaited.done = true;
	awaited.err = msg->err;
	awaited.status = rd_kafka_message_status(msg);
	awaited.partition = msg->partition;
	awaited.offset = msg->offset;
}

static void
drop_producer(void)
{
	KbKafkaClient *client = producer;

	/* forget it first: destroying it must not be tried twice */
	producer = NULL;
	if (producer_fingerprint)
		pfree(producer_fingerprint);
	producer_fingerprint = NULL;
	kb_kafka_client_destroy(client);
}

/*
 * At backend exit.  Records still waiting are those of interrupted calls:
 * they are dropped, as an interrupted call never promised them.
 */
static void
produce_at_exit(int code, Datum arg)
{
	if (producer)
		drop_producer();
}

static bool
bootstrap_servers_empty(void)
{
	const char *p = kb_bootstrap_servers ? kb_bootstrap_servers : "";

	for (; *p; p++)
		if (!isspace((unsigned char) *p) && *p != ',')
			return false;
	return true;
}

/*
 * The backend's producer: created on first use, and again when the
 * kafka_bridge.* settings changed since it was (a reload).  Records of
 * interrupted calls still waiting in the old one are dropped with it.
 */
static rd_kafka_t *
get_producer(void)
{
	char	   *fingerprint = kb_kafka_settings_fingerprint();

	if (producer && strcmp(fingerprint, producer_fingerprint) != 0)
		drop_producer();

	if (producer == NULL)
	{
		char		client_id[128];
		char	   *detail;

		if (bootstrap_servers_empty())
			ereport(ERROR,
					(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
					 errmsg("kafka_bridge.produce() needs kafka_bridge.bootstrap_servers to be set"),
					 errhint("Set kafka_bridge.bootstrap_servers in postgresql.conf to the Kafka brokers, as host:port separated by commas, and reload the configuration.")));

		if (!exit_callback_registered)
		{
			before_shmem_exit(produce_at_exit, (Datum) 0);
			exit_callback_registered = true;
		}

		snprintf(client_id, sizeof(client_id), "kafka_bridge-produce-%s-%d",
				 kb_instance_id(), MyProcPid);
		producer = kb_kafka_client_create(KB_CLIENT_PRODUCER, client_id,
										  produce_delivery_report, &detail);
		if (producer == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("could not create a Kafka producer for kafka_bridge.produce()"),
					 errdetail("%s", detail),
					 errhint("Check kafka_bridge.kafka_options and kafka_bridge.producer_options.")));
		producer_fingerprint = MemoryContextStrdup(TopMemoryContext, fingerprint);
	}
	pfree(fingerprint);
	return kb_kafka_client_handle(producer);
}

/*
 * A handle for topic whose records librdkafka gives up after at most
 * KB_PRODUCE_TIMEOUT_MS: the producer's message.timeout.ms if lower and not
 * 0 (which means forever), else that default.  Sets *timeout_ms to the value
 * in force.
 *
 * Topic handles are shared per name and keep the configuration of their
 * creation, so this works because the producer never sends otherwise.
 */
static rd_kafka_topic_t *
topic_handle(rd_kafka_t *rk, const char *topic, int *timeout_ms)
{
	rd_kafka_topic_conf_t *tconf = rd_kafka_default_topic_conf_dup(rk);
	rd_kafka_topic_t *rkt;
	char		value[32];
	size_t		size = sizeof(value);
	long		configured = 0;
	char		errstr[512];

	if (rd_kafka_topic_conf_get(tconf, "message.timeout.ms", value, &size) == RD_KAFKA_CONF_OK)
		configured = strtol(value, NULL, 10);
	*timeout_ms = (configured > 0 && configured < KB_PRODUCE_TIMEOUT_MS)
		? (int) configured : KB_PRODUCE_TIMEOUT_MS;
	snprintf(value, sizeof(value), "%d", *timeout_ms);
	if (rd_kafka_topic_conf_set(tconf, "message.timeout.ms", value,
								errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
	{
		rd_kafka_topic_conf_destroy(tconf);
		elog(ERROR, "librdkafka refused message.timeout.ms=%s: %s", value, errstr);
	}

	/* takes tconf over, whatever the outcome */
	rkt = rd_kafka_topic_new(rk, topic, tconf);
	if (rkt == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("could not prepare a Kafka producer for topic \"%s\"", topic),
				 errdetail("%s", rd_kafka_err2str(rd_kafka_last_error())),
				 errhint("Check kafka_bridge.kafka_options and kafka_bridge.producer_options.")));
	return rkt;
}

/*
 * The headers by which appliers tell a replay and order versions: a record
 * that forged them could hide the next changes of an instance, or win
 * every conflict.
 */
static const char *const reserved_headers[] = {
	KB_HEADER_ORIGIN, KB_HEADER_LSN, KB_HEADER_SEQ, KB_HEADER_COMMIT_TIME
};

const char *
kb_reserved_header(const char *name, int name_len)
{
	for (int i = 0; i < lengthof(reserved_headers); i++)
		if (name_len == strlen(reserved_headers[i]) &&
			memcmp(name, reserved_headers[i], name_len) == 0)
			return reserved_headers[i];
	return NULL;
}

/*
 * Check the headers argument, a JSON object whose values are strings or
 * null, and copy it.  Returns the number of headers.
 */
int
kb_collect_headers(Jsonb *headers, KbHeader **result, size_t *total_bytes)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			count = 0;
	KbHeader   *list;
	char	   *name = NULL;
	int			name_len = 0;

	*result = NULL;
	if (headers == NULL)
		return 0;
	if (!JB_ROOT_IS_OBJECT(headers) || JB_ROOT_IS_SCALAR(headers))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the headers of a Kafka record must be a JSON object"),
				 errdetail("The headers argument is a JSON %s.",
						   JB_ROOT_IS_ARRAY(headers) && !JB_ROOT_IS_SCALAR(headers)
						   ? "array" : "scalar"),
				 errhint("Give headers as {\"name\": \"value\", ...}, with string or null values.")));

	list = palloc(sizeof(KbHeader) * Max(JB_ROOT_COUNT(headers), 1));
	it = JsonbIteratorInit(&headers->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
		{
			const char *reserved;

			name = v.val.string.val;
			name_len = v.val.string.len;
			if (name_len == 0)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("the name of a Kafka record header cannot be empty")));
			reserved = kb_reserved_header(name, name_len);
			if (reserved)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("Kafka record header \"%s\" is kafka_bridge's own", reserved),
						 errdetail("Appliers read the headers origin, lsn, seq and commit_time to tell replays and to order versions."),
						 errhint("Give the header another name.")));
		}
		else if (tok == WJB_VALUE)
		{
			KbHeader   *h = &list[count++];

			if (v.type != jbvString && v.type != jbvNull)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("the value of Kafka record header \"%s\" must be a string or null",
								pnstrdup(name, name_len)),
						 errhint("Turn numbers, booleans, arrays and objects into strings, for example with to_jsonb(x::text).")));
			h->name = pnstrdup(name, name_len);
			h->name_len = name_len;
			h->value = v.type == jbvNull ? NULL
				: pnstrdup(v.val.string.val, v.val.string.len);
			h->value_len = v.type == jbvNull ? 0 : v.val.string.len;
			*total_bytes += h->name_len + h->value_len;
		}
	}
	*result = list;
	return count;
}

/* Bytes of a zigzag varint of n (n >= 0): Kafka's lengths in a record. */
static size_t
varint_size(size_t n)
{
	size_t		bytes = 1;

	for (n <<= 1; n >= 0x80; n >>= 7)
		bytes++;
	return bytes;
}

/*
 * The framing of a v2 record at its largest: its length, attributes,
 * timestamp delta (a 64-bit varint), offset delta, key and value lengths
 * and header count.
 */
#define RECORD_MAX_FRAMING	(5 + 1 + 10 + 5 + 5 + 5 + 5)

size_t
kb_record_wire_size(size_t key_len, size_t value_len, const KbHeader *headers,
					int nheaders)
{
	size_t		size = RECORD_MAX_FRAMING + key_len + value_len;

	for (int i = 0; i < nheaders; i++)
		size += varint_size(headers[i].name_len) + headers[i].name_len +
			varint_size(headers[i].value_len) + headers[i].value_len;
	return size;
}

/* The SQLSTATE of a record's failure, by librdkafka's or the broker's code. */
static int
failure_sqlstate(rd_kafka_resp_err_t err)
{
	switch (err)
	{
		case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
		case RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE:
			return ERRCODE_PROGRAM_LIMIT_EXCEEDED;
		case RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED:
		case RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED:
		case RD_KAFKA_RESP_ERR_SASL_AUTHENTICATION_FAILED:
		case RD_KAFKA_RESP_ERR__AUTHENTICATION:
			return ERRCODE_INSUFFICIENT_PRIVILEGE;
		case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART:
		case RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC:
		case RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION:
		case RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION:
			return ERRCODE_UNDEFINED_OBJECT;
		case RD_KAFKA_RESP_ERR_INVALID_RECORD:
		case RD_KAFKA_RESP_ERR_INVALID_MSG:
			return ERRCODE_DATA_EXCEPTION;
		default:
			/* timeouts, transport, brokers or replicas not available */
			return ERRCODE_CONNECTION_FAILURE;
	}
}

/*
 * Raise the error of a record the producer (before sending: local) or the
 * brokers refused.  limit is the producer's message.max.bytes.
 */
static void
report_failure(rd_kafka_t *rk, const char *topic, rd_kafka_resp_err_t err,
			   rd_kafka_msg_status_t status, bool local, size_t record_bytes,
			   const char *limit)
{
	char		fatal[512];

	/* a fatal error leaves the producer unusable: the next call builds another */
	if (rd_kafka_fatal_error(rk, fatal, sizeof(fatal)) != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		drop_producer();
		kb_redact_secrets(fatal);
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not deliver a record to Kafka topic \"%s\"", topic),
				 errdetail("The producer failed for good: %s.", fatal),
				 errhint("The next call of kafka_bridge.produce() creates a new producer.")));
	}
	if (err == RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE && local)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("record for Kafka topic \"%s\" is too large", topic),
				 errdetail("Its key, value and headers take %zu bytes; with Kafka's record framing that is more than the producer's message.max.bytes of %s bytes.",
						   record_bytes, limit),
				 errhint("Send a smaller record, or raise message.max.bytes in kafka_bridge.producer_options (the topic's max.message.bytes on the brokers must allow it too).")));
	if (err == RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("record for Kafka topic \"%s\" is too large for the brokers", topic),
				 errdetail("Its key, value and headers take %zu bytes: %s.",
						   record_bytes, rd_kafka_err2str(err)),
				 errhint("Send a smaller record, or raise the topic's max.message.bytes on the brokers.")));
	/* sent, but no answer came: the broker may have written it */
	if (status == RD_KAFKA_MSG_STATUS_POSSIBLY_PERSISTED)
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("the delivery of a record to Kafka topic \"%s\" is in doubt", topic),
				 errdetail("%s; the record was sent, and the broker may have written it.",
						   rd_kafka_err2str(err)),
				 errhint("Calling again may write it twice: look in the topic first, or have its consumers ignore duplicates.")));
	ereport(ERROR,
			(errcode(failure_sqlstate(err)),
			 errmsg("could not deliver a record to Kafka topic \"%s\"", topic),
			 errdetail("%s.", rd_kafka_err2str(err)),
			 failure_sqlstate(err) == ERRCODE_CONNECTION_FAILURE ?
			 errhint("Check that the brokers in kafka_bridge.bootstrap_servers (\"%s\") are up and reachable.",
					 kb_bootstrap_servers) : 0));
}

/* errcontext while waiting: an interrupted call leaves its record behind */
static void
wait_error_context(void *arg)
{
	errcontext("waiting for Kafka to acknowledge a record for topic \"%s\" (the record may still be delivered)",
			   (const char *) arg);
}

/*
 * kafka_bridge.produce(topic, key, value, headers): value is jsonb, text or
 * bytea (one C function for the three).  Returns (partition, offset).
 */
PG_FUNCTION_INFO_V1(kafka_bridge_produce);

Datum
kafka_bridge_produce(PG_FUNCTION_ARGS)
{
	Oid			value_type = get_fn_expr_argtype(fcinfo->flinfo, 2);
	char	   *topic;
	const char *key = NULL;
	size_t		key_len = 0;
	const char *value = NULL;
	size_t		value_len = 0;
	KbHeader   *headers;
	int			nheaders;
	size_t		record_bytes = 0;
	TupleDesc	tupdesc;
	rd_kafka_t *rk;
	rd_kafka_topic_t *rkt;
	rd_kafka_headers_t *hdrs;
	rd_kafka_resp_err_t err;
	int			timeout_ms;
	TimestampTz deadline;
	ErrorContextCallback errcallback;
	uintptr_t	id;
	char		limit[32];
	size_t		limit_size = sizeof(limit);
	Datum		values[2];
	bool		nulls[2] = {false, false};

	if (value_type != JSONBOID && value_type != TEXTOID && value_type != BYTEAOID)
		elog(ERROR, "kafka_bridge.produce() called with a value of type %u", value_type);
	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");

	/* ---- check and encode everything before anything reaches librdkafka ---- */
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the topic of kafka_bridge.produce() cannot be null")));
	topic = text_to_cstring(PG_GETARG_TEXT_PP(0));
	kb_check_topic(topic, false);

	if (!PG_ARGISNULL(1))
	{
		text	   *k = PG_GETARG_TEXT_PP(1);

		key = VARDATA_ANY(k);
		key_len = VARSIZE_ANY_EXHDR(k);
	}

	/* a null value makes a tombstone */
	if (!PG_ARGISNULL(2) && value_type == JSONBOID)
	{
		Jsonb	   *jb = PG_GETARG_JSONB_P(2);

		value = JsonbToCString(NULL, &jb->root, VARSIZE_ANY_EXHDR(jb));
		value_len = strlen(value);
	}
	else if (!PG_ARGISNULL(2))
	{
		struct varlena *v = PG_GETARG_VARLENA_PP(2);

		value = VARDATA_ANY(v);
		value_len = VARSIZE_ANY_EXHDR(v);
	}

	nheaders = kb_collect_headers(PG_ARGISNULL(3) ? NULL : PG_GETARG_JSONB_P(3),
							   &headers, &record_bytes);
	record_bytes += key_len + value_len;

	/* ---- hand the record over ---- */
	rk = get_producer();
	rkt = topic_handle(rk, topic, &timeout_ms);
	/* for the message of a refusal */
	if (rd_kafka_conf_get(rd_kafka_conf(rk), "message.max.bytes", limit,
						  &limit_size) != RD_KAFKA_CONF_OK)
		strlcpy(limit, "?", sizeof(limit));

	/* from here on, no error may be raised before producev took hdrs */
	hdrs = rd_kafka_headers_new(nheaders);
	for (int i = 0; i < nheaders; i++)
		rd_kafka_header_add(hdrs, headers[i].name, headers[i].name_len,
							headers[i].value, headers[i].value_len);

	id = ++last_record_id;
	awaited.id = id;
	awaited.done = false;
	err = rd_kafka_producev(rk,
							RD_KAFKA_V_RKT(rkt),
							RD_KAFKA_V_PARTITION(RD_KAFKA_PARTITION_UA),
							RD_KAFKA_V_KEY(key, key_len),
							RD_KAFKA_V_VALUE((void *) value, value_len),
							RD_KAFKA_V_HEADERS(hdrs),
							RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
							RD_KAFKA_V_OPAQUE((void *) id),
							RD_KAFKA_V_END);
	/* the record holds its own reference to the topic */
	rd_kafka_topic_destroy(rkt);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		/* the headers stay ours when producev fails */
		rd_kafka_headers_destroy(hdrs);
		awaited.id = 0;
		report_failure(rk, topic, err, RD_KAFKA_MSG_STATUS_NOT_PERSISTED, true, record_bytes, limit);
	}

	/*
	 * Wait for the acknowledgement.  librdkafka gives the record up after
	 * timeout_ms, so this ends; the deadline is a safeguard.  An interrupt
	 * (statement_timeout, cancel, termination) ends the wait with an error,
	 * but the record is then still in librdkafka's hands: it may yet be
	 * delivered, by this backend's producer, until its timeout.
	 */
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
										   timeout_ms + KB_PRODUCE_GRACE_MS);
	errcallback.callback = wait_error_context;
	errcallback.arg = topic;
	errcallback.previous = error_context_stack;
	error_context_stack = &errcallback;

	while (!awaited.done)
	{
		CHECK_FOR_INTERRUPTS();
		/*
		 * flush rather than poll: it serves the delivery report the same
		 * way, and sends at once instead of lingering (linger.ms) for
		 * records that will never come, since the caller waits
		 */
		rd_kafka_flush(rk, 10);
		kb_kafka_client_poll(producer, 0);	/* librdkafka's logs */
		if (!awaited.done && GetCurrentTimestamp() >= deadline)
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("no acknowledgement from Kafka for a record to topic \"%s\" within %d ms",
							topic, timeout_ms + KB_PRODUCE_GRACE_MS),
					 errhint("Check that the brokers in kafka_bridge.bootstrap_servers (\"%s\") are up and reachable.",
							 kb_bootstrap_servers)));
	}
	error_context_stack = errcallback.previous;
	awaited.id = 0;

	if (awaited.err != RD_KAFKA_RESP_ERR_NO_ERROR)
		report_failure(rk, topic, awaited.err, awaited.status, false, record_bytes, limit);

	values[0] = Int32GetDatum(awaited.partition);
	values[1] = Int64GetDatum(awaited.offset);
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(tupdesc),
													  values, nulls)));
}
