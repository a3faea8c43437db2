/*-------------------------------------------------------------------------
 * event_reader.c
 *	  Reading the JSON of consumed events without losing anything: the
 *	  members of an object as text, numbers exactly as written, and JSON
 *	  arrays turned into PostgreSQL array literals.
 *
 * Built on PostgreSQL's own JSON parser (common/jsonapi.h), which reports
 * errors by return code rather than by raising them, and hands numbers
 * over as their text: a numeric with 100 digits or a float8 written in its
 * shortest form reaches the column's input function unchanged.  Nested
 * objects and arrays are kept as their JSON text, cut out of the input.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/json.h"

#include "apply.h"

/* ---- Objects ---- */

typedef struct ObjectParse
{
	JsonLexContext *lex;
	KbJsonObject *obj;
	KbJsonObject *inner;		/* members of the descend member, or NULL */
	const char *descend;
	bool	   *has_inner;
	int			depth;			/* 1 inside the object itself */
	char	   *name;			/* member whose value comes next */
	bool		in_inner;		/* that member is the descend member */
	char	   *value_start;	/* of a nested object or array at depth 1 or 2 */
	int			value_depth;	/* the depth its callbacks start at */
	bool		not_object;		/* the text is a JSON scalar or array */
} ObjectParse;

static void
add_field(KbJsonObject *obj, char *name, JsonTokenType type, char *text)
{
	KbJsonField *f;

	if (obj->nfields == obj->capacity)
	{
		obj->capacity = Max(obj->capacity * 2, 16);
		obj->fields = obj->fields ?
			repalloc(obj->fields, sizeof(KbJsonField) * obj->capacity) :
			palloc(sizeof(KbJsonField) * obj->capacity);
	}
	f = &obj->fields[obj->nfields++];
	f->name = name;
	f->type = type;
	f->text = text;
	f->used = false;
}

/* the object whose members are being read at the current depth, or NULL */
static KbJsonObject *
target(ObjectParse *p)
{
	if (p->depth == 1)
		return p->obj;
	if (p->depth == 2 && p->in_inner)
		return p->inner;
	return NULL;
}

static void
composite_start(ObjectParse *p)
{
	if (p->depth == 0)
	{
		p->depth = 1;
		return;
	}
	if (p->value_start == NULL && target(p) != NULL)
	{
		/* a nested value of a member we keep: remember where it starts */
		if (p->depth == 1 && p->in_inner && *p->lex->token_start == '{')
		{
			*p->has_inner = true;
			p->depth++;
			return;
		}
		p->value_start = p->lex->token_start;
		p->value_depth = p->depth;
	}
	p->depth++;
}

static void
composite_end(ObjectParse *p, JsonTokenType type)
{
	p->depth--;
	if (p->value_start != NULL && p->depth == p->value_depth)
	{
		char	   *end = p->lex->prev_token_terminator;

		add_field(target(p), p->name, type,
				  pnstrdup(p->value_start, end - p->value_start));
		p->value_start = NULL;
	}
	if (p->depth == 1)
		p->in_inner = false;
}

static void
object_start(void *state)
{
	composite_start((ObjectParse *) state);
}

static void
object_end(void *state)
{
	composite_end((ObjectParse *) state, JSON_TOKEN_OBJECT_START);
}

static void
array_start(void *state)
{
	ObjectParse *p = (ObjectParse *) state;

	if (p->depth == 0)
	{
		p->not_object = true;
		p->depth = 1;			/* nothing below is kept */
		p->obj = NULL;
		return;
	}
	composite_start(p);
}

static void
array_end(void *state)
{
	composite_end((ObjectParse *) state, JSON_TOKEN_ARRAY_START);
}

static void
field_start(void *state, char *fname, bool isnull)
{
	ObjectParse *p = (ObjectParse *) state;

	if (p->value_start != NULL)
		return;
	if (p->depth == 1)
	{
		p->name = fname;
		p->in_inner = (p->descend != NULL && p->inner != NULL &&
					   strcmp(fname, p->descend) == 0);
	}
	else if (p->depth == 2 && p->in_inner)
		p->name = fname;
}

static void
scalar(void *state, char *token, JsonTokenType type)
{
	ObjectParse *p = (ObjectParse *) state;
	KbJsonObject *obj;

	if (p->depth == 0)
	{
		p->not_object = true;
		return;
	}
	if (p->value_start != NULL || (obj = target(p)) == NULL)
		return;
	if (p->depth == 1 && p->in_inner)
		p->in_inner = false;	/* the descend member is no object */
	add_field(obj, p->name, type, type == JSON_TOKEN_NULL ? NULL : token);
}

char *
kb_json_parse_object(char *json, int len, KbJsonObject *obj,
					 const char *descend, KbJsonObject *inner, bool *has_inner)
{
	ObjectParse p = {0};
	JsonSemAction sem = {0};
	JsonParseErrorType rc;
	bool		dummy = false;

	memset(obj, 0, sizeof(*obj));
	if (inner)
		memset(inner, 0, sizeof(*inner));
	if (!pg_verifymbstr(json, len, true))
		return psprintf("not valid in the database encoding (%s)", GetDatabaseEncodingName());

	p.lex = makeJsonLexContextCstringLen(json, len, GetDatabaseEncoding(), true);
	p.obj = obj;
	p.inner = inner;
	p.descend = descend;
	p.has_inner = has_inner ? has_inner : &dummy;
	*p.has_inner = false;
	sem.semstate = &p;
	sem.object_start = object_start;
	sem.object_end = object_end;
	sem.array_start = array_start;
	sem.array_end = array_end;
	sem.object_field_start = field_start;
	sem.scalar = scalar;

	rc = pg_parse_json(p.lex, &sem);
	if (rc != JSON_SUCCESS)
		return psprintf("malformed JSON: %s", json_errdetail(rc, p.lex));
	if (p.not_object)
		return pstrdup("a JSON object was expected");
	return NULL;
}

KbJsonField *
kb_json_find(KbJsonObject *obj, const char *name)
{
	for (int i = 0; i < obj->nfields; i++)
		if (strcmp(obj->fields[i].name, name) == 0)
			return &obj->fields[i];
	return NULL;
}

/* ---- Arrays ---- */

#define MAX_NESTING 8			/* above PostgreSQL's MAXDIM of 6 */

typedef struct ArrayParse
{
	JsonLexContext *lex;
	StringInfoData out;
	int			depth;			/* arrays open */
	int			elements[MAX_NESTING + 1];	/* written at each depth */
	char	   *object_start;	/* an object element being skipped over */
	int			object_depth;
	bool		json_elements;	/* json[]/jsonb[]: strings keep their quotes */
	char	   *error;
} ArrayParse;

/* an element, quoted as array_in wants it */
static void
append_quoted(StringInfo out, const char *text, int len)
{
	appendStringInfoChar(out, '"');
	for (int i = 0; i < len; i++)
	{
		if (text[i] == '"' || text[i] == '\\')
			appendStringInfoChar(out, '\\');
		appendStringInfoChar(out, text[i]);
	}
	appendStringInfoChar(out, '"');
}

static void
element_start(void *state, bool isnull)
{
	ArrayParse *a = (ArrayParse *) state;

	if (a->object_start == NULL && a->depth > 0 && a->depth <= MAX_NESTING &&
		a->elements[a->depth]++ > 0)
		appendStringInfoChar(&a->out, ',');
}

static void
arr_array_start(void *state)
{
	ArrayParse *a = (ArrayParse *) state;

	if (a->object_start != NULL)
		return;
	/* depth counts every array open; past MAX_NESTING nothing is written */
	if (++a->depth > MAX_NESTING)
	{
		a->error = "arrays nest too deep";
		return;
	}
	a->elements[a->depth] = 0;
	appendStringInfoChar(&a->out, '{');
}

static void
arr_array_end(void *state)
{
	ArrayParse *a = (ArrayParse *) state;

	if (a->object_start != NULL)
		return;
	if (a->depth-- > MAX_NESTING)
		return;
	appendStringInfoChar(&a->out, '}');
}

static void
arr_object_start(void *state)
{
	ArrayParse *a = (ArrayParse *) state;

	if (a->depth == 0)
		a->error = "a JSON array was expected";
	if (a->object_start == NULL)
	{
		a->object_start = a->lex->token_start;
		a->object_depth = 0;
	}
	a->object_depth++;
}

static void
arr_object_end(void *state)
{
	ArrayParse *a = (ArrayParse *) state;

	if (--a->object_depth == 0)
	{
		append_quoted(&a->out, a->object_start,
					  a->lex->prev_token_terminator - a->object_start);
		a->object_start = NULL;
	}
}

static void
arr_scalar(void *state, char *token, JsonTokenType type)
{
	ArrayParse *a = (ArrayParse *) state;

	if (a->object_start != NULL)
		return;
	if (a->depth == 0)
		a->error = "a JSON array was expected";
	else if (type == JSON_TOKEN_NULL)
		appendStringInfoString(&a->out, "NULL");
	else if (type == JSON_TOKEN_STRING && a->json_elements)
	{
		StringInfoData buf;

		initStringInfo(&buf);
		escape_json(&buf, token);
		append_quoted(&a->out, buf.data, buf.len);
	}
	else
		append_quoted(&a->out, token, strlen(token));
}

char *
kb_json_array_to_literal(char *json, bool json_elements, char **error)
{
	ArrayParse a = {0};
	JsonSemAction sem = {0};
	JsonParseErrorType rc;

	a.lex = makeJsonLexContextCstringLen(json, strlen(json), GetDatabaseEncoding(), true);
	initStringInfo(&a.out);
	a.json_elements = json_elements;
	sem.semstate = &a;
	sem.array_start = arr_array_start;
	sem.array_end = arr_array_end;
	sem.object_start = arr_object_start;
	sem.object_end = arr_object_end;
	sem.array_element_start = element_start;
	sem.scalar = arr_scalar;

	rc = pg_parse_json(a.lex, &sem);
	if (rc != JSON_SUCCESS)
		a.error = json_errdetail(rc, a.lex);
	if (a.error)
	{
		*error = a.error;
		return NULL;
	}
	return a.out.data;
}

/* ---- Arrays of strings ---- */

typedef struct StringsParse
{
	int			depth;
	bool		bad;
	List	   *strings;
} StringsParse;

static void
str_array_start(void *state)
{
	StringsParse *s = (StringsParse *) state;

	s->bad |= (s->depth++ > 0);
}

static void
str_object_start(void *state)
{
	((StringsParse *) state)->bad = true;
}

static void
str_scalar(void *state, char *token, JsonTokenType type)
{
	StringsParse *s = (StringsParse *) state;

	if (s->depth != 1 || type != JSON_TOKEN_STRING)
		s->bad = true;
	else
		s->strings = lappend(s->strings, token);
}

bool
kb_json_string_array(char *json, List **strings)
{
	StringsParse s = {0};
	JsonSemAction sem = {0};
	JsonLexContext *lex = makeJsonLexContextCstringLen(json, strlen(json),
													   GetDatabaseEncoding(), true);
	bool		ok;

	sem.semstate = &s;
	sem.array_start = str_array_start;
	sem.object_start = str_object_start;
	sem.scalar = str_scalar;
	ok = pg_parse_json(lex, &sem) == JSON_SUCCESS && !s.bad && s.depth == 1;
	*strings = s.strings;
	return ok;
}
