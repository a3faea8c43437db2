/*-------------------------------------------------------------------------
 * spool.c
 *	  The records of a transaction PostgreSQL streams before its commit,
 *	  kept in a temporary file until the commit or the abort.
 *
 * When a transaction outgrows logical_decoding_work_mem, PostgreSQL either
 * spills its changes to disk and decodes them all at commit, or, for an
 * output plugin that supports it, streams them to the plugin as they come.
 * The publisher's plugin (decoder.c) takes the stream: it encodes each
 * change into its record at once and appends the record here; the commit
 * replays the records to Kafka, an abort drops them.  Nothing reaches Kafka
 * before the commit, and the worker's memory stays bounded by
 * logical_decoding_work_mem and a file buffer.
 *
 * A record is opaque here: bytes the decoder wrote, with the LSN of the
 * change it came from.  A subtransaction rolled back after some of its
 * changes were streamed cuts the spool at its first LSN: a subtransaction's
 * records (its children's too) are the tail of its top transaction's from
 * that LSN on, since subtransactions nest and follow one another.  To find
 * where that tail starts, the spool remembers the first record of each run
 * of records of one subtransaction, and every record whose subtransaction
 * is not known (a logical message's: PostgreSQL does not say which).
 *
 * The file is a temporary file that survives transaction ends (decoding
 * runs each stream in a transaction of its own) and is removed when the
 * spool is closed or, at the latest, when the process exits.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/transam.h"
#include "storage/buffile.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

#include "spool.h"

/* Where a record starts, to cut the spool there. */
typedef struct SpoolMark
{
	XLogRecPtr	lsn;
	uint64		index;			/* the record's number, from 0 */
	int			fileno;
	off_t		offset;
} SpoolMark;

struct KbSpool
{
	BufFile    *file;
	uint64		nrecords;
	TransactionId last_xid;		/* of the last record appended */
	SpoolMark  *marks;
	int			nmarks;
	int			maxmarks;
	/* replay */
	uint64		read;
};

KbSpool *
kb_spool_create(MemoryContext cxt)
{
	KbSpool    *spool = MemoryContextAllocZero(cxt, sizeof(KbSpool));
	MemoryContext old = MemoryContextSwitchTo(cxt);
	ResourceOwner owner = CurrentResourceOwner;

	/*
	 * No resource owner: the file outlives the transaction decoding runs
	 * this stream in, and BufFile would use that owner for later segments.
	 */
	CurrentResourceOwner = NULL;
	spool->file = BufFileCreateTemp(true);
	CurrentResourceOwner = owner;
	spool->maxmarks = 16;
	spool->marks = palloc(sizeof(SpoolMark) * spool->maxmarks);
	spool->last_xid = InvalidTransactionId;
	MemoryContextSwitchTo(old);
	return spool;
}

/*
 * Append a record of len bytes, from the change at lsn of subtransaction
 * (or top transaction) xid; InvalidTransactionId when that is not known.
 */
void
kb_spool_append(KbSpool *spool, XLogRecPtr lsn, TransactionId xid,
				const void *record, uint32 len)
{
	if (spool->nrecords == 0 || xid != spool->last_xid || !TransactionIdIsValid(xid))
	{
		SpoolMark  *mark;

		if (spool->nmarks == spool->maxmarks)
		{
			spool->maxmarks *= 2;
			spool->marks = repalloc(spool->marks, sizeof(SpoolMark) * spool->maxmarks);
		}
		mark = &spool->marks[spool->nmarks++];
		mark->lsn = lsn;
		mark->index = spool->nrecords;
		BufFileTell(spool->file, &mark->fileno, &mark->offset);
	}
	spool->last_xid = xid;
	BufFileWrite(spool->file, &len, sizeof(len));
	BufFileWrite(spool->file, (void *) record, len);
	spool->nrecords++;
}

/*
 * Drop every record from lsn on: a subtransaction that began at lsn
 * rolled back.
 */
void
kb_spool_cut(KbSpool *spool, XLogRecPtr lsn)
{
	int			i;

	for (i = 0; i < spool->nmarks; i++)
		if (spool->marks[i].lsn >= lsn)
			break;
	if (i == spool->nmarks)
		return;
	if (BufFileSeek(spool->file, spool->marks[i].fileno, spool->marks[i].offset,
					SEEK_SET) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not seek in the spool of a streamed transaction: %m")));
	spool->nrecords = spool->marks[i].index;
	spool->nmarks = i;
	spool->last_xid = InvalidTransactionId;
}

uint64
kb_spool_records(KbSpool *spool)
{
	return spool->nrecords;
}

/* Get ready to read the records from the first. */
void
kb_spool_rewind(KbSpool *spool)
{
	if (BufFileSeek(spool->file, 0, 0, SEEK_SET) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not seek in the spool of a streamed transaction: %m")));
	spool->read = 0;
}

/* The next record in buf; false after the last. */
bool
kb_spool_next(KbSpool *spool, StringInfo buf)
{
	uint32		len;

	if (spool->read >= spool->nrecords)
		return false;
	if (BufFileRead(spool->file, &len, sizeof(len)) != sizeof(len))
		goto short_read;
	resetStringInfo(buf);
	enlargeStringInfo(buf, len);
	if (BufFileRead(spool->file, buf->data, len) != len)
		goto short_read;
	buf->len = len;
	buf->data[len] = '\0';
	buf->cursor = 0;
	spool->read++;
	return true;

short_read:
	ereport(ERROR,
			(errcode_for_file_access(),
			 errmsg("could not read record %llu of %llu from the spool of a streamed transaction",
					(unsigned long long) spool->read + 1,
					(unsigned long long) spool->nrecords)));
	return false;				/* keep the compiler quiet */
}

void
kb_spool_close(KbSpool *spool)
{
	BufFileClose(spool->file);
	pfree(spool->marks);
	pfree(spool);
}
