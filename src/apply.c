/*-------------------------------------------------------------------------
 * apply.c
 *	  Applying one consumed event to its table: a PUT inserts or updates the
 *	  row with its key, a DELETE removes it, a TRUNCATE empties the table.
 *
 * Values never become SQL text: each column's value goes through the
 * column type's input function (so every type the publisher encodes comes
 * back as it was, and a value the type refuses is an error naming the
 * column), and the statements are prepared once per table and set of
 * columns, with quoted identifiers and bound parameters.  They run through
 * SPI as the subscription's apply role, so the role's privileges, row
 * security and the table's constraints hold for what Kafka writes.
 *
 * Columns an event lacks keep their value on update and get their default
 * on insert; event members that are no column are ignored (and logged once
 * per table); columns listed as "unchanged" (TOASTed values an UPDATE left
 * alone) keep the local value.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/relation.h"
#include "access/table.h"
#include "catalog/pg_index.h"
#include "catalog/pg_opclass.h"
#include "catalog/pg_operator.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "access/stratnum.h"
#include "common/hashfn.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "apply.h"
#include "kafka_bridge.h"

typedef enum PlanKind
{
	PLAN_UPSERT,
	PLAN_UPSERT_MANY,			/* one row per element of array parameters */
	PLAN_UPDATE,				/* the event leaves some columns unchanged */
	PLAN_DELETE,
	PLAN_LOCK,					/* lock the row with a key, read its xmin */
	PLAN_INSERT,				/* insert unless the key exists */
	PLAN_LOCK_MANY,				/* PLAN_LOCK for arrays of keys */
	PLAN_INSERT_MANY			/* PLAN_INSERT for arrays of rows */
} PlanKind;

typedef struct ApplyColumn
{
	char	   *name;
	AttrNumber	attnum;
	Oid			typid;
	int32		typmod;
	FmgrInfo	input;
	Oid			ioparam;
	bool		is_array;		/* JSON arrays become array literals */
	bool		is_json;		/* json or jsonb (or an array of them): JSON strings stay quoted */
	Oid			array_type;		/* for PLAN_UPSERT_MANY, or InvalidOid */
	int16		typlen;
	bool		typbyval;
	char		typalign;
	bool		writable;		/* not a generated column */
	bool		identity_always;	/* inserted only, never updated */
	int			key_pos;		/* position in the key, or -1 */
	char	   *eq_operator;	/* key columns: OPERATOR(schema.=) */
} ApplyColumn;

typedef struct ApplyPlan
{
	PlanKind	kind;
	Bitmapset  *columns;		/* indexes into ApplyTable.columns */
	SPIPlanPtr	plan;
} ApplyPlan;

typedef struct ApplyTable
{
	Oid			relid;			/* hash key */
	bool		valid;
	MemoryContext cxt;			/* everything below */
	char	   *name;			/* schema-qualified, quoted */
	int			ncolumns;
	ApplyColumn *columns;
	int			nkeys;
	int		   *keys;			/* column indexes, in key order */
	bool		identity_always;	/* inserts need OVERRIDING SYSTEM VALUE */
	bool		many_ok;		/* every column has an array type: PLAN_UPSERT_MANY */
	List	   *plans;			/* ApplyPlan */
	List	   *ignored;		/* member names already logged as no column */
} ApplyTable;

static HTAB *apply_tables = NULL;
static const char *current_column = NULL;

static void chunk_forget_table(struct ApplyTable *t);

const char *
kb_apply_current_column(void)
{
	return current_column;
}

static void
free_table(ApplyTable *t)
{
	ListCell   *lc;

	foreach(lc, t->plans)
		SPI_freeplan(((ApplyPlan *) lfirst(lc))->plan);
	if (t->cxt)
		MemoryContextDelete(t->cxt);
	t->cxt = NULL;
	t->plans = NIL;
	t->ignored = NIL;			/* it lived in t->cxt */
	t->valid = false;
}

/* ALTER TABLE and the like: rebuild the table's shape and plans at next use. */
static void
invalidate_table(Datum arg, Oid relid)
{
	HASH_SEQ_STATUS status;
	ApplyTable *t;

	if (apply_tables == NULL)
		return;
	hash_seq_init(&status, apply_tables);
	while ((t = hash_seq_search(&status)) != NULL)
		if (relid == InvalidOid || t->relid == relid)
			t->valid = false;
}

void
kb_apply_reset(void)
{
	HASH_SEQ_STATUS status;
	ApplyTable *t;

	if (apply_tables == NULL)
		return;
	kb_apply_discard();
	hash_seq_init(&status, apply_tables);
	while ((t = hash_seq_search(&status)) != NULL)
	{
		free_table(t);
		(void) hash_search(apply_tables, &t->relid, HASH_REMOVE, NULL);
	}
}

/* The equality operator of a key column's index opclass, qualified. */
static char *
key_operator(Oid opclass, Oid typid)
{
	HeapTuple	tup = SearchSysCache1(CLAOID, ObjectIdGetDatum(opclass));
	Oid			opfamily;
	Oid			opcintype;
	Oid			op;

	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for operator class %u", opclass);
	opfamily = ((Form_pg_opclass) GETSTRUCT(tup))->opcfamily;
	opcintype = ((Form_pg_opclass) GETSTRUCT(tup))->opcintype;
	ReleaseSysCache(tup);
	op = get_opfamily_member(opfamily, opcintype, opcintype, BTEqualStrategyNumber);
	if (!OidIsValid(op))
		return pstrdup("OPERATOR(pg_catalog.=)");
	tup = SearchSysCache1(OPEROID, ObjectIdGetDatum(op));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for operator %u", op);
	{
		Form_pg_operator form = (Form_pg_operator) GETSTRUCT(tup);
		char	   *result = psprintf("OPERATOR(%s.%s)",
									  quote_identifier(get_namespace_name(form->oprnamespace)),
									  NameStr(form->oprname));

		ReleaseSysCache(tup);
		return result;
	}
}

static void
build_table(ApplyTable *t)
{
	Relation	rel = table_open(t->relid, AccessShareLock);
	TupleDesc	desc = RelationGetDescr(rel);
	Oid			index = RelationGetReplicaIndex(rel);
	HeapTuple	indtup;
	Form_pg_index indform;
	oidvector  *indclass;
	bool		isnull;
	MemoryContext old;

	if (!OidIsValid(index))
		index = RelationGetPrimaryKeyIndex(rel);
	if (!OidIsValid(index))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("table \"%s\" has no primary key any more", RelationGetRelationName(rel)),
				 errhint("Add a primary key: events are applied by key.")));

	t->cxt = AllocSetContextCreate(CacheMemoryContext, "kafka_bridge apply table",
								   ALLOCSET_SMALL_SIZES);
	old = MemoryContextSwitchTo(t->cxt);
	t->name = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
										 RelationGetRelationName(rel));
	t->columns = palloc0(sizeof(ApplyColumn) * Max(desc->natts, 1));
	t->ncolumns = 0;
	t->identity_always = false;
	t->many_ok = true;
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		ApplyColumn *c;
		Oid			infunc;

		if (att->attisdropped)
			continue;
		c = &t->columns[t->ncolumns++];
		c->name = pstrdup(NameStr(att->attname));
		c->attnum = att->attnum;
		c->typid = att->atttypid;
		c->typmod = att->atttypmod;
		getTypeInputInfo(att->atttypid, &infunc, &c->ioparam);
		fmgr_info_cxt(infunc, &c->input, t->cxt);
		c->is_array = OidIsValid(get_element_type(getBaseType(att->atttypid)));
		{
			Oid			base = getBaseType(c->is_array ? get_element_type(getBaseType(att->atttypid))
											   : att->atttypid);

			c->is_json = (base == JSONOID || base == JSONBOID);
		}
		c->writable = (att->attgenerated == '\0');
		get_typlenbyvalalign(att->atttypid, &c->typlen, &c->typbyval, &c->typalign);
		/* an array column's array type would be its own: unnest flattens it */
		c->array_type = c->is_array ? InvalidOid : get_array_type(att->atttypid);
		c->key_pos = -1;
		c->identity_always = (att->attidentity == ATTRIBUTE_IDENTITY_ALWAYS);
		t->identity_always |= c->identity_always;
		t->many_ok &= (!c->writable || OidIsValid(c->array_type));
	}

	indtup = SearchSysCache1(INDEXRELID, ObjectIdGetDatum(index));
	if (!HeapTupleIsValid(indtup))
		elog(ERROR, "cache lookup failed for index %u", index);
	indform = (Form_pg_index) GETSTRUCT(indtup);
	indclass = (oidvector *) DatumGetPointer(SysCacheGetAttr(INDEXRELID, indtup,
															 Anum_pg_index_indclass, &isnull));
	t->nkeys = indform->indnkeyatts;
	t->keys = palloc(sizeof(int) * t->nkeys);
	for (int k = 0; k < t->nkeys; k++)
	{
		for (int i = 0; i < t->ncolumns; i++)
			if (t->columns[i].attnum == indform->indkey.values[k])
			{
				t->keys[k] = i;
				t->columns[i].key_pos = k;
				t->columns[i].eq_operator = key_operator(indclass->values[k],
														 t->columns[i].typid);
			}
	}
	ReleaseSysCache(indtup);
	MemoryContextSwitchTo(old);
	table_close(rel, AccessShareLock);
	t->valid = true;
}

static ApplyTable *
get_table(Oid relid)
{
	ApplyTable *t;
	bool		found;

	if (apply_tables == NULL)
	{
		HASHCTL		ctl = {0};

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(ApplyTable);
		apply_tables = hash_create("kafka_bridge apply tables", 16, &ctl,
								   HASH_ELEM | HASH_BLOBS);
		CacheRegisterRelcacheCallback(invalidate_table, (Datum) 0);
	}
	t = hash_search(apply_tables, &relid, HASH_ENTER, &found);
	if (!found)
	{
		memset(((char *) t) + sizeof(Oid), 0, sizeof(ApplyTable) - sizeof(Oid));
	}
	if (!t->valid)
	{
		chunk_forget_table(t);
		free_table(t);
		build_table(t);
	}
	return t;
}

/* A prepared statement of the given kind for a set of columns. */
static SPIPlanPtr
get_plan(ApplyTable *t, PlanKind kind, Bitmapset *columns)
{
	ListCell   *lc;
	StringInfoData sql;
	Oid		   *types;
	int			nparams = 0;
	int			col;
	bool		first = true;
	ApplyPlan  *p;
	MemoryContext old;
	int		   *param_of = palloc(sizeof(int) * t->ncolumns);

	foreach(lc, t->plans)
	{
		p = lfirst(lc);
		if (p->kind == kind && bms_equal(p->columns, columns))
			return p->plan;
	}

	/* parameters: the columns given, in column order */
	types = palloc(sizeof(Oid) * Max(t->ncolumns, 1));
	col = -1;
	while ((col = bms_next_member(columns, col)) >= 0)
	{
		param_of[col] = ++nparams;
		types[nparams - 1] = kind == PLAN_UPSERT_MANY || kind == PLAN_INSERT_MANY ||
			kind == PLAN_LOCK_MANY ? t->columns[col].array_type : t->columns[col].typid;
	}

	initStringInfo(&sql);
	if (kind == PLAN_UPSERT || kind == PLAN_UPSERT_MANY || kind == PLAN_INSERT ||
		kind == PLAN_INSERT_MANY)
	{
		bool		many = (kind == PLAN_UPSERT_MANY || kind == PLAN_INSERT_MANY);
		bool		nothing = (kind == PLAN_INSERT || kind == PLAN_INSERT_MANY);

		bool		any_set = false;

		appendStringInfo(&sql, "INSERT INTO %s AS t (", t->name);
		col = -1;
		while ((col = bms_next_member(columns, col)) >= 0)
		{
			appendStringInfo(&sql, "%s%s", first ? "" : ", ", quote_identifier(t->columns[col].name));
			first = false;
		}
		appendStringInfoString(&sql, t->identity_always ? ") OVERRIDING SYSTEM VALUE " : ") ");
		appendStringInfoString(&sql, many ? "SELECT * FROM ROWS FROM (" : "VALUES (");
		for (int i = 1; i <= nparams; i++)
			appendStringInfo(&sql, many ? "%spg_catalog.unnest($%d)" : "%s$%d",
							 i > 1 ? ", " : "", i);
		appendStringInfoString(&sql, ") ON CONFLICT (");
		for (int k = 0; k < t->nkeys; k++)
			appendStringInfo(&sql, "%s%s", k > 0 ? ", " : "",
							 quote_identifier(t->columns[t->keys[k]].name));
		if (nothing)
			appendStringInfoString(&sql, ") DO NOTHING");
		else
			appendStringInfoString(&sql, ") DO UPDATE SET ");
		col = -1;
		while (!nothing && (col = bms_next_member(columns, col)) >= 0)
		{
			/*
			 * A GENERATED ALWAYS identity column can be updated to DEFAULT
			 * only: it keeps the value it was inserted with (which no
			 * update of the source changes either).
			 */
			if (t->columns[col].key_pos >= 0 || t->columns[col].identity_always)
				continue;
			appendStringInfo(&sql, "%s%s = excluded.%s", any_set ? ", " : "",
							 quote_identifier(t->columns[col].name),
							 quote_identifier(t->columns[col].name));
			any_set = true;
		}
		if (!any_set && !nothing)
		{
			/* only key columns: nothing to update */
			sql.len -= strlen(" DO UPDATE SET ");
			sql.data[sql.len] = '\0';
			appendStringInfoString(&sql, " DO NOTHING");
		}
	}
	else if (kind == PLAN_UPDATE)
	{
		bool		any_set = false;

		appendStringInfo(&sql, "UPDATE %s SET ", t->name);
		col = -1;
		while ((col = bms_next_member(columns, col)) >= 0)
		{
			if (t->columns[col].key_pos >= 0 || t->columns[col].identity_always)
				continue;
			appendStringInfo(&sql, "%s%s = $%d", any_set ? ", " : "",
							 quote_identifier(t->columns[col].name), param_of[col]);
			any_set = true;
		}
		if (!any_set)
		{
			int			k0 = t->keys[0];

			appendStringInfo(&sql, "%s = $%d", quote_identifier(t->columns[k0].name),
							 param_of[k0]);
		}
	}
	else if (kind == PLAN_LOCK)
		appendStringInfo(&sql, "SELECT xmin FROM %s", t->name);
	else if (kind == PLAN_LOCK_MANY)
	{
		/*
		 * The keys as a set s(k1, ..., ord), each locking its row by the
		 * key index (a lateral probe per key: a join could read the whole
		 * table to lock a few rows).
		 */
		appendStringInfoString(&sql, "SELECT s.ord, l.xmin FROM ROWS FROM (");
		for (int i = 1; i <= nparams; i++)
			appendStringInfo(&sql, "%spg_catalog.unnest($%d)", i > 1 ? ", " : "", i);
		appendStringInfoString(&sql, ") WITH ORDINALITY AS s(");
		for (int i = 1; i <= nparams; i++)
			appendStringInfo(&sql, "k%d, ", i);
		appendStringInfo(&sql, "ord), LATERAL (SELECT t.xmin FROM %s t WHERE ", t->name);
		col = -1;
		while ((col = bms_next_member(columns, col)) >= 0)
			appendStringInfo(&sql, "%st.%s %s s.k%d", param_of[col] > 1 ? " AND " : "",
							 quote_identifier(t->columns[col].name), t->columns[col].eq_operator,
							 param_of[col]);
		appendStringInfoString(&sql, " FOR UPDATE) l");
	}
	else
		appendStringInfo(&sql, "DELETE FROM %s", t->name);

	if (kind == PLAN_UPDATE || kind == PLAN_DELETE || kind == PLAN_LOCK)
	{
		appendStringInfoString(&sql, " WHERE ");
		for (int k = 0; k < t->nkeys; k++)
		{
			ApplyColumn *c = &t->columns[t->keys[k]];

			appendStringInfo(&sql, "%s%s %s $%d", k > 0 ? " AND " : "",
							 quote_identifier(c->name), c->eq_operator,
							 param_of[t->keys[k]]);
		}
		if (kind == PLAN_LOCK)
			appendStringInfoString(&sql, " FOR UPDATE");
	}

	p = MemoryContextAlloc(t->cxt, sizeof(ApplyPlan));
	p->kind = kind;
	old = MemoryContextSwitchTo(t->cxt);
	p->columns = bms_copy(columns);
	MemoryContextSwitchTo(old);
	p->plan = SPI_prepare(sql.data, nparams, types);
	if (p->plan == NULL)
		elog(ERROR, "could not prepare \"%s\": %s", sql.data,
			 SPI_result_code_string(SPI_result));
	SPI_keepplan(p->plan);
	old = MemoryContextSwitchTo(t->cxt);
	t->plans = lappend(t->plans, p);
	MemoryContextSwitchTo(old);
	return p->plan;
}

static int
find_column(ApplyTable *t, const char *name)
{
	for (int i = 0; i < t->ncolumns; i++)
		if (strcmp(t->columns[i].name, name) == 0)
			return i;
	return -1;
}

/* The value of one column from its JSON member, through the type's input function. */
static Datum
column_value(ApplyColumn *c, KbJsonField *f, bool *isnull)
{
	char	   *text = f->text;
	Datum		d;

	current_column = c->name;
	*isnull = (f->type == JSON_TOKEN_NULL);
	if (*isnull)
	{
		/*
		 * Through the input function all the same: a domain's checks NOT
		 * NULL included (a NULL parameter of the column's own type is never
		 * coerced to it); a strict input function is not even called.
		 */
		d = InputFunctionCall(&c->input, NULL, c->ioparam, c->typmod);
		current_column = NULL;
		return d;
	}
	if (f->type == JSON_TOKEN_STRING && c->is_json && !c->is_array)
	{
		/* a JSON string is the value: give the type its JSON text */
		StringInfoData buf;

		initStringInfo(&buf);
		escape_json(&buf, f->text);
		text = buf.data;
	}
	else if (f->type == JSON_TOKEN_ARRAY_START && c->is_array)
	{
		char	   *error;

		text = kb_json_array_to_literal(f->text, c->is_json, &error);
		if (text == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
					 errmsg("malformed array: %s", error)));
	}
	d = InputFunctionCall(&c->input, text, c->ioparam, c->typmod);
	current_column = NULL;
	return d;
}

/* Set the reason a record is refused, and say it is refused. */
#define reject(reason, ...) \
	(*(reason) = psprintf(__VA_ARGS__), KB_APPLY_REJECTED)

/* Key members must name key columns and equal the row's values. */
static bool
key_matches_row(KbJsonObject *key, KbJsonObject *row, char **reason)
{
	for (int i = 0; i < key->nfields; i++)
	{
		KbJsonField *k = &key->fields[i];
		KbJsonField *r = kb_json_find(row, k->name);

		if (r == NULL || r->type != k->type ||
			(k->text != NULL && strcmp(k->text, r->text) != 0))
		{
			(void) reject(reason, "the record key does not match the row: key member \"%s\" is %s, the row's is %s",
				   k->name, k->text ? k->text : "null",
				   r == NULL ? "missing" : (r->text ? r->text : "null"));
			return false;
		}
	}
	return true;
}

static void
truncate_table(ApplyTable *t)
{
	int			rc = SPI_execute(psprintf("TRUNCATE %s", t->name), false, 0);

	if (rc != SPI_OK_UTILITY)
		elog(ERROR, "TRUNCATE %s failed: %s", t->name, SPI_result_code_string(rc));
}


/*
 * ---- PUTs applied many at a time ----
 *
 * Consecutive PUTs of one table that give the same columns are gathered
 * and applied by one INSERT ... SELECT FROM unnest(arrays) ... ON CONFLICT,
 * which starts the executor once for the lot instead of once per row.  The
 * statement may not meet one key twice, so a PUT of a key already gathered
 * applies the gathered rows first; so does any other event, which keeps
 * every table's changes in their order.
 */
static void run_plan(ApplyTable *t, PlanKind kind, Bitmapset *columns, Datum *values, char *nulls);

#define CHUNK_MAX 1000
#define CHUNK_HASH_SLOTS 4096	/* a power of two, > 2 * CHUNK_MAX */

typedef struct PendingChunk
{
	ApplyTable *table;
	Oid			apply_role;
	Bitmapset  *columns;
	int			ncolumns;
	int		   *column_index;	/* into table->columns */
	Datum	   *values;			/* [column][row] */
	bool	   *nulls;
	int			nrows;
	uint64		key_hashes[CHUNK_HASH_SLOTS];	/* 0: empty */
	/* rows under last_write_wins: their version, and each row's record */
	KbSubscription *sub;		/* NULL: applied unchecked */
	KbVersion	version;
	int32	   *partition;
	int64	   *offset;
	int64	  **applied_count;
	int64	  **skipped_count;
} PendingChunk;

static PendingChunk chunk;
static MemoryContext chunk_cxt = NULL;

static void
chunk_reset(void)
{
	if (chunk_cxt == NULL)
		chunk_cxt = AllocSetContextCreate(TopMemoryContext, "kafka_bridge pending rows",
										  ALLOCSET_DEFAULT_SIZES);
	MemoryContextReset(chunk_cxt);
	chunk.table = NULL;
	chunk.columns = NULL;
	chunk.nrows = 0;
	chunk.sub = NULL;
	memset(chunk.key_hashes, 0, sizeof(chunk.key_hashes));
}

/*
 * A table is about to be rebuilt (ALTER TABLE): apply its gathered rows
 * first, with the plans made for them.
 */
static void
chunk_forget_table(ApplyTable *t)
{
	if (chunk.table == t)
	{
		t->valid = true;
		kb_apply_flush();
		t->valid = false;
	}
}

/* Forget rows gathered by a batch that rolled back. */
void
kb_apply_discard(void)
{
	chunk_reset();
}

/* The chunk's column j (chunk order) for the rows in mask (NULL: all), as an array. */
static Datum
chunk_array(int j, const bool *mask)
{
	ApplyColumn *c = &chunk.table->columns[chunk.column_index[j]];
	Datum	   *values = chunk.values + (size_t) j * CHUNK_MAX;
	bool	   *nulls = chunk.nulls + (size_t) j * CHUNK_MAX;
	int			dims[1] = {0};
	int			lbs[1] = {1};

	if (mask != NULL)
	{
		Datum	   *v = palloc(sizeof(Datum) * chunk.nrows);
		bool	   *n = palloc(sizeof(bool) * chunk.nrows);

		for (int i = 0; i < chunk.nrows; i++)
			if (mask[i])
			{
				v[dims[0]] = values[i];
				n[dims[0]++] = nulls[i];
			}
		values = v;
		nulls = n;
	}
	else
		dims[0] = chunk.nrows;
	return PointerGetDatum(construct_md_array(values, nulls, 1, dims, lbs, c->typid,
											  c->typlen, c->typbyval, c->typalign));
}

/* Run a plan over the chunk's columns for the rows in mask, as the apply role. */
static void
chunk_run(PlanKind kind, Bitmapset *columns, const bool *mask)
{
	ApplyTable *t = chunk.table;
	Datum	   *arrays = palloc(sizeof(Datum) * chunk.ncolumns);
	int			n = 0;
	Oid			save_userid;
	int			save_sec;

	for (int j = 0; j < chunk.ncolumns; j++)
		if (bms_is_member(chunk.column_index[j], columns))
			arrays[n++] = chunk_array(j, mask);
	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(chunk.apply_role, save_sec | KB_APPLY_SEC_CONTEXT);
	run_plan(t, kind, columns, arrays, NULL);
	SetUserIdAndSecContext(save_userid, save_sec);
}

/* Row i of the chunk: its key as text, its values in column order. */
static char *
chunk_row(int i, Datum *values, char *nulls)
{
	ApplyTable *t = chunk.table;
	Datum	   *keyvals = palloc(sizeof(Datum) * t->nkeys);
	Oid		   *keytypes = palloc(sizeof(Oid) * t->nkeys);

	for (int j = 0; j < chunk.ncolumns; j++)
	{
		ApplyColumn *c = &t->columns[chunk.column_index[j]];
		Datum		d = chunk.values[(size_t) j * CHUNK_MAX + i];

		if (values)
		{
			values[j] = d;
			nulls[j] = chunk.nulls[(size_t) j * CHUNK_MAX + i] ? 'n' : ' ';
		}
		if (c->key_pos >= 0)
		{
			keyvals[c->key_pos] = d;
			keytypes[c->key_pos] = c->typid;
		}
	}
	return kb_key_text(t->nkeys, keyvals, keytypes);
}

static KbApplyOutcome apply_versioned(ApplyTable *t, KbSubscription *sub, KbRecord *rec,
									  bool is_delete, bool has_unchanged, Bitmapset *columns,
									  Datum *values, char *nulls, char **reason);

/*
 * The gathered rows under last_write_wins, as apply_versioned() does one:
 * one statement locks the rows the keys have and reads their xmin, one
 * reads the tombstones of the keys without a row, and after the choice,
 * one upsert and one insert write the rows that win.  An insert that meets
 * a row which appeared meanwhile leaves its rows to apply_versioned().
 */
static void
flush_versioned(void)
{
	ApplyTable *t = chunk.table;
	KbSubscription *sub = chunk.sub;
	int			n = chunk.nrows;
	bool	   *found = palloc0(sizeof(bool) * n);
	TransactionId *xmin = palloc0(sizeof(TransactionId) * n);
	char	  **keys = palloc0(sizeof(char *) * n);
	bool	   *has_tombstone = palloc0(sizeof(bool) * n);
	KbVersion  *tombstone = palloc0(sizeof(KbVersion) * n);
	bool	   *update = palloc0(sizeof(bool) * n);
	bool	   *insert = palloc0(sizeof(bool) * n);
	Bitmapset  *keycols = NULL;
	int			nmissing = 0;
	int			nupdate = 0;
	int			ninsert = 0;

	for (int k = 0; k < t->nkeys; k++)
		keycols = bms_add_member(keycols, t->keys[k]);
	chunk_run(PLAN_LOCK_MANY, keycols, NULL);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		bool		isnull;
		int64		ord = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull));

		found[ord - 1] = true;
		xmin[ord - 1] = DatumGetTransactionId(SPI_getbinval(SPI_tuptable->vals[r],
															 SPI_tuptable->tupdesc, 2, &isnull));
	}
	for (int i = 0; i < n; i++)
		nmissing += !found[i];
	if (nmissing > 0 && kb_tombstones_may_exist(sub->relid))
	{
		for (int i = 0; i < n; i++)
			if (!found[i])
				keys[i] = chunk_row(i, NULL, NULL);
		kb_tombstones_find(sub->relid, n, keys, has_tombstone, tombstone);
	}

	for (int i = 0; i < n; i++)
	{
		KbVersion	local = {0};
		bool		exists = found[i] || has_tombstone[i];
		bool		same_txn = found[i] && TransactionIdIsCurrentTransactionId(xmin[i]);
		bool		apply;

		if (found[i])
			kb_row_version(xmin[i], &chunk.version, &local);
		else if (has_tombstone[i])
			local = tombstone[i];
		apply = !exists || kb_version_cmp(&chunk.version, &local) >= 0;
		if (exists && !same_txn && strcmp(local.origin, chunk.version.origin) != 0)
			kb_conflict_record(sub->relid, keys[i] ? keys[i] : chunk_row(i, NULL, NULL),
							   found[i] ? "update_origin_differs" : "update_deleted",
							   &local, &chunk.version, sub->policy,
							   apply ? "applied_remote" : "kept_local",
							   chunk.offset[i] >= 0 ? sub->topic : NULL,
							   chunk.partition[i], chunk.offset[i]);
		if (!apply)
		{
			/* counted as applied when gathered */
			(*chunk.applied_count[i])--;
			(*chunk.skipped_count[i])++;
		}
		else if (found[i])
			update[i] = true, nupdate++;
		else
			insert[i] = true, ninsert++;
	}

	if (nupdate > 0)
		chunk_run(PLAN_UPSERT_MANY, chunk.columns, update);
	if (ninsert > 0)
	{
		chunk_run(PLAN_INSERT_MANY, chunk.columns, insert);
		if (SPI_processed == ninsert)
		{
			for (int i = 0; i < n; i++)
				if (insert[i] && has_tombstone[i])
					kb_tombstone_forget(sub->relid, keys[i]);
		}
		else
		{
			/* some keys got a row since they were locked: one by one */
			Datum	   *values = palloc(sizeof(Datum) * chunk.ncolumns);
			char	   *nulls = palloc(sizeof(char) * chunk.ncolumns);

			for (int i = 0; i < n; i++)
			{
				rd_kafka_message_t msg = {0};
				KbRecord	rec = {0};
				char	   *reason = NULL;

				if (!insert[i])
					continue;
				(void) chunk_row(i, values, nulls);
				msg.partition = chunk.partition[i];
				msg.offset = chunk.offset[i];
				rec.msg = &msg;
				rec.origin = chunk.version.origin;
				rec.commit_time = chunk.version.commit_time;
				if (apply_versioned(t, sub, &rec, false, false, chunk.columns,
									values, nulls, &reason) != KB_APPLY_APPLIED)
				{
					(*chunk.applied_count[i])--;
					(*chunk.skipped_count[i])++;
				}
			}
		}
	}
}

/* Apply the gathered rows, as their apply role. */
void
kb_apply_flush(void)
{
	if (chunk.table == NULL || chunk.nrows == 0)
	{
		chunk_reset();
		return;
	}
	if (chunk.sub != NULL)
		flush_versioned();
	else
		chunk_run(PLAN_UPSERT_MANY, chunk.columns, NULL);
	chunk_reset();
}

static uint64
key_hash(ApplyTable *t, KbJsonObject *row)
{
	uint64		h = 0;

	for (int k = 0; k < t->nkeys; k++)
	{
		KbJsonField *f = kb_json_find(row, t->columns[t->keys[k]].name);

		h = hash_combine64(h, hash_bytes_extended((const unsigned char *) f->text,
												  strlen(f->text), k));
	}
	return h == 0 ? 1 : h;
}

/* Whether the key is gathered already; if not, remember it. */
static bool
chunk_has_key(uint64 h)
{
	for (int i = h & (CHUNK_HASH_SLOTS - 1);; i = (i + 1) & (CHUNK_HASH_SLOTS - 1))
	{
		if (chunk.key_hashes[i] == h)
			return true;
		if (chunk.key_hashes[i] == 0)
		{
			chunk.key_hashes[i] = h;
			return false;
		}
	}
}

/*
 * Gather a PUT (the caller checked it gives every key column); versioned:
 * sub and rec, when last_write_wins decides.
 */
static void
chunk_add(ApplyTable *t, Oid apply_role, Bitmapset *columns, KbJsonObject *row,
		  KbSubscription *sub, KbRecord *rec)
{
	MemoryContext old;
	int			j = 0;
	int			col = -1;

	if (chunk.table != t || chunk.apply_role != apply_role ||
		!bms_equal(chunk.columns, columns) || chunk.nrows == CHUNK_MAX ||
		chunk.sub != sub ||
		(sub != NULL && (chunk.version.commit_time != rec->commit_time ||
						 strcmp(chunk.version.origin, rec->origin) != 0)))
		kb_apply_flush();
	if (chunk.nrows > 0 && chunk_has_key(key_hash(t, row)))
	{
		kb_apply_flush();
		(void) chunk_has_key(key_hash(t, row));
	}
	else if (chunk.nrows == 0)
		(void) chunk_has_key(key_hash(t, row));

	old = MemoryContextSwitchTo(chunk_cxt);
	if (chunk.table == NULL)
	{
		chunk.table = t;
		chunk.apply_role = apply_role;
		chunk.columns = bms_copy(columns);
		chunk.ncolumns = bms_num_members(columns);
		chunk.column_index = palloc(sizeof(int) * chunk.ncolumns);
		while ((col = bms_next_member(columns, col)) >= 0)
			chunk.column_index[j++] = col;
		chunk.values = palloc(sizeof(Datum) * chunk.ncolumns * CHUNK_MAX);
		chunk.nulls = palloc(sizeof(bool) * chunk.ncolumns * CHUNK_MAX);
		chunk.sub = sub;
		if (sub != NULL)
		{
			chunk.version.commit_time = rec->commit_time;
			chunk.version.origin = pstrdup(rec->origin);
			chunk.partition = palloc(sizeof(int32) * CHUNK_MAX);
			chunk.offset = palloc(sizeof(int64) * CHUNK_MAX);
			chunk.applied_count = palloc(sizeof(int64 *) * CHUNK_MAX);
			chunk.skipped_count = palloc(sizeof(int64 *) * CHUNK_MAX);
		}
	}
	if (sub != NULL)
	{
		chunk.partition[chunk.nrows] = rec->msg->partition;
		chunk.offset[chunk.nrows] = rec->msg->offset;
		chunk.applied_count[chunk.nrows] = rec->applied_count;
		chunk.skipped_count[chunk.nrows] = rec->skipped_count;
	}
	for (j = 0; j < chunk.ncolumns; j++)
	{
		ApplyColumn *c = &t->columns[chunk.column_index[j]];
		bool		isnull;
		Datum		d = column_value(c, kb_json_find(row, c->name), &isnull);

		chunk.values[(size_t) j * CHUNK_MAX + chunk.nrows] = d;
		chunk.nulls[(size_t) j * CHUNK_MAX + chunk.nrows] = isnull;
	}
	chunk.nrows++;
	MemoryContextSwitchTo(old);
}

/* The event's values of the columns, in column order, through their input functions. */
static void
event_values(ApplyTable *t, Bitmapset *columns, KbJsonObject *row, Datum *values, char *nulls)
{
	int			col = -1;
	int			n = 0;

	while ((col = bms_next_member(columns, col)) >= 0)
	{
		bool		isnull;

		values[n] = column_value(&t->columns[col], kb_json_find(row, t->columns[col].name), &isnull);
		nulls[n++] = isnull ? 'n' : ' ';
	}
}

static void
missing_row_error(void)
{
	ereport(ERROR,
			(errcode(ERRCODE_NO_DATA_FOUND),
			 errmsg("the row is missing locally and the event leaves columns unchanged, whose values it does not carry")));
}

/* Run a plan; an error names the table. */
static void
run_plan(ApplyTable *t, PlanKind kind, Bitmapset *columns, Datum *values, char *nulls)
{
	int			rc = SPI_execute_plan(get_plan(t, kind, columns), values, nulls, false, 0);

	if (rc < 0)
		elog(ERROR, "applying an event to %s failed: %s", t->name, SPI_result_code_string(rc));
}

/*
 * Apply a PUT or DELETE under a conflict policy: lock the local row and
 * compare its version with the event's (or, when there is no row, the
 * tombstone's), record a conflict when another origin wrote it, and apply
 * the change when the policy says so.  values and nulls are the event's
 * columns, in column order.
 */
static KbApplyOutcome
apply_versioned(ApplyTable *t, KbSubscription *sub, KbRecord *rec, bool is_delete,
				bool has_unchanged, Bitmapset *columns, Datum *values, char *nulls,
				char **reason)
{
	KbVersion	remote = {rec->commit_time, rec->origin};
	Bitmapset  *keycols = NULL;
	Datum	   *keyvals = palloc(sizeof(Datum) * t->nkeys);
	Oid		   *keytypes = palloc(sizeof(Oid) * t->nkeys);
	Datum	   *lockvals = palloc(sizeof(Datum) * t->nkeys);
	char	   *key;
	int			col = -1;
	int			param = 0;
	int			nlock = 0;

	/* the key, in key order for its text and in column order for the lock */
	while ((col = bms_next_member(columns, col)) >= 0)
	{
		if (t->columns[col].key_pos >= 0)
		{
			keyvals[t->columns[col].key_pos] = values[param];
			keytypes[t->columns[col].key_pos] = t->columns[col].typid;
			keycols = bms_add_member(keycols, col);
			lockvals[nlock++] = values[param];
		}
		param++;
	}
	key = kb_key_text(t->nkeys, keyvals, keytypes);

	for (int attempt = 1;; attempt++)
	{
		KbVersion	local = {0};
		bool		found;
		bool		tombstone = false;
		bool		same_txn = false;
		bool		conflict;
		bool		apply;

		run_plan(t, PLAN_LOCK, keycols, lockvals, NULL);
		found = (SPI_processed > 0);
		if (found)
		{
			bool		isnull;
			TransactionId xmin = DatumGetTransactionId(SPI_getbinval(SPI_tuptable->vals[0],
																	 SPI_tuptable->tupdesc, 1, &isnull));

			same_txn = TransactionIdIsCurrentTransactionId(xmin);
			kb_row_version(xmin, &remote, &local);
		}
		else if (kb_tombstones_may_exist(sub->relid))
			tombstone = kb_tombstone_find(sub->relid, key, &local);

		if (!found && is_delete)
		{
			/* nothing to delete: remember the newest delete of the key */
			if (!tombstone || kb_version_cmp(&remote, &local) > 0)
				kb_tombstone_store(sub->relid, key, &remote);
			return KB_APPLY_APPLIED;
		}

		conflict = (found || tombstone) && !same_txn && strcmp(local.origin, remote.origin) != 0;
		if (sub->policy == KB_POLICY_LAST_WRITE_WINS)
			apply = !(found || tombstone) || kb_version_cmp(&remote, &local) >= 0;
		else
			apply = !conflict;
		if (conflict)
			kb_conflict_record(sub->relid, key,
							   !found ? "update_deleted" :
							   is_delete ? "delete_origin_differs" : "update_origin_differs",
							   &local, &remote, sub->policy,
							   apply ? "applied_remote" :
							   sub->policy == KB_POLICY_ERROR ? "dead_letter" : "kept_local",
							   rec->msg->offset >= 0 ? sub->topic : NULL,
							   rec->msg->partition, rec->msg->offset);
		if (!apply)
		{
			if (sub->policy == KB_POLICY_ERROR)
				return reject(reason, "conflict: the row with key %s was %s by instance \"%s\" at %s (conflict_policy is error)",
							  key, found ? "written" : "deleted", local.origin,
							  TIMESTAMP_IS_NOBEGIN(local.commit_time) ? "an unknown time" :
							  timestamptz_to_str(local.commit_time));
			return KB_APPLY_SKIPPED;
		}

		if (is_delete)
		{
			run_plan(t, PLAN_DELETE, columns, values, nulls);
			kb_tombstone_store(sub->relid, key, &remote);
			return KB_APPLY_APPLIED;
		}
		if (found)
		{
			run_plan(t, has_unchanged ? PLAN_UPDATE : PLAN_UPSERT, columns, values, nulls);
			return KB_APPLY_APPLIED;
		}
		if (has_unchanged)
			missing_row_error();
		run_plan(t, PLAN_INSERT, columns, values, nulls);
		if (SPI_processed == 1)
		{
			if (tombstone)
				kb_tombstone_forget(sub->relid, key);
			return KB_APPLY_APPLIED;
		}
		/* the key appeared since the lock found nothing: look again */
		if (attempt == 3)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("a row with key %s exists in %s but the apply role cannot see it", key, t->name),
					 errhint("Check the table's row security policies for the apply role.")));
	}
}

KbApplyOutcome
kb_apply_record(KbSubscription *sub, KbRecord *rec, bool gather, char **reason)
{
	rd_kafka_message_t *msg = rec->msg;
	KbJsonObject env;
	KbJsonObject row;
	KbJsonObject key;
	KbJsonField *f;
	const char *event;
	size_t		prefix_len = strlen(sub->event_prefix);
	List	   *unchanged = NIL;
	ApplyTable *t;
	char	   *error;
	bool		has_row = false;
	enum
	{
		EV_PUT, EV_DELETE, EV_TRUNCATE
	}			kind;
	Bitmapset  *columns = NULL;
	Datum	   *values;
	char	   *nulls;
	PlanKind	plan_kind;

	current_column = NULL;
	if (msg->payload == NULL && sub->format == KB_FORMAT_ENVELOPE)
		return KB_APPLY_SKIPPED;	/* a tombstone: the DELETE did the work */
	if (rec->origin && strcmp(rec->origin, kb_instance_id()) == 0)
		return KB_APPLY_SKIPPED;	/* this instance's own change */

	/* the event type, and the row */
	if (sub->format == KB_FORMAT_ENVELOPE)
	{
		error = kb_json_parse_object(msg->payload, msg->len, &env, "row", &row, &has_row);
		if (error)
			return reject(reason, "the record value is not an event: %s", error);
		f = kb_json_find(&env, "event");
		if (f == NULL || f->type != JSON_TOKEN_STRING)
			return reject(reason, "the event has no \"event\" member naming its type");
		event = f->text;
	}
	else
	{
		if (msg->key == NULL)
			return reject(reason, "the record has no key: in the flat format the key is the event type (%s-PUT or %s-DELETE)",
						  sub->event_prefix, sub->event_prefix);
		event = pnstrdup(msg->key, msg->key_len);
	}

	if (strncmp(event, sub->event_prefix, prefix_len) == 0 && event[prefix_len] == '-' &&
		strcmp(event + prefix_len + 1, KB_EVENT_PUT) == 0)
		kind = EV_PUT;
	else if (strncmp(event, sub->event_prefix, prefix_len) == 0 && event[prefix_len] == '-' &&
			 strcmp(event + prefix_len + 1, KB_EVENT_DELETE) == 0)
		kind = EV_DELETE;
	else if (strncmp(event, sub->event_prefix, prefix_len) == 0 && event[prefix_len] == '-' &&
			 strcmp(event + prefix_len + 1, KB_EVENT_TRUNCATE) == 0)
		kind = EV_TRUNCATE;
	else
		return reject(reason, "unknown event type \"%s\": expected %s-PUT, %s-DELETE or %s-TRUNCATE",
					  event, sub->event_prefix, sub->event_prefix, sub->event_prefix);

	t = get_table(sub->relid);
	if (kind == EV_TRUNCATE)
	{
		kb_apply_flush();
		truncate_table(t);
		return KB_APPLY_APPLIED;
	}

	if (sub->format == KB_FORMAT_ENVELOPE)
	{
		if (!has_row)
			return reject(reason, "the %s event has no \"row\" object", event);
		if (msg->key == NULL)
			return reject(reason, "the record has no key: an event's key is its row's key as a JSON object");
		error = kb_json_parse_object(msg->key, msg->key_len, &key, NULL, NULL, NULL);
		if (error)
			return reject(reason, "the record key is not a JSON object: %s", error);
		if (!key_matches_row(&key, &row, reason))
			return KB_APPLY_REJECTED;
		f = kb_json_find(&env, "unchanged");
		if (f && f->type != JSON_TOKEN_NULL &&
			(f->type != JSON_TOKEN_ARRAY_START || !kb_json_string_array(f->text, &unchanged)))
			return reject(reason, "the event's \"unchanged\" member is not an array of column names");
	}
	else
	{
		if (msg->payload == NULL)
			return reject(reason, "the %s record has no value: in the flat format the value is the row", event);
		error = kb_json_parse_object(msg->payload, msg->len, &row, NULL, NULL, NULL);
		if (error)
			return reject(reason, "the record value is not a row: %s", error);
	}

	/* which columns the event gives */
	values = palloc(sizeof(Datum) * Max(t->ncolumns, 1));
	nulls = palloc(sizeof(char) * Max(t->ncolumns, 1));
	for (int i = 0; i < row.nfields; i++)
	{
		KbJsonField *rf = &row.fields[i];
		int			col = find_column(t, rf->name);
		ListCell   *lc;
		bool		is_unchanged = false;

		if (col < 0)
		{
			MemoryContext old;

			foreach(lc, t->ignored)
				if (strcmp(lfirst(lc), rf->name) == 0)
					break;
			if (lc == NULL)
			{
				ereport(LOG,
						(errmsg("kafka_bridge ignores member \"%s\" of the events of topic \"%s\": table %s has no such column",
								rf->name, sub->topic, t->name),
						 errdetail("This is logged once per column; add the column to apply it.")));
				old = MemoryContextSwitchTo(t->cxt);
				t->ignored = lappend(t->ignored, pstrdup(rf->name));
				MemoryContextSwitchTo(old);
			}
			continue;
		}
		foreach(lc, unchanged)
			is_unchanged |= (strcmp(lfirst(lc), rf->name) == 0);
		if (is_unchanged || !t->columns[col].writable)
			continue;
		if (kind == EV_DELETE && t->columns[col].key_pos < 0)
			continue;
		if (bms_is_member(col, columns))
			return reject(reason, "the row gives column \"%s\" twice", rf->name);
		columns = bms_add_member(columns, col);
	}
	for (int k = 0; k < t->nkeys; k++)
	{
		ApplyColumn *c = &t->columns[t->keys[k]];
		KbJsonField *kf = kb_json_find(&row, c->name);

		if (kf == NULL || kf->type == JSON_TOKEN_NULL)
			return reject(reason, "the row has no value for key column \"%s\"", c->name);
		if (!bms_is_member(t->keys[k], columns))
			columns = bms_add_member(columns, t->keys[k]);
	}

	if (sub->policy != KB_POLICY_APPLY_REMOTE && !TIMESTAMP_IS_NOBEGIN(rec->commit_time) && rec->origin != NULL)
	{
		/* last_write_wins gathers PUTs and decides for them together */
		if (gather && kind == EV_PUT && unchanged == NIL && t->many_ok &&
			sub->policy == KB_POLICY_LAST_WRITE_WINS && rec->applied_count != NULL)
		{
			chunk_add(t, sub->apply_role, columns, &row, sub, rec);
			return KB_APPLY_APPLIED;
		}
		/* the versions decide: one row at a time */
		kb_apply_flush();
		event_values(t, columns, &row, values, nulls);
		return apply_versioned(t, sub, rec, kind == EV_DELETE, unchanged != NIL,
							   columns, values, nulls, reason);
	}

	if (gather && kind == EV_PUT && unchanged == NIL && t->many_ok)
	{
		chunk_add(t, sub->apply_role, columns, &row, NULL, NULL);
		return KB_APPLY_APPLIED;
	}
	kb_apply_flush();

	event_values(t, columns, &row, values, nulls);

	plan_kind = kind == EV_DELETE ? PLAN_DELETE : unchanged != NIL ? PLAN_UPDATE : PLAN_UPSERT;
	run_plan(t, plan_kind, columns, values, nulls);
	if (plan_kind == PLAN_UPDATE && SPI_processed == 0)
		missing_row_error();
	return KB_APPLY_APPLIED;
}
