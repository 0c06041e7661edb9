/* aclone: the clone device: the I/O semantics of aclone-design(7), built
 * on the metadata file, the region map, the source and the destination.
 *
 * All I/O functions are safe to call from many threads at once.  They
 * return 0 or -errno; -errno is what the NBD client should see.
 */
#ifndef ACLONE_CLONE_H
#define ACLONE_CLONE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "aclone/dest.h"
#include "aclone/error.h"
#include "aclone/map.h"
#include "aclone/meta.h"
#include "aclone/source.h"

struct aclone_hydrator;

/* Block status flags, as NBD's base:allocation. */
#define ACLONE_EXTENT_HOLE 1u
#define ACLONE_EXTENT_ZERO 2u

struct aclone_clone_config {
  const char *dest_path;
  const char *meta_path;
  uint32_t region_size;          /* 0 = default for new, any for existing */
  bool copy_on_read;
};

/* Log sink: level 0 debug, 1 info, 2 error. */
typedef void (*aclone_log_fn) (void *opaque, int level, const char *msg);

/* The clone's mode: what its data allows.  One value, changed only by
 * the transitions in clone.c ("Modes"):
 *
 *   HYDRATING --(a commit finds every region hydrated)--> COMPLETE
 *   HYDRATING, COMPLETE --(dest or metadata sync fails)--> FAILED
 *
 * and never out of FAILED while the server runs (dm-clone's fail mode).
 */
enum aclone_mode {
  ACLONE_MODE_HYDRATING = 0,   /* some regions still read from the source */
  ACLONE_MODE_COMPLETE,        /* every region on dest and committed */
  ACLONE_MODE_FAILED,          /* a sync failed: nothing is committed again */
};

/* Where the server is in its life: the request gate (see
 * aclone_clone_shutdown).  RUNNING -> STOPPING -> STOPPED, once.
 */
enum aclone_run {
  ACLONE_RUN_RUNNING = 0,      /* requests pass the gate */
  ACLONE_RUN_STOPPING,         /* gate closed, requests inside drain */
  ACLONE_RUN_STOPPED,          /* final commit done */
};

struct aclone_clone {
  /* Set at open, then read-only. */
  struct aclone_meta *meta;
  struct aclone_dest *dest;
  uint64_t size;
  uint32_t region_size;
  bool copy_on_read;
  aclone_log_fn log;
  void *log_opaque;

  struct aclone_map map;         /* atomic bits; region locks inside */

  /* The source: NULL once complete.  Borrow it with
   * aclone_clone_source_get/put; released under the write lock.
   */
  struct aclone_source *src;     /* protected by src_lock */
  pthread_rwlock_t src_lock;

  _Atomic int mode;              /* enum aclone_mode: clone.c, "Modes" */
  _Atomic int run;               /* enum aclone_run */
  char fail_cause[256];          /* written once, by the move to FAILED */

  /* Unhydrated regions read zero on dest: dest was created sparse by us,
   * or the header said so at open.  Cleared for good by any failed dest
   * write, which may leave junk in a region that is not hydrated.
   */
  atomic_bool dest_zero;

  /* Commit (invariant 1): one at a time, under commit_lock, which also
   * protects the scratch arrays.
   */
  pthread_mutex_t commit_lock;
  uint64_t *ci, *cw;  size_t ccap;     /* scratch: hydrated dirty words */
  uint64_t *wi, *ww;  size_t wcap;     /* scratch: written dirty words */

  /* Counters, cumulative over the clone's life (loaded from live page);
   * atomic, advisory.
   */
  atomic_uint_fast64_t bytes_copied, bytes_skipped, errors, in_flight;
  pthread_mutex_t err_lock;      /* protects last_error */
  char last_error[256];

  /* Shared with the hydrator (atomic). */
  atomic_uint_fast64_t rate;     /* bytes/s copied recently (hydrator) */
  atomic_uint_fast64_t hint;     /* 1 + region after the last read miss, 0 none */
  atomic_uint fg_active;         /* client requests in progress */
  atomic_uint_fast64_t fg_last_ns; /* when the last client request began */
  atomic_bool backing_off;       /* hydrator waiting after failures */
  /* After a copy-on-read's dest write failed: no copy-on-read before
   * this time (aclone_now_ns), reads go to the source alone.
   */
  atomic_uint_fast64_t cor_retry_ns;

  /* Ticker: commits every second while dirty, updates the live page.
   * It stops when run leaves RUNNING (signalled under tick_lock).
   */
  pthread_t ticker;
  bool ticker_running;           /* owned by start/shutdown */
  pthread_mutex_t tick_lock;
  pthread_cond_t tick_cond;

  atomic_uint requests;          /* client requests inside the gate */

  struct aclone_hydrator *hydrator;  /* owned by hydrator.c */
};

/* The current mode (acquire: a reader that sees COMPLETE sees every
 * region hydrated).
 */
static inline enum aclone_mode
aclone_clone_mode (struct aclone_clone *c)
{
  return (enum aclone_mode) atomic_load_explicit (&c->mode, memory_order_acquire);
}

/* Enter FAILED, for good, with cause (printf-style): logs once and
 * shows "failed" with the cause in the live page.  Later calls do nothing.
 */
void aclone_clone_fail (struct aclone_clone *c, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* Borrow the source for one call: returns it with src_lock read-held,
 * or NULL (nothing held) once it has been released.  Every non-NULL
 * return must be paired with aclone_clone_source_put.
 */
struct aclone_source *aclone_clone_source_get (struct aclone_clone *c);
void aclone_clone_source_put (struct aclone_clone *c);

/* A dest write at off failed with r (-errno): record it, and void the
 * dest-zero promise.  Returns r.
 */
int aclone_clone_dest_failed (struct aclone_clone *c, int r, const char *what,
                              uint64_t off);

/* Open or create the clone.  src may be NULL only for a complete clone;
 * on success the clone owns src.  Checks everything before modifying
 * anything: on failure dest and meta are as they were.
 */
int aclone_clone_open (const struct aclone_clone_config *cfg,
                       struct aclone_source *src, aclone_log_fn log,
                       void *log_opaque, struct aclone_clone **out,
                       struct aclone_error *err);

/* Start background threads (the ticker; the hydrator is started by its
 * own module).  Call after nbdkit's fork.
 */
int aclone_clone_start (struct aclone_clone *c, struct aclone_error *err);

/* Make calls waiting for a lost or hung source give up now (-ESHUTDOWN):
 * for stopping.  The source stays open.
 */
void aclone_clone_cancel_source (struct aclone_clone *c);

/* Graceful stop, without freeing anything, so that threads still
 * calling in get -ESHUTDOWN rather than a freed clone:
 *   1. close the request gate (new requests fail with -ESHUTDOWN) and
 *      cancel waits for a lost source;
 *   2. wait up to drain_ms for requests in progress to finish;
 *   3. stop the ticker, final commit, live page says "stopped";
 *   4. release the metadata lock (only if step 2 drained: a request still
 *      inside could write after a new server took over).
 * Stop the hydrator first.  Returns 0, or -errno of the commit, or
 * -EBUSY when requests did not drain.  Runs once; later calls return 0.
 */
int aclone_clone_shutdown (struct aclone_clone *c, unsigned drain_ms);

/* aclone_clone_shutdown if not done yet, then close and free. */
void aclone_clone_close (struct aclone_clone *c);

int aclone_clone_pread (struct aclone_clone *c, void *buf, uint32_t count,
                        uint64_t offset);
int aclone_clone_pwrite (struct aclone_clone *c, const void *buf,
                         uint32_t count, uint64_t offset, bool fua);

/* Zero or trim.  Trim is zero that may punch; both leave the range
 * reading zero.  fast: fail with -ENOTSUP rather than copy or write.
 */
int aclone_clone_zero (struct aclone_clone *c, uint32_t count,
                       uint64_t offset, bool may_trim, bool fast, bool fua);
int aclone_clone_flush (struct aclone_clone *c);

/* Hydrate the regions covering the range (NBD_CMD_CACHE). */
int aclone_clone_cache (struct aclone_clone *c, uint32_t count, uint64_t offset);

/* Block status: call fn for consecutive extents from offset; type is
 * NBD's (bit 0 hole, bit 1 zero).  Reports at least the first extent.
 */
typedef int (*aclone_status_fn) (void *opaque, uint64_t offset,
                                 uint64_t length, uint32_t type);
int aclone_clone_extents (struct aclone_clone *c, uint32_t count,
                          uint64_t offset, bool req_one,
                          aclone_status_fn fn, void *opaque);

/* The commit protocol (invariant 1):
 *   1. swap out the dirty bits (regions hydrated/written since last commit)
 *   2. fdatasync dest
 *   3. set the written bits in the mmap'd bitmap and msync them, then
 *   4. the same for the hydrated bits
 * then, when every region is hydrated, set the header's complete flag.
 * A failed sync or metadata write moves the clone to FAILED (the kernel
 * reports a writeback error once and may have dropped the data, so no
 * later commit could be trusted): this call and every later one return
 * -EIO.  Only a lack of memory in step 1 leaves the bits for the next try.
 */
int aclone_clone_commit (struct aclone_clone *c);

/* Hydrate regions [first, first+count) that are not hydrated yet, by
 * copying from the source; optionally fill out[] with device bytes
 * [out_off, out_off+out_len) inside that range.  Must be called with the
 * region lock for the range held.
 */
int aclone_clone_copy_locked (struct aclone_clone *c, uint64_t first,
                              uint64_t count, void *out, uint64_t out_off,
                              size_t out_len);

/* Mark regions hydrated without copying because they read zero on the
 * source, zeroing dest first unless it is known zero (invariant 4).
 * Must be called with the region lock held.
 */
int aclone_clone_skip_zero_locked (struct aclone_clone *c, uint64_t first,
                                   uint64_t count);

/* Close the source once the clone is complete: waits for calls in
 * progress.  Afterwards every read is served from dest.
 */
void aclone_clone_release_source (struct aclone_clone *c);

/* Log a message through the clone's log sink (level 0 debug, 1 info). */
void aclone_clone_log (struct aclone_clone *c, int level, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

/* Record a runtime error: counters, live page, log. */
void aclone_clone_error (struct aclone_clone *c, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* Publish counters and state to the live page now. */
void aclone_clone_publish (struct aclone_clone *c, enum aclone_state state);

#endif
