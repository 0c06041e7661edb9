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
 *   read,  unhydrated run  copy-on-read: lock, copy S->D, serve from the
 *                          copy; without copy-on-read: S, no lock
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
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bsd/string.h>

#include "aclone/clone.h"

/* Largest run one foreground copy locks and buffers. */
#define COPY_MAX_BYTES (32u << 20)

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

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

static int
source_read (struct aclone_clone *c, void *buf, size_t len, uint64_t off)
{
  int r = -EIO;

  pthread_rwlock_rdlock (&c->src_lock);
  if (c->src) {
    r = aclone_source_pread (c->src, buf, len, off);
    if (r < 0)
      aclone_clone_error (c, "source %s: read %zu bytes at %llu: %s",
                          c->src->desc, len, (unsigned long long) off,
                          strerror (-r));
  }
  pthread_rwlock_unlock (&c->src_lock);
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

/* A dest write failed: it may have left junk in regions that are not
 * hydrated, so D can no longer be assumed zero there.
 */
static int
dest_failed (struct aclone_clone *c, int r, const char *what, uint64_t off)
{
  atomic_store (&c->dest_tainted, true);
  aclone_clone_error (c, "dest %s: %s at %llu: %s", c->dest->path, what,
                      (unsigned long long) off, strerror (-r));
  return r;
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
        ret = aclone_dest_pwrite (c->dest, buf, len, b0);
        if (ret < 0)
          dest_failed (c, ret, "write", b0);
      }
      atomic_fetch_sub (&c->in_flight, len);
      if (ret == 0) {
        aclone_map_set_hydrated (&c->map, r, n);
        atomic_fetch_add (&c->bytes_copied, len);
        if (o0 < o1 && buf == bounce)
          memcpy ((char *) out + (o0 - out_off), bounce + (o0 - b0), o1 - o0);
      }
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
      if (!c->dest_zero || atomic_load (&c->dest_tainted)) {
        int ret = aclone_dest_zero (c->dest, b1 - b0, b0, true, false);
        if (ret < 0)
          return dest_failed (c, ret, "zero", b0);
      }
      aclone_map_set_hydrated (&c->map, r, n);
      atomic_fetch_add (&c->bytes_skipped, b1 - b0);
    }
    r += n;
  }
  return 0;
}

static int
clone_pread (struct aclone_clone *c, void *buf, uint32_t count,
             uint64_t offset)
{
  uint64_t pos = offset, end = offset + count;

  if (atomic_load_explicit (&c->complete, memory_order_acquire))
    return aclone_dest_pread (c->dest, buf, count, offset);

  int ret = 0;
  atomic_fetch_add (&c->fg_active, 1);
  atomic_store_explicit (&c->fg_last_ns, aclone_now_ns (), memory_order_relaxed);
  while (pos < end && ret == 0) {
    uint64_t r = pos >> c->map.shift;
    uint64_t last = (end - 1) >> c->map.shift;
    uint64_t n = aclone_map_run (&c->map, r, last - r + 1);
    bool hydrated = aclone_map_hydrated (&c->map, r);

    if (!hydrated && c->copy_on_read)
      n = MIN (n, copy_max_regions (c));
    uint64_t seg_end = MIN (end, region_end (c, r + n));
    char *p = (char *) buf + (pos - offset);

    if (hydrated) {
      ret = aclone_dest_pread (c->dest, p, seg_end - pos, pos);
      if (ret < 0)
        aclone_clone_error (c, "dest %s: read at %llu: %s", c->dest->path,
                            (unsigned long long) pos, strerror (-ret));
    }
    else {
      if (c->copy_on_read) {
        aclone_map_lock (&c->map, r, n);
        ret = aclone_clone_copy_locked (c, r, n, p, pos, seg_end - pos);
        aclone_map_unlock (&c->map, r, n);
      }
      else
        ret = source_read (c, p, seg_end - pos, pos);
      /* Locality: the hydrator copies what follows a miss next. */
      atomic_store_explicit (&c->hint, r + n + 1, memory_order_relaxed);
    }
    pos = seg_end;
  }
  atomic_fetch_sub (&c->fg_active, 1);
  return ret;
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
  return r < 0 ? dest_failed (c, r, w->data ? "write" : "zero", pos) : 0;
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

  if (!aclone_map_hydrated (&c->map, r)) {
    if (w->fast)
      return -ENOTSUP;              /* would need a copy: not fast */
    aclone_map_lock (&c->map, r, 1);
    if (!aclone_map_hydrated (&c->map, r)) {
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
          ret = aclone_dest_pwrite (c->dest, buf, b1 - b0, b0);
          if (ret < 0)
            dest_failed (c, ret, "write", b0);
        }
        atomic_fetch_sub (&c->in_flight, b1 - b0);
        free (buf);
        if (ret == 0) {
          aclone_map_set_hydrated (&c->map, r, 1);
          atomic_fetch_add (&c->bytes_copied, b1 - b0);
        }
      }
      if (ret == 0)
        aclone_map_set_written (&c->map, r, 1);
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
    aclone_map_lock (&c->map, r, n);
    bool none_hydrated = !aclone_map_hydrated (&c->map, r) &&
                         aclone_map_run (&c->map, r, n) == n;
    if (!w->data && none_hydrated && c->dest_zero &&
        !atomic_load (&c->dest_tainted))
      ret = 0;                      /* D already reads zero there */
    else
      ret = dest_apply (c, w, data, len, pos);
    if (ret == 0) {
      uint64_t newly = aclone_map_set_hydrated (&c->map, r, n);
      atomic_fetch_add (&c->bytes_skipped,
                        MIN (newly << c->map.shift, len));
    }
    if (ret == 0)
      aclone_map_set_written (&c->map, r, n);
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

  atomic_fetch_add (&c->fg_active, 1);
  atomic_store_explicit (&c->fg_last_ns, aclone_now_ns (), memory_order_relaxed);
  if (atomic_load_explicit (&c->complete, memory_order_acquire)) {
    struct wop plain = *w;
    ret = dest_apply (c, &plain, w->data, count, offset);
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
  if (count == 0 || atomic_load (&c->complete))
    return 0;
  uint64_t r = offset >> c->map.shift;
  uint64_t end = ((offset + count - 1) >> c->map.shift) + 1;

  while ((r = aclone_map_next_unhydrated (&c->map, r)) < end) {
    uint64_t n = MIN (aclone_map_run (&c->map, r, end - r), copy_max_regions (c));
    aclone_map_lock (&c->map, r, n);
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
    bool complete = atomic_load (&c->complete);
    bool hydrated = complete || aclone_map_hydrated (&c->map, r);
    uint64_t seg_end = end;
    if (!complete) {
      uint64_t last = (end - 1) >> c->map.shift;
      uint64_t n = aclone_map_run (&c->map, r, last - r + 1);
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
      pthread_rwlock_rdlock (&c->src_lock);
      int sr = c->src ? c->src->ops->extents (c->src, pos, seg_end - pos,
                                              src_extent_cb, &s)
                      : -ENOTSUP;
      pthread_rwlock_unlock (&c->src_lock);
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

int
aclone_clone_commit (struct aclone_clone *c)
{
  struct aclone_error err;
  size_t nh = 0, nw = 0;
  int r;

  pthread_mutex_lock (&c->commit_lock);
  if (atomic_load (&c->complete)) {
    r = aclone_dest_sync (c->dest);
    if (r < 0)
      aclone_clone_error (c, "dest %s: fdatasync: %s", c->dest->path,
                          strerror (-r));
    goto out;
  }

  /* 1. Swap out what changed since the last commit. */
  atomic_store (&c->map.dirty, false);
  r = aclone_map_take_dirty (&c->map, ACLONE_BIT_HYDRATED, &c->ci, &c->cw,
                             &c->ccap, &nh);
  if (r == 0)
    r = aclone_map_take_dirty (&c->map, ACLONE_BIT_WRITTEN, &c->wi, &c->ww,
                               &c->wcap, &nw);
  if (r < 0) {
    aclone_map_return_dirty (&c->map, ACLONE_BIT_HYDRATED, c->ci, c->cw, nh);
    nh = 0;
    aclone_clone_error (c, "commit: out of memory");
    goto out;
  }
  /* 2. Make the data of those regions (and every write so far) durable. */
  r = aclone_dest_sync (c->dest);
  if (r < 0) {
    aclone_clone_error (c, "dest %s: fdatasync: %s", c->dest->path,
                        strerror (-r));
    goto fail;
  }
  /* 3, 4. Only now may the metadata file say so. */
  r = aclone_meta_commit_bits (c->meta, ACLONE_BIT_HYDRATED, c->ci, c->cw, nh,
                               &err);
  if (r == 0)
    r = aclone_meta_commit_bits (c->meta, ACLONE_BIT_WRITTEN, c->wi, c->ww, nw,
                                 &err);
  if (r < 0) {
    aclone_clone_error (c, "%s", err.msg);
    goto fail;
  }
  /* Complete only if nothing was hydrated after step 1 (it would be
   * hydrated in core, not yet in the file).
   */
  if (atomic_load (&c->map.nr_hydrated) == c->map.regions &&
      !atomic_load (&c->map.dirty)) {
    r = aclone_meta_set_flags (c->meta, c->meta->hdr.flags | ACLONE_FLAG_COMPLETE,
                               &err);
    if (r < 0)
      aclone_clone_error (c, "%s", err.msg);
    else {
      atomic_store_explicit (&c->complete, true, memory_order_release);
      aclone_clone_log (c, 0, "clone complete: %s holds every region of %s",
              c->dest->path, c->meta->hdr.source);
    }
  }
  goto out;

 fail:
  aclone_map_return_dirty (&c->map, ACLONE_BIT_HYDRATED, c->ci, c->cw, nh);
  aclone_map_return_dirty (&c->map, ACLONE_BIT_WRITTEN, c->wi, c->ww, nw);
 out:
  /* Keep the live page at least as fresh as the committed bitmap. */
  aclone_clone_publish (c, current_state (c));
  pthread_mutex_unlock (&c->commit_lock);
  return r;
}

/* Request gate ------------------------------------------------------
 *
 * Every client request passes the gate: aclone_clone_shutdown closes it
 * and then waits until no request is inside, so that its final commit
 * covers every request that was answered.  Enter increments first and
 * checks second (both sequentially consistent): shutdown sets the flag
 * first and reads the count second, so one of the two always sees the
 * other.
 */
static bool
gate_enter (struct aclone_clone *c)
{
  atomic_fetch_add (&c->requests, 1);
  if (atomic_load (&c->gate_closed)) {
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
  return GATED (c, clone_pread (c, buf, count, offset));
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
  LIVE_STORE (bytes_copied, atomic_load (&c->bytes_copied));
  LIVE_STORE (bytes_skipped, atomic_load (&c->bytes_skipped));
  LIVE_STORE (in_flight, atomic_load (&c->in_flight));
  LIVE_STORE (errors, atomic_load (&c->errors));
  LIVE_STORE (rate, atomic_load (&c->rate));
  pthread_mutex_lock (&c->err_lock);
  if (strncmp (live->last_error, c->last_error, sizeof live->last_error) != 0)
    strlcpy (live->last_error, c->last_error, sizeof live->last_error);
  pthread_mutex_unlock (&c->err_lock);
}

static enum aclone_state
current_state (struct aclone_clone *c)
{
  if (atomic_load (&c->complete))
    return ACLONE_STATE_COMPLETE;
  if (c->src && atomic_load (&c->src->outage_since_ns))
    return ACLONE_STATE_WAITING;
  if (atomic_load (&c->failing))
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
  while (!c->stopping) {
    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    ts.tv_sec += 1;
    pthread_cond_timedwait (&c->tick_cond, &c->tick_lock, &ts);
    if (c->stopping)
      break;
    pthread_mutex_unlock (&c->tick_lock);
    if (atomic_load (&c->map.dirty))
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
  r = pthread_create (&c->ticker, NULL, ticker, c);
  if (r != 0)
    return aclone_error_set (err, r, "cannot start commit thread");
  c->ticker_running = true;
  return 0;
}

/* Open ------------------------------------------------------------- */

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
    r = aclone_meta_open (cfg->meta_path, ACLONE_META_SERVER, &meta, err);
    if (r < 0)
      return r;
    if (region_size && region_size != meta->hdr.region_size) {
      r = aclone_error_set (err, 0, "meta %s: region size is %u, block-size=%u "
                            "differs (it applies only to new clones)",
                            cfg->meta_path, meta->hdr.region_size, region_size);
      goto fail;
    }
    region_size = meta->hdr.region_size;
    if (src && src->size != meta->hdr.size) {
      r = aclone_error_set (err, 0, "meta %s: device size is %llu but source %s "
                            "is %llu bytes", cfg->meta_path,
                            (unsigned long long) meta->hdr.size, src->desc,
                            (unsigned long long) src->size);
      goto fail;
    }
    if (!src && !(meta->hdr.flags & ACLONE_FLAG_COMPLETE)) {
      r = aclone_error_set (err, 0, "meta %s: the clone is not complete, "
                            "source= is required", cfg->meta_path);
      goto fail;
    }
    size = meta->hdr.size;
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
  c = calloc (1, sizeof *c);
  if (!c) {
    r = aclone_error_set (err, ENOMEM, "meta %s", cfg->meta_path);
    goto fail;
  }
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
    goto fail_c;
  }
  if (meta_exists) {
    /* pread, not the mapping: page-faulting through 2 MiB bitmaps of a
     * 1 TiB clone costs more than copying them.
     */
    size_t len = meta->hdr.bitmap_len;
    uint64_t *hb = malloc (len), *wb = malloc (len);
    if (!hb || !wb ||
        pread (meta->fd, hb, len, meta->hdr.hydrated_off) != (ssize_t) len ||
        pread (meta->fd, wb, len, meta->hdr.written_off) != (ssize_t) len) {
      free (hb);
      free (wb);
      r = aclone_error_set (err, errno ? errno : EIO, "meta %s: read bitmaps",
                            cfg->meta_path);
      goto fail_c;
    }
    aclone_map_load (&c->map, hb, wb);
    free (hb);
    free (wb);
  }
  atomic_store (&c->complete, (meta->hdr.flags & ACLONE_FLAG_COMPLETE) != 0);
  c->dest_zero = dest->created || (meta->hdr.flags & ACLONE_FLAG_DEST_ZERO);
  if (meta->live->magic == ACLONE_LIVE_MAGIC) {
    atomic_store (&c->bytes_copied, meta->live->bytes_copied);
    atomic_store (&c->bytes_skipped, meta->live->bytes_skipped);
    atomic_store (&c->errors, meta->live->errors);
  }
  /* The dest-zero promise holds only while this server is not running:
   * withdraw it now, and give it back at a clean stop.
   */
  if (meta->hdr.flags & ACLONE_FLAG_DEST_ZERO) {
    r = aclone_meta_set_flags (meta, meta->hdr.flags & ~ACLONE_FLAG_DEST_ZERO, err);
    if (r < 0)
      goto fail_c;
  }
  if (atomic_load (&c->complete) && src) {
    aclone_source_close (src);     /* not needed any more */
    src = NULL;
  }
  c->src = src;
  *out = c;
  return 0;

 fail_c:
  c->meta = NULL;
  c->dest = NULL;
  aclone_map_free (&c->map);
  free (c);
 fail:
  aclone_dest_close (dest);
  aclone_meta_close (meta);
  return r;
}

void
aclone_clone_cancel_source (struct aclone_clone *c)
{
  pthread_rwlock_rdlock (&c->src_lock);
  if (c->src)
    atomic_store (&c->src->cancelled, true);
  pthread_rwlock_unlock (&c->src_lock);
}

int
aclone_clone_shutdown (struct aclone_clone *c, unsigned drain_ms)
{
  struct aclone_error err;
  int ret = 0;

  if (c->shut)
    return 0;
  c->shut = true;

  /* 1. Close the gate; requests waiting for a lost source give up. */
  atomic_store (&c->gate_closed, true);
  aclone_clone_cancel_source (c);

  /* 2. Let the requests inside finish. */
  unsigned long long end = aclone_now_ns () + drain_ms * 1000000ull;
  while (atomic_load (&c->requests) > 0 && aclone_now_ns () < end) {
    struct timespec ts = { 0, 1000000 };
    nanosleep (&ts, NULL);
  }
  bool drained = atomic_load (&c->requests) == 0;

  /* 3. Stop the ticker and commit for the last time. */
  if (c->ticker_running) {
    pthread_mutex_lock (&c->tick_lock);
    c->stopping = true;
    pthread_cond_signal (&c->tick_cond);
    pthread_mutex_unlock (&c->tick_lock);
    pthread_join (c->ticker, NULL);
    c->ticker_running = false;
  }
  int r = aclone_clone_commit (c);
  if (r == 0 && c->dest_zero && !atomic_load (&c->dest_tainted) &&
      !atomic_load (&c->complete)) {
    if (aclone_meta_set_flags (c->meta, c->meta->hdr.flags | ACLONE_FLAG_DEST_ZERO,
                               &err) < 0)
      aclone_clone_error (c, "%s", err.msg);
  }
  aclone_clone_publish (c, ACLONE_STATE_STOPPED);
  __atomic_store_n (&c->meta->live->pid, 0, __ATOMIC_RELAXED);

  /* 4. Release the lock, so that a new server may start at once, but
   * only when no request can still write: one stuck inside keeps it
   * until the process exits.
   */
  if (drained && r == 0)
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
  aclone_source_close (c->src);
  aclone_dest_close (c->dest);
  aclone_meta_close (c->meta);
  aclone_map_free (&c->map);
  free (c->ci); free (c->cw); free (c->wi); free (c->ww);
  pthread_mutex_destroy (&c->commit_lock);
  pthread_rwlock_destroy (&c->src_lock);
  pthread_mutex_destroy (&c->err_lock);
  pthread_mutex_destroy (&c->tick_lock);
  pthread_cond_destroy (&c->tick_cond);
  free (c);
}
