/*-------------------------------------------------------------------------
 * spool.h
 *	  The records of a streamed, not yet committed transaction (spool.c).
 *-------------------------------------------------------------------------
 */
#ifndef KB_SPOOL_H
#define KB_SPOOL_H

#include "access/xlogdefs.h"
#include "lib/stringinfo.h"

typedef struct KbSpool KbSpool;

extern KbSpool *kb_spool_create(MemoryContext cxt);
extern void kb_spool_append(KbSpool *spool, XLogRecPtr lsn, TransactionId xid,
							const void *record, uint32 len);
extern void kb_spool_cut(KbSpool *spool, XLogRecPtr lsn);
extern uint64 kb_spool_records(KbSpool *spool);
extern void kb_spool_rewind(KbSpool *spool);
extern bool kb_spool_next(KbSpool *spool, StringInfo buf);
extern void kb_spool_close(KbSpool *spool);

#endif
