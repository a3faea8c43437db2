/*-------------------------------------------------------------------------
 * event_codec.c
 *	  Rows to JSON, the way kafka_bridge events carry them.
 *
 * The encoding is lossless: every value comes out either as a JSON value of
 * the same meaning (integers, booleans, json, arrays) or as a string that
 * the column type's input function reads back (numeric, timestamps, bytea,
 * and every other type through its text output).  It does not depend on the
 * session's DateStyle, IntervalStyle, TimeZone, bytea_output or
 * extra_float_digits, so the
 * same change always gives the same bytes.  docs/events.md has the table.
 *
 * Everything that needs the catalogs (output functions, array element
 * types, column names) is looked up once per column when the decoder builds
 * its relation cache entry; encoding a row only calls output functions.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "libpq/pqformat.h"

#include <math.h>

#include "access/htup_details.h"
#include "access/sysattr.h"
#include "access/tupdesc.h"
#include "catalog/pg_type.h"
#include "common/shortest_dec.h"
#include "miscadmin.h"
#include "nodes/bitmapset.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/datetime.h"
#include "utils/json.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"

#include "event_codec.h"

static void append_array(StringInfo buf, Datum value, KbTypeInfo *info);

/*
 * Decide how values of type typid are encoded, and look up what that
 * needs.  Domains are encoded as their base type; arrays by their element
 * type, recursively.  Allocations go to cxt, which must live as long as
 * info.
 */
void
kb_type_info_init(KbTypeInfo *info, Oid typid, MemoryContext cxt)
{
	Oid			base = getBaseType(typid);
	Oid			outfunc;
	bool		isvarlena;
	Oid			elemtype;

	memset(info, 0, sizeof(KbTypeInfo));
	info->base_type = base;
	getTypeOutputInfo(base, &outfunc, &isvarlena);
	fmgr_info_cxt(outfunc, &info->output, cxt);

	switch (base)
	{
		case INT2OID:
			info->kind = KB_VALUE_INT16;
			break;
		case INT4OID:
			info->kind = KB_VALUE_INT32;
			break;
		case INT8OID:
			info->kind = KB_VALUE_INT64;
			break;
		case OIDOID:
			info->kind = KB_VALUE_OID;
			break;
		case FLOAT4OID:
			info->kind = KB_VALUE_FLOAT4;
			break;
		case FLOAT8OID:
			info->kind = KB_VALUE_FLOAT8;
			break;
		case NUMERICOID:
			info->kind = KB_VALUE_NUMERIC;
			break;
		case BOOLOID:
			info->kind = KB_VALUE_BOOL;
			break;
		case JSONOID:
			info->kind = KB_VALUE_JSON;
			break;
		case JSONBOID:
			info->kind = KB_VALUE_JSONB;
			break;
		case DATEOID:
		case TIMEOID:
		case TIMETZOID:
		case TIMESTAMPOID:
		case TIMESTAMPTZOID:
			info->kind = KB_VALUE_DATETIME;
			break;
		case INTERVALOID:
			info->kind = KB_VALUE_INTERVAL;
			break;
		case BYTEAOID:
			info->kind = KB_VALUE_BYTEA;
			break;
		default:
			elemtype = get_element_type(base);
			if (OidIsValid(elemtype))
			{
				info->kind = KB_VALUE_ARRAY;
				get_typlenbyvalalign(elemtype, &info->elem_len,
									 &info->elem_byval, &info->elem_align);
				info->element = MemoryContextAlloc(cxt, sizeof(KbTypeInfo));
				kb_type_info_init(info->element, elemtype, cxt);
			}
			else
				info->kind = KB_VALUE_TEXT;
			break;
	}
}

/*
 * The columns of desc that events carry: every column but dropped and
 * generated ones (the receiving side computes generated columns itself).
 * key_attrs holds the key columns (offset by
 * FirstLowInvalidHeapAttributeNumber, as the relcache builds such sets);
 * all_key makes every column a key column instead.
 */
KbRowShape *
kb_row_shape_create(TupleDesc desc, Bitmapset *key_attrs, bool all_key,
					MemoryContext cxt)
{
	KbRowShape *shape = MemoryContextAllocZero(cxt, sizeof(KbRowShape));
	MemoryContext old = MemoryContextSwitchTo(cxt);

	shape->columns = palloc0(sizeof(KbColumn) * Max(desc->natts, 1));
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		KbColumn   *col;
		StringInfoData name;

		if (att->attisdropped || att->attgenerated)
			continue;
		col = &shape->columns[shape->ncolumns++];
		col->attnum = att->attnum;
		col->varlena = (att->attlen == -1);
		col->is_key = all_key ||
			bms_is_member(att->attnum - FirstLowInvalidHeapAttributeNumber,
						  key_attrs);
		if (col->is_key)
			shape->nkeys++;

		initStringInfo(&name);
		kb_append_json_string(&name, NameStr(att->attname));
		col->json_name_len = name.len;
		appendStringInfoChar(&name, ':');
		col->json_name = name.data;

		kb_type_info_init(&col->type, att->atttypid, cxt);
	}
	MemoryContextSwitchTo(old);
	return shape;
}

/*
 * len bytes of str as a JSON string: quoted, with quotes, backslashes and
 * controls escaped exactly as escape_json() does, but copying the runs
 * between them whole rather than a character at a time.
 */
static void
append_json_bytes(StringInfo buf, const char *str, size_t len)
{
	const char *end = str + len;
	const char *run = str;

	enlargeStringInfo(buf, len + 2);
	appendStringInfoCharMacro(buf, '"');
	for (const char *p = str; p < end; p++)
	{
		unsigned char c = (unsigned char) *p;

		if (c >= 0x20 && c != '"' && c != '\\')
			continue;
		appendBinaryStringInfo(buf, run, p - run);
		run = p + 1;
		switch (c)
		{
			case '\b':
				appendStringInfoString(buf, "\\b");
				break;
			case '\f':
				appendStringInfoString(buf, "\\f");
				break;
			case '\n':
				appendStringInfoString(buf, "\\n");
				break;
			case '\r':
				appendStringInfoString(buf, "\\r");
				break;
			case '\t':
				appendStringInfoString(buf, "\\t");
				break;
			case '"':
				appendStringInfoString(buf, "\\\"");
				break;
			case '\\':
				appendStringInfoString(buf, "\\\\");
				break;
			default:
				appendStringInfo(buf, "\\u%04x", c);
				break;
		}
	}
	appendBinaryStringInfo(buf, run, end - run);
	appendStringInfoCharMacro(buf, '"');
}

/* str as a JSON string: quoted, with quotes, backslashes and controls escaped. */
void
kb_append_json_string(StringInfo buf, const char *str)
{
	append_json_bytes(buf, str, strlen(str));
}

/* An ISO 8601 timestamp in UTC, as a JSON string. */
void
kb_append_timestamptz(StringInfo buf, TimestampTz ts)
{
	char		text[MAXDATELEN + 1];
	int			utc = 0;

	JsonEncodeDateTime(text, TimestampTzGetDatum(ts), TIMESTAMPTZOID, &utc);
	appendStringInfoChar(buf, '"');
	appendStringInfoString(buf, text);
	appendStringInfoChar(buf, '"');
}

/*
 * Embed json text.  It is valid JSON (the type checks its input), but may
 * hold line breaks between tokens; those become spaces so that every event
 * stays on one line.  Inside strings, a line break is always escaped.
 */
static void
append_json_text(StringInfo buf, const char *text)
{
	const char *start = text;
	const char *p;
	bool		in_string = false;

	for (p = text; *p; p++)
	{
		if (in_string)
		{
			if (*p == '\\' && p[1] != '\0')
				p++;
			else if (*p == '"')
				in_string = false;
		}
		else if (*p == '"')
			in_string = true;
		else if (*p == '\n' || *p == '\r' || *p == '\t')
		{
			appendBinaryStringInfo(buf, start, p - start);
			appendStringInfoChar(buf, ' ');
			start = p + 1;
		}
	}
	appendBinaryStringInfo(buf, start, p - start);
}

/* A float that JSON cannot hold as a number goes out as a string. */
static bool
append_special_float(StringInfo buf, double value)
{
	if (isnan(value))
		appendStringInfoString(buf, "\"NaN\"");
	else if (isinf(value))
		appendStringInfoString(buf, value > 0 ? "\"Infinity\"" : "\"-Infinity\"");
	else
		return false;
	return true;
}

/*
 * Fix, until AtEOXact_GUC(false, the level returned), the settings the
 * text forms of values follow (dates and times, intervals, floats, bytea),
 * as pg_dump does: a text form written then reads back the same in any
 * session, and is the same text wherever it was written.
 */
int
kb_fix_text_settings(void)
{
	int			guc_level = NewGUCNestLevel();

	(void) set_config_option("DateStyle", "ISO, YMD", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("IntervalStyle", "postgres", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("TimeZone", "UTC", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("extra_float_digits", "1", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("bytea_output", "hex", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	return guc_level;
}

/* Append the JSON encoding of a non-null value. */
void
kb_append_datum(StringInfo buf, Datum value, KbTypeInfo *info)
{
	char		num[Max(DOUBLE_SHORTEST_DECIMAL_LEN, MAXINT8LEN + 1)];
	char		date[MAXDATELEN + 1];
	int			len;

	switch (info->kind)
	{
		case KB_VALUE_INT16:
			len = pg_ltoa(DatumGetInt16(value), num);
			appendBinaryStringInfo(buf, num, len);
			break;
		case KB_VALUE_INT32:
			len = pg_ltoa(DatumGetInt32(value), num);
			appendBinaryStringInfo(buf, num, len);
			break;
		case KB_VALUE_INT64:
			len = pg_lltoa(DatumGetInt64(value), num);
			appendBinaryStringInfo(buf, num, len);
			break;
		case KB_VALUE_OID:
			len = pg_ultoa_n(DatumGetObjectId(value), num);
			appendBinaryStringInfo(buf, num, len);
			break;
		case KB_VALUE_FLOAT4:
			if (!append_special_float(buf, DatumGetFloat4(value)))
			{
				/* shortest exact form, whatever extra_float_digits says */
				len = float_to_shortest_decimal_bufn(DatumGetFloat4(value), num);
				appendBinaryStringInfo(buf, num, len);
			}
			break;
		case KB_VALUE_FLOAT8:
			if (!append_special_float(buf, DatumGetFloat8(value)))
			{
				len = double_to_shortest_decimal_bufn(DatumGetFloat8(value), num);
				appendBinaryStringInfo(buf, num, len);
			}
			break;
		case KB_VALUE_NUMERIC:
			/* digits, sign, point, NaN or Infinity: nothing to escape */
			appendStringInfoChar(buf, '"');
			appendStringInfoString(buf, OutputFunctionCall(&info->output, value));
			appendStringInfoChar(buf, '"');
			break;
		case KB_VALUE_BOOL:
			appendStringInfoString(buf, DatumGetBool(value) ? "true" : "false");
			break;
		case KB_VALUE_JSON:
			append_json_text(buf, OutputFunctionCall(&info->output, value));
			break;
		case KB_VALUE_JSONB:
			/* jsonb's output never has a line break outside a string */
			appendStringInfoString(buf, OutputFunctionCall(&info->output, value));
			break;
		case KB_VALUE_DATETIME:
			if (info->base_type == TIMESTAMPTZOID)
			{
				kb_append_timestamptz(buf, DatumGetTimestampTz(value));
				break;
			}
			JsonEncodeDateTime(date, value, info->base_type, NULL);
			appendStringInfoChar(buf, '"');
			appendStringInfoString(buf, date);
			appendStringInfoChar(buf, '"');
			break;
		case KB_VALUE_INTERVAL:
			{
				struct pg_itm itm;

				/* the ISO 8601 style, whatever IntervalStyle says */
				interval2itm(*DatumGetIntervalP(value), &itm);
				EncodeInterval(&itm, INTSTYLE_ISO_8601, date);
				appendStringInfoChar(buf, '"');
				appendStringInfoString(buf, date);
				appendStringInfoChar(buf, '"');
			}
			break;
		case KB_VALUE_BYTEA:
			{
				bytea	   *bytes = DatumGetByteaPP(value);
				size_t		nbytes = VARSIZE_ANY_EXHDR(bytes);

				/* "\\x" then two hex digits a byte: bytea's hex format */
				appendStringInfoString(buf, "\"\\\\x");
				enlargeStringInfo(buf, nbytes * 2 + 1);
				buf->len += hex_encode(VARDATA_ANY(bytes), nbytes,
									   buf->data + buf->len);
				appendStringInfoChar(buf, '"');
			}
			break;
		case KB_VALUE_ARRAY:
			append_array(buf, value, info);
			break;
		case KB_VALUE_TEXT:
			/* text and varchar are their own output: no copy needed */
			if (info->base_type == TEXTOID || info->base_type == VARCHAROID)
			{
				text	   *t = DatumGetTextPP(value);

				append_json_bytes(buf, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
			}
			else
				kb_append_json_string(buf, OutputFunctionCall(&info->output, value));
			break;
	}
}

/* One dimension of an array, its sub-arrays nested. */
static void
append_array_dimension(StringInfo buf, int dim, int ndim, const int *dims,
					   Datum *elems, bool *nulls, int *next,
					   KbTypeInfo *element)
{
	appendStringInfoChar(buf, '[');
	for (int i = 0; i < dims[dim]; i++)
	{
		if (i > 0)
			appendStringInfoChar(buf, ',');
		if (dim + 1 < ndim)
			append_array_dimension(buf, dim + 1, ndim, dims, elems, nulls,
								   next, element);
		else
		{
			if (nulls[*next])
				appendStringInfoString(buf, "null");
			else
				kb_append_datum(buf, elems[*next], element);
			(*next)++;
		}
	}
	appendStringInfoChar(buf, ']');
}

/*
 * An array as a JSON array, multi-dimensional ones nested.  JSON has no
 * place for lower bounds, so an array whose bounds do not start at 1 goes
 * out as its text output ('[0:1]={1,2}'), which the input function reads
 * back exactly.
 */
static void
append_array(StringInfo buf, Datum value, KbTypeInfo *info)
{
	ArrayType  *array = DatumGetArrayTypeP(value);
	int			ndim = ARR_NDIM(array);
	int		   *dims = ARR_DIMS(array);
	int		   *lbounds = ARR_LBOUND(array);
	Datum	   *elems;
	bool	   *nulls;
	int			nelems;
	int			next = 0;

	if (ndim == 0)
	{
		appendStringInfoString(buf, "[]");
		return;
	}
	for (int d = 0; d < ndim; d++)
	{
		if (lbounds[d] != 1)
		{
			kb_append_json_string(buf, OutputFunctionCall(&info->output, value));
			return;
		}
	}
	deconstruct_array(array, ARR_ELEMTYPE(array), info->elem_len,
					  info->elem_byval, info->elem_align,
					  &elems, &nulls, &nelems);
	append_array_dimension(buf, 0, ndim, dims, elems, nulls, &next,
						   info->element);
}

/*
 * True for the value logical decoding gives for a TOASTed column that an
 * UPDATE left unchanged: a pointer to out-of-line storage that the decoder
 * cannot follow, rather than the value.
 */
bool
kb_datum_is_unchanged_toast(Datum value, const KbColumn *col)
{
	return col->varlena && VARATT_IS_EXTERNAL_ONDISK(DatumGetPointer(value));
}

/*
 * Append a row as a JSON object by column name, in attnum order: all its
 * columns, or only the key columns.  values and nulls are indexed by
 * attnum - 1.  A column whose value is an unchanged TOAST pointer is left
 * out; its index in shape->columns goes to unchanged[] (sized for
 * shape->ncolumns, or NULL).  Returns how many columns were left out.
 */
int
kb_append_row(StringInfo buf, KbRowShape *shape, Datum *values,
			  bool *nulls, KbRowPart part, int *unchanged)
{
	bool		first = true;
	int			nunchanged = 0;

	appendStringInfoCharMacro(buf, '{');
	for (int i = 0; i < shape->ncolumns; i++)
	{
		KbColumn   *col = &shape->columns[i];
		int			index = col->attnum - 1;

		if (part == KB_ROW_KEY && !col->is_key)
			continue;
		if (!nulls[index] && kb_datum_is_unchanged_toast(values[index], col))
		{
			if (unchanged)
				unchanged[nunchanged] = i;
			nunchanged++;
			continue;
		}
		if (!first)
			appendStringInfoCharMacro(buf, ',');
		first = false;
		/* the name, its ':' included */
		appendBinaryStringInfo(buf, col->json_name, col->json_name_len + 1);
		if (nulls[index])
			appendBinaryStringInfo(buf, "null", 4);
		else
			kb_append_datum(buf, values[index], &col->type);
	}
	appendStringInfoCharMacro(buf, '}');
	return nunchanged;
}

/* ---- the binary frames of the publisher's output (see event_codec.h) ---- */

/* A length-prefixed byte string of a frame. */
void
kb_send_bytes(StringInfo out, const char *str, int len)
{
	pq_sendint32(out, len);
	pq_sendbytes(out, str, len);
}

/* A record header of a frame: its name, then its value. */
void
kb_send_header(StringInfo out, const char *name, const char *value)
{
	int			len = strlen(name);

	pq_sendint16(out, len);
	pq_sendbytes(out, name, len);
	kb_send_bytes(out, value, strlen(value));
}
