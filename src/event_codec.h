/*-------------------------------------------------------------------------
 * event_codec.h
 *	  The event contract in code: the binary frames the output plugin writes
 *	  for the publisher worker, the JSON encoding of rows, and the
 *	  kafka_bridge.publications catalog that says what is published.
 *
 * decoder.c (the output plugin) and the publisher worker both include this
 * file; docs/events.md describes the same contract for users.
 *-------------------------------------------------------------------------
 */
#ifndef KB_EVENT_CODEC_H
#define KB_EVENT_CODEC_H

#include "postgres.h"

#include "access/attnum.h"
#include "access/tupdesc.h"
#include "datatype/timestamp.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "nodes/bitmapset.h"
#include "utils/jsonb.h"

/*
 * ---- Frames of the 'kafka' output ----
 *
 * Every frame is one OutputPluginWrite, integers in network byte order
 * (libpq/pqformat.h).  A record frame:
 *
 *	byte	KB_FRAME_RECORD
 *	int32	topic length, then the topic bytes
 *	int32	key length (-1: null key), then the key bytes
 *	int32	value length (-1: null value, a tombstone), then the value bytes
 *	int16	number of headers, then for each header
 *			int16 name length, name bytes, int32 value length, value bytes
 *
 * A commit frame follows the records of each transaction that produced at
 * least one record (a transaction with none produces no frame at all):
 *
 *	byte	KB_FRAME_COMMIT
 *	int64	end LSN of the commit record (where the slot may be confirmed)
 *	int64	LSN of the commit record (the "lsn" header of its records)
 *	int64	commit timestamp (TimestampTz, microseconds since 2000-01-01)
 *	int32	top-level transaction id
 */
#define KB_FRAME_RECORD		'R'
#define KB_FRAME_COMMIT		'C'

/*
 * A record of kafka_bridge.send(): a record frame but for its tag, so that
 * the publisher creates a missing topic as an event log (never compacted)
 * rather than as a row topic.
 */
#define KB_FRAME_SEND_RECORD	'S'

/* Record header names. */
#define KB_HEADER_EVENT		"event"
#define KB_HEADER_ORIGIN	"origin"
#define KB_HEADER_LSN		"lsn"
#define KB_HEADER_SEQ		"seq"	/* the record's number in its transaction */
#define KB_HEADER_COMMIT_TIME "commit_time"	/* the transaction's, ISO 8601 in UTC */

/* Event type suffixes: "<PREFIX>-PUT" and so on. */
#define KB_EVENT_PUT		"PUT"
#define KB_EVENT_DELETE		"DELETE"
#define KB_EVENT_TRUNCATE	"TRUNCATE"

/* ---- Row encoding (event_codec.c) ---- */

/* How a value of a given type becomes JSON; decided once per column. */
typedef enum KbValueKind
{
	KB_VALUE_INT16,				/* JSON number */
	KB_VALUE_INT32,
	KB_VALUE_INT64,
	KB_VALUE_OID,
	KB_VALUE_FLOAT4,			/* JSON number; NaN and infinities as strings */
	KB_VALUE_FLOAT8,
	KB_VALUE_NUMERIC,			/* JSON string, every digit kept */
	KB_VALUE_BOOL,
	KB_VALUE_JSON,				/* embedded, line breaks outside strings made spaces */
	KB_VALUE_JSONB,				/* embedded */
	KB_VALUE_DATETIME,			/* ISO 8601 string, timestamptz in UTC */
	KB_VALUE_INTERVAL,			/* ISO 8601 duration string (P1Y2M3DT4H5M6S) */
	KB_VALUE_BYTEA,				/* "\\x" and hex digits, whatever bytea_output says */
	KB_VALUE_ARRAY,				/* JSON array, elements by their own kind */
	KB_VALUE_TEXT				/* the type's text output as a JSON string */
} KbValueKind;

typedef struct KbTypeInfo
{
	KbValueKind kind;
	Oid			base_type;		/* the type, or for a domain its base type */
	FmgrInfo	output;			/* the type's output function */
	/* arrays only: */
	struct KbTypeInfo *element;
	int16		elem_len;
	bool		elem_byval;
	char		elem_align;
} KbTypeInfo;

/* One column of a published table, as events show it. */
typedef struct KbColumn
{
	AttrNumber	attnum;			/* in the published table's descriptor */
	char	   *json_name;		/* the name as a JSON string followed by ':' */
	int			json_name_len;	/* length of the JSON string, without ':' */
	bool		is_key;			/* part of the event key */
	bool		varlena;		/* attlen -1: may be an unchanged TOAST pointer */
	KbTypeInfo	type;
} KbColumn;

/* The columns of a published table that events carry, in attnum order. */
typedef struct KbRowShape
{
	int			ncolumns;
	KbColumn   *columns;
	int			nkeys;			/* how many columns have is_key */
} KbRowShape;

/* Which columns kb_append_row writes. */
typedef enum KbRowPart
{
	KB_ROW_ALL,					/* every column */
	KB_ROW_KEY					/* only the key columns */
} KbRowPart;

extern void kb_type_info_init(KbTypeInfo *info, Oid typid, MemoryContext cxt);
extern KbRowShape *kb_row_shape_create(TupleDesc desc, Bitmapset *key_attrs,
									   bool all_key, MemoryContext cxt);
extern void kb_append_json_string(StringInfo buf, const char *str);
extern void kb_append_datum(StringInfo buf, Datum value, KbTypeInfo *info);
extern void kb_append_timestamptz(StringInfo buf, TimestampTz ts);

/* Parts of a binary frame: a length-prefixed string, a record header. */
extern void kb_send_bytes(StringInfo out, const char *str, int len);
extern void kb_send_header(StringInfo out, const char *name, const char *value);
extern bool kb_datum_is_unchanged_toast(Datum value, const KbColumn *col);
extern int	kb_append_row(StringInfo buf, KbRowShape *shape, Datum *values,
						  bool *nulls, KbRowPart part, int *unchanged);

/* ---- The kafka_bridge.publications catalog (publish.c) ---- */

/* Its columns, in the order kafka_bridge--0.1.sql creates them. */
#define Anum_kb_publications_relid			1
#define Anum_kb_publications_topic			2
#define Anum_kb_publications_event_prefix	3
#define Anum_kb_publications_format			4
#define Anum_kb_publications_tombstones		5
#define Anum_kb_publications_created_at		6
#define Anum_kb_publications_snapshot_state	7
#define Anum_kb_publications_snapshot_upto	8
#define Anum_kb_publications_snapshot_rows	9
#define Anum_kb_publications_snapshot_estimate	10
#define Anum_kb_publications_snapshot_started_at	11
#define Anum_kb_publications_snapshot_done_at	12
#define Anum_kb_publications_snapshot_acked	13
#define Natts_kb_publications				13

#define KB_SCHEMA_NAME			"kafka_bridge"
#define KB_PUBLICATIONS_NAME	"publications"

typedef enum KbEventFormat
{
	KB_FORMAT_ENVELOPE,
	KB_FORMAT_FLAT
} KbEventFormat;

/* A table's publication, as the catalog holds it. */
typedef struct KbPublication
{
	char	   *topic;
	char	   *event_prefix;
	KbEventFormat format;
	bool		tombstones;
	/* a snapshot is pending or running: PUTs of keys above upto wait for it */
	bool		snapshot_active;
	int			nupto;			/* 0: no chunk done yet */
	char	  **upto;			/* the last key done, column by column, as text */
} KbPublication;

extern bool kb_lookup_publication(Oid relid, KbPublication *pub);
extern void kb_check_topic(const char *topic, bool is_default);
extern const char *kb_topic_problem(const char *topic, size_t len);
extern void kb_check_event_prefix(const char *prefix);
extern KbEventFormat kb_parse_format(const char *name);
extern struct RelationData *kb_open_owned_table(Oid relid);
extern void kb_check_table_kind(struct RelationData *rel, const char *verb,
								const char *participle);

/*
 * ---- Application records: kafka_bridge.send() ----
 *
 * send() writes a transactional logical message with prefix
 * KB_MESSAGE_PREFIX whose content is:
 *
 *	byte	value kind: KB_VALUE_KIND_JSON, _TEXT or _BYTES
 *	int32	topic length, then the topic bytes
 *	int32	key length (-1: null key), then the key bytes
 *	int32	value length (-1: null value), then the value bytes
 *	int16	number of headers, then for each header
 *			int16 name length, name bytes, int32 value length, value bytes
 *
 * so that the output plugin turns it into a record frame by dropping the
 * first byte.
 */
#define KB_MESSAGE_PREFIX		"kafka_bridge"

/* A record header given to send() or produce(). */
typedef struct KbHeader
{
	char	   *name;
	int			name_len;
	char	   *value;			/* NULL: a null header */
	int			value_len;
} KbHeader;

/*
 * The headers argument of send() and produce() (a JSON object of string or
 * null values), checked, as a palloc'd array; returns how many.  Adds their
 * bytes to *total_bytes.  (produce.c)
 */
extern int	kb_collect_headers(Jsonb *headers, KbHeader **result,
							   size_t *total_bytes);

/* Which reserved header (origin, lsn, seq, commit_time) name is, or NULL. */
extern const char *kb_reserved_header(const char *name, int name_len);

/*
 * The size librdkafka gives a record when it checks it against
 * message.max.bytes: key, value and headers, each header's lengths as
 * varints, and the most the framing of one record takes.  (produce.c)
 */
extern size_t kb_record_wire_size(size_t key_len, size_t value_len,
								  const KbHeader *headers, int nheaders);
#define KB_VALUE_KIND_JSON		'j'
#define KB_VALUE_KIND_TEXT		't'
#define KB_VALUE_KIND_BYTES		'b'

extern int	kb_fix_text_settings(void);
extern char *kb_default_topic(const char *relname);
extern char *kb_default_event_prefix(const char *relname);

/*
 * ---- Snapshots of published tables (snapshot.c) ----
 *
 * While a table's snapshot runs, the output plugin drops the PUT events of
 * keys the snapshot has not reached yet, as of the change's historic
 * catalog snapshot: the snapshot chunk that reaches them publishes the row.
 */
typedef struct KbSnapshotFilter KbSnapshotFilter;

extern KbSnapshotFilter *kb_snapshot_filter_create(struct RelationData *target,
												   const KbPublication *pub);
extern bool kb_snapshot_filter_skips(KbSnapshotFilter *filter, Datum *values,
									 bool *nulls);
extern void kb_invalidate_publication(struct RelationData *rel);
extern int64 kb_estimate_rows(struct RelationData *rel);
extern char **kb_snapshot_key_strings(Datum key, int *n);

#endif							/* KB_EVENT_CODEC_H */
