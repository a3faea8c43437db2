/*-------------------------------------------------------------------------
 * send.c
 *	  kafka_bridge.send(): application records that reach Kafka if and only
 *	  if the calling transaction commits, in commit order with its row events.
 *
 * A send is a transactional logical message (prefix "kafka_bridge") in the
 * WAL: the output plugin turns it into a record when the transaction's
 * commit is decoded, the publisher produces it like any row event, and a
 * rollback, of the transaction or of a savepoint, drops it with the rest.
 * No outbox table to create, poll or clean; a broker outage only delays it.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "libpq/pqformat.h"
#include "replication/message.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/pg_lsn.h"

#include "event_codec.h"
#include "kafka_bridge.h"

/*
 * The producer's message.max.bytes (librdkafka's default, or what
 * kafka_bridge.kafka_options / producer_options say), recomputed only when
 * those settings change.  A larger record is refused at once: the producer
 * would refuse it later, in the worker, where nobody can act on it.
 */
static int
producer_max_bytes(void)
{
	static const char *cached_kafka = NULL;
	static const char *cached_producer = NULL;
	static int	max_bytes = 1000000;

	if (cached_kafka != kb_kafka_options || cached_producer != kb_producer_options)
	{
		rd_kafka_conf_t *conf = rd_kafka_conf_new();
		char		value[32];
		size_t		size = sizeof(value);
		char	   *detail;

		/* both lists were validated when they were set */
		if (kb_apply_property_list(conf, kb_kafka_options, &detail) &&
			kb_apply_property_list(conf, kb_producer_options, &detail) &&
			rd_kafka_conf_get(conf, "message.max.bytes", value, &size) == RD_KAFKA_CONF_OK)
			max_bytes = atoi(value);
		rd_kafka_conf_destroy(conf);
		cached_kafka = kb_kafka_options;
		cached_producer = kb_producer_options;
	}
	return max_bytes;
}

/*
 * Append the headers, checked as produce() checks them; returns the size
 * of the record librdkafka will check against message.max.bytes.
 */
static size_t
append_headers(StringInfo buf, Jsonb *headers, size_t key_len, size_t value_len)
{
	KbHeader   *list;
	size_t		bytes = 0;
	int			count = kb_collect_headers(headers, &list, &bytes);

	if (count > PG_INT16_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("a Kafka record has at most %d headers", PG_INT16_MAX)));
	pq_sendint16(buf, count);
	for (int i = 0; i < count; i++)
	{
		if (list[i].name_len > PG_INT16_MAX)
			ereport(ERROR,
					(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
					 errmsg("a Kafka record header name has at most %d bytes", PG_INT16_MAX)));
		pq_sendint16(buf, list[i].name_len);
		pq_sendbytes(buf, list[i].name, list[i].name_len);
		if (list[i].value == NULL)
			pq_sendint32(buf, -1);
		else
		{
			pq_sendint32(buf, list[i].value_len);
			pq_sendbytes(buf, list[i].value, list[i].value_len);
		}
	}
	return kb_record_wire_size(key_len, value_len, list, count);
}

/*
 * kafka_bridge.send(topic, key, value, headers): value is jsonb, text or
 * bytea (one C function for the three).  Returns the LSN of the message.
 */
PG_FUNCTION_INFO_V1(kafka_bridge_send);

Datum
kafka_bridge_send(PG_FUNCTION_ARGS)
{
	Oid			value_type = get_fn_expr_argtype(fcinfo->flinfo, 2);
	StringInfoData buf;
	char	   *topic;
	size_t		key_len = 0;
	size_t		value_len = 0;
	size_t		record_bytes;
	XLogRecPtr	lsn;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the topic of kafka_bridge.send() cannot be null")));
	topic = text_to_cstring(PG_GETARG_TEXT_PP(0));
	kb_check_topic(topic, false);

	initStringInfo(&buf);
	pq_sendbyte(&buf, value_type == JSONBOID ? KB_VALUE_KIND_JSON :
				value_type == BYTEAOID ? KB_VALUE_KIND_BYTES : KB_VALUE_KIND_TEXT);
	pq_sendint32(&buf, strlen(topic));
	pq_sendbytes(&buf, topic, strlen(topic));

	if (PG_ARGISNULL(1))
		pq_sendint32(&buf, -1);
	else
	{
		text	   *key = PG_GETARG_TEXT_PP(1);

		key_len = VARSIZE_ANY_EXHDR(key);
		pq_sendint32(&buf, key_len);
		pq_sendbytes(&buf, VARDATA_ANY(key), key_len);
	}

	if (PG_ARGISNULL(2))
		pq_sendint32(&buf, -1);
	else if (value_type == JSONBOID)
	{
		Jsonb	   *jb = PG_GETARG_JSONB_P(2);
		char	   *json = JsonbToCString(NULL, &jb->root, VARSIZE_ANY_EXHDR(jb));

		value_len = strlen(json);
		pq_sendint32(&buf, value_len);
		pq_sendbytes(&buf, json, value_len);
	}
	else
	{
		struct varlena *value = PG_GETARG_VARLENA_PP(2);

		value_len = VARSIZE_ANY_EXHDR(value);
		pq_sendint32(&buf, value_len);
		pq_sendbytes(&buf, VARDATA_ANY(value), value_len);
	}

	record_bytes = append_headers(&buf, PG_ARGISNULL(3) ? NULL : PG_GETARG_JSONB_P(3),
								  key_len, value_len);

	/*
	 * Measured as librdkafka measures it when the publisher produces the
	 * record: one it refused there would stop publishing until the limit
	 * is raised
	 */
	if (record_bytes > (size_t) producer_max_bytes())
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("record for topic \"%s\" is %zu bytes, more than the producer's limit of %d bytes",
						topic, record_bytes, producer_max_bytes()),
				 errdetail("The size counts the key, the value, the headers and Kafka's framing of a record."),
				 errhint("Send a smaller value, or raise message.max.bytes in kafka_bridge.producer_options (and the topic's max.message.bytes).")));

	lsn = LogLogicalMessage(KB_MESSAGE_PREFIX, buf.data, buf.len, true);
	pfree(buf.data);
	PG_RETURN_LSN(lsn);
}
