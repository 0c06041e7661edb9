/* aclone: the clone's state, and the interface clone.c gives the
 * hydrator (and the unit tests).  Not for the plugin or the CLI, which
 * see only include/aclone/clone.h.
 *
 * Every field says what protects it: "set at open" (read-only after),
 * "atomic", "protected by X", or "owned by Y" (only Y touches it).
 */
#ifndef ACLONE_CLONE_INTERNAL_H
#define ACLONE_CLONE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <sys/types.h>

#include "aclone/clock.h"
#include "aclone/clone.h"
#include "aclone/hydrator.h"
#include "aclone/map.h"
#include "aclone/meta.h"
#include "fgpace.h"

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
  struct aclone_dirty_list dirty_hydrated;  /* scratch: taken words */
  struct aclone_dirty_list dirty_written;

  /* Counters, cumulative over the clone's life (loaded from live page);
   * atomic, advisory.
   */
  atomic_uint_fast64_t bytes_copied, bytes_skipped, errors, in_flight;
  atomic_uint_fast64_t bytes_cor;  /* of bytes_copied, copied on read */
  atomic_uint_fast64_t bytes_cor_charged; /* see aclone_clone_bytes_cor_charged */
  pthread_mutex_t err_lock;      /* protects last_error */
  char last_error[256];

  /* Shared with the hydrator (atomic). */
  atomic_uint_fast64_t rate;     /* bytes/s copied recently (hydrator) */
  atomic_uint_fast64_t hint;     /* 1 + region after the last read miss, 0 none */
  atomic_uint fg_active;         /* client requests in progress */
  atomic_uint_fast64_t fg_last_ns; /* when the last client request began */
  atomic_uint fg_misses;         /* client reads waiting for the source now */
  atomic_uint_fast64_t fg_miss_ns; /* when the last of those ended */
  atomic_uint_fast64_t bytes_missed; /* read from the source for clients
                                      * and not copied, cumulative */
  atomic_uint_fast64_t copy_write_cuts; /* copy writes cut into pieces while
                                         * clients were served (hydrator.c) */
  /* Service times of client reads served wholly from dest (fgpace.h):
   * written by clone_pread, read by the hydrator's pace controller.
   */
  struct aclone_svc_hist svc;
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

  /* Copy threads' priority (prio.h).  copy_tids: each copy thread's tid
   * while it runs, 0 otherwise (written by the thread itself);
   * copies_idle: they may be at idle priority; lock_waiters: client
   * requests waiting for a region lock (none may go back to idle while
   * one waits); boost_until_ns: nor until then (after the last wait);
   * boost_gen: bumped each time a client set them to background, so
   * that each thread knows its own idea of its priority is stale.
   */
  _Atomic pid_t copy_tids[ACLONE_HYDRATOR_MAX_WORKERS];
  atomic_bool copies_idle;
  atomic_uint lock_waiters;
  atomic_uint_fast64_t boost_until_ns;
  atomic_uint boost_gen;         /* (also: how many times, for status) */

  /* Copy-on-read writes behind replies: set by aclone_clone_start
   * before requests come, stopped at shutdown after they drained.
   */
  struct aclone_writebehind *wb;
  /* The settler thread's own: a writeback error was seen while settling
   * copies; their pages are left cached from then on (cor_settle).
   */
  bool wb_unsettled;
};

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

/* The one place a copy into dest ends.  A copy of regions [first,
 * first+count) into dest bytes [off, off+len) finished its write with wr
 * (0 or -errno).  Success: mark them hydrated (and written, for a
 * client's read-modify-write) and count the bytes.  Failure: they stay
 * unhydrated (a later copy redoes them), D is no longer known zero, and
 * copy-on-read rests for a second.  Returns wr.  Must be called with the
 * regions' lock held, after the write: marking first would let a commit
 * record data D does not hold (invariant 1).
 */
int aclone_clone_copy_landed (struct aclone_clone *c, uint64_t first,
                              uint64_t count, uint64_t off, uint64_t len,
                              int wr, bool written);

/* Hydrate regions [first, first+count) that are not hydrated yet, by
 * copying from the source; optionally fill out[] with device bytes
 * [out_off, out_off+out_len) inside that range (a client's read: the
 * copies count as copied on read).  Must be called with the region lock
 * for the range held.
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

/* May the copy threads be at idle priority now: allowed, no client
 * waiting for a region lock, and none lately?
 */
bool aclone_clone_copies_may_idle (struct aclone_clone *c);

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

/* The hydrator's view ------------------------------------------------
 *
 * What hydrator.c reads and writes of the clone goes through these (and
 * the functions above), besides the fields set at open (size,
 * region_size, dest, the map with its own atomics, meta's header) and
 * c->hydrator, which it owns.  All lock-free: atomics, advisory.
 */

/* Clients: a request in progress, or one begun within `within` ns (a
 * client at queue depth 1 has nothing in progress between its requests).
 */
static inline bool
aclone_clone_clients_active (struct aclone_clone *c, uint64_t within)
{
  uint64_t last = atomic_load_explicit (&c->fg_last_ns, memory_order_relaxed);
  return atomic_load (&c->fg_active) > 0 ||
         (last && aclone_now_ns () - last < within);
}

/* Clients and the source: a client read waiting for the source now
 * (a miss, on the path hydration's reads take), or, with within > 0, one
 * ended within `within` ns.
 */
static inline bool
aclone_clone_client_missing (struct aclone_clone *c, uint64_t within)
{
  uint64_t last = atomic_load_explicit (&c->fg_miss_ns, memory_order_relaxed);
  return atomic_load (&c->fg_misses) > 0 ||
         (within && last && aclone_now_ns () - last < within);
}

/* Take the read-miss hint: 1 + the region after the last miss, 0 none. */
static inline uint64_t
aclone_clone_take_hint (struct aclone_clone *c)
{
  return atomic_exchange_explicit (&c->hint, 0, memory_order_relaxed);
}

/* The clients' turns, for the pace controller (fgpace.h). */
static inline const struct aclone_svc_hist *
aclone_clone_client_turns (struct aclone_clone *c)
{
  return &c->svc;
}

/* The live page: the controls (ctl_*) and the controller's fields. */
static inline struct aclone_live *
aclone_clone_live (struct aclone_clone *c)
{
  return c->meta->live;
}

/* The source as the header names it, for messages. */
static inline const char *
aclone_clone_source_name (struct aclone_clone *c)
{
  return c->meta->hdr.source;
}

/* Counters and state the hydrator reports. */
static inline void
aclone_clone_set_backing_off (struct aclone_clone *c, bool v)
{
  atomic_store (&c->backing_off, v);
}

static inline bool
aclone_clone_backing_off (struct aclone_clone *c)
{
  return atomic_load (&c->backing_off);
}

static inline void
aclone_clone_set_rate (struct aclone_clone *c, uint64_t bytes_per_s)
{
  atomic_store (&c->rate, bytes_per_s);
}

static inline uint64_t
aclone_clone_bytes_copied (struct aclone_clone *c)
{
  return atomic_load (&c->bytes_copied);
}

/* Of those, the bytes copied for clients' reads (copy-on-read). */
static inline uint64_t
aclone_clone_bytes_copied_on_read (struct aclone_clone *c)
{
  return atomic_load (&c->bytes_cor);
}

/* Copy-on-read bytes for the progress floor (hydrator.c): copied in
 * line, or queued behind a reply.  A queued copy counts at once: it
 * lands when the writer gets to it, later while the writer rests.
 */
static inline uint64_t
aclone_clone_bytes_cor_charged (struct aclone_clone *c)
{
  return atomic_load (&c->bytes_cor_charged);
}

static inline uint64_t
aclone_clone_bytes_missed (struct aclone_clone *c)
{
  return atomic_load_explicit (&c->bytes_missed, memory_order_relaxed);
}

static inline uint64_t
aclone_clone_bytes_skipped (struct aclone_clone *c)
{
  return atomic_load (&c->bytes_skipped);
}

/* A copy of len bytes begins, or ends (landed or not): in_flight. */
static inline void
aclone_clone_copy_begins (struct aclone_clone *c, uint64_t len)
{
  atomic_fetch_add (&c->in_flight, len);
}

static inline void
aclone_clone_copy_ends (struct aclone_clone *c, uint64_t len)
{
  atomic_fetch_sub (&c->in_flight, len);
}

/* A copy write was cut into pieces for clients (hydrator.c). */
static inline void
aclone_clone_count_write_cut (struct aclone_clone *c)
{
  atomic_fetch_add_explicit (&c->copy_write_cuts, 1, memory_order_relaxed);
}

/* Copy thread k runs as tid (0: it ended), so that a client waiting for
 * a lock it holds can lift its priority (client_region_lock).
 */
static inline void
aclone_clone_copy_thread (struct aclone_clone *c, unsigned k, pid_t tid)
{
  atomic_store (&c->copy_tids[k], tid);
}

static inline pid_t
aclone_clone_copy_thread_tid (struct aclone_clone *c, unsigned k)
{
  return atomic_load (&c->copy_tids[k]);
}

/* May the copy threads use idle priority at all (prio.h)? */
static inline void
aclone_clone_allow_idle (struct aclone_clone *c, bool v)
{
  atomic_store (&c->copies_idle, v);
}

/* Bumped each time a client set the copy threads to background. */
static inline unsigned
aclone_clone_boost_gen (struct aclone_clone *c)
{
  return atomic_load (&c->boost_gen);
}

/* Publish counters and state to the live page now. */
void aclone_clone_publish (struct aclone_clone *c, enum aclone_state state);

/* The same, with the state the clone is in (paused, waiting...). */
void aclone_clone_publish_current (struct aclone_clone *c);

#endif
