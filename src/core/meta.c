/* aclone: the metadata file (see include/aclone/meta.h for the layout).
 *
 * Design notes
 * ------------
 * The header is validated field by field against the only layout this
 * version writes: the areas sit at fixed, page-aligned offsets computed
 * from the region count, and the file length must match exactly.  So a
 * file that passes validation can be mapped and indexed without further
 * bounds checks, whatever bytes a hostile or corrupt file holds.
 *
 * The header is rewritten only for flag changes (complete, dest-zero),
 * as a whole page followed by msync; the checksum catches a torn write.
 * The new page is encoded aside and copied into the shared mapping with
 * one memcpy, so a reader (aclone status, a second server) never sees a
 * zeroed page; it may still see a mix of the old and new bytes, which
 * only the checksum notices, so aclone_meta_open reads the header again
 * a few times while a server holds the file.
 * Bits in the bitmaps are only ever set, never cleared.  Hydrated bits
 * are set only by aclone_meta_commit_bits after the caller made the data
 * durable (invariant 1 of aclone-design(7)); written bits also ahead of a client's
 * write (aclone_meta_written_ahead), since one too many only keeps a
 * region out of the audit.
 *
 * The server's lock is an OFD write lock (fcntl F_OFD_SETLK) on the
 * whole file, not flock: like flock it belongs to the open file
 * description (it survives nbdkit's fork and is released by the last
 * close), and unlike flock it can be tested without taking anything
 * (F_OFD_GETLK), so the CLI's probe can never make a server that starts
 * at that instant fail.
 */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/param.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <bsd/string.h>

#include "aclone/meta.h"
#include "aclone/crc32c.h"

_Static_assert (sizeof (struct aclone_meta_header) == 376, "header layout");
_Static_assert (sizeof (struct aclone_live) <= ACLONE_PAGE, "live page layout");

bool
aclone_region_size_valid (uint64_t v)
{
  return v >= (1u << ACLONE_MIN_REGION_SHIFT) &&
         v <= (1u << ACLONE_MAX_REGION_SHIFT) && (v & (v - 1)) == 0;
}

static uint64_t
round_page (uint64_t v)
{
  return (v + ACLONE_PAGE - 1) & ~(uint64_t) (ACLONE_PAGE - 1);
}

/* Layout of a file for `regions` regions: fills the offset fields. */
static void
layout (struct aclone_meta_header *h)
{
  h->live_off = ACLONE_PAGE;
  h->hydrated_off = 2 * ACLONE_PAGE;
  h->bitmap_len = round_page ((h->regions + 7) / 8);
  h->written_off = h->hydrated_off + h->bitmap_len;
  h->file_len = h->written_off + h->bitmap_len;
}

/* Serialise a host-endian header into a little-endian page image,
 * checksum included.
 */
static void
header_encode (const struct aclone_meta_header *h, void *page)
{
  struct aclone_meta_header le = *h;

  le.version = htole32 (h->version);
  le.header_len = htole32 (h->header_len);
  le.size = htole64 (h->size);
  le.region_size = htole32 (h->region_size);
  le.flags = htole32 (h->flags);
  le.regions = htole64 (h->regions);
  le.created = htole64 (h->created);
  le.completed = htole64 (h->completed);
  le.live_off = htole64 (h->live_off);
  le.hydrated_off = htole64 (h->hydrated_off);
  le.written_off = htole64 (h->written_off);
  le.bitmap_len = htole64 (h->bitmap_len);
  le.file_len = htole64 (h->file_len);
  le.checksum = 0;
  le.pad = 0;
  le.checksum = htole32 (aclone_crc32c (&le, sizeof le));
  memset (page, 0, ACLONE_PAGE);
  memcpy (page, &le, sizeof le);
}

/* fcntl OFD lock operation on the whole file (l_pid must be 0 for OFD
 * commands).
 */
static int
ofd_lock (int fd, int cmd, short type)
{
  struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = 0,
                      .l_len = 0, .l_pid = 0 };
  return fcntl (fd, cmd, &fl);
}

/* Take the server's exclusive lock; -1 with errno EAGAIN or EACCES if
 * another open file description holds it.
 */
static int
lock_exclusive (int fd)
{
  return ofd_lock (fd, F_OFD_SETLK, F_WRLCK);
}

/* Does another open file description hold a lock on fd's file?  Takes
 * nothing: a server locking at the same instant is not disturbed.
 * 1 yes, 0 no, -1 (errno) if it cannot tell.
 */
static int
lock_held_elsewhere (int fd)
{
  struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0,
                      .l_len = 0, .l_pid = 0 };
  if (fcntl (fd, F_OFD_GETLK, &fl) < 0)
    return -1;
  return fl.l_type != F_UNLCK;
}

int
aclone_meta_validate (const char *path, const void *page, size_t page_len,
                      uint64_t file_len, struct aclone_meta_header *out,
                      struct aclone_error *err)
{
  struct aclone_meta_header h, expect;

  if (page_len < sizeof h)
    return aclone_error_set (err, 0, "%s: too short to be an aclone metadata file",
                             path);
  memcpy (&h, page, sizeof h);
  if (memcmp (h.magic, ACLONE_META_MAGIC, 8) != 0)
    return aclone_error_set (err, 0, "%s: not an aclone metadata file (bad magic)",
                             path);
  if (le32toh (h.version) != ACLONE_META_VERSION)
    return aclone_error_set (err, 0, "%s: unsupported metadata format version %u "
                             "(this aclone reads version %u)", path,
                             le32toh (h.version), ACLONE_META_VERSION);
  if (le32toh (h.header_len) != ACLONE_HEADER_LEN)
    return aclone_error_set (err, 0, "%s: corrupt header (header length %u)",
                             path, le32toh (h.header_len));
  uint32_t stored = le32toh (h.checksum);
  struct aclone_meta_header tmp = h;
  tmp.checksum = 0;
  if (aclone_crc32c (&tmp, sizeof tmp) != stored)
    return aclone_error_set (err, 0, "%s: corrupt header (checksum mismatch)", path);

  out->version = ACLONE_META_VERSION;
  out->header_len = ACLONE_HEADER_LEN;
  memcpy (out->magic, h.magic, 8);
  memcpy (out->uuid, h.uuid, 16);
  out->size = le64toh (h.size);
  out->region_size = le32toh (h.region_size);
  out->flags = le32toh (h.flags);
  out->regions = le64toh (h.regions);
  out->created = le64toh (h.created);
  out->completed = le64toh (h.completed);
  out->live_off = le64toh (h.live_off);
  out->hydrated_off = le64toh (h.hydrated_off);
  out->written_off = le64toh (h.written_off);
  out->bitmap_len = le64toh (h.bitmap_len);
  out->file_len = le64toh (h.file_len);
  memcpy (out->source, h.source, sizeof out->source);
  out->checksum = stored;
  out->pad = 0;

  /* A valid checksum over nonsense is still nonsense: check every field. */
  if (!aclone_region_size_valid (out->region_size))
    return aclone_error_set (err, 0, "%s: corrupt header (region size %u)",
                             path, out->region_size);
  if (out->size == 0 || out->size > (UINT64_C (1) << 60))
    return aclone_error_set (err, 0, "%s: corrupt header (device size %llu)",
                             path, (unsigned long long) out->size);
  if (out->regions != aclone_region_count (out->size, out->region_size))
    return aclone_error_set (err, 0, "%s: corrupt header (region count)", path);
  if (out->flags & ~(ACLONE_FLAG_COMPLETE | ACLONE_FLAG_DEST_ZERO))
    return aclone_error_set (err, 0, "%s: unknown header flags 0x%x", path,
                             out->flags);
  if (memchr (out->source, '\0', sizeof out->source) == NULL)
    return aclone_error_set (err, 0, "%s: corrupt header (source text)", path);
  expect = *out;
  layout (&expect);
  if (expect.live_off != out->live_off || expect.hydrated_off != out->hydrated_off ||
      expect.written_off != out->written_off ||
      expect.bitmap_len != out->bitmap_len || expect.file_len != out->file_len)
    return aclone_error_set (err, 0, "%s: corrupt header (area layout)", path);
  if (file_len != out->file_len)
    return aclone_error_set (err, 0, "%s: file is %llu bytes, header says %llu "
                             "(truncated or extended)", path,
                             (unsigned long long) file_len,
                             (unsigned long long) out->file_len);
  return 0;
}

/* Map a validated file and fill in the pointers. */
static int
meta_map (struct aclone_meta *m, struct aclone_error *err)
{
  int prot = PROT_READ | (m->writable ? PROT_WRITE : 0);

  m->map_len = m->hdr.file_len;
  m->map = mmap (NULL, m->map_len, prot, MAP_SHARED, m->fd, 0);
  if (m->map == MAP_FAILED) {
    m->map = NULL;
    return aclone_error_set (err, errno, "%s: mmap", m->path);
  }
  m->live = (struct aclone_live *) (m->map + m->hdr.live_off);
  m->hydrated = (uint64_t *) (m->map + m->hdr.hydrated_off);
  m->written = (uint64_t *) (m->map + m->hdr.written_off);
  return 0;
}

static struct aclone_meta *
meta_alloc (const char *path)
{
  struct aclone_meta *m = calloc (1, sizeof *m);
  if (!m)
    return NULL;
  m->fd = -1;
  m->path = strdup (path);
  if (!m->path) {
    free (m);
    return NULL;
  }
  return m;
}

/* A new header: random UUID, geometry, layout. */
static int
header_new (const char *path, uint64_t size, uint32_t region_size,
            uint32_t flags, const char *source_desc,
            struct aclone_meta_header *h, struct aclone_error *err)
{
  memset (h, 0, sizeof *h);
  memcpy (h->magic, ACLONE_META_MAGIC, 8);
  h->version = ACLONE_META_VERSION;
  h->header_len = ACLONE_HEADER_LEN;
  if (getrandom (h->uuid, sizeof h->uuid, 0) != sizeof h->uuid)
    return aclone_error_set (err, errno, "%s: getrandom", path);
  h->uuid[6] = (h->uuid[6] & 0x0f) | 0x40;      /* RFC 4122 version 4 */
  h->uuid[8] = (h->uuid[8] & 0x3f) | 0x80;
  h->size = size;
  h->region_size = region_size;
  h->flags = flags;
  h->regions = aclone_region_count (size, region_size);
  h->created = time (NULL);
  strlcpy (h->source, source_desc ? source_desc : "", sizeof h->source);
  layout (h);
  return 0;
}

/* Write the whole new file to fd: its length, the header page and a live
 * page that says it has been set up (bitmaps: holes, all zero).
 */
static int
file_write (int fd, const char *path, const struct aclone_meta_header *h,
            struct aclone_error *err)
{
  unsigned char page[ACLONE_PAGE];

  if (ftruncate (fd, h->file_len) < 0)
    return aclone_error_set (err, errno, "%s: ftruncate", path);
  header_encode (h, page);
  if (pwrite (fd, page, ACLONE_PAGE, 0) != ACLONE_PAGE)
    return aclone_error_set (err, errno ? errno : EIO, "%s: write header", path);
  memset (page, 0, sizeof page);
  uint64_t live_magic = htole64 (ACLONE_LIVE_MAGIC);
  memcpy (page, &live_magic, sizeof live_magic);
  if (pwrite (fd, page, ACLONE_PAGE, h->live_off) != ACLONE_PAGE)
    return aclone_error_set (err, errno ? errno : EIO, "%s: write live page",
                             path);
  return 0;
}

/* Sync path's directory, so that a new name in it survives a crash.
 * Best effort: the file itself is already durable.
 */
static void
dir_sync (const char *path)
{
  char *dir = strdup (path), *slash;

  if (!dir)
    return;
  slash = strrchr (dir, '/');
  const char *d = slash ? (slash == dir ? "/" : (*slash = '\0', dir)) : ".";
  int dfd = open (d, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    fsync (dfd);
    close (dfd);
  }
  free (dir);
}

int
aclone_meta_create (const char *path, uint64_t size, uint32_t region_size,
                    uint32_t flags, const char *source_desc,
                    struct aclone_meta **out, struct aclone_error *err)
{
  struct aclone_meta *m;
  struct aclone_meta_header h;
  char *tmp = NULL;
  int r;

  if (!aclone_region_size_valid (region_size) || size == 0)
    return aclone_error_set (err, 0, "%s: invalid geometry", path);
  m = meta_alloc (path);
  if (!m || asprintf (&tmp, "%s.tmpXXXXXX", path) < 0) {
    aclone_meta_close (m);
    return aclone_error_set (err, ENOMEM, "%s", path);
  }
  r = header_new (path, size, region_size, flags, source_desc, &h, err);
  if (r < 0)
    goto fail;

  /* 1. Build the whole file under a temporary name. */
  m->fd = mkostemp (tmp, O_CLOEXEC);       /* mode 0600 */
  if (m->fd < 0) {
    r = aclone_error_set (err, errno, "%s: cannot create", path);
    free (tmp);
    tmp = NULL;
    goto fail;
  }
  r = file_write (m->fd, path, &h, err);
  if (r < 0)
    goto fail;
  /* 2. Make it durable and lock it before anyone can see it. */
  if (fsync (m->fd) < 0) {
    r = aclone_error_set (err, errno, "%s: fsync", path);
    goto fail;
  }
  if (lock_exclusive (m->fd) < 0) {
    r = aclone_error_set (err, errno, "%s: lock", path);
    goto fail;
  }
  m->locked = true;
  /* 3. Publish it, never replacing a file that appeared meanwhile. */
  if (renameat2 (AT_FDCWD, tmp, AT_FDCWD, path, RENAME_NOREPLACE) < 0) {
    r = aclone_error_set (err, errno, "%s: cannot create", path);
    goto fail;
  }
  free (tmp);
  tmp = NULL;
  /* 4. Make the name durable too. */
  dir_sync (path);
  m->hdr = h;
  m->writable = true;
  r = meta_map (m, err);
  if (r < 0)
    goto fail;
  *out = m;
  return 0;

 fail:
  if (tmp) {
    unlink (tmp);
    free (tmp);
  }
  aclone_meta_close (m);
  return r;
}

/* How often aclone_meta_open reads a header that fails validation while
 * a server holds the file (1 ms apart).
 */
#define HEADER_READ_ATTEMPTS 10

int
aclone_meta_open (const char *path, enum aclone_meta_mode mode,
                  struct aclone_meta **out, struct aclone_error *err)
{
  struct aclone_meta *m;
  unsigned char page[ACLONE_PAGE];
  struct stat st;
  ssize_t n;
  int r;

  m = meta_alloc (path);
  if (!m)
    return aclone_error_set (err, ENOMEM, "%s", path);
  m->writable = mode != ACLONE_META_READ;
  m->fd = open (path, (m->writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOFOLLOW);
  if (m->fd < 0) {
    r = aclone_error_set (err, errno, "%s", path);
    goto fail;
  }
  if (fstat (m->fd, &st) < 0) {
    r = aclone_error_set (err, errno, "%s: stat", path);
    goto fail;
  }
  if (!S_ISREG (st.st_mode)) {
    r = aclone_error_set (err, 0, "%s: not a regular file", path);
    goto fail;
  }
  for (int attempt = 1; ; attempt++) {
    memset (page, 0, sizeof page);
    n = pread (m->fd, page, sizeof page, 0);
    if (n < 0) {
      r = aclone_error_set (err, errno, "%s: read", path);
      goto fail;
    }
    r = aclone_meta_validate (path, page, n, st.st_size, &m->hdr, err);
    if (r == 0)
      break;
    /* A server rewriting the header (aclone_meta_set_flags) at this
     * instant can leave us a mix of its old and new bytes: read again
     * while a server holds the file.  One that stays wrong is corrupt.
     */
    if (attempt >= HEADER_READ_ATTEMPTS || lock_held_elsewhere (m->fd) != 1)
      goto fail;
    nanosleep (&(struct timespec) { .tv_nsec = 1000000 }, NULL);
  }
  if (mode == ACLONE_META_SERVER) {
    if (lock_exclusive (m->fd) < 0) {
      if (errno == EAGAIN || errno == EACCES) {
        /* F_OFD_GETLK cannot name the holder (l_pid is -1 for OFD
         * locks): the live page can, once the server published it.
         */
        int64_t pid = 0;     /* only for the message: 0 if unreadable */
        if (pread (m->fd, &pid, sizeof pid,
                   m->hdr.live_off + offsetof (struct aclone_live, pid))
            != (ssize_t) sizeof pid)
          pid = 0;
        r = aclone_error_set (err, EBUSY, "%s: in use by another aclone server "
                              "(pid %lld)", path, (long long) le64toh (pid));
      }
      else
        r = aclone_error_set (err, errno, "%s: lock", path);
      goto fail;
    }
    m->locked = true;
  }
  r = meta_map (m, err);
  if (r < 0)
    goto fail;
  *out = m;
  return 0;

 fail:
  aclone_meta_close (m);
  return r;
}

int
aclone_meta_set_flags (struct aclone_meta *m, uint32_t flags,
                       struct aclone_error *err)
{
  unsigned char page[ACLONE_PAGE];

  m->hdr.flags = flags;
  if (flags & ACLONE_FLAG_COMPLETE) {
    if (!m->hdr.completed)
      m->hdr.completed = time (NULL);
  }
  else
    m->hdr.completed = 0;
  /* Encode aside, then one copy into the shared page: readers never see
   * it zeroed or half encoded (a torn copy fails the checksum; see
   * aclone_meta_open).
   */
  header_encode (&m->hdr, page);
  memcpy (m->map, page, ACLONE_PAGE);
  if (msync (m->map, ACLONE_PAGE, MS_SYNC) < 0)
    return aclone_error_set (err, errno, "%s: msync header", m->path);
  return 0;
}

/* The page-aligned span of bitmap words [lo, hi] of bm. */
static void
bitmap_span (uint64_t *bm, uint64_t lo, uint64_t hi, uintptr_t *start, size_t *len)
{
  uintptr_t a = (uintptr_t) &bm[lo] & ~(uintptr_t) (ACLONE_PAGE - 1);
  uintptr_t b = ((uintptr_t) &bm[hi] + 8 + ACLONE_PAGE - 1)
                & ~(uintptr_t) (ACLONE_PAGE - 1);

  *start = a;
  *len = b - a;
}

/* Unmap the pages of words [lo, hi] from this process, keeping them in
 * the page cache: MADV_DONTNEED on a shared file mapping drops no data
 * (a dirty page table entry leaves its page dirty in the cache), and a
 * page dirtied meanwhile (by aclone_meta_written_ahead) stays dirty.
 */
static void
bitmap_drop (uint64_t *bm, uint64_t lo, uint64_t hi)
{
  uintptr_t start;
  size_t len;

  bitmap_span (bm, lo, hi, &start, &len);
  madvise ((void *) start, len, MADV_DONTNEED);
}

/* Pages of bitmap a commit touches before it drops them: 256 KiB, so
 * that a commit of a whole clone (a zero scan marks most of a sparse
 * one) never holds more of the bitmap resident, however the words it
 * sets are spread (a 1 TiB clone's bitmap is 2 MiB, 15 TiB's 30 MiB).
 */
#define COMMIT_CHUNK_PAGES 64u

int
aclone_meta_commit_bits (struct aclone_meta *m, int which,
                         const struct aclone_dirty_words *v, size_t n,
                         struct aclone_error *err)
{
  uint64_t *bm = which ? m->written : m->hydrated;
  uint64_t nwords = m->hdr.bitmap_len / 8;
  const uint64_t page_words = ACLONE_PAGE / 8;
  uint64_t lo = UINT64_MAX, hi = 0;          /* the whole commit's span */
  uint64_t chunk_lo = 0, chunk_hi = 0, last_page = UINT64_MAX;
  unsigned pages = 0;

  for (size_t i = 0; i < n; i++)
    if (v[i].index + v[i].count > nwords || v[i].count == 0)
      return aclone_error_set (err, ERANGE, "%s: bitmap index", m->path);
  if (n == 0)
    return 0;
  /* 1. Set the bits, dropping the pages every COMMIT_CHUNK_PAGES pages
   * met; they stay dirty in the page cache.  Entries come in index order
   * (aclone_map_take_dirty); out of order, a chunk's span is still
   * [its least word, its greatest], so nothing it touched stays mapped.
   */
  for (size_t i = 0; i < n; i++) {
    for (uint64_t k = v[i].index; k < v[i].index + v[i].count; k++) {
      if (k / page_words != last_page) {
        if (pages == COMMIT_CHUNK_PAGES) {
          bitmap_drop (bm, chunk_lo, chunk_hi);
          pages = 0;
        }
        if (pages == 0)
          chunk_lo = chunk_hi = k;
        last_page = k / page_words;
        pages++;
      }
      chunk_lo = MIN (chunk_lo, k);
      chunk_hi = MAX (chunk_hi, k);
      /* htole64 permutes bits, so it commutes with OR. */
      __atomic_fetch_or (&bm[k], htole64 (v[i].value), __ATOMIC_RELAXED);
      lo = MIN (lo, k);
      hi = MAX (hi, k);
    }
  }
  /* 2. Write the whole span back at once (msync writes the file's dirty
   * pages in the range, mapped or not: the kernel writes only the dirty
   * ones, so a sparse span costs no more than its pages), then drop the
   * last chunk.
   */
  uintptr_t start;
  size_t len;
  bitmap_span (bm, lo, hi, &start, &len);
  if (msync ((void *) start, len, MS_SYNC) < 0)
    return aclone_error_set (err, errno, "%s: msync bitmap", m->path);
  bitmap_drop (bm, chunk_lo, chunk_hi);
  return 0;
}

uint64_t
aclone_meta_count (const struct aclone_meta *m, int which)
{
  const uint64_t *bm = which ? m->written : m->hydrated;
  uint64_t n = 0, words = (m->hdr.regions + 63) / 64;

  for (uint64_t i = 0; i < words; i++) {
    uint64_t w = le64toh (__atomic_load_n (&bm[i], __ATOMIC_RELAXED));
    if (i == words - 1 && m->hdr.regions % 64)
      w &= (UINT64_C (1) << (m->hdr.regions % 64)) - 1;
    n += __builtin_popcountll (w);
  }
  return n;
}

void
aclone_meta_written_ahead (struct aclone_meta *m, uint64_t first,
                           uint64_t count)
{
  uint64_t end = first + count;

  while (first < end) {
    unsigned lo = first % 64;
    unsigned n = end - first < 64 - lo ? (unsigned) (end - first) : 64 - lo;
    uint64_t mask = (n == 64 ? UINT64_MAX : ((UINT64_C (1) << n) - 1)) << lo;
    uint64_t *w = &m->written[first / 64];
    if ((le64toh (__atomic_load_n (w, __ATOMIC_RELAXED)) & mask) != mask)
      __atomic_fetch_or (w, htole64 (mask), __ATOMIC_RELAXED);
    first += n;
  }
}

bool
aclone_meta_bit (const struct aclone_meta *m, int which, uint64_t region)
{
  const uint64_t *bm = which ? m->written : m->hydrated;
  return (le64toh (bm[region / 64]) >> (region % 64)) & 1;
}

bool
aclone_meta_in_use (const char *path)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  bool busy;

  if (fd < 0)
    return false;
  busy = lock_held_elsewhere (fd) == 1;   /* tests, takes nothing */
  close (fd);
  return busy;
}

void
aclone_meta_unlock (struct aclone_meta *m)
{
  if (m->fd >= 0 && m->locked && ofd_lock (m->fd, F_OFD_SETLK, F_UNLCK) == 0)
    m->locked = false;
}

void
aclone_meta_close (struct aclone_meta *m)
{
  if (!m)
    return;
  if (m->map)
    munmap (m->map, m->map_len);
  if (m->fd >= 0)
    close (m->fd);          /* releases the lock, if the last reference */
  free (m->path);
  free (m);
}
