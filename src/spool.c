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
 * logical_decoding_work_mem and the spool's buffers.
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
 * Memory first.  A spool starts as one buffer of 64 kB in memory, doubled
 * as it fills up to SPOOL_BUFFER_SIZE: a streamed transaction smaller than
 * that never has a file, nor the other buffers (when many transactions run
 * at once, PostgreSQL may stream many of them).
 *
 * Writing.  Records are copied into buffers of SPOOL_BUFFER_SIZE bytes, and
 * a full buffer is written to the file by the spool writer, a thread of
 * the process, while decoding goes on into the next buffer.  While a large
 * transaction streams, the second core has nothing else to do, and
 * copying the bytes into the kernel's page cache took from a tenth to a
 * third of the decoding thread when it wrote them itself, as fresh pages
 * came cheap or dear (bench/publish, one_txn; in alternating runs the
 * decoding thread then took 0.69 to 0.71 us a row, against 0.76 to 0.78,
 * and the whole went 1% to 10% faster).  The writer takes buffers in the
 * order they come, so a cut that goes back over bytes already handed to it
 * needs no waiting: the bytes written after the cut overwrite the cut
 * ones, later.  The writer runs no PostgreSQL code: pwrite, and a mutex
 * and condition variables shared with the decoding thread; an error it
 * meets is raised by the decoding thread at its next look.  Replay first
 * waits until every buffer is written, then reads the file a buffer at a
 * time (BufFile read 8 kB).
 *
 * The file.  It is made in a temporary tablespace as PostgreSQL's own
 * temporary files are (temp_tablespaces, else the database's pgsql_tmp),
 * and unlinked at once: it goes with its descriptor, whatever ends the
 * process.  So no directory listing shows it, and temp_file_limit does not
 * count it, as it does not count PostgreSQL's own spill files; closing it
 * reports its size to pg_stat_database.temp_bytes and, over
 * log_temp_files, to the log.  A spool lives in a memory context of its
 * own, and whatever deletes that context (kb_spool_close, or an error that
 * resets its parent) waits for the writer and closes the file.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include "access/transam.h"
#include "catalog/pg_tablespace.h"
#include "commands/tablespace.h"
#include "common/file_perm.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/fd.h"
#include "utils/guc.h"
#include "utils/memutils.h"

#include "kafka_bridge.h"
#include "spool.h"

#define SPOOL_BUFFER_SIZE	(1024 * 1024)
#define SPOOL_BUFFERS		4
#define SPOOL_FIRST_SIZE	(64 * 1024)	/* the first buffer's, at first */
#define SPOOL_OPEN_FLAGS	(O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | PG_BINARY)

/* Where a record starts, to cut the spool there. */
typedef struct SpoolMark
{
	XLogRecPtr	lsn;
	uint64		index;			/* the record's number, from 0 */
	uint64		offset;			/* in the file */
} SpoolMark;

/* A buffer of the spool; busy while queued for the writer or written. */
typedef struct SpoolBuffer
{
	struct SpoolBuffer *next;	/* in the writer's queue */
	KbSpool    *spool;
	char	   *data;
	size_t		len;
	size_t		capacity;		/* SPOOL_BUFFER_SIZE, or less for the first */
	uint64		offset;			/* of data[0] in the file */
	bool		busy;			/* under writer.lock */
} SpoolBuffer;

struct KbSpool
{
	MemoryContext cxt;			/* the spool's own */
	int			fd;				/* -1 once closed */
	char		path[MAXPGPATH];	/* the name it was made under */
	Oid			tablespace;		/* of temp_tablespaces, else invalid */
	uint64		nrecords;
	TransactionId last_xid;		/* of the last record appended */
	SpoolMark  *marks;
	int			nmarks;
	int			maxmarks;
	SpoolBuffer buffers[SPOOL_BUFFERS];
	int			current;		/* the buffer being filled */
	uint64		size;			/* bytes appended (to the file or current) */
	uint64		file_size;		/* the most ever appended: the file's size */
	int			write_errno;	/* under writer.lock: the writer's error */
	/* replay (no record may be appended after kb_spool_rewind) */
	bool		replaying;
	uint64		read;			/* records read */
	uint64		read_offset;	/* of the next byte to load from the file */
	size_t		read_pos;		/* in the current buffer */
};

/* The spool writer: one thread for every spool of the process. */
static struct
{
	bool		started;
	pthread_t	thread;
	pthread_mutex_t lock;
	pthread_cond_t queued;		/* the writer waits for a buffer */
	pthread_cond_t written;		/* the decoding thread waits for one */
	SpoolBuffer *head;
	SpoolBuffer *tail;
}			writer =
{
	.lock = PTHREAD_MUTEX_INITIALIZER,
	.queued = PTHREAD_COND_INITIALIZER,
	.written = PTHREAD_COND_INITIALIZER,
};

static void *
writer_main(void *arg)
{
	pthread_mutex_lock(&writer.lock);
	for (;;)
	{
		SpoolBuffer *b;
		size_t		done = 0;
		int			err = 0;

		while (writer.head == NULL)
			pthread_cond_wait(&writer.queued, &writer.lock);
		b = writer.head;
		writer.head = b->next;
		if (writer.head == NULL)
			writer.tail = NULL;
		pthread_mutex_unlock(&writer.lock);

		while (done < b->len)
		{
			ssize_t		n = pwrite(b->spool->fd, b->data + done, b->len - done,
								   (off_t) (b->offset + done));

			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
			{
				err = n < 0 ? errno : ENOSPC;
				break;
			}
			done += n;
		}

		pthread_mutex_lock(&writer.lock);
		if (err != 0 && b->spool->write_errno == 0)
			b->spool->write_errno = err;
		b->busy = false;
		pthread_cond_broadcast(&writer.written);
	}
	return NULL;
}

/* Start the writer if it does not run yet. */
static void
start_writer(void)
{
	int			rc;

	if (writer.started)
		return;
	rc = kb_start_thread(&writer.thread, writer_main, NULL, "kb:spool");
	if (rc != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
				 errmsg("could not start the thread that writes the spool of a streamed transaction: %s",
						strerror(rc))));
	writer.started = true;
}

/* Raise the error the writer met, if any; call with writer.lock held. */
static void
check_written(KbSpool *spool)
{
	int			err = spool->write_errno;

	if (err == 0)
		return;
	pthread_mutex_unlock(&writer.lock);
	errno = err;
	ereport(ERROR,
			(errcode_for_file_access(),
			 errmsg("could not write to the spool of a streamed transaction, file \"%s\": %m",
					spool->path),
			 errhint("The publisher starts again and decodes the transaction again: make room where the file is, or name another tablespace in temp_tablespaces.")));
}

/* Wait until buffer b is free; call with writer.lock held. */
static void
wait_free(SpoolBuffer *b)
{
	while (b->busy)
		pthread_cond_wait(&writer.written, &writer.lock);
}

/* Wait until every buffer of spool is written. */
static void
wait_all_written(KbSpool *spool, bool check)
{
	pthread_mutex_lock(&writer.lock);
	for (int i = 0; i < SPOOL_BUFFERS; i++)
		wait_free(&spool->buffers[i]);
	if (check)
		check_written(spool);
	pthread_mutex_unlock(&writer.lock);
}

/* Hand the current buffer to the writer, and make the next one current. */
static void
hand_over(KbSpool *spool)
{
	SpoolBuffer *b = &spool->buffers[spool->current];
	SpoolBuffer *next;

	pthread_mutex_lock(&writer.lock);
	b->busy = true;
	b->next = NULL;
	if (writer.tail)
		writer.tail->next = b;
	else
		writer.head = b;
	writer.tail = b;
	pthread_cond_signal(&writer.queued);

	spool->current = (spool->current + 1) % SPOOL_BUFFERS;
	next = &spool->buffers[spool->current];
	wait_free(next);
	next->offset = spool->size;
	next->len = 0;
	check_written(spool);
	pthread_mutex_unlock(&writer.lock);
}

static void open_file(KbSpool *spool);

/*
 * The first buffer is full: grow it while it is smaller than the others;
 * else the spool needs its file, its writer and its other buffers.
 */
static void
first_buffer_full(KbSpool *spool)
{
	SpoolBuffer *b = &spool->buffers[0];

	if (b->capacity < SPOOL_BUFFER_SIZE)
	{
		b->capacity = Min(b->capacity * 2, SPOOL_BUFFER_SIZE);
		b->data = repalloc(b->data, b->capacity);
		return;
	}
	for (int i = 1; i < SPOOL_BUFFERS; i++)
	{
		spool->buffers[i].data = MemoryContextAlloc(spool->cxt, SPOOL_BUFFER_SIZE);
		spool->buffers[i].capacity = SPOOL_BUFFER_SIZE;
	}
	start_writer();
	open_file(spool);
}

static void
append_bytes(KbSpool *spool, const char *bytes, size_t len)
{
	while (len > 0)
	{
		SpoolBuffer *b = &spool->buffers[spool->current];
		size_t		n = Min(len, b->capacity - b->len);

		memcpy(b->data + b->len, bytes, n);
		b->len += n;
		spool->size += n;
		spool->file_size = Max(spool->file_size, spool->size);
		bytes += n;
		len -= n;
		if (b->len == b->capacity)
		{
			if (spool->fd < 0)
				first_buffer_full(spool);
			if (b->len == b->capacity)
				hand_over(spool);
		}
	}
}

/*
 * The spool's memory context goes: wait for the writer to be done with its
 * buffers, then close the file.
 */
static void
spool_release(void *arg)
{
	KbSpool    *spool = arg;

	if (spool->fd < 0)
		return;
	wait_all_written(spool, false);
	close(spool->fd);
	ReleaseExternalFD();
	spool->fd = -1;
	pgstat_report_tempfile(spool->file_size);
	if (log_temp_files >= 0 && spool->file_size / 1024 >= log_temp_files)
		ereport(LOG,
				(errmsg("temporary file: path \"%s\", size %llu",
						spool->path, (unsigned long long) spool->file_size)));
}

/*
 * Open the spool's file in a tablespace's pgsql_tmp, made when first
 * needed as PostgreSQL does; -1 with errno set when it cannot be.
 */
static int
open_in_tablespace(KbSpool *spool, Oid tablespace, uint32 number)
{
	char		dir[MAXPGPATH];
	int			fd;

	TempTablespacePath(dir, tablespace);
	snprintf(spool->path, sizeof(spool->path), "%s/%s%d.kb_spool.%u",
			 dir, PG_TEMP_FILE_PREFIX, MyProcPid, number);
	fd = BasicOpenFilePerm(spool->path, SPOOL_OPEN_FLAGS, pg_file_create_mode);
	if (fd < 0 && errno == ENOENT)
	{
		(void) MakePGDirectory(dir);
		fd = BasicOpenFilePerm(spool->path, SPOOL_OPEN_FLAGS, pg_file_create_mode);
	}
	return fd;
}

/*
 * Make the spool's file, unlinked at once: in the next of temp_tablespaces,
 * else, or when that one cannot be used (as OpenTemporaryFile does), in
 * the database's own tablespace.
 */
static void
open_file(KbSpool *spool)
{
	static uint32 counter = 0;
	uint32		number = counter++;
	Oid			tablespace;
	Oid			fallback = MyDatabaseTableSpace ? MyDatabaseTableSpace : DEFAULTTABLESPACE_OID;

	if (!AcquireExternalFD())
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
				 errmsg("could not make the spool of a streamed transaction: too many open files"),
				 errhint("Raise max_files_per_process.")));

	tablespace = spool->tablespace;
	spool->fd = -1;
	if (OidIsValid(tablespace) && tablespace != fallback)
		spool->fd = open_in_tablespace(spool, tablespace, number);
	if (spool->fd < 0)
		spool->fd = open_in_tablespace(spool, fallback, number);
	if (spool->fd < 0)
	{
		int			save_errno = errno;

		ReleaseExternalFD();
		errno = save_errno;
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not make the spool of a streamed transaction, file \"%s\": %m",
						spool->path)));
	}
	if (unlink(spool->path) != 0)
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("could not unlink the spool file \"%s\": %m", spool->path),
				 errdetail("The file stays until the server restarts.")));
}

KbSpool *
kb_spool_create(MemoryContext cxt)
{
	MemoryContext spool_cxt = AllocSetContextCreate(cxt, "kafka_bridge spool",
													ALLOCSET_SMALL_SIZES);
	KbSpool    *spool = MemoryContextAllocZero(spool_cxt, sizeof(KbSpool));
	MemoryContextCallback *cb = MemoryContextAlloc(spool_cxt, sizeof(MemoryContextCallback));

	spool->cxt = spool_cxt;
	spool->fd = -1;
	spool->maxmarks = 16;
	spool->marks = MemoryContextAlloc(spool_cxt, sizeof(SpoolMark) * spool->maxmarks);
	spool->last_xid = InvalidTransactionId;
	for (int i = 0; i < SPOOL_BUFFERS; i++)
		spool->buffers[i].spool = spool;
	/* the rest when the first buffer outgrows its size (first_buffer_full) */
	spool->buffers[0].data = MemoryContextAlloc(spool_cxt, SPOOL_FIRST_SIZE);
	spool->buffers[0].capacity = SPOOL_FIRST_SIZE;

	/*
	 * The tablespace of its file is chosen now: the file is made while a
	 * change is decoded, when no catalog may be scanned but through its
	 * indexes (and temp_tablespaces names are looked up by a scan).
	 */
	PrepareTempTablespaces();
	spool->tablespace = GetNextTempTableSpace();
	cb->func = spool_release;
	cb->arg = spool;
	MemoryContextRegisterResetCallback(spool_cxt, cb);
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
	Assert(!spool->replaying);
	if (spool->nrecords == 0 || xid != spool->last_xid || !TransactionIdIsValid(xid))
	{
		SpoolMark  *mark;

		if (spool->nmarks == spool->maxmarks)
		{
			spool->maxmarks *= 2;
			spool->marks = repalloc_huge(spool->marks, sizeof(SpoolMark) * spool->maxmarks);
		}
		mark = &spool->marks[spool->nmarks++];
		mark->lsn = lsn;
		mark->index = spool->nrecords;
		mark->offset = spool->size;
	}
	spool->last_xid = xid;
	append_bytes(spool, (const char *) &len, sizeof(len));
	append_bytes(spool, record, len);
	spool->nrecords++;
}

/*
 * Drop every record from lsn on: a subtransaction that began at lsn
 * rolled back.
 */
void
kb_spool_cut(KbSpool *spool, XLogRecPtr lsn)
{
	SpoolBuffer *b = &spool->buffers[spool->current];
	int			lo = 0;
	int			hi = spool->nmarks;
	int			i;

	/* the first mark at lsn or after (marks go by LSN) */
	while (lo < hi)
	{
		int			mid = lo + (hi - lo) / 2;

		if (spool->marks[mid].lsn < lsn)
			lo = mid + 1;
		else
			hi = mid;
	}
	i = lo;
	if (i == spool->nmarks)
		return;

	/*
	 * Within the current buffer, the cut shortens it; before it, the
	 * buffer starts again at the cut, and the bytes it takes will be
	 * written over the cut ones after them (the writer keeps the order).
	 */
	if (spool->marks[i].offset >= b->offset)
		b->len = spool->marks[i].offset - b->offset;
	else
	{
		b->offset = spool->marks[i].offset;
		b->len = 0;
	}
	spool->size = spool->marks[i].offset;
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
	SpoolBuffer *b = &spool->buffers[spool->current];

	spool->read_pos = 0;
	spool->read = 0;
	if (spool->fd < 0)
	{
		/* no file: the records are all in the first buffer, read there */
		Assert(spool->current == 0 && b->len == spool->size);
		spool->replaying = true;
		spool->read_offset = spool->size;
		return;
	}
	/* what the current buffer holds goes to the file too (once) */
	if (b->len > 0 && !spool->replaying)
		hand_over(spool);
	spool->replaying = true;
	wait_all_written(spool, true);
	b = &spool->buffers[spool->current];
	b->len = 0;
	spool->read_offset = 0;
}

/* Copy the next len bytes of the file to dst. */
static void
read_bytes(KbSpool *spool, char *dst, size_t len)
{
	SpoolBuffer *b = &spool->buffers[spool->current];

	while (len > 0)
	{
		size_t		n;

		if (spool->read_pos == b->len)
		{
			ssize_t		got;

			n = Min(SPOOL_BUFFER_SIZE, spool->size - spool->read_offset);
			if (n == 0)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("could not read record %llu of %llu from the spool of a streamed transaction: the file ends",
								(unsigned long long) spool->read + 1,
								(unsigned long long) spool->nrecords)));
			do
				got = pread(spool->fd, b->data, n, (off_t) spool->read_offset);
			while (got < 0 && errno == EINTR);
			if (got == 0)
				ereport(ERROR,
						(errcode(ERRCODE_DATA_CORRUPTED),
						 errmsg("could not read from the spool of a streamed transaction, file \"%s\": it ends at %llu bytes, before %llu",
								spool->path, (unsigned long long) spool->read_offset,
								(unsigned long long) spool->size)));
			if (got < 0)
				ereport(ERROR,
						(errcode_for_file_access(),
						 errmsg("could not read from the spool of a streamed transaction, file \"%s\": %m",
								spool->path)));
			b->len = got;
			spool->read_offset += got;
			spool->read_pos = 0;
		}
		n = Min(len, b->len - spool->read_pos);
		memcpy(dst, b->data + spool->read_pos, n);
		spool->read_pos += n;
		dst += n;
		len -= n;
	}
}

/* The next record in buf; false after the last. */
bool
kb_spool_next(KbSpool *spool, StringInfo buf)
{
	uint32		len;

	if (spool->read >= spool->nrecords)
		return false;
	read_bytes(spool, (char *) &len, sizeof(len));
	resetStringInfo(buf);
	enlargeStringInfo(buf, len);
	read_bytes(spool, buf->data, len);
	buf->len = len;
	buf->data[len] = '\0';
	buf->cursor = 0;
	spool->read++;
	return true;
}

void
kb_spool_close(KbSpool *spool)
{
	MemoryContextDelete(spool->cxt);
}
