/*-------------------------------------------------------------------------
 * apply.h
 *	  The apply side: subscriptions (subscribe.c), the reading of events
 *	  (event_reader.c) and the applying of one Kafka record to its table
 *	  (apply.c), which the applier worker (applier.c) drives.
 *
 * docs/applying.md describes the same behaviour for users.
 *-------------------------------------------------------------------------
 */
#ifndef KB_APPLY_H
#define KB_APPLY_H

#include "postgres.h"

#include "common/jsonapi.h"
#include "datatype/timestamp.h"
#include "nodes/pg_list.h"
#include "replication/origin.h"

#include <librdkafka/rdkafka.h>

#include "event_codec.h"

/* ---- conflict.c ---- */

typedef enum KbConflictPolicy
{
	KB_POLICY_LAST_WRITE_WINS,	/* the newer version wins, everywhere */
	KB_POLICY_KEEP_LOCAL,		/* a row another origin wrote keeps its version */
	KB_POLICY_APPLY_REMOTE,		/* no check: the remote change is applied */
	KB_POLICY_ERROR				/* a conflicting change goes to the dead letters */
} KbConflictPolicy;

/* A row version: who wrote it, when. */
typedef struct KbVersion
{
	TimestampTz commit_time;	/* DT_NOBEGIN: unknown, older than any */
	const char *origin;			/* instance id */
} KbVersion;

extern Oid	kb_conflict_writer;
extern uint64 kb_conflicts_counted;

extern KbConflictPolicy kb_parse_conflict_policy(const char *name);
extern const char *kb_conflict_policy_name(KbConflictPolicy policy);
extern int	kb_version_cmp(const KbVersion *a, const KbVersion *b);
extern RepOriginId kb_origin_for_instance(const char *instance, bool manual);
extern void kb_row_version(TransactionId xmin, const KbVersion *current, KbVersion *v);
/*
 * The security context in which a table's own code (triggers, defaults,
 * checks, policies, index expressions) runs for an applied event, as the
 * subscription's apply_role: restricted, as core's apply workers run it,
 * so that it cannot leave temporary objects, prepared statements or held
 * cursors in the session that runs the next events.
 */
#define KB_APPLY_SEC_CONTEXT (SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION)

extern char *kb_key_text(int nkeys, const Datum *values, const Oid *types);
extern bool kb_tombstone_find(Oid relid, const char *key, KbVersion *v);
extern void kb_tombstones_find(Oid relid, int n, char **keys, bool *found, KbVersion *v);
extern bool kb_tombstones_may_exist(Oid relid);
extern void kb_tombstone_store(Oid relid, const char *key, const KbVersion *v);
extern void kb_tombstone_forget(Oid relid, const char *key);
extern void kb_conflict_record(Oid relid, const char *key, const char *kind,
							   const KbVersion *local, const KbVersion *remote,
							   KbConflictPolicy policy, const char *resolution,
							   const char *topic, int32 partition, int64 offset);
extern uint64 kb_prune_conflicts(void);

/* ---- subscribe.c ---- */

/* A table's subscription, as kafka_bridge.subscriptions holds it. */
typedef struct KbSubscription
{
	Oid			relid;
	char	   *topic;
	KbEventFormat format;
	char	   *event_prefix;
	Oid			apply_role;
	KbConflictPolicy policy;
	TransactionId row_xmin;		/* of its row: a new row is a new subscription */
} KbSubscription;

/*
 * Every subscription of the database (in a transaction, SPI connected);
 * with lock, held unchanged until the transaction ends.
 */
extern List *kb_load_subscriptions(bool lock);

/* Why a subscription may not be applied now, or NULL (see subscribe.c). */
extern char *kb_subscription_refusal(const KbSubscription *s);

/* The sql_drop event trigger's part for subscriptions. */
extern void kb_forget_dropped_subscriptions(void);

/* Set by subscribe()/unsubscribe(): wake the applier when the transaction commits. */
extern bool kb_subscriptions_changed;

/* ---- event_reader.c ---- */

/*
 * A member of a JSON object.  Scalars are held as text (strings
 * de-escaped, numbers as written, true/false/null by name); objects and
 * arrays as their JSON text.
 */
typedef struct KbJsonField
{
	char	   *name;
	JsonTokenType type;			/* STRING, NUMBER, TRUE, FALSE, NULL,
								 * OBJECT_START or ARRAY_START */
	char	   *text;
	bool		used;			/* set by whoever consumed it */
} KbJsonField;

typedef struct KbJsonObject
{
	int			nfields;
	int			capacity;
	KbJsonField *fields;
} KbJsonObject;

/*
 * Parse json (len bytes, need not be terminated) as one JSON object into
 * *obj; when descend is not NULL and the object has an object member of
 * that name, its members go to *inner as well.  Returns NULL on success,
 * else why the text is no JSON object.
 */
extern char *kb_json_parse_object(char *json, int len, KbJsonObject *obj,
								  const char *descend, KbJsonObject *inner,
								  bool *has_inner);
extern KbJsonField *kb_json_find(KbJsonObject *obj, const char *name);

/*
 * A JSON array as a PostgreSQL array literal ("[1,[2]]" -> "{1,{2}}");
 * NULL and *error set when it is no array of arrays and scalars.  With
 * json_elements (json[], jsonb[]) string elements keep their JSON quotes.
 */
extern char *kb_json_array_to_literal(char *json, bool json_elements, char **error);

/* The strings of a JSON array of strings; false when it is not one. */
extern bool kb_json_string_array(char *json, List **strings);

/* ---- apply.c ---- */

typedef enum KbApplyOutcome
{
	KB_APPLY_APPLIED,			/* the table changed (or a DELETE found no row) */
	KB_APPLY_SKIPPED,			/* nothing to do: tombstone, own event, replay */
	KB_APPLY_REJECTED			/* bad event: *reason says why, nothing written */
} KbApplyOutcome;

/* What the applier knows of a record before applying it. */
typedef struct KbRecord
{
	rd_kafka_message_t *msg;
	const char *origin;			/* "origin" header, or NULL */
	XLogRecPtr	lsn;			/* "lsn" header, or InvalidXLogRecPtr */
	uint32		seq;			/* "seq" header, or 0 */
	TimestampTz commit_time;	/* "commit_time" header, or DT_NOBEGIN when none */
	/* the partition's counters, for a gathered row the policy skips later */
	int64	   *applied_count;
	int64	   *skipped_count;
} KbRecord;

/*
 * Apply one record of a subscribed topic to its table.  Raises an error
 * when PostgreSQL refuses the change (the caller decides whether that is
 * the event's fault); returns KB_APPLY_REJECTED with *reason when the
 * event itself is malformed.  The caller runs it as the subscription's
 * apply role.
 */
extern KbApplyOutcome kb_apply_record(KbSubscription *sub, KbRecord *rec,
									  bool gather, char **reason);

/*
 * With gather, kb_apply_record may keep a PUT to apply later with others:
 * kb_apply_flush() applies what is kept (before the transaction commits),
 * kb_apply_discard() forgets it (after a rollback).
 */
extern void kb_apply_flush(void);
extern void kb_apply_discard(void);

/* The column being converted when an error is raised, or NULL. */
extern const char *kb_apply_current_column(void);

/* Forget cached plans and table shapes (subscriptions changed). */
extern void kb_apply_reset(void);

#endif							/* KB_APPLY_H */
