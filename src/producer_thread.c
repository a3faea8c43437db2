/*-------------------------------------------------------------------------
 * producer_thread.c
 *	  The publisher's producing thread: the worker's thread decodes and
 *	  copies each record into a ring; this thread hands the records to
 *	  librdkafka and serves their delivery reports.
 *
 * Decoding and producing then run on two cores.  Measured without any
 * Kafka at all, the worker decodes small transactions about as fast as
 * pgoutput alone; with librdkafka's calls on the same thread (a producev,
 * its eight or so mallocs, the frees of each delivery report) it ran at
 * about half that (bench/publish).
 *
 * Both malloc and free of a record happen on this thread: librdkafka's
 * copy of a record and its header list are made here, and freed here when
 * the delivery report is served.  (A thread that only served delivery
 * reports was measured slower than none: it freed what the worker's
 * thread malloc'd, and the two waited on malloc's lock.)  The worker's
 * thread copies into the ring with no malloc at all.
 *
 * The ring holds entries one after the other: an entry header, the key,
 * the value and the headers.  The worker's thread (the only writer)
 * advances head, this thread (the only reader) advances tail; both are
 * byte counts that only grow, published with barriers.  An entry that
 * does not fit before the end of the buffer starts at its beginning, after
 * a marker.  A record larger than a quarter of the ring is copied to a
 * block of its own, which this thread frees.
 *
 * This thread runs no PostgreSQL code: no palloc, no elog, no GUC.  What
 * librdkafka refuses goes to the caller's on_error callback, which must be
 * as careful.  It wakes the worker's thread (kb_kafka_client_wake) when
 * that waits for room in the ring.
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <pthread.h>

#include "port/atomics.h"
#include "utils/memutils.h"

#include "kafka_bridge.h"

#define RING_SIZE		(4 * 1024 * 1024)
#define RING_ALIGN(n)	TYPEALIGN(8, (n))

/*
 * The writer looks whether the thread sleeps (a full memory barrier) every
 * this many entries, and when it calls kb_producer_thread_flush(); a look
 * per entry took half of the writer's time in kb_producer_thread_put.
 */
#define WAKE_CHECK_EVERY 32

/* An entry of the ring; key, value and headers follow it. */
typedef struct RingEntry
{
	uint32		size;			/* of the whole entry; 0: skip to the end */
	uint16		nheaders;
	bool		external;		/* the record is in *block, not here */
	int32		key_len;		/* -1: null key */
	int32		value_len;		/* -1: null value (a tombstone) */
	rd_kafka_topic_t *rkt;
	void	   *opaque;
	char	   *block;			/* external: malloc'd copy of what follows */
} RingEntry;

/* each header: uint16 name length, int32 value length (-1 null), the bytes */
#define HEADER_FIXED	(sizeof(uint16) + sizeof(int32))

struct KbProducerThread
{
	KbKafkaClient *client;
	rd_kafka_t *rk;
	rd_kafka_queue_t *mainq;	/* rk's main queue, to wake the thread */
	KbProduceErrorCallback on_error;
	pthread_t	thread;
	char	   *ring;
	uint64		head;			/* the writer's own copy */
	uint64		tail_seen;		/* the writer's last look at tail */
	int			unannounced;	/* entries put since the last wake-up check */
	pg_atomic_uint64 published_head;	/* bytes written */
	pg_atomic_uint64 tail;		/* bytes consumed */
	pg_atomic_uint32 stop;
	pg_atomic_uint32 sleeping;	/* the thread waits for records */
	pg_atomic_uint32 room_wanted;	/* the writer waits for room */
	pg_atomic_uint32 queue_full;	/* librdkafka's queue refuses records */
};

/* Bytes an entry's key, value and headers take after its header. */
static size_t
payload_size(int key_len, int value_len, const KbRecordHeader *headers, int nheaders)
{
	size_t		size = Max(key_len, 0) + Max(value_len, 0);

	for (int i = 0; i < nheaders; i++)
		size += HEADER_FIXED + headers[i].name_len + Max(headers[i].value_len, 0);
	return size;
}

static void
copy_payload(char *p, const char *key, int key_len, const char *value, int value_len,
			 const KbRecordHeader *headers, int nheaders)
{
	if (key_len > 0)
	{
		memcpy(p, key, key_len);
		p += key_len;
	}
	if (value_len > 0)
	{
		memcpy(p, value, value_len);
		p += value_len;
	}
	for (int i = 0; i < nheaders; i++)
	{
		uint16		name_len = headers[i].name_len;
		int32		hv_len = headers[i].value ? headers[i].value_len : -1;

		memcpy(p, &name_len, sizeof(name_len));
		memcpy(p + sizeof(name_len), &hv_len, sizeof(hv_len));
		p += HEADER_FIXED;
		memcpy(p, headers[i].name, name_len);
		p += name_len;
		if (hv_len > 0)
		{
			memcpy(p, headers[i].value, hv_len);
			p += hv_len;
		}
	}
}

/* Produce one entry, waiting while librdkafka's queue is full. */
static void
produce_entry(KbProducerThread *pt, RingEntry *e)
{
	char	   *p = e->external ? e->block : (char *) (e + 1);
	const char *key = NULL;
	const char *value = NULL;
	rd_kafka_headers_t *headers = NULL;
	rd_kafka_resp_err_t err;

	if (e->key_len >= 0)
	{
		key = p;
		p += e->key_len;
	}
	if (e->value_len >= 0)
	{
		value = p;
		p += e->value_len;
	}
	if (e->nheaders > 0)
	{
		headers = rd_kafka_headers_new(e->nheaders);
		for (int i = 0; i < e->nheaders; i++)
		{
			uint16		name_len;
			int32		hv_len;

			memcpy(&name_len, p, sizeof(name_len));
			memcpy(&hv_len, p + sizeof(name_len), sizeof(hv_len));
			p += HEADER_FIXED;
			rd_kafka_header_add(headers, p, name_len, hv_len >= 0 ? p + name_len : NULL,
								Max(hv_len, 0));
			p += name_len + Max(hv_len, 0);
		}
	}

	for (;;)
	{
		/* a record without headers (most sends) needs no header list */
		if (headers)
			err = rd_kafka_producev(pt->rk,
									RD_KAFKA_V_RKT(e->rkt),
									RD_KAFKA_V_KEY(key, Max(e->key_len, 0)),
									RD_KAFKA_V_VALUE((void *) value, Max(e->value_len, 0)),
									RD_KAFKA_V_HEADERS(headers),
									RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
									RD_KAFKA_V_OPAQUE(e->opaque),
									RD_KAFKA_V_END);
		else
			err = rd_kafka_producev(pt->rk,
									RD_KAFKA_V_RKT(e->rkt),
									RD_KAFKA_V_KEY(key, Max(e->key_len, 0)),
									RD_KAFKA_V_VALUE((void *) value, Max(e->value_len, 0)),
									RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
									RD_KAFKA_V_OPAQUE(e->opaque),
									RD_KAFKA_V_END);
		if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
			break;
		if (pg_atomic_read_u32(&pt->stop))
		{
			/* dropped, as the records still in the ring */
			err = RD_KAFKA_RESP_ERR_NO_ERROR;
			if (headers)
				rd_kafka_headers_destroy(headers);
			break;
		}
		/* back-pressure: the broker is slow or away; acknowledgements make room */
		pg_atomic_write_u32(&pt->queue_full, 1);
		rd_kafka_poll(pt->rk, 10);
	}
	pg_atomic_write_u32(&pt->queue_full, 0);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		/* on failure the header list is still ours */
		if (headers)
			rd_kafka_headers_destroy(headers);
		pt->on_error(e->opaque, e->rkt, err);
	}
	if (e->external)
		free(e->block);
}

/* Let the writer see that entries up to tail are consumed. */
static void
release(KbProducerThread *pt, uint64 tail)
{
	/* the entries were read before the writer may overwrite them */
	pg_memory_barrier();
	pg_atomic_write_u64(&pt->tail, tail);
	pg_memory_barrier();
	if (pg_atomic_read_u32(&pt->room_wanted) &&
		pg_atomic_exchange_u32(&pt->room_wanted, 0))
		kb_kafka_client_wake(pt->client);
}

static void *
thread_main(void *arg)
{
	KbProducerThread *pt = (KbProducerThread *) arg;
	uint64		tail = pg_atomic_read_u64(&pt->tail);

	while (!pg_atomic_read_u32(&pt->stop))
	{
		uint64		head = pg_atomic_read_u64(&pt->published_head);
		int			n = 0;

		/* the entries below head were written before head was */
		pg_read_barrier();
		while (tail != head && !pg_atomic_read_u32(&pt->stop))
		{
			RingEntry  *e = (RingEntry *) (pt->ring + tail % RING_SIZE);

			if (e->size == 0)
			{
				tail += RING_SIZE - tail % RING_SIZE;
				continue;
			}
			produce_entry(pt, e);
			tail += e->size;
			/* now and then: room for the writer, acknowledgements served */
			if ((++n & 255) == 0)
			{
				release(pt, tail);
				rd_kafka_poll(pt->rk, 0);
			}
		}
		release(pt, tail);
		rd_kafka_poll(pt->rk, 0);
		if (n > 0)
			continue;

		/*
		 * Nothing to produce: wait for records (the writer yields the main
		 * queue, see kb_producer_thread_flush) or acknowledgements;
		 * entries the writer has not announced yet are found within 100 ms.
		 */
		pg_atomic_write_u32(&pt->sleeping, 1);
		pg_memory_barrier();
		if (pg_atomic_read_u64(&pt->published_head) == tail)
			rd_kafka_poll(pt->rk, 100);
		pg_atomic_write_u32(&pt->sleeping, 0);
	}
	return NULL;
}

/*
 * Start the producing thread of a producer client: from now on it serves
 * the client's main queue (delivery reports and errors), and the client's
 * delivery callback runs on it.
 */
KbProducerThread *
kb_producer_thread_start(KbKafkaClient *client, KbProduceErrorCallback on_error)
{
	KbProducerThread *pt = MemoryContextAllocZero(TopMemoryContext, sizeof(KbProducerThread));
	int			rc;

	pt->client = client;
	pt->rk = kb_kafka_client_handle(client);
	pt->mainq = rd_kafka_queue_get_main(pt->rk);
	pt->on_error = on_error;
	pt->ring = MemoryContextAllocHuge(TopMemoryContext, RING_SIZE);
	pg_atomic_init_u64(&pt->published_head, 0);
	pg_atomic_init_u64(&pt->tail, 0);
	pg_atomic_init_u32(&pt->stop, 0);
	pg_atomic_init_u32(&pt->sleeping, 0);
	pg_atomic_init_u32(&pt->room_wanted, 0);
	pg_atomic_init_u32(&pt->queue_full, 0);

	rc = kb_start_thread(&pt->thread, thread_main, pt, "kb:producer");
	if (rc != 0)
	{
		rd_kafka_queue_destroy(pt->mainq);
		pfree(pt->ring);
		pfree(pt);
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
				 errmsg("could not start the thread that produces to Kafka: %s",
						strerror(rc))));
	}
	kb_kafka_client_set_threaded(client, true);
	return pt;
}

/*
 * Stop the thread once the record it is producing is handed over; records
 * still in the ring are dropped (the publisher decodes them again).  The
 * worker's thread serves the client's main queue again.
 */
void
kb_producer_thread_stop(KbProducerThread *pt)
{
	uint64		tail;

	if (pt == NULL)
		return;
	pg_atomic_write_u32(&pt->stop, 1);
	rd_kafka_queue_yield(pt->mainq);
	pthread_join(pt->thread, NULL);
	rd_kafka_queue_destroy(pt->mainq);
	kb_kafka_client_set_threaded(pt->client, false);

	/* free the blocks of records never produced */
	tail = pg_atomic_read_u64(&pt->tail);
	while (tail != pt->head)
	{
		RingEntry  *e = (RingEntry *) (pt->ring + tail % RING_SIZE);

		if (e->size == 0)
		{
			tail += RING_SIZE - tail % RING_SIZE;
			continue;
		}
		if (e->external)
			free(e->block);
		tail += e->size;
	}
	pfree(pt->ring);
	pfree(pt);
}

/*
 * Copy a record into the ring for the thread to produce: key and value
 * NULL are a null key and value; a header with a NULL value is a null
 * header.  False when the ring has no room now: the caller waits, polling
 * its client (the thread wakes it), and tries again.
 */
bool
kb_producer_thread_put(KbProducerThread *pt, rd_kafka_topic_t *rkt, void *opaque,
					   const char *key, int key_len, const char *value, int value_len,
					   const KbRecordHeader *headers, int nheaders)
{
	size_t		payload;
	size_t		need;
	size_t		to_end = RING_SIZE - pt->head % RING_SIZE;
	size_t		total;
	bool		external;
	RingEntry  *e;
	char	   *block = NULL;

	if (key == NULL)
		key_len = -1;
	if (value == NULL)
		value_len = -1;
	payload = payload_size(key_len, value_len, headers, nheaders);
	external = payload > RING_SIZE / 4;
	need = RING_ALIGN(sizeof(RingEntry) + (external ? 0 : payload));
	/* an entry that does not fit before the end starts at the beginning */
	total = to_end < need ? to_end + need : need;

	/*
	 * Room is counted from the tail last seen, which only lags: tail is read
	 * again (a shared cache line, and a barrier) only when that is not
	 * enough.
	 */
	if (RING_SIZE - (pt->head - pt->tail_seen) < total)
	{
		pt->tail_seen = pg_atomic_read_u64(&pt->tail);
		/* what the thread read below tail is no longer read */
		pg_memory_barrier();
		if (RING_SIZE - (pt->head - pt->tail_seen) < total)
		{
			/* ask to be woken, then look again: the thread may have moved on */
			pg_atomic_write_u32(&pt->room_wanted, 1);
			pg_memory_barrier();
			pt->tail_seen = pg_atomic_read_u64(&pt->tail);
			if (RING_SIZE - (pt->head - pt->tail_seen) < total)
			{
				kb_producer_thread_flush(pt);
				return false;
			}
			pg_atomic_write_u32(&pt->room_wanted, 0);
			pg_memory_barrier();
		}
	}

	if (external)
	{
		block = malloc(Max(payload, 1));
		if (block == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory"),
					 errdetail("Failed on a request of size %zu for a Kafka record.", payload)));
		copy_payload(block, key, key_len, value, value_len, headers, nheaders);
	}
	if (to_end < need)
	{
		((RingEntry *) (pt->ring + pt->head % RING_SIZE))->size = 0;
		pt->head += to_end;
	}
	e = (RingEntry *) (pt->ring + pt->head % RING_SIZE);
	e->size = need;
	e->nheaders = nheaders;
	e->external = external;
	e->key_len = key_len;
	e->value_len = value_len;
	e->rkt = rkt;
	e->opaque = opaque;
	e->block = block;
	if (!external)
		copy_payload((char *) (e + 1), key, key_len, value, value_len, headers, nheaders);
	pt->head += need;

	/* the entry is written before the thread can see it */
	pg_write_barrier();
	pg_atomic_write_u64(&pt->published_head, pt->head);
	if (++pt->unannounced >= WAKE_CHECK_EVERY)
		kb_producer_thread_flush(pt);
	return true;
}

/*
 * Wake the thread if it sleeps, for the entries put since the last check:
 * the caller does it at the end of each transaction and before it waits.
 * (A thread never woken still looks for entries every 100 ms.)
 */
void
kb_producer_thread_flush(KbProducerThread *pt)
{
	if (pt->unannounced == 0)
		return;
	pt->unannounced = 0;
	/* head is published before sleeping is read; the thread does the reverse */
	pg_memory_barrier();
	if (pg_atomic_read_u32(&pt->sleeping) &&
		pg_atomic_exchange_u32(&pt->sleeping, 0))
		rd_kafka_queue_yield(pt->mainq);
}

/*
 * Positions in the ring, in bytes since the start: up to where records
 * were put, and up to where they were handed to librdkafka.  A record put
 * before written() returned x is handed over once consumed() reaches x.
 */
uint64
kb_producer_thread_written(KbProducerThread *pt)
{
	return pt->head;
}

uint64
kb_producer_thread_consumed(KbProducerThread *pt)
{
	return pg_atomic_read_u64(&pt->tail);
}

/*
 * Have the thread wake the worker's thread (kb_kafka_client_wake) the next
 * time it hands records over; the caller then looks at consumed() again
 * before it waits.
 */
void
kb_producer_thread_wake_me(KbProducerThread *pt)
{
	kb_producer_thread_flush(pt);
	pg_atomic_write_u32(&pt->room_wanted, 1);
	pg_memory_barrier();
}

/* Whether librdkafka's queue is full: the broker is slow or away. */
bool
kb_producer_thread_queue_full(KbProducerThread *pt)
{
	return pg_atomic_read_u32(&pt->queue_full) != 0;
}
