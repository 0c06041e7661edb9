/* aclone: copy-on-read write-behind (aclone-design(7), "FOREGROUND
 * FIRST").  Internal to the core library.
 *
 * A client's read miss reads whole regions from the source, and with
 * copy-on-read they are also written to dest.  The client should not wait
 * for that write: its data is in hand.  So the reply goes out first and
 * the write is handed here, to one writer thread, together with the
 * region lock, which the reading thread took and does not release:
 *
 *   1. the client thread locks the regions, reads them from the source,
 *      copies its part into the reply, and queues {regions, buffer};
 *   2. it replies; the regions stay locked and unhydrated;
 *   3. the writer lands the write (the land callback: write dest, mark
 *      the regions hydrated, or record the failure), then unlocks them
 *      and frees the buffer.
 *
 * Because the lock is held until step 3, a client write to those regions
 * waits for the copy as before, the hydrator skips them, and a commit
 * cannot mark them before their data is written: a commit marks only
 * regions hydrated in core, which step 3 does after the write, and it
 * syncs dest before it writes the bitmap (invariant 1).  A crash before
 * step 3 leaves them unhydrated: their data is still the source's.
 *
 * Buffers come from aclone_writebehind_buf and go back to it once
 * landed: a spare kept (up to WB_SPARE_BYTES) is one malloc, one set of
 * page faults and one trim of the heap fewer for the next miss.  Without
 * them, fresh buffers halved copy-on-read misses (0.45x an nbdkit nbd
 * proxy; 0.67x with spares; tests/bench/run --only 10).
 *
 * Landed copies then settle (the settle callback, on a thread of its
 * own; dest.h, aclone_dest_settle_begin): their writeback starts at
 * once, and a few copies later (WB_SETTLE_BYTES) it is waited for and
 * their pages dropped from the page cache.  The client has the data;
 * keeping it cached cost the machine memory, and on the development
 * machine the fresh pages made each copy 10x as dear as one into pages
 * just dropped.
 *
 * The writer is background work, and on a machine whose CPUs are busy it
 * still takes time the clients want: when its landings wait for a CPU
 * longer than they run, the writer rests between them (writebehind.c),
 * its queue fills, and further misses are served without a copy.  On two
 * cores saturated by a client reading misses, copying all it could cost
 * the client 30-40% of its throughput.  No rests while someone waits for
 * a region (may_rest): a queued copy may hold it.  A client about to
 * wait calls aclone_writebehind_hurry, which also ends a rest under way.
 *
 * The queue holds at most max_bytes; beyond that (dest slower than the
 * source), the caller does not copy at all: the read is served from the
 * source as without copy-on-read, the regions stay unhydrated for the
 * hydrator.  Copy-on-read is an optimisation; neither memory nor the
 * client's reply waits for it.
 */
#ifndef ACLONE_WRITEBEHIND_H
#define ACLONE_WRITEBEHIND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct aclone_writebehind;

/* One queued copy: regions [first, first+count), locked by the caller;
 * buf (from aclone_writebehind_buf, cap bytes) holds dest bytes
 * [off, off+len).
 */
struct aclone_wb_copy {
  uint64_t first, count;
  uint64_t off;
  size_t len;
  char *buf;
  size_t cap;
};

/* Lands one copy: write it, mark it or record the failure, unlock the
 * regions.  The writer takes buf back afterwards.
 */
typedef void (*aclone_wb_land_fn) (void *opaque, const struct aclone_wb_copy *w);

/* Settles dest bytes [off, off+len) of a landed copy: end=false soon
 * after it landed, end=true once a few more copies have (or none came
 * for a while).  Runs on the settler thread, with no lock held; it may
 * wait for I/O.
 */
typedef void (*aclone_wb_settle_fn) (void *opaque, uint64_t off, size_t len,
                                     bool end);

struct aclone_wb_ops {
  aclone_wb_land_fn land;
  aclone_wb_settle_fn settle;        /* NULL: copies are not settled */
  /* false while someone waits for a region (a queued copy may hold it):
   * the writer does not rest then.  NULL: always true.
   */
  bool (*may_rest) (void *opaque);
};

/* Start the writer thread (and the settler, with ops->settle).  Returns
 * 0 or -errno.
 */
int aclone_writebehind_start (const struct aclone_wb_ops *ops, void *opaque,
                              size_t max_bytes,
                              struct aclone_writebehind **out);

/* Hand w over.  true: queued, the writer owns w's lock and buffer from
 * now on.  false (full, or stopping): the caller still owns them.
 */
bool aclone_writebehind_queue (struct aclone_writebehind *wb,
                               const struct aclone_wb_copy *w);

/* A buffer of at least len bytes (*cap receives its size), a spare if
 * one fits, else new; NULL if out of memory.  Give it back with
 * aclone_writebehind_buf_put (with that *cap) unless it was queued.
 */
char *aclone_writebehind_buf (struct aclone_writebehind *wb, size_t len,
                              size_t *cap);
void aclone_writebehind_buf_put (struct aclone_writebehind *wb, char *buf,
                                 size_t cap);

/* Is there room for len more bytes now?  (A hint: another thread may
 * take it first, and aclone_writebehind_queue then says no.)
 */
bool aclone_writebehind_has_room (struct aclone_writebehind *wb, size_t len);

/* Bytes of spare buffers kept now. */
uint64_t aclone_writebehind_spare_bytes (struct aclone_writebehind *wb);

/* Bytes queued and not landed yet; copies queued since start; rests
 * taken since start.
 */
uint64_t aclone_writebehind_pending (struct aclone_writebehind *wb);
uint64_t aclone_writebehind_queued (struct aclone_writebehind *wb);
uint64_t aclone_writebehind_rests (struct aclone_writebehind *wb);

/* Someone waits for a region a queued copy holds: end the writer's
 * rest, and take none for a while.
 */
void aclone_writebehind_hurry (struct aclone_writebehind *wb);

/* Refuse new copies from now on, land every queued one, join the
 * writer and the settler (copies not settled yet stay cached) and free
 * the spare buffers.  Safe with NULL, and twice in a
 * row; not from two threads at once (the second would return before the
 * queue has landed).
 */
void aclone_writebehind_stop (struct aclone_writebehind *wb);

/* Free a stopped write-behind.  Safe with NULL. */
void aclone_writebehind_free (struct aclone_writebehind *wb);

#endif
