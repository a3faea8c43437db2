/*-------------------------------------------------------------------------
 * settings.c
 *	  The kafka_bridge.* settings: definitions, strict validation, the
 *	  librdkafka property lists, and keeping the two secrets out of sight.
 *
 * Every setting is checked when it is set (postgresql.conf, reload, ALTER
 * SYSTEM), so a bad value is refused with a message naming the setting and,
 * for property lists, the librdkafka property; the value in force stays.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "access/xlog.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/elog.h"
#include "utils/guc.h"
#include "utils/varlena.h"

#include "kafka_bridge.h"

char	   *kb_bootstrap_servers = NULL;
char	   *kb_databases = NULL;
char	   *kb_instance_id_setting = NULL;
char	   *kb_kafka_options = NULL;
char	   *kb_producer_options = NULL;
char	   *kb_consumer_options = NULL;
char	   *kb_sasl_password = NULL;
char	   *kb_ssl_key_password = NULL;
int			kb_worker_restart_delay = 5;
int			kb_max_event_size;
int			kb_apply_batch_size;
int			kb_tombstone_retention;
int			kb_conflict_retention;
int			kb_probe_interval = 5;
bool		kb_create_topics = true;
bool		kb_stream_large_transactions = true;
int			kb_topic_partitions = -1;
int			kb_topic_replication_factor = -1;
int			kb_topic_cleanup_policy = KB_CLEANUP_COMPACT;
int			kb_snapshot_chunk_rows = 50000;
int			kb_snapshot_chunk_time = 200;

static const struct config_enum_entry cleanup_policies[] = {
	{"compact", KB_CLEANUP_COMPACT, false},
	{"delete", KB_CLEANUP_DELETE, false},
	{"compact,delete", KB_CLEANUP_COMPACT_DELETE, false},
	{NULL, 0, false}
};

static emit_log_hook_type prev_emit_log_hook = NULL;

/*
 * librdkafka properties that kafka_bridge sets itself, because its
 * guarantees depend on them (no loss, offsets stored with the rows).
 */
static const char *const managed_properties[] = {
	"bootstrap.servers", "metadata.broker.list", "enable.idempotence",
	"acks", "request.required.acks", "enable.auto.commit",
	"enable.auto.offset.store", "group.id", "transactional.id",
	/* logs must reach the worker's thread, never run on librdkafka's */
	"log.queue",
	/* the slot moves on acknowledgements: each must be reported */
	"delivery.report.only.error",
	NULL
};

/* Properties that would load code into the server process, or run it. */
static const char *const forbidden_properties[] = {
	"plugin.library.paths", "interceptors",
	"ssl.engine.location", "ssl.providers",
	NULL
};

/* A property that runs a shell command, as the server's user. */
static const char *const command_properties[] = {
	"sasl.kerberos.kinit.cmd",
	NULL
};

/*
 * Properties holding secrets: refused in the property lists, which every
 * user can read, so that secrets only live in the superuser-only settings.
 */
static const char *const secret_properties[] = {
	"sasl.password", "ssl.key.password", "ssl.keystore.password",
	"ssl.key.pem", "sasl.oauthbearer.client.secret",
	"sasl.oauthbearer.config",
	NULL
};

static bool
name_in(const char *name, const char *const *list)
{
	for (; *list; list++)
		if (strcmp(name, *list) == 0)
			return true;
	return false;
}

/*
 * Parse "name=value name='quoted value'" and feed each pair to conf.
 *
 * Values are separated by white space; a value containing white space is
 * single-quoted, with \' and \\ as escapes (as in a libpq connection
 * string).  A property given twice is an error rather than a silent
 * override.
 */
bool
kb_apply_property_list(rd_kafka_conf_t *conf, const char *list, char **detail)
{
	const char *p = list ? list : "";
	List	   *seen = NIL;
	StringInfoData name;
	StringInfoData value;

	initStringInfo(&name);
	initStringInfo(&value);
	*detail = NULL;

	for (;;)
	{
		char		errstr[512];
		ListCell   *lc;

		while (isspace((unsigned char) *p))
			p++;
		if (*p == '\0')
			break;

		resetStringInfo(&name);
		resetStringInfo(&value);
		while (*p && *p != '=' && !isspace((unsigned char) *p))
			appendStringInfoChar(&name, *p++);
		if (*p != '=')
		{
			*detail = psprintf("Expected \"name=value\" after \"%s\".", name.data);
			return false;
		}
		p++;
		if (name.len == 0)
		{
			*detail = pstrdup("A property name is missing before \"=\".");
			return false;
		}
		if (*p == '\'')
		{
			p++;
			while (*p && *p != '\'')
			{
				if (*p == '\\' && p[1])
					p++;
				appendStringInfoChar(&value, *p++);
			}
			if (*p != '\'')
			{
				*detail = psprintf("The value of librdkafka property \"%s\" lacks its closing quote.",
								   name.data);
				return false;
			}
			p++;
		}
		else
		{
			while (*p && !isspace((unsigned char) *p))
				appendStringInfoChar(&value, *p++);
		}

		if (name_in(name.data, managed_properties))
		{
			*detail = psprintf("kafka_bridge sets librdkafka property \"%s\" itself.",
							   name.data);
			return false;
		}
		if (name_in(name.data, forbidden_properties))
		{
			*detail = psprintf("librdkafka property \"%s\" would load a library into the server and is not allowed.",
							   name.data);
			return false;
		}
		if (name_in(name.data, command_properties))
		{
			*detail = psprintf("librdkafka property \"%s\" would run a shell command as the server's user and is not allowed.",
							   name.data);
			return false;
		}
		if (name_in(name.data, secret_properties))
		{
			*detail = psprintf("librdkafka property \"%s\" holds a secret and is not accepted in a setting that every user can read; "
							   "use kafka_bridge.sasl_password or kafka_bridge.ssl_key_password.",
							   name.data);
			return false;
		}
		foreach(lc, seen)
		{
			if (strcmp((char *) lfirst(lc), name.data) == 0)
			{
				*detail = psprintf("librdkafka property \"%s\" is given twice.", name.data);
				return false;
			}
		}
		seen = lappend(seen, pstrdup(name.data));

		if (conf &&
			rd_kafka_conf_set(conf, name.data, value.data, errstr,
							  sizeof(errstr)) != RD_KAFKA_CONF_OK)
		{
			*detail = psprintf("librdkafka property \"%s\": %s", name.data, errstr);
			return false;
		}
	}
	return true;
}

/*
 * Check hook shared by the three property-list settings: apply the list to a
 * scratch configuration so librdkafka itself judges names and values.
 */
static bool
check_property_list(char **newval, void **extra, GucSource source)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	char	   *detail;
	bool		ok;

	ok = kb_apply_property_list(conf, *newval, &detail);
	rd_kafka_conf_destroy(conf);
	if (!ok)
	{
		GUC_check_errcode(ERRCODE_INVALID_PARAMETER_VALUE);
		GUC_check_errdetail("%s", detail);
		GUC_check_errhint("The setting lists librdkafka properties as name=value separated by spaces; see the librdkafka CONFIGURATION reference.");
	}
	return ok;
}

static bool
check_bootstrap_servers(char **newval, void **extra, GucSource source)
{
	char	   *copy = pstrdup(*newval ? *newval : "");
	char	   *tok;
	char	   *save;

	for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
	{
		char	   *t = tok;
		char	   *colon;

		while (isspace((unsigned char) *t))
			t++;
		if (*t == '\0')
			continue;
		colon = strrchr(t, ':');
		if (colon)
		{
			char	   *end;
			long		port = strtol(colon + 1, &end, 10);

			while (isspace((unsigned char) *end))
				end++;
			if (colon[1] == '\0' || *end != '\0' || port < 1 || port > 65535)
			{
				GUC_check_errdetail("\"%s\" is not host:port with a port between 1 and 65535.", t);
				return false;
			}
		}
	}
	return true;
}

static bool
check_databases(char **newval, void **extra, GucSource source)
{
	char	   *copy = pstrdup(*newval ? *newval : "");
	List	   *names;

	if (!SplitIdentifierString(copy, ',', &names))
	{
		GUC_check_errdetail("List syntax is invalid: give database names separated by commas.");
		return false;
	}
	if (list_length(names) > KB_MAX_DATABASES)
	{
		GUC_check_errdetail("At most %d databases can be listed.", KB_MAX_DATABASES);
		return false;
	}
	for (int i = 0; i < list_length(names); i++)
	{
		for (int j = 0; j < i; j++)
		{
			if (strcmp(list_nth(names, i), list_nth(names, j)) == 0)
			{
				GUC_check_errdetail("Database \"%s\" is listed twice.",
									(char *) list_nth(names, i));
				return false;
			}
		}
	}
	return true;
}

/* Partitions and replicas: a positive number, or -1 for the broker's default. */
static bool
check_topic_count(int *newval, void **extra, GucSource source)
{
	if (*newval == 0)
	{
		GUC_check_errdetail("Give a positive number, or -1 for the broker's default.");
		return false;
	}
	return true;
}

/* An instance id goes into every event's headers and into topic names. */
static bool
check_instance_id(char **newval, void **extra, GucSource source)
{
	const char *p = *newval ? *newval : "";

	if (strlen(p) > 64)
	{
		GUC_check_errdetail("An instance id has at most 64 characters.");
		return false;
	}
	for (; *p; p++)
	{
		if (!isalnum((unsigned char) *p) && *p != '.' && *p != '_' && *p != '-')
		{
			GUC_check_errdetail("An instance id may contain only letters, digits, \".\", \"_\" and \"-\".");
			return false;
		}
	}
	return true;
}

/*
 * The instance id in force: the setting, or else this cluster's system
 * identifier, which initdb makes unique (only copies of one data directory
 * share it).
 */
const char *
kb_instance_id(void)
{
	static char fallback[32];

	if (kb_instance_id_setting && kb_instance_id_setting[0])
		return kb_instance_id_setting;
	if (fallback[0] == '\0')
		snprintf(fallback, sizeof(fallback), UINT64_FORMAT, GetSystemIdentifier());
	return fallback;
}

List *
kb_database_names(void)
{
	char	   *copy = pstrdup(kb_databases ? kb_databases : "");
	List	   *names = NIL;

	/* already validated by check_databases */
	(void) SplitIdentifierString(copy, ',', &names);
	return names;
}

void
kb_require_preload(const char *what)
{
	if (!kb_preloaded)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("%s needs kafka_bridge to be loaded at server start", what),
				 errhint("Add kafka_bridge to shared_preload_libraries in postgresql.conf "
						 "(shared_preload_libraries = 'kafka_bridge') and restart the server.")));
}

/*
 * Replace every occurrence of a configured secret in text by asterisks, for
 * messages that come from librdkafka.
 */
void
kb_redact_secrets(char *text)
{
	const char *secrets[] = {kb_sasl_password, kb_ssl_key_password};

	for (int i = 0; i < lengthof(secrets); i++)
	{
		const char *s = secrets[i];
		size_t		len;
		char	   *hit;

		if (s == NULL || (len = strlen(s)) < 1)
			continue;
		while ((hit = strstr(text, s)) != NULL)
			memset(hit, '*', len);
	}
}

/* Setting names are case-insensitive, so are these checks. */
static bool
mentions_secret(const char *message)
{
	if (strcasestr(message, "kafka_bridge.") == NULL)
		return false;
	if (strcasestr(message, "kafka_bridge.sasl_password") ||
		strcasestr(message, "kafka_bridge.ssl_key_password"))
		return true;
	/* a secret typed into a property list by mistake: refused, but logged */
	for (const char *const *p = secret_properties; *p; p++)
		if (strcasestr(message, *p))
			return true;
	return false;
}

/*
 * The server logs the new value of a reloaded setting, a refused value, and
 * the statement that caused an error.  For messages about the secrets, keep
 * only the part before the value and drop the statement.
 */
static void
kb_emit_log_hook(ErrorData *edata)
{
	const char *m = edata->message;
	const char *name;
	const char *end = NULL;

	if (m && mentions_secret(m))
	{
		/* keep the name, its closing quote and the words up to the value */
		name = strcasestr(m, "kafka_bridge.");
		end = name + strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_.");
		if (*end == '"')
			end++;
		end += strcspn(end, "\"'=");
	}
	/* a message that names a secret setting without a value stays whole */
	if (end && *end != '\0')
	{
		edata->message = psprintf("%.*s(value hidden by kafka_bridge)",
								  (int) (end - m), m);
		edata->hide_stmt = true;
		edata->context = NULL;
		edata->internalquery = NULL;
	}
	/* a statement or query text naming a secret setting is never logged */
	if ((edata->context && mentions_secret(edata->context)) ||
		(edata->internalquery && mentions_secret(edata->internalquery)))
	{
		edata->context = NULL;
		edata->internalquery = NULL;
		edata->hide_stmt = true;
	}
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

void
kb_define_settings(void)
{
	DefineCustomStringVariable("kafka_bridge.bootstrap_servers",
							   "Kafka brokers to connect to, as host:port separated by commas.",
							   "Empty means the workers wait, doing nothing, until it is set.",
							   &kb_bootstrap_servers, "",
							   PGC_SIGHUP, 0,
							   check_bootstrap_servers, NULL, NULL);

	DefineCustomStringVariable("kafka_bridge.databases",
							   "Databases that get a kafka_bridge worker, separated by commas.",
							   NULL,
							   &kb_databases, "",
							   PGC_SIGHUP, GUC_LIST_INPUT,
							   check_databases, NULL, NULL);

	DefineCustomStringVariable("kafka_bridge.instance_id",
							   "This instance's name in the events it publishes.",
							   "Empty means the database system identifier. Instances that sync "
							   "through one topic must have different ids.",
							   &kb_instance_id_setting, "",
	/* PostgreSQL allows postmaster-level settings only to preloaded modules */
							   process_shared_preload_libraries_in_progress
							   ? PGC_POSTMASTER : PGC_SIGHUP, 0,
							   check_instance_id, NULL, NULL);

	DefineCustomStringVariable("kafka_bridge.kafka_options",
							   "librdkafka properties for every Kafka client, as name=value separated by spaces.",
							   NULL,
							   &kb_kafka_options, "",
							   PGC_SIGHUP, 0,
							   check_property_list, NULL, NULL);

	DefineCustomStringVariable("kafka_bridge.producer_options",
							   "librdkafka properties for the producer, applied after kafka_bridge.kafka_options.",
							   NULL,
							   &kb_producer_options, "",
							   PGC_SIGHUP, 0,
							   check_property_list, NULL, NULL);

	DefineCustomStringVariable("kafka_bridge.consumer_options",
							   "librdkafka properties for the consumer, applied after kafka_bridge.kafka_options.",
							   NULL,
							   &kb_consumer_options, "",
							   PGC_SIGHUP, 0,
							   check_property_list, NULL, NULL);

	DefineCustomStringVariable("kafka_bridge.sasl_password",
							   "SASL password for the Kafka clients (librdkafka sasl.password).",
							   "Readable by superusers only, and never written to the server log.",
							   &kb_sasl_password, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("kafka_bridge.ssl_key_password",
							   "Password of the client's SSL private key (librdkafka ssl.key.password).",
							   "Readable by superusers only, and never written to the server log.",
							   &kb_ssl_key_password, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("kafka_bridge.worker_restart_delay",
							"Time the launcher waits before restarting a worker that stopped.",
							NULL,
							&kb_worker_restart_delay, 5, 1, 3600,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("kafka_bridge.probe_interval",
							"Time between two checks of the brokers by an idle worker.",
							NULL,
							&kb_probe_interval, 5, 1, 3600,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("kafka_bridge.max_event_size",
							"Largest record the applier applies; a larger one goes to kafka_bridge.dead_letters.",
							NULL,
							&kb_max_event_size, 64 * 1024, 1, 1024 * 1024,
							PGC_SIGHUP, GUC_UNIT_KB,
							NULL, NULL, NULL);

	DefineCustomIntVariable("kafka_bridge.apply_batch_size",
							"Most records the applier gathers before applying them.",
							"Records are applied in a transaction per source transaction.",
							&kb_apply_batch_size, 1000, 1, 100000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("kafka_bridge.tombstone_retention",
							"How long the version of a deleted row is kept, so that an older change arriving later cannot bring the row back.",
							NULL,
							&kb_tombstone_retention, 7 * 24 * 3600, 60, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("kafka_bridge.conflict_retention",
							"How long kafka_bridge.conflicts keeps a conflict.",
							NULL,
							&kb_conflict_retention, 30 * 24 * 3600, 60, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("kafka_bridge.create_topics",
							 "Create the topics kafka_bridge publishes to when they do not exist.",
							 "With the kafka_bridge.topic_* settings; an existing topic is never changed.",
							 &kb_create_topics, true,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);

	DefineCustomBoolVariable("kafka_bridge.stream_large_transactions",
							 "Let PostgreSQL stream a transaction that outgrows logical_decoding_work_mem to the publisher before its commit.",
							 "The publisher keeps the transaction's records in a temporary file until the commit produces them; off, PostgreSQL spills the transaction's changes and the publisher decodes them all after the commit.",
							 &kb_stream_large_transactions, true,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("kafka_bridge.topic_partitions",
							"Partitions of the topics kafka_bridge creates; -1 means the broker's num.partitions.",
							NULL,
							&kb_topic_partitions, -1, -1, 100000,
							PGC_SIGHUP, 0,
							check_topic_count, NULL, NULL);

	DefineCustomIntVariable("kafka_bridge.topic_replication_factor",
							"Replicas of each partition of the topics kafka_bridge creates; -1 means the broker's default.replication.factor.",
							NULL,
							&kb_topic_replication_factor, -1, -1, 32767,
							PGC_SIGHUP, 0,
							check_topic_count, NULL, NULL);

	DefineCustomEnumVariable("kafka_bridge.topic_cleanup_policy",
							 "cleanup.policy of the row topics kafka_bridge creates.",
							 "compact keeps the latest record of every row (key); topics of kafka_bridge.send() records are always created with the broker's default.",
							 &kb_topic_cleanup_policy, KB_CLEANUP_COMPACT, cleanup_policies,
							 PGC_SIGHUP, 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("kafka_bridge.snapshot_chunk_rows",
							"Most rows one chunk of a snapshot reads.",
							"Each chunk holds a SHARE lock on the table while it reads its rows; Kafka's acknowledgements are awaited after it commits.",
							&kb_snapshot_chunk_rows, 50000, 1, 10000000,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("kafka_bridge.snapshot_chunk_time",
							"Longest time one chunk of a snapshot reads rows, while writers of the table wait.",
							NULL,
							&kb_snapshot_chunk_time, 200, 1, 60000,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	MarkGUCPrefixReserved("kafka_bridge");

	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = kb_emit_log_hook;
}
