/* aclone: the clone device.
 *
 * Design notes
 * ------------
 * Every region is in one of two states, unhydrated (its data lives on the
 * source S) or hydrated (on the destination D).  The in-core map says
 * which; bits only go from unhydrated to hydrated.  Requests are split
 * at region boundaries into runs of regions in the same state:
 *
 *   read,  hydrated run    D, no lock
 *   read,  unhydrated run  copy-on-read: lock, read S, reply, and write D
 *                          behind the reply (writebehind.h), which marks
 *                          and unlocks; without copy-on-read: S, no lock
 *   write, hydrated        D, no lock
 *   write, unhydrated      whole regions: lock, write D, mark hydrated;
 *                          a partial region: lock, read S, merge, write
 *                          the whole region to D, mark hydrated
 *   zero/trim              as write, with zeroes; whole unhydrated
 *                          regions need no D I/O when D is known zero
 *
 * Why hydrated regions need no lock (invariant 3): every copy of S into
 * D happens under the region lock, and re-checks the hydrated bit after
 * taking it.  Once a region is hydrated no copy will ever write it
 * again, so a writer that sees the bit set cannot race a copy.  A writer
 * that sees it clear takes the lock, and so waits for any copy in
 * flight; the copy, when it re-checks, skips regions hydrated meanwhile.
 *
 * Durability is the commit's business (aclone_clone_commit).  Marking a
 * region hydrated in core happens only after D holds its data; the
 * commit swaps out those marks, syncs D, then writes them to the
 * metadata file (invariant 1).
 *
 * Modes
 * -----
 * The clone is in one mode (c->mode, enum aclone_mode):
 *
 *   HYDRATING  reads route by the map; copies, commits and the hydrator
 *              run.
 *   COMPLETE   every region is on D and committed: every request goes
 *              to D, the source is released; commits still sync D and
 *              record written regions (the audit needs them).
 *   FAILED     a sync of D or of the metadata file failed.  The kernel
 *              reports a writeback error once and may drop the data, so
 *              nothing is committed again: FLUSH and FUA fail with EIO,
 *              the hydrator stops, reads go on without copy-on-read:
 *              from D for regions committed before the failure or
 *              written by a client since, from the source for the rest
 *              (a region copied since the last good commit may have lost
 *              its pages with the failed sync).  Writes reach D but are
 *              never acknowledged as durable.  A restart reads every
 *              region not committed before the error from the source
 *              again.
 *
 * Transitions, each in one function:
 *   HYDRATING -> COMPLETE   aclone_clone_commit, under commit_lock, once
 *                           every region is hydrated and committed;
 *   HYDRATING -> FAILED,    aclone_clone_fail, called by the commit when
 *   COMPLETE  -> FAILED     a sync or a metadata write fails.
 * Nothing leaves FAILED.  The server's life (c->run: RUNNING, STOPPING,
 * STOPPED) is separate: it says whether requests pass the gate, not
 * what the data allows.
 *
 * A failed write to D is not a failed sync: the request that wrote
 * fails (a copy-on-read still serves the data it read, leaving the
 * region unhydrated), D stops being known zero, and the clone goes on.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/param.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bsd/string.h>

#include "clone-internal.h"
#include "prio.h"
#include "writebehind.h"
#include "aclone/clock.h"

/* Largest run one foreground copy locks and buffers. */
#define COPY_MAX_BYTES (32u << 20)

/* How long copy-on-read pauses after its dest write failed. */
#define COR_BACKOFF_NS 1000000000ull

/* Bitmap words read at a time when a clone opens (1 MiB). */
#define LOAD_CHUNK_WORDS (128u * 1024)

/* How long copy threads stay at background priority after a client
 * waited for a region lock.
 */
#define BOOST_NS 200000000ull

/* Copy-on-read writes queued behind their replies, at most. */
#define COR_BEHIND_MAX_BYTES (16u << 20)


/* Byte range of regions [first, first+count). */
static uint64_t
region_start (const struct aclone_clone *c, uint64_t r)
{
  return r << c->map.shift;
}

static uint64_t
region_end (const struct aclone_clone *c, uint64_t last_plus_one)
{
  return MIN (last_plus_one << c->map.shift, c->size);
}

static uint64_t
copy_max_regions (const struct aclone_clone *c)
{
  uint64_t n = COPY_MAX_BYTES >> c->map.shift;
  return n ? n : 1;
}

void
aclone_clone_log (struct aclone_clone *c, int level, const char *fmt, ...)
{
  char msg[512];
  va_list ap;

  if (!c->log)
    return;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  c->log (c->log_opaque, level, msg);
}

void
aclone_clone_error (struct aclone_clone *c, const char *fmt, ...)
{
  char msg[256];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  atomic_fetch_add (&c->errors, 1);
  pthread_mutex_lock (&c->err_lock);
  strlcpy (c->last_error, msg, sizeof c->last_error);
  pthread_mutex_unlock (&c->err_lock);
  if (c->log)
    c->log (c->log_opaque, 2, msg);
}

enum aclone_mode
aclone_clone_mode (struct aclone_clone *c)
{
  return (enum aclone_mode) atomic_load_explicit (&c->mode, memory_order_acquire);
}

uint64_t
aclone_clone_size (const struct aclone_clone *c)
{
  return c->size;
}

void
aclone_clone_fail (struct aclone_clone *c, const char *fmt, ...)
{
  int expect = ACLONE_MODE_HYDRATING;
  va_list ap;

  /* The cause is written before the mode changes, by the one caller
   * that wins the exchange; the publish that follows copies it.
   */
  pthread_mutex_lock (&c->err_lock);
  if (aclone_clone_mode (c) == ACLONE_MODE_FAILED) {
    pthread_mutex_unlock (&c->err_lock);
    return;
  }
  va_start (ap, fmt);
  vsnprintf (c->fail_cause, sizeof c->fail_cause, fmt, ap);
  va_end (ap);
  if (!atomic_compare_exchange_strong (&c->mode, &expect, ACLONE_MODE_FAILED)) {
    expect = ACLONE_MODE_COMPLETE;
    atomic_compare_exchange_strong (&c->mode, &expect, ACLONE_MODE_FAILED);
  }
  strlcpy (c->last_error, c->fail_cause, sizeof c->last_error);
  pthread_mutex_unlock (&c->err_lock);
  atomic_fetch_add (&c->errors, 1);
  if (c->log) {
    char msg[512];
    snprintf (msg, sizeof msg, "failed: %s; nothing more is committed (FLUSH "
              "fails), hydration stopped; restart to resume from the last "
              "commit", c->fail_cause);
    c->log (c->log_opaque, 2, msg);
  }
}

struct aclone_source *
aclone_clone_source_get (struct aclone_clone *c)
{
  pthread_rwlock_rdlock (&c->src_lock);
  if (!c->src) {
    pthread_rwlock_unlock (&c->src_lock);
    return NULL;
  }
  return c->src;
}

void
aclone_clone_source_put (struct aclone_clone *c)
{
  pthread_rwlock_unlock (&c->src_lock);
}

static int
source_read (struct aclone_clone *c, void *buf, size_t len, uint64_t off)
{
  struct aclone_source *src = aclone_clone_source_get (c);
  int r;

  /* Released: the clone completed since the caller looked at the map,
   * so every region is on D now (only an unlocked read can see this).
   */
  if (!src)
    return -ESTALE;
  r = aclone_source_pread (src, buf, len, off);
  if (r < 0)
    aclone_clone_error (c, "source %s: read %zu bytes at %llu: %s",
                        src->desc, len, (unsigned long long) off,
                        strerror (-r));
  aclone_clone_source_put (c);
  return r;
}

void
aclone_clone_release_source (struct aclone_clone *c)
{
  pthread_rwlock_wrlock (&c->src_lock);
  aclone_source_close (c->src);
  c->src = NULL;
  pthread_rwlock_unlock (&c->src_lock);
}

int
aclone_clone_dest_failed (struct aclone_clone *c, int r, const char *what,
                          uint64_t off)
{
  atomic_store (&c->dest_zero, false);
  aclone_clone_error (c, "dest %s: %s at %llu: %s", c->dest->path, what,
                      (unsigned long long) off, strerror (-r));
  return r;
}

/* Is D known to read zero in every region that is not hydrated? */
static bool
dest_reads_zero (struct aclone_clone *c)
{
  return atomic_load (&c->dest_zero);
}

int
aclone_clone_copy_landed (struct aclone_clone *c, uint64_t first,
                          uint64_t count, uint64_t off, uint64_t len, int wr,
                          bool written)
{
  if (wr < 0) {
    aclone_clone_dest_failed (c, wr, "write", off);
    atomic_store (&c->cor_retry_ns, aclone_now_ns () + COR_BACKOFF_NS);
    return wr;
  }
  if (written)
    aclone_map_set_written (&c->map, first, count);
  aclone_map_set_hydrated (&c->map, first, count);
  atomic_fetch_add (&c->bytes_copied, len);
  return 0;
}

/* Write a copy to dest and land it (aclone_clone_copy_landed). */
static int
land_copy (struct aclone_clone *c, uint64_t first, uint64_t count,
           const char *buf, uint64_t off, size_t len, bool written)
{
  return aclone_clone_copy_landed (c, first, count, off, len,
                                   aclone_dest_pwrite (c->dest, buf, len, off),
                                   written);
}

/* The write-behind's land callback: runs on its writer thread, owns the
 * regions' lock (see writebehind.h).
 */
static void
cor_land (void *opaque, const struct aclone_wb_copy *w)
{
  struct aclone_clone *c = opaque;

  if (land_copy (c, w->first, w->count, w->buf, w->off, w->len, false) == 0)
    atomic_fetch_add (&c->bytes_cor, w->len);
  atomic_fetch_sub (&c->in_flight, w->len);
  aclone_map_unlock (&c->map, w->first, w->count);
}

/* The write-behind's settle callback (writebehind.h): copies leave the
 * page cache once written back (dest.h).  Runs on its settler thread.
 *   - After a failed wait, pages are kept for good: the commit's sync
 *     reports the error (dest.h), and until then a page whose writeback
 *     failed is the only good copy of its data.
 *   - A range a client wrote since it landed is not dropped: its writes
 *     take no lock once it is hydrated, and a page they dirtied after the
 *     wait and whose writeback then failed would go with it.  What is
 *     left: a client write under way during the check (its written bit
 *     comes after its dest write) whose page's writeback fails within
 *     the drop; the same risk as the kernel reclaiming that page.  Nor
 *     is anything dropped once FAILED.
 */
static void
cor_settle (void *opaque, uint64_t off, size_t len, bool end)
{
  struct aclone_clone *c = opaque;

  if (c->wb_unsettled)
    return;
  if (!end) {
    aclone_dest_settle_begin (c->dest, off, len);
    return;
  }
  if (aclone_dest_settle_wait (c->dest, off, len) < 0) {
    c->wb_unsettled = true;
    return;
  }
  if (aclone_clone_mode (c) == ACLONE_MODE_FAILED)
    return;
  uint64_t last = (off + len - 1) >> c->map.shift;
  for (uint64_t r = off >> c->map.shift; r <= last; r++)
    if (aclone_map_written (&c->map, r))
      return;
  aclone_dest_drop_cached (c->dest, off, len);
}

/* The write-behind's may_rest callback: not while a client waits for a
 * region lock (client_region_lock).
 */
static bool
cor_may_rest (void *opaque)
{
  struct aclone_clone *c = opaque;

  return atomic_load (&c->lock_waiters) == 0;
}

/* Copy-on-read of regions [first, first+count), locked by the caller,
 * with the write behind the reply.  Reads them whole from the source and
 * fills out[] with device bytes [out_off, out_off+out_len).  Returns
 *   1   done, and the lock is gone: the writer owns it (or, if the
 *       queue filled meanwhile, the copy was dropped and unlocked);
 *   2   the writer is behind (its queue is full): no copy; the caller
 *       unlocks and reads from the source alone;
 *   0   not done, nothing changed: some region is hydrated already, or
 *       there is no write-behind; the caller copies in line;
 *   <0  -errno of the source read; the caller still holds the lock.
 */
static int
cor_behind (struct aclone_clone *c, uint64_t first, uint64_t count,
            void *out, uint64_t out_off, size_t out_len)
{
  uint64_t b0 = region_start (c, first), len = region_end (c, first + count) - b0;
  bool hydrated;
  size_t cap;
  char *buf;
  int r;

  if (!c->wb ||
      aclone_map_run_state (&c->map, first, count, &hydrated) != count ||
      hydrated)
    return 0;
  if (!aclone_writebehind_has_room (c->wb, len))
    return 2;
  if (!(buf = aclone_writebehind_buf (c->wb, len, &cap)))
    return 0;
  atomic_fetch_add (&c->in_flight, len);
  r = source_read (c, buf, len, b0);
  if (r < 0) {
    atomic_fetch_sub (&c->in_flight, len);
    aclone_writebehind_buf_put (c->wb, buf, cap);
    return r;
  }
  memcpy (out, buf + (out_off - b0), out_len);
  struct aclone_wb_copy w = { first, count, b0, len, buf, cap };
  if (aclone_writebehind_queue (c->wb, &w))
    atomic_fetch_add (&c->bytes_cor_charged, len);
  else {
    /* Full after all: drop the copy, the hydrator will do it. */
    atomic_fetch_sub (&c->in_flight, len);
    aclone_map_unlock (&c->map, first, count);
    aclone_writebehind_buf_put (c->wb, buf, cap);
  }
  return 1;
}

int
aclone_clone_copy_locked (struct aclone_clone *c, uint64_t first,
                          uint64_t count, void *out, uint64_t out_off,
                          size_t out_len)
{
  uint64_t r = first, end = first + count;
  char *bounce = NULL;
  size_t bounce_len = 0;
  int ret = 0;

  while (r < end && ret == 0) {
    uint64_t n = aclone_map_run (&c->map, r, end - r);
    uint64_t b0 = region_start (c, r), b1 = region_end (c, r + n);
    uint64_t o0 = out ? MAX (b0, out_off) : 0;
    uint64_t o1 = out ? MIN (b1, out_off + out_len) : 0;

    if (aclone_map_hydrated (&c->map, r)) {
      if (o0 < o1) {
        ret = aclone_dest_pread (c->dest, (char *) out + (o0 - out_off),
                                 o1 - o0, o0);
        if (ret < 0)
          aclone_clone_error (c, "dest %s: read at %llu: %s", c->dest->path,
                              (unsigned long long) o0, strerror (-ret));
      }
    }
    else {
      size_t len = b1 - b0;
      char *buf;
      if (o0 == b0 && o1 == b1)
        buf = (char *) out + (b0 - out_off);      /* straight into the reply */
      else {
        if (bounce_len < len) {
          free (bounce);
          bounce = malloc (len);
          if (!bounce) {
            ret = -ENOMEM;
            break;
          }
          bounce_len = len;
        }
        buf = bounce;
      }
      atomic_fetch_add (&c->in_flight, len);
      ret = source_read (c, buf, len, b0);
      if (ret == 0) {
        /* A failed write leaves the regions unhydrated; the data was
         * read, so a client gets it all the same.  Only a copy done for
         * its own sake (out == NULL) fails.
         */
        int wr = land_copy (c, r, n, buf, b0, len, false);
        if (wr < 0 && !out)
          ret = wr;
        if (wr == 0 && out) {
          atomic_fetch_add (&c->bytes_cor, len);
          atomic_fetch_add (&c->bytes_cor_charged, len);
        }
        if (ret == 0 && o0 < o1 && buf == bounce)
          memcpy ((char *) out + (o0 - out_off), bounce + (o0 - b0), o1 - o0);
      }
      atomic_fetch_sub (&c->in_flight, len);
    }
    r += n;
  }
  free (bounce);
  return ret;
}

int
aclone_clone_skip_zero_locked (struct aclone_clone *c, uint64_t first,
                               uint64_t count)
{
  uint64_t r = first, end = first + count;

  while (r < end) {
    uint64_t n = aclone_map_run (&c->map, r, end - r);
    if (!aclone_map_hydrated (&c->map, r)) {
      uint64_t b0 = region_start (c, r), b1 = region_end (c, r + n);
      if (!dest_reads_zero (c)) {
        int ret = aclone_dest_zero (c->dest, b1 - b0, b0, true, false);
        if (ret < 0)
          return aclone_clone_dest_failed (c, ret, "zero", b0);
      }
      aclone_map_set_hydrated (&c->map, r, n);
      atomic_fetch_add (&c->bytes_skipped, b1 - b0);
    }
    r += n;
  }
  return 0;
}

/* In FAILED mode, may region r be read from D?  Only if it was committed
 * before the failure, or a client wrote it since (the client reads its
 * own write back, durable or not).  A region copied since the last good
 * commit is not trusted: the failed sync may have dropped its pages, and
 * D would then read stale.  Must be called with r's lock held or with r
 * hydrated in core (both freeze it).
 */
static bool
failed_region_on_dest (struct aclone_clone *c, uint64_t r)
{
  return aclone_meta_bit (c->meta, ACLONE_BIT_HYDRATED, r) ||
         aclone_map_written (&c->map, r);
}

static int
failed_pread (struct aclone_clone *c, char *buf, uint32_t count,
              uint64_t offset)
{
  uint64_t pos = offset, end = offset + count;
  int ret = 0;

  while (pos < end && ret == 0) {
    uint64_t r = pos >> c->map.shift;
    uint64_t seg_end = MIN (end, region_end (c, r + 1));
    if (aclone_map_hydrated (&c->map, r) && failed_region_on_dest (c, r))
      ret = aclone_dest_pread (c->dest, buf + (pos - offset), seg_end - pos, pos);
    else
      ret = source_read (c, buf + (pos - offset), seg_end - pos, pos);
    pos = seg_end;
  }
  return ret;
}

/* since: as for aclone_clone_pread_client (0: no sample). */
static int
clone_pread (struct aclone_clone *c, void *buf, uint32_t count,
             uint64_t offset, uint64_t since)
{
  uint64_t pos = offset, end = offset + count;
  enum aclone_mode mode = aclone_clone_mode (c);

  if (mode == ACLONE_MODE_COMPLETE)
    return aclone_dest_pread (c->dest, buf, count, offset);
  if (mode == ACLONE_MODE_FAILED)
    return failed_pread (c, buf, count, offset);

  /* After a failed dest write, copy-on-read rests for a while. */
  uint64_t retry = atomic_load (&c->cor_retry_ns);
  bool copy = c->copy_on_read && (retry == 0 || aclone_now_ns () >= retry);
  int ret = 0;
  bool all_local = true;         /* every byte from dest: a sample */
  atomic_fetch_add (&c->fg_active, 1);
  atomic_store_explicit (&c->fg_last_ns, aclone_now_ns (), memory_order_relaxed);
  while (pos < end && ret == 0) {
    uint64_t r = pos >> c->map.shift;
    uint64_t last = (end - 1) >> c->map.shift;
    /* State and run from one sample: a run seen hydrated stays so (bits
     * only go that way); one seen unhydrated is re-checked under the
     * lock (copy) or read from the source, which holds its data.
     */
    bool hydrated;
    uint64_t n = aclone_map_run_state (&c->map, r, last - r + 1, &hydrated);

    /* A copy-on-read does not wait for regions someone else holds (a
     * copy, a write landing behind a reply, a client write): the source
     * has their data, as without copy-on-read.  Only the first region is
     * read that way; the loop tries the rest again.
     */
    bool locked = false;
    /* A writer that is behind takes no copy (cor_behind): then neither
     * is the lock worth taking.
     */
    if (!hydrated && copy &&
        (!c->wb || aclone_writebehind_has_room (c->wb, region_end (c, r + 1) -
                                                region_start (c, r)))) {
      n = MIN (n, copy_max_regions (c));
      locked = aclone_map_trylock (&c->map, r, n);
      if (!locked)
        n = 1;
    }
    uint64_t seg_end = MIN (end, region_end (c, r + n));
    char *p = (char *) buf + (pos - offset);

    if (hydrated) {
      ret = aclone_dest_pread (c->dest, p, seg_end - pos, pos);
      if (ret < 0)
        aclone_clone_error (c, "dest %s: read at %llu: %s", c->dest->path,
                            (unsigned long long) pos, strerror (-ret));
    }
    else {
      /* A miss: hydration starts no batch while it waits (hydrator.c). */
      all_local = false;
      atomic_fetch_add (&c->fg_misses, 1);
      if (locked) {
        ret = cor_behind (c, r, n, p, pos, seg_end - pos);
        if (ret == 0)
          ret = aclone_clone_copy_locked (c, r, n, p, pos, seg_end - pos);
        if (ret != 1)
          aclone_map_unlock (&c->map, r, n);
        if (ret == 1)
          ret = 0;
        else if (ret == 2)
          locked = false;             /* no copy: from the source below */
      }
      if (!locked) {
        ret = source_read (c, p, seg_end - pos, pos);
        if (ret == 0)
          atomic_fetch_add_explicit (&c->bytes_missed, seg_end - pos,
                                     memory_order_relaxed);
        else if (ret == -ESTALE)
          ret = aclone_dest_pread (c->dest, p, seg_end - pos, pos);
      }
      /* Locality: the hydrator copies what follows a miss next (told
       * before the miss ends, so that its next batch is that).
       */
      atomic_store_explicit (&c->hint, r + n + 1, memory_order_relaxed);
      /* The hold after a miss (hydrator.c) counts from its end: on a
       * narrow link a miss can take longer than the hold.
       */
      atomic_store_explicit (&c->fg_miss_ns, aclone_now_ns (), memory_order_relaxed);
      atomic_fetch_sub (&c->fg_misses, 1);
    }
    pos = seg_end;
  }
  /* What the pace controller asks the clients (fgpace.h). */
  if (since && all_local && ret == 0 && count <= ACLONE_SVC_MAX_READ)
    aclone_svc_record (&c->svc, aclone_now_ns () - since);
  atomic_fetch_sub (&c->fg_active, 1);
  return ret;
}

/* Lock regions for a client request that must wait for them.  When
 * someone holds them, it may be a copy thread at idle priority, which
 * barely runs while the CPU is busy: the copy threads go to background
 * priority first, for BOOST_NS (priority inheritance, by hand).
 */
static void
client_region_lock (struct aclone_clone *c, uint64_t first, uint64_t count)
{
  if (aclone_map_trylock (&c->map, first, count))
    return;
  /* 1. Count ourselves in: while anyone waits, no copy thread goes back
   *    to idle (hydrator.c, follow_priority, checks after it applies).
   * 2. If they may be idle now, set them to background ourselves (the
   *    lock holder may not run to see step 1) and say so (boost_gen);
   *    and end the copy-on-read writer's rest, if it is resting on a
   *    copy of these regions (writebehind.h).
   * 3. Wait; 4. count ourselves out, keeping them at background a
   *    little longer, so that a burst of waits does not flap them.
   */
  atomic_fetch_add (&c->lock_waiters, 1);
  if (c->wb)
    aclone_writebehind_hurry (c->wb);
  if (atomic_load (&c->copies_idle)) {
    pid_t tids[ACLONE_HYDRATOR_MAX_WORKERS];
    for (unsigned i = 0; i < ACLONE_HYDRATOR_MAX_WORKERS; i++)
      tids[i] = atomic_load (&c->copy_tids[i]);
    aclone_prio_apply_all (tids, ACLONE_HYDRATOR_MAX_WORKERS, false);
    atomic_fetch_add (&c->boost_gen, 1);
  }
  aclone_map_lock (&c->map, first, count);
  atomic_store (&c->boost_until_ns, aclone_now_ns () + BOOST_NS);
  atomic_fetch_sub (&c->lock_waiters, 1);
}

bool
aclone_clone_copies_may_idle (struct aclone_clone *c)
{
  return atomic_load (&c->copies_idle) && atomic_load (&c->lock_waiters) == 0 &&
         aclone_now_ns () >= atomic_load (&c->boost_until_ns);
}

/* The write-like operations: data != NULL writes it, else zeroes. */
struct wop {
  const char *data;
  bool punch, fast;
};

static int
dest_apply (struct aclone_clone *c, const struct wop *w, const char *data,
            uint64_t len, uint64_t pos)
{
  int r;

  if (w->data)
    r = aclone_dest_pwrite (c->dest, data, len, pos);
  else {
    r = aclone_dest_zero (c->dest, len, pos, w->punch, w->fast);
    if (r == -ENOTSUP)
      return r;                     /* fast zero refused: not an error */
  }
  return r < 0 ? aclone_clone_dest_failed (c, r, w->data ? "write" : "zero", pos) : 0;
}

/* A client's data is on D in regions [r, r+n), which the caller has
 * locked: mark them written, then hydrated.  In that order: a commit
 * swaps out the hydrated bits before the written ones, so any commit
 * that records one of these regions as hydrated records it as written
 * too, and verify never takes a client's data for a bad copy.  Returns
 * how many were newly hydrated.
 */
static uint64_t
mark_written_hydrated (struct aclone_clone *c, uint64_t r, uint64_t n)
{
  aclone_map_set_written (&c->map, r, n);
  return aclone_map_set_hydrated (&c->map, r, n);
}

/* Does D hold region r's data, for a write that covers only part of it?
 * In FAILED mode a region copied since the last good commit does not
 * count (failed_region_on_dest): the rest of it comes from the source.
 */
static bool
region_on_dest (struct aclone_clone *c, uint64_t r)
{
  return aclone_map_hydrated (&c->map, r) &&
         (aclone_clone_mode (c) != ACLONE_MODE_FAILED ||
          failed_region_on_dest (c, r));
}

/* Write or zero [pos, pos+len) inside region r, which it does not cover
 * whole.
 */
static int
apply_partial (struct aclone_clone *c, const struct wop *w, uint64_t r,
               const char *data, uint64_t pos, uint64_t len)
{
  uint64_t b0 = region_start (c, r), b1 = region_end (c, r + 1);
  int ret = 0;

  if (!region_on_dest (c, r)) {
    if (w->fast)
      return -ENOTSUP;              /* would need a copy: not fast */
    client_region_lock (c, r, 1);
    if (!region_on_dest (c, r)) {
      /* Read-modify-write of the whole region. */
      char *buf = malloc (b1 - b0);
      if (!buf)
        ret = -ENOMEM;
      else {
        atomic_fetch_add (&c->in_flight, b1 - b0);
        ret = source_read (c, buf, b1 - b0, b0);
        if (ret == 0) {
          if (w->data)
            memcpy (buf + (pos - b0), data, len);
          else
            memset (buf + (pos - b0), 0, len);
          ret = land_copy (c, r, 1, buf, b0, b1 - b0, true);
        }
        atomic_fetch_sub (&c->in_flight, b1 - b0);
        free (buf);
      }
      aclone_map_unlock (&c->map, r, 1);
      return ret;
    }
    aclone_map_unlock (&c->map, r, 1);   /* hydrated meanwhile */
  }
  ret = dest_apply (c, w, data, len, pos);
  if (ret == 0)
    aclone_map_set_written (&c->map, r, 1);
  return ret;
}

/* Write or zero n whole regions from r, [pos, pos+len). */
static int
apply_whole (struct aclone_clone *c, const struct wop *w, uint64_t r,
             uint64_t n, const char *data, uint64_t pos, uint64_t len)
{
  bool all_hydrated = aclone_map_hydrated (&c->map, r) &&
                      aclone_map_run (&c->map, r, n) == n;
  int ret;

  if (all_hydrated)
    ret = dest_apply (c, w, data, len, pos);
  else {
    client_region_lock (c, r, n);
    bool none_hydrated = !aclone_map_hydrated (&c->map, r) &&
                         aclone_map_run (&c->map, r, n) == n;
    /* A trim of regions D already reads zero in needs no I/O; a zero
     * without may_trim must leave them allocated (NO_HOLE).
     */
    if (!w->data && w->punch && none_hydrated && dest_reads_zero (c))
      ret = 0;
    else
      ret = dest_apply (c, w, data, len, pos);
    if (ret == 0) {
      uint64_t newly = mark_written_hydrated (c, r, n);
      atomic_fetch_add (&c->bytes_skipped,
                        MIN (newly << c->map.shift, len));
    }
    aclone_map_unlock (&c->map, r, n);
    return ret;
  }
  if (ret == 0)
    aclone_map_set_written (&c->map, r, n);
  return ret;
}

static int
apply (struct aclone_clone *c, const struct wop *w, uint32_t count,
       uint64_t offset, bool fua)
{
  uint64_t pos = offset, end = offset + count;
  int ret = 0;

  if (count == 0)
    return fua ? aclone_clone_commit (c) : 0;
  atomic_fetch_add (&c->fg_active, 1);
  atomic_store_explicit (&c->fg_last_ns, aclone_now_ns (), memory_order_relaxed);
  /* The metadata file says "written" before D holds the data: see
   * aclone_meta_written_ahead.
   */
  uint64_t r0 = offset >> c->map.shift, r1 = (end - 1) >> c->map.shift;
  aclone_meta_written_ahead (c->meta, r0, r1 - r0 + 1);
  if (aclone_clone_mode (c) == ACLONE_MODE_COMPLETE) {
    /* Every region hydrated: no locks, but the written bits still
     * count, for the audit.
     */
    ret = dest_apply (c, w, w->data, count, offset);
    if (ret == 0)
      aclone_map_set_written (&c->map, r0, r1 - r0 + 1);
  }
  else {
    while (pos < end && ret == 0) {
      uint64_t r = pos >> c->map.shift;
      uint64_t b0 = region_start (c, r), b1 = region_end (c, r + 1);
      const char *p = w->data ? w->data + (pos - offset) : NULL;

      if (pos != b0 || end < b1) {
        uint64_t seg_end = MIN (end, b1);
        ret = apply_partial (c, w, r, p, pos, seg_end - pos);
        pos = seg_end;
      }
      else {
        uint64_t last = end >= c->size ? c->map.regions : end >> c->map.shift;
        uint64_t seg_end = region_end (c, last);
        ret = apply_whole (c, w, r, last - r, p, pos, seg_end - pos);
        pos = seg_end;
      }
    }
  }
  atomic_fetch_sub (&c->fg_active, 1);
  if (ret == 0 && fua)
    ret = aclone_clone_commit (c);
  return ret;
}

static int
clone_pwrite (struct aclone_clone *c, const void *buf, uint32_t count,
              uint64_t offset, bool fua)
{
  struct wop w = { .data = buf };
  return apply (c, &w, count, offset, fua);
}

static int
clone_zero (struct aclone_clone *c, uint32_t count, uint64_t offset,
            bool may_trim, bool fast, bool fua)
{
  struct wop w = { .data = NULL, .punch = may_trim, .fast = fast };
  return apply (c, &w, count, offset, fua);
}

static int
clone_flush (struct aclone_clone *c)
{
  return aclone_clone_commit (c);
}

static int
clone_cache (struct aclone_clone *c, uint32_t count, uint64_t offset)
{
  if (count == 0 || aclone_clone_mode (c) != ACLONE_MODE_HYDRATING)
    return 0;
  uint64_t r = offset >> c->map.shift;
  uint64_t end = ((offset + count - 1) >> c->map.shift) + 1;

  while ((r = aclone_map_next_unhydrated (&c->map, r)) < end) {
    uint64_t n = MIN (aclone_map_run (&c->map, r, end - r), copy_max_regions (c));
    client_region_lock (c, r, n);
    int ret = aclone_clone_copy_locked (c, r, n, NULL, 0, 0);
    aclone_map_unlock (&c->map, r, n);
    if (ret < 0)
      return ret;
    r += n;
  }
  return 0;
}

/* Extents of unhydrated regions come from the source, clamped to the
 * run being described.
 */
struct src_extents {
  aclone_status_fn fn;
  void *opaque;
  uint64_t pos, end;
  bool req_one;
  int ret;
};

static int
src_extent_cb (void *opaque, uint64_t off, uint64_t len, bool zero)
{
  struct src_extents *s = opaque;
  uint64_t e = MIN (off + len, s->end);

  if (off > s->pos || e <= s->pos)
    return off > s->pos;           /* gap or stale: stop / skip */
  s->ret = s->fn (s->opaque, s->pos, e - s->pos,
                  zero ? (ACLONE_EXTENT_HOLE | ACLONE_EXTENT_ZERO) : 0);
  s->pos = e;
  return s->ret < 0 || s->req_one || s->pos >= s->end;
}

static int
clone_extents (struct aclone_clone *c, uint32_t count, uint64_t offset,
               bool req_one, aclone_status_fn fn, void *opaque)
{
  uint64_t pos = offset, end = offset + count;
  int runs = 0, ret = 0;

  while (pos < end && runs++ < 32 && ret == 0) {
    uint64_t r = pos >> c->map.shift;
    bool complete = aclone_clone_mode (c) == ACLONE_MODE_COMPLETE;
    bool hydrated = complete;
    uint64_t seg_end = end;
    if (!complete) {
      /* State and run from one sample, as in clone_pread. */
      uint64_t last = (end - 1) >> c->map.shift;
      uint64_t n = aclone_map_run_state (&c->map, r, last - r + 1, &hydrated);
      seg_end = MIN (end, region_end (c, r + n));
    }

    if (hydrated) {
      while (pos < seg_end && ret == 0) {
        bool data;
        uint64_t e;
        ret = aclone_dest_probe (c->dest, pos, seg_end - pos, &data, &e);
        if (ret < 0) {
          data = true;
          e = seg_end;
          ret = 0;
        }
        ret = fn (opaque, pos, e - pos, data ? 0 : (ACLONE_EXTENT_HOLE | ACLONE_EXTENT_ZERO));
        pos = e;
        if (req_one)
          return ret;
      }
    }
    else {
      struct src_extents s = { fn, opaque, pos, seg_end, req_one, 0 };
      struct aclone_source *src = aclone_clone_source_get (c);
      int sr = -ENOTSUP;
      if (src) {
        sr = src->ops->extents (src, pos, seg_end - pos, src_extent_cb, &s);
        aclone_clone_source_put (c);
      }
      if (s.ret < 0)
        return s.ret;
      if (sr < 0 || s.pos == pos) {  /* no answer: call it data */
        ret = fn (opaque, s.pos, seg_end - s.pos, 0);
        s.pos = seg_end;
      }
      pos = s.pos;
      if (req_one)
        return ret;
    }
  }
  return ret;
}

static enum aclone_state current_state (struct aclone_clone *c);

/* Steps 3 and 4 of the commit for one bitmap; 0 or -1 (the clone has
 * failed).
 */
static int
commit_bitmap (struct aclone_clone *c, int which, struct aclone_dirty_list *l)
{
  struct aclone_error err;

  /* A list that grew for one big commit (scattered writes) does not
   * keep its memory for the clone's life.
   */
  if (l->cap > 4096 && l->n < l->cap / 8) {
    struct aclone_dirty_words *v = realloc (l->v, MAX (l->n, 64u) * sizeof *v);
    if (v) {
      l->v = v;
      l->cap = MAX (l->n, 64u);
    }
  }
  if (l->n == 0)
    return 0;
  if (aclone_meta_commit_bits (c->meta, which, l->v, l->n, &err) < 0) {
    aclone_clone_fail (c, "%s", err.msg);
    return -1;
  }
  return 0;
}

int
aclone_clone_commit (struct aclone_clone *c)
{
  struct aclone_error err;
  int r = 0;

  pthread_mutex_lock (&c->commit_lock);
  if (aclone_clone_mode (c) == ACLONE_MODE_FAILED) {
    r = -EIO;
    goto out;
  }

  /* 1. Swap out what changed since the last commit: hydrated first,
   * then written (see mark_written_hydrated).  Once complete, only
   * written bits change.
   */
  /* Every region hydrated before the take is in it (set_hydrated sets
   * the dirty bit before it counts), so this commit completes the clone.
   */
  bool all_in = atomic_load (&c->map.nr_hydrated) == c->map.regions;
  atomic_exchange (&c->map.dirty, false);
  r = aclone_map_take_dirty (&c->map, ACLONE_BIT_HYDRATED, &c->dirty_hydrated);
  if (r == 0)
    r = aclone_map_take_dirty (&c->map, ACLONE_BIT_WRITTEN, &c->dirty_written);
  if (r < 0) {
    aclone_map_return_dirty (&c->map, ACLONE_BIT_HYDRATED, &c->dirty_hydrated);
    atomic_store (&c->map.dirty, true);
    aclone_clone_error (c, "commit: out of memory");
    goto out;
  }
  /* 2. Make the data of those regions (and every write so far) durable.
   * A failure here is for good: the kernel may already have dropped the
   * pages it could not write, and would not report it again.
   */
  r = aclone_dest_sync (c->dest);
  if (r < 0) {
    aclone_clone_fail (c, "dest %s: fdatasync: %s", c->dest->path,
                       strerror (-r));
    r = -EIO;
    goto out;
  }
  /* 3, 4. Only now may the metadata file say so: written bits before
   * hydrated ones, each durable before the next is set, so that after
   * any crash a region recorded as hydrated is recorded as written when
   * a client wrote it.
   */
  if (commit_bitmap (c, ACLONE_BIT_WRITTEN, &c->dirty_written) < 0 ||
      commit_bitmap (c, ACLONE_BIT_HYDRATED, &c->dirty_hydrated) < 0) {
    r = -EIO;
    goto out;
  }
  /* Complete once every region was hydrated before step 1 (and so is in
   * the file now); written bits changing meanwhile do not matter.
   */
  if (aclone_clone_mode (c) == ACLONE_MODE_HYDRATING && all_in) {
    if (aclone_meta_set_flags (c->meta, c->meta->hdr.flags | ACLONE_FLAG_COMPLETE,
                               &err) < 0) {
      aclone_clone_fail (c, "%s", err.msg);
      r = -EIO;
      goto out;
    }
    int expect = ACLONE_MODE_HYDRATING;
    atomic_compare_exchange_strong_explicit (&c->mode, &expect,
                                             ACLONE_MODE_COMPLETE,
                                             memory_order_release,
                                             memory_order_relaxed);
    aclone_clone_log (c, 0, "clone complete: %s holds every region of %s",
                      c->dest->path, c->meta->hdr.source);
    /* Every hydrated bit is in the file now: the in-core copy can go. */
    int e = aclone_map_hydrated_from_file (&c->map, c->meta->fd,
                                           c->meta->hdr.hydrated_off);
    if (e < 0)
      aclone_clone_log (c, 0, "%s: in-core map kept: %s", c->meta->path,
                        strerror (-e));
  }

 out:
  /* Keep the live page at least as fresh as the committed bitmap. */
  aclone_clone_publish (c, current_state (c));
  pthread_mutex_unlock (&c->commit_lock);
  return r;
}

/* Request gate ------------------------------------------------------
 *
 * Every client request passes the gate: aclone_clone_shutdown closes it
 * (run leaves RUNNING) and then waits until no request is inside, so
 * that its final commit covers every request that was answered.  Enter
 * increments first and checks second (both sequentially consistent):
 * shutdown sets run first and reads the count second, so one of the two
 * always sees the other.
 */
static bool
gate_enter (struct aclone_clone *c)
{
  atomic_fetch_add (&c->requests, 1);
  if (atomic_load (&c->run) != ACLONE_RUN_RUNNING) {
    atomic_fetch_sub (&c->requests, 1);
    return false;
  }
  return true;
}

static void
gate_leave (struct aclone_clone *c)
{
  atomic_fetch_sub (&c->requests, 1);
}

#define GATED(c, call) \
  ({ int r_ = -ESHUTDOWN; if (gate_enter (c)) { r_ = (call); gate_leave (c); } r_; })

int
aclone_clone_pread (struct aclone_clone *c, void *buf, uint32_t count,
                    uint64_t offset)
{
  return GATED (c, clone_pread (c, buf, count, offset, 0));
}

int
aclone_clone_pread_client (struct aclone_clone *c, void *buf, uint32_t count,
                           uint64_t offset, uint64_t since)
{
  return GATED (c, clone_pread (c, buf, count, offset, since));
}

uint64_t
aclone_client_enter (struct aclone_client *cl)
{
  /* Count in first: a request that ends after this sees busy != 0 at
   * its next enter, and last_end_ns is then the one before us.
   */
  if (atomic_fetch_add (&cl->busy, 1) != 0)
    return 0;
  uint64_t last = atomic_load (&cl->last_end_ns);
  uint64_t now = aclone_now_ns ();
  if (last == 0 || last > now || now - last > ACLONE_CLIENT_CYCLE_MAX_NS)
    return 0;
  return last;
}

void
aclone_client_leave (struct aclone_client *cl)
{
  atomic_store (&cl->last_end_ns, aclone_now_ns ());
  atomic_fetch_sub (&cl->busy, 1);
}

int
aclone_clone_pwrite (struct aclone_clone *c, const void *buf, uint32_t count,
                     uint64_t offset, bool fua)
{
  return GATED (c, clone_pwrite (c, buf, count, offset, fua));
}

int
aclone_clone_zero (struct aclone_clone *c, uint32_t count, uint64_t offset,
                   bool may_trim, bool fast, bool fua)
{
  return GATED (c, clone_zero (c, count, offset, may_trim, fast, fua));
}

int
aclone_clone_flush (struct aclone_clone *c)
{
  return GATED (c, clone_flush (c));
}

int
aclone_clone_cache (struct aclone_clone *c, uint32_t count, uint64_t offset)
{
  return GATED (c, clone_cache (c, count, offset));
}

int
aclone_clone_extents (struct aclone_clone *c, uint32_t count, uint64_t offset,
                      bool req_one, aclone_status_fn fn, void *opaque)
{
  return GATED (c, clone_extents (c, count, offset, req_one, fn, opaque));
}

/* Live page -------------------------------------------------------- */

#define LIVE_STORE(field, v) __atomic_store_n (&live->field, (v), __ATOMIC_RELAXED)

void
aclone_clone_publish (struct aclone_clone *c, enum aclone_state state)
{
  struct aclone_live *live = c->meta->live;

  LIVE_STORE (magic, ACLONE_LIVE_MAGIC);
  LIVE_STORE (heartbeat_ns, aclone_wall_ns ());
  LIVE_STORE (state, (uint64_t) state);
  LIVE_STORE (regions_hydrated, atomic_load (&c->map.nr_hydrated));
  /* (The part first: a copy adds to the whole first, so the part
   * shown never exceeds it.)
   */
  LIVE_STORE (bytes_cor, atomic_load (&c->bytes_cor));
  LIVE_STORE (bytes_copied, atomic_load (&c->bytes_copied));
  LIVE_STORE (bytes_skipped, atomic_load (&c->bytes_skipped));
  LIVE_STORE (in_flight, atomic_load (&c->in_flight));
  LIVE_STORE (errors, atomic_load (&c->errors));
  LIVE_STORE (rate, atomic_load (&c->rate));
  LIVE_STORE (fg_lock_boosts, atomic_load (&c->boost_gen));
  /* (Zero without a writer: nothing is left over from an earlier run.) */
  LIVE_STORE (cor_behind, c->wb ? aclone_writebehind_queued (c->wb) : 0);
  LIVE_STORE (cor_pending, c->wb ? aclone_writebehind_pending (c->wb) : 0);
  LIVE_STORE (cor_rests, c->wb ? aclone_writebehind_rests (c->wb) : 0);
  pthread_mutex_lock (&c->err_lock);
  /* Once failed, the cause stays in view whatever comes after it. */
  const char *msg = aclone_clone_mode (c) == ACLONE_MODE_FAILED ? c->fail_cause
                                                               : c->last_error;
  if (strncmp (live->last_error, msg, sizeof live->last_error) != 0)
    strlcpy (live->last_error, msg, sizeof live->last_error);
  pthread_mutex_unlock (&c->err_lock);
}

void
aclone_clone_publish_current (struct aclone_clone *c)
{
  aclone_clone_publish (c, current_state (c));
}

static enum aclone_state
current_state (struct aclone_clone *c)
{
  switch (aclone_clone_mode (c)) {
  case ACLONE_MODE_COMPLETE: return ACLONE_STATE_COMPLETE;
  case ACLONE_MODE_FAILED:   return ACLONE_STATE_FAILED;
  case ACLONE_MODE_HYDRATING: break;
  }
  struct aclone_source *src = aclone_clone_source_get (c);
  bool outage = false;
  if (src) {
    outage = atomic_load (&src->outage_since_ns) != 0;
    aclone_clone_source_put (c);
  }
  if (outage)
    return ACLONE_STATE_WAITING;
  if (atomic_load (&c->backing_off))
    return ACLONE_STATE_ERROR;
  if (__atomic_load_n (&c->meta->live->ctl_pause, __ATOMIC_RELAXED))
    return ACLONE_STATE_PAUSED;
  return ACLONE_STATE_HYDRATING;
}

static void *
ticker (void *arg)
{
  struct aclone_clone *c = arg;

  pthread_mutex_lock (&c->tick_lock);
  while (atomic_load (&c->run) == ACLONE_RUN_RUNNING) {
    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    ts.tv_sec += 1;
    pthread_cond_timedwait (&c->tick_cond, &c->tick_lock, &ts);
    if (atomic_load (&c->run) != ACLONE_RUN_RUNNING)
      break;
    pthread_mutex_unlock (&c->tick_lock);
    if (atomic_load (&c->map.dirty) &&
        aclone_clone_mode (c) != ACLONE_MODE_FAILED)
      aclone_clone_commit (c);     /* errors are recorded inside */
    aclone_clone_publish (c, current_state (c));
    pthread_mutex_lock (&c->tick_lock);
  }
  pthread_mutex_unlock (&c->tick_lock);
  return NULL;
}

int
aclone_clone_start (struct aclone_clone *c, struct aclone_error *err)
{
  struct aclone_live *live = c->meta->live;
  int r;

  LIVE_STORE (pid, (int64_t) getpid ());
  LIVE_STORE (started_ns, aclone_wall_ns ());
  aclone_clone_publish (c, current_state (c));
  if (c->copy_on_read && aclone_clone_mode (c) == ACLONE_MODE_HYDRATING) {
    struct aclone_wb_ops ops = {
      .land = cor_land,
      .settle = aclone_dest_settles (c->dest) ? cor_settle : NULL,
      .may_rest = cor_may_rest,
    };
    r = aclone_writebehind_start (&ops, c, COR_BEHIND_MAX_BYTES, &c->wb);
    if (r < 0)
      return aclone_error_set (err, -r, "cannot start copy-on-read writer");
  }
  r = pthread_create (&c->ticker, NULL, ticker, c);
  if (r != 0)
    return aclone_error_set (err, r, "cannot start commit thread");
  c->ticker_running = true;
  return 0;
}

/* Open ------------------------------------------------------------- */

/* Step 1 of open, for a clone that exists: open and lock its metadata
 * file and check it against the source and the options.  *size and
 * *region_size receive the clone's.
 */
static int
open_existing_meta (const struct aclone_clone_config *cfg,
                    const struct aclone_source *src, struct aclone_meta **out,
                    uint64_t *size, uint32_t *region_size,
                    struct aclone_error *err)
{
  struct aclone_meta *meta;
  int r = aclone_meta_open (cfg->meta_path, ACLONE_META_SERVER, &meta, err);

  if (r < 0)
    return r;
  if (*region_size && *region_size != meta->hdr.region_size)
    r = aclone_error_set (err, 0, "meta %s: region size is %u, block-size=%u "
                          "differs (it applies only to new clones)",
                          cfg->meta_path, meta->hdr.region_size, *region_size);
  else if (src && src->size != meta->hdr.size)
    r = aclone_error_set (err, 0, "meta %s: device size is %llu but source %s "
                          "is %llu bytes", cfg->meta_path,
                          (unsigned long long) meta->hdr.size, src->desc,
                          (unsigned long long) src->size);
  else if (!src && !(meta->hdr.flags & ACLONE_FLAG_COMPLETE))
    r = aclone_error_set (err, 0, "meta %s: the clone is not complete, "
                          "source= is required", cfg->meta_path);
  if (r < 0) {
    aclone_meta_close (meta);
    return r;
  }
  *region_size = meta->hdr.region_size;
  *size = meta->hdr.size;
  *out = meta;
  return 0;
}

/* Load the committed bitmaps into the map.  pread, not the mapping:
 * page-faulting through 2 MiB bitmaps of a 1 TiB clone costs more than
 * copying them.
 */
static int
load_bitmaps (struct aclone_clone *c, struct aclone_error *err)
{
  struct aclone_meta *meta = c->meta;
  size_t words = meta->hdr.bitmap_len / 8;
  uint64_t *buf = malloc (LOAD_CHUNK_WORDS * 8);
  bool complete = meta->hdr.flags & ACLONE_FLAG_COMPLETE;
  int r = 0;

  if (!buf)
    return aclone_error_set (err, ENOMEM, "meta %s: read bitmaps", meta->path);
  /* A complete clone maps its hydrated bits from the file (all ones)
   * rather than holding them.
   */
  complete = complete &&
             aclone_map_hydrated_from_file (&c->map, meta->fd,
                                            meta->hdr.hydrated_off) == 0;
  for (int which = 0; which < 2 && r == 0; which++) {
    uint64_t off = which ? meta->hdr.written_off : meta->hdr.hydrated_off;
    if (which == ACLONE_BIT_HYDRATED && complete)
      continue;
    for (size_t w = 0; w < words && r == 0; w += LOAD_CHUNK_WORDS) {
      size_t n = MIN (LOAD_CHUNK_WORDS, words - w);
      if (pread (meta->fd, buf, n * 8, off + w * 8) != (ssize_t) (n * 8))
        r = aclone_error_set (err, errno ? errno : EIO, "meta %s: read bitmaps",
                              meta->path);
      else
        aclone_map_load (&c->map, which, w, buf, n);
    }
  }
  free (buf);
  return r;
}

/* Step 3 of open: the in-core clone over meta and dest (which it then
 * owns), with its map loaded, mode set and counters carried on.
 */
static int
clone_new (const struct aclone_clone_config *cfg, struct aclone_meta *meta,
           struct aclone_dest *dest, uint64_t size, uint32_t region_size,
           bool meta_existed, aclone_log_fn log, void *log_opaque,
           struct aclone_clone **out, struct aclone_error *err)
{
  struct aclone_clone *c = calloc (1, sizeof *c);
  int r;

  if (!c)
    return aclone_error_set (err, ENOMEM, "meta %s", cfg->meta_path);
  c->meta = meta;
  c->dest = dest;
  c->size = size;
  c->region_size = region_size;
  c->copy_on_read = cfg->copy_on_read;
  c->log = log;
  c->log_opaque = log_opaque;
  pthread_mutex_init (&c->commit_lock, NULL);
  pthread_rwlock_init (&c->src_lock, NULL);
  pthread_mutex_init (&c->err_lock, NULL);
  pthread_mutex_init (&c->tick_lock, NULL);
  pthread_cond_init (&c->tick_cond, NULL);
  r = aclone_map_init (&c->map, size, __builtin_ctz (region_size));
  if (r < 0) {
    aclone_error_set (err, -r, "meta %s: region map", cfg->meta_path);
    goto fail;
  }
  if (meta_existed && (r = load_bitmaps (c, err)) < 0)
    goto fail;
  atomic_store (&c->mode, (meta->hdr.flags & ACLONE_FLAG_COMPLETE)
                         ? ACLONE_MODE_COMPLETE : ACLONE_MODE_HYDRATING);
  atomic_store (&c->dest_zero,
                dest->created || (meta->hdr.flags & ACLONE_FLAG_DEST_ZERO));
  if (meta->live->magic == ACLONE_LIVE_MAGIC) {
    atomic_store (&c->bytes_copied, meta->live->bytes_copied);
    atomic_store (&c->bytes_cor, meta->live->bytes_cor);
    atomic_store (&c->bytes_skipped, meta->live->bytes_skipped);
    atomic_store (&c->errors, meta->live->errors);
  }
  *out = c;
  return 0;

 fail:
  aclone_map_free (&c->map);
  free (c);
  return r;
}

int
aclone_clone_open (const struct aclone_clone_config *cfg,
                   struct aclone_source *src, aclone_log_fn log,
                   void *log_opaque, struct aclone_clone **out,
                   struct aclone_error *err)
{
  struct aclone_meta *meta = NULL;
  struct aclone_dest *dest = NULL;
  struct aclone_clone *c = NULL;
  struct stat st;
  bool meta_exists, dest_exists;
  uint32_t region_size = cfg->region_size;
  uint64_t size;
  int r;

  /* 1. Check everything; modify nothing. */
  if (lstat (cfg->meta_path, &st) == 0)
    meta_exists = true;
  else if (errno == ENOENT)
    meta_exists = false;
  else
    return aclone_error_set (err, errno, "meta %s", cfg->meta_path);

  if (meta_exists) {
    r = open_existing_meta (cfg, src, &meta, &size, &region_size, err);
    if (r < 0)
      return r;
  }
  else {
    if (!src)
      return aclone_error_set (err, 0, "meta %s does not exist: source= is "
                               "required to start a new clone", cfg->meta_path);
    if (!region_size)
      region_size = ACLONE_DEFAULT_REGION;
    size = src->size;
  }
  r = aclone_dest_check (cfg->dest_path, size, &dest_exists, err);
  if (r < 0)
    goto fail;
  if (meta_exists && !dest_exists) {
    r = aclone_error_set (err, ENOENT, "dest %s is missing but meta %s "
                          "describes a clone into it", cfg->dest_path,
                          cfg->meta_path);
    goto fail;
  }

  /* 2. Create what is missing. */
  r = aclone_dest_open (cfg->dest_path, size, !dest_exists, &dest, err);
  if (r < 0)
    goto fail;
  if (!meta_exists) {
    r = aclone_meta_create (cfg->meta_path, size, region_size, 0,
                            src->desc, &meta, err);
    if (r < 0) {
      if (dest->created)
        unlink (cfg->dest_path);
      goto fail;
    }
  }

  /* 3. Build the in-core state. */
  r = clone_new (cfg, meta, dest, size, region_size, meta_exists, log,
                 log_opaque, &c, err);
  if (r < 0)
    goto fail;

  /* 4. The dest-zero promise holds only while no server runs: withdraw
   * it now, and give it back at a clean stop.
   */
  if (meta->hdr.flags & ACLONE_FLAG_DEST_ZERO) {
    r = aclone_meta_set_flags (meta, meta->hdr.flags & ~ACLONE_FLAG_DEST_ZERO, err);
    if (r < 0) {
      aclone_map_free (&c->map);
      free (c);
      goto fail;
    }
  }
  if (aclone_clone_mode (c) == ACLONE_MODE_COMPLETE && src) {
    aclone_source_close (src);     /* not needed any more */
    src = NULL;
  }
  c->src = src;
  *out = c;
  return 0;

 fail:
  aclone_dest_close (dest);
  aclone_meta_close (meta);
  return r;
}

void
aclone_clone_cancel_source (struct aclone_clone *c)
{
  struct aclone_source *src = aclone_clone_source_get (c);

  if (src) {
    atomic_store (&src->cancelled, true);
    aclone_clone_source_put (c);
  }
}

int
aclone_clone_shutdown (struct aclone_clone *c, unsigned drain_ms)
{
  struct aclone_error err;
  int ret = 0, running = ACLONE_RUN_RUNNING;

  /* 1. Close the gate (once); requests waiting for a lost source give
   * up.
   */
  if (!atomic_compare_exchange_strong (&c->run, &running, ACLONE_RUN_STOPPING))
    return 0;
  aclone_clone_cancel_source (c);

  /* 2. Let the requests inside finish. */
  unsigned long long end = aclone_now_ns () + drain_ms * 1000000ull;
  while (atomic_load (&c->requests) > 0 && aclone_now_ns () < end) {
    struct timespec ts = { 0, 1000000 };
    nanosleep (&ts, NULL);
  }
  bool drained = atomic_load (&c->requests) == 0;

  /* 3. Land the copy-on-read writes behind replies, so that the final
   * commit marks them.  (A request still inside finds the writer
   * stopped and copies nothing.)
   */
  aclone_writebehind_stop (c->wb);

  /* 4. Stop the ticker and commit for the last time. */
  if (c->ticker_running) {
    pthread_mutex_lock (&c->tick_lock);
    pthread_cond_signal (&c->tick_cond);
    pthread_mutex_unlock (&c->tick_lock);
    pthread_join (c->ticker, NULL);
    c->ticker_running = false;
  }
  int r = aclone_clone_commit (c);
  /* The dest-zero promise goes back into the header only when no
   * request is left that could still write into an unhydrated region.
   */
  if (r == 0 && drained && dest_reads_zero (c) && !c->hydrator &&
      aclone_clone_mode (c) == ACLONE_MODE_HYDRATING) {
    if (aclone_meta_set_flags (c->meta, c->meta->hdr.flags | ACLONE_FLAG_DEST_ZERO,
                               &err) < 0)
      aclone_clone_error (c, "%s", err.msg);
  }
  aclone_clone_publish (c, aclone_clone_mode (c) == ACLONE_MODE_FAILED
                           ? ACLONE_STATE_FAILED : ACLONE_STATE_STOPPED);
  __atomic_store_n (&c->meta->live->pid, 0, __ATOMIC_RELAXED);
  atomic_store (&c->run, ACLONE_RUN_STOPPED);

  /* 5. Release the lock, so that a new server may start at once, but
   * only when no request can still write: one stuck inside keeps it
   * until the process exits.  A failed clone commits nothing more, so
   * its lock goes too.
   */
  if (drained && (r == 0 || aclone_clone_mode (c) == ACLONE_MODE_FAILED))
    aclone_meta_unlock (c->meta);
  else {
    aclone_clone_log (c, 1, "%s: a request is still in progress; the lock "
                      "is released when the server exits", c->meta->path);
    ret = -EBUSY;
  }
  return r < 0 ? r : ret;
}

void
aclone_clone_close (struct aclone_clone *c)
{
  if (!c)
    return;
  aclone_clone_shutdown (c, 10000);
  aclone_writebehind_free (c->wb);
  aclone_source_close (c->src);
  aclone_dest_close (c->dest);
  aclone_meta_close (c->meta);
  aclone_map_free (&c->map);
  free (c->dirty_hydrated.v);
  free (c->dirty_written.v);
  pthread_mutex_destroy (&c->commit_lock);
  pthread_rwlock_destroy (&c->src_lock);
  pthread_mutex_destroy (&c->err_lock);
  pthread_mutex_destroy (&c->tick_lock);
  pthread_cond_destroy (&c->tick_cond);
  free (c);
}
