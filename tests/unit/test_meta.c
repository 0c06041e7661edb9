/* Unit tests: the metadata file (src/meta.c). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "aclone/meta.h"
#include "aclone/crc32c.h"
#include "aclone/size.h"
#include "fakes.h"

struct fx {
  char *dir, *path;
};

static int
setup (void **state)
{
  struct fx *f = calloc (1, sizeof *f);
  f->dir = make_tmpdir ();
  f->path = path_join (f->dir, "meta");
  *state = f;
  return 0;
}

static int
teardown (void **state)
{
  struct fx *f = *state;
  rm_rf (f->dir);
  free (f->dir);
  free (f->path);
  free (f);
  return 0;
}

static void
create_close (const char *path, uint64_t size, uint32_t rs)
{
  struct aclone_meta *m;
  struct aclone_error err;
  assert_int_equal (aclone_meta_create (path, size, rs, 0, "nbd://src/x", &m, &err), 0);
  aclone_meta_close (m);
}

static void
test_create_reopen (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;
  struct stat st;

  create_close (f->path, (1ull << 30) + 12345, 65536);
  assert_int_equal (stat (f->path, &st), 0);
  assert_int_equal (st.st_mode & 0777, 0600);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err), 0);
  assert_int_equal (m->hdr.size, (1ull << 30) + 12345);
  assert_int_equal (m->hdr.region_size, 65536);
  assert_int_equal (m->hdr.regions, 16385);
  assert_string_equal (m->hdr.source, "nbd://src/x");
  assert_int_equal (m->live->magic, ACLONE_LIVE_MAGIC);
  assert_false (aclone_meta_bit (m, 0, 0));
  aclone_meta_close (m);
}

static void
test_create_refuses_existing (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;

  create_close (f->path, 1 << 20, 4096);
  assert_int_equal (aclone_meta_create (f->path, 1 << 20, 4096, 0, "", &m, &err),
                    -EEXIST);
  assert_non_null (strstr (err.msg, f->path));
}

static void
test_lock_exclusive (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *a, *b;
  struct aclone_error err;

  create_close (f->path, 1 << 20, 4096);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &a, &err), 0);
  assert_true (aclone_meta_in_use (f->path));
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &b, &err), -EBUSY);
  assert_non_null (strstr (err.msg, "in use"));
  assert_non_null (strstr (err.msg, f->path));
  /* Readers are not locked out. */
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &b, &err), 0);
  aclone_meta_close (b);
  aclone_meta_close (a);
  assert_false (aclone_meta_in_use (f->path));
}

/* The lock as the CLI and nbdkit see it: a probe says "in use" while a
 * server holds it (also right after aclone_meta_create) and takes
 * nothing; a second server is refused naming the pid in the live page;
 * aclone_meta_unlock releases it early; it outlives the parent's close
 * while a forked child keeps the descriptor (nbdkit forks after
 * opening the file, and the parent exits).
 */
static void
test_lock_probe_unlock_fork (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *a, *b;
  struct aclone_error err;
  int go[2], st;

  assert_int_equal (aclone_meta_create (f->path, 1 << 20, 4096, 0, "", &a, &err), 0);
  for (int i = 0; i < 100; i++)
    assert_true (aclone_meta_in_use (f->path));
  __atomic_store_n (&a->live->pid, 4242, __ATOMIC_RELAXED);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &b, &err), -EBUSY);
  assert_non_null (strstr (err.msg, "in use by another aclone server (pid 4242)"));
  assert_non_null (strstr (err.msg, f->path));

  aclone_meta_unlock (a);                    /* early, mapping kept */
  assert_false (aclone_meta_in_use (f->path));
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &b, &err), 0);
  assert_true (aclone_meta_in_use (f->path));
  aclone_meta_close (a);                     /* not b's lock */
  assert_true (aclone_meta_in_use (f->path));

  assert_int_equal (pipe (go), 0);
  pid_t pid = fork ();
  assert_true (pid >= 0);
  if (pid == 0) {                            /* keeps b's descriptor */
    char c;
    alarm (30);
    close (go[1]);
    (void) !read (go[0], &c, 1);             /* until the parent closes */
    _exit (0);
  }
  close (go[0]);
  aclone_meta_close (b);                     /* the parent's copy */
  assert_true (aclone_meta_in_use (f->path));
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &a, &err), -EBUSY);
  close (go[1]);
  assert_int_equal (waitpid (pid, &st, 0), pid);
  assert_true (WIFEXITED (st) && WEXITSTATUS (st) == 0);
  assert_false (aclone_meta_in_use (f->path));
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &a, &err), 0);
  aclone_meta_close (a);
}

struct prober {
  const char *path;
  atomic_bool stop;
  atomic_ulong probes;
};

static void *
probe_main (void *arg)
{
  struct prober *p = arg;
  while (!atomic_load (&p->stop)) {
    (void) aclone_meta_in_use (p->path);
    atomic_fetch_add (&p->probes, 1);
  }
  return NULL;
}

/* aclone status/inspect/wait probe "in use" at any moment: a probe must
 * never make a server that opens the file at that instant fail (the old
 * probe took a shared flock, and a server starting then was refused as
 * "in use by another aclone server (pid 0)").
 */
static void
test_probe_never_fails_open (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;
  struct prober p = { .path = f->path };
  pthread_t t;
  int failures = 0;
  const int n = 5000;
  char first[sizeof err.msg] = "";

  create_close (f->path, 1 << 20, 4096);
  assert_int_equal (pthread_create (&t, NULL, probe_main, &p), 0);
  while (atomic_load (&p.probes) == 0)
    sched_yield ();
  for (int i = 0; i < n; i++) {
    if (aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err) < 0) {
      if (failures++ == 0)
        snprintf (first, sizeof first, "%s", err.msg);
      continue;
    }
    aclone_meta_close (m);
  }
  atomic_store (&p.stop, true);
  pthread_join (t, NULL);
  if (failures)
    fail_msg ("%d of %d server opens failed during %lu probes; first: %s",
              failures, n, (unsigned long) atomic_load (&p.probes), first);
}

struct flipper {
  struct aclone_meta *m;
  int n, errors;
  atomic_bool done;
};

static void *
flip_main (void *arg)
{
  struct flipper *fl = arg;
  struct aclone_error err;
  for (int i = 0; i < fl->n; i++) {
    uint32_t flags = i & 1 ? ACLONE_FLAG_COMPLETE | ACLONE_FLAG_DEST_ZERO : 0;
    if (aclone_meta_set_flags (fl->m, flags, &err) < 0)
      fl->errors++;
  }
  atomic_store (&fl->done, true);
  return NULL;
}

/* A server rewrites the header (aclone_meta_set_flags) while aclone
 * status opens the file read-only again and again: no open may find it
 * invalid (the old code zeroed the page in the mapping, then filled it).
 */
static void
test_header_rewrite_while_reading (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *w, *m;
  struct aclone_error err;
  struct flipper fl = { .n = 2000 };
  pthread_t t;
  int failures = 0, reads = 0;
  char first[sizeof err.msg] = "";

  create_close (f->path, 1 << 20, 4096);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &w, &err), 0);
  fl.m = w;
  assert_int_equal (pthread_create (&t, NULL, flip_main, &fl), 0);
  while (!atomic_load (&fl.done)) {
    reads++;
    if (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err) < 0) {
      if (failures++ == 0)
        snprintf (first, sizeof first, "%s", err.msg);
      continue;
    }
    uint32_t fg = m->hdr.flags;
    aclone_meta_close (m);
    if (fg != 0 && fg != (ACLONE_FLAG_COMPLETE | ACLONE_FLAG_DEST_ZERO))
      fail_msg ("read flags 0x%x", fg);
  }
  pthread_join (t, NULL);
  aclone_meta_close (w);
  assert_int_equal (fl.errors, 0);
  if (failures)
    fail_msg ("%d of %d read-only opens failed during %d header rewrites; "
              "first: %s", failures, reads, fl.n, first);
  assert_true (reads > 0);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  assert_int_equal (m->hdr.flags, ACLONE_FLAG_COMPLETE | ACLONE_FLAG_DEST_ZERO);
  aclone_meta_close (m);
}

/* aclone_meta_open sleeps with nanosleep between two reads of a header
 * that failed validation: this definition (the executable's wins over
 * libc's) counts those sleeps and lets a test act between the reads.
 */
static atomic_int header_sleeps;
static void (*between_reads) (void);

int
nanosleep (const struct timespec *req, struct timespec *rem)
{
  atomic_fetch_add (&header_sleeps, 1);
  if (between_reads)
    between_reads ();
  return clock_nanosleep (CLOCK_REALTIME, 0, req, rem);
}

static struct aclone_meta *torn_meta;
static unsigned char torn_good[ACLONE_PAGE];

static void
finish_header_copy (void)
{
  memcpy (torn_meta->map, torn_good, ACLONE_PAGE);
}

/* A reader that catches the header half copied (old flags, new
 * checksum) while a server holds the file reads it again and gets the
 * whole copy; a header that stays wrong is still refused, after a bounded
 * number of reads; with no server, a bad header is refused at once.
 */
static void
test_torn_header_read_again (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *w, *m;
  struct aclone_error err;
  const size_t flags_off = offsetof (struct aclone_meta_header, flags);

  create_close (f->path, 1 << 20, 4096);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &w, &err), 0);
  memcpy (torn_good, w->map, ACLONE_PAGE);
  torn_meta = w;

  w->map[flags_off] ^= ACLONE_FLAG_DEST_ZERO;          /* torn */
  atomic_store (&header_sleeps, 0);
  between_reads = finish_header_copy;
  int r = aclone_meta_open (f->path, ACLONE_META_READ, &m, &err);
  between_reads = NULL;
  assert_int_equal (r, 0);
  assert_int_equal (atomic_load (&header_sleeps), 1);
  assert_int_equal (m->hdr.flags, 0);
  aclone_meta_close (m);

  w->map[flags_off] ^= ACLONE_FLAG_DEST_ZERO;          /* stays wrong */
  atomic_store (&header_sleeps, 0);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), -EINVAL);
  assert_non_null (strstr (err.msg, "checksum mismatch"));
  assert_non_null (strstr (err.msg, f->path));
  assert_true (atomic_load (&header_sleeps) >= 1);
  assert_true (atomic_load (&header_sleeps) < 100);

  aclone_meta_unlock (w);                              /* no server */
  atomic_store (&header_sleeps, 0);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), -EINVAL);
  assert_int_equal (atomic_load (&header_sleeps), 0);
  finish_header_copy ();
  aclone_meta_close (w);
}

static void
test_commit_bits (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;
  struct aclone_dirty_words v[2] = { { 0, 1, 0x5 }, { 3, 1, 1ull << 63 } };
  struct aclone_dirty_words run = { 1, 2, UINT64_MAX };

  create_close (f->path, 1 << 20, 4096);       /* 256 regions */
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err), 0);
  assert_int_equal (aclone_meta_commit_bits (m, 0, v, 2, &err), 0);
  assert_int_equal (aclone_meta_commit_bits (m, 1, v, 1, &err), 0);
  aclone_meta_close (m);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  assert_true (aclone_meta_bit (m, 0, 0));
  assert_false (aclone_meta_bit (m, 0, 1));
  assert_true (aclone_meta_bit (m, 0, 2));
  assert_false (aclone_meta_bit (m, 0, 64));
  assert_true (aclone_meta_bit (m, 0, 255));
  assert_true (aclone_meta_bit (m, 1, 2));
  assert_false (aclone_meta_bit (m, 1, 255));
  aclone_meta_close (m);
  /* A run: words 1 and 2 whole; past the bitmap refused. */
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err), 0);
  assert_int_equal (aclone_meta_commit_bits (m, 0, &run, 1, &err), 0);
  run.count = m->hdr.bitmap_len / 8;
  assert_int_equal (aclone_meta_commit_bits (m, 0, &run, 1, &err), -ERANGE);
  aclone_meta_close (m);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  for (unsigned r = 64; r < 192; r++)
    assert_true (aclone_meta_bit (m, 0, r));
  assert_false (aclone_meta_bit (m, 0, 1));
  aclone_meta_close (m);
}

/* Resident KiB of the mapping holding addr (/proc/self/smaps). */
static long
mapping_rss_kib (const void *addr)
{
  FILE *fp = fopen ("/proc/self/smaps", "r");
  char line[512];
  bool in = false;
  long rss = -1;

  assert_non_null (fp);
  while (fgets (line, sizeof line, fp)) {
    unsigned long lo, hi;
    if (sscanf (line, "%lx-%lx ", &lo, &hi) == 2 && strchr (line, '-') < strchr (line, ' '))
      in = (uintptr_t) addr >= lo && (uintptr_t) addr < hi;
    else if (in && sscanf (line, "Rss: %ld kB", &rss) == 1)
      break;
  }
  fclose (fp);
  return rss;
}

/* A commit over many pages of bitmap (16M regions: 2 MiB, 512 pages),
 * in index order and out of it: every bit lands, and the commit leaves
 * none of the bitmap's pages mapped in the process.
 */
static void
test_commit_bits_many_pages (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;
  enum { WORDS = (1 << 24) / 64, STEP = 257 };   /* a word every ~2 pages */
  static struct aclone_dirty_words v[WORDS / STEP + 1];
  size_t n = 0;

  for (uint64_t w = 3; w < WORDS; w += STEP)
    v[n++] = (struct aclone_dirty_words) { w, 1, 1ull << (w % 64) };
  create_close (f->path, (uint64_t) 1 << 36, 4096);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err), 0);
  /* (valgrind and TSan keep their own view of the pages: under them,
   * only the bits are checked.)
   */
  const char *pre = getenv ("LD_PRELOAD");
  bool own_view = pre && strstr (pre, "vgpreload");
#ifdef __SANITIZE_THREAD__
  own_view = true;
#endif
  long before = own_view ? LONG_MAX : mapping_rss_kib (m->hydrated);
  assert_int_equal (aclone_meta_commit_bits (m, 0, v, n, &err), 0);
  assert_true (mapping_rss_kib (m->hydrated) <= before);
  /* Out of order (written bits): still all set, nothing left mapped. */
  for (size_t i = 0; i < n / 2; i++) {
    struct aclone_dirty_words t = v[i];
    v[i] = v[n - 1 - i];
    v[n - 1 - i] = t;
  }
  assert_int_equal (aclone_meta_commit_bits (m, 1, v, n, &err), 0);
  assert_true (mapping_rss_kib (m->hydrated) <= before);
  aclone_meta_close (m);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  assert_int_equal (aclone_meta_count (m, 0), n);
  assert_int_equal (aclone_meta_count (m, 1), n);
  for (size_t i = 0; i < n; i++) {
    uint64_t r = v[i].index * 64 + v[i].index % 64;
    assert_true (aclone_meta_bit (m, 0, r));
    assert_true (aclone_meta_bit (m, 1, r));
    assert_false (aclone_meta_bit (m, 0, r + 1));
  }
  aclone_meta_close (m);
}

static void
test_flags (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;

  create_close (f->path, 1 << 20, 4096);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err), 0);
  assert_int_equal (aclone_meta_set_flags (m, ACLONE_FLAG_COMPLETE, &err), 0);
  aclone_meta_close (m);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  assert_int_equal (m->hdr.flags, ACLONE_FLAG_COMPLETE);
  assert_true (m->hdr.completed > 0);
  aclone_meta_close (m);
}

/* Flip every byte of the header, one at a time: each must be refused
 * with a message naming the file, and the file must stay unmodified.
 */
static void
test_every_header_byte (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;
  unsigned char orig[ACLONE_PAGE];

  create_close (f->path, 3 << 20, 65536);
  int fd = open (f->path, O_RDWR);
  assert_true (fd >= 0);
  assert_int_equal (pread (fd, orig, sizeof orig, 0), sizeof orig);
  for (size_t i = 0; i < ACLONE_HEADER_LEN; i++) {
    unsigned char b = orig[i] ^ 0x01;
    if (i >= offsetof (struct aclone_meta_header, pad))
      continue;                      /* padding is not covered */
    assert_int_equal (pwrite (fd, &b, 1, i), 1);
    int r = aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err);
    if (r == 0)
      fail_msg ("flipped byte %zu accepted", i);
    assert_non_null (strstr (err.msg, f->path));
    assert_int_equal (pwrite (fd, &orig[i], 1, i), 1);
  }
  close (fd);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  aclone_meta_close (m);
}

/* One header field changed, the checksum made right again. */
struct field_case {
  const char *what;              /* for failure messages */
  size_t off, len;               /* field in the header */
  uint64_t value;
  uint64_t file_len;             /* resize the file to this first (0: keep) */
  const char *expect;            /* in the error message */
};

static void
put_le (unsigned char *p, size_t len, uint64_t v)
{
  for (size_t i = 0; i < len; i++)
    p[i] = (unsigned char) (v >> (8 * i));
}

static void
reseal (unsigned char *page)
{
  const size_t co = offsetof (struct aclone_meta_header, checksum);
  put_le (page + co, 4, 0);
  put_le (page + co, 4, aclone_crc32c (page, ACLONE_HEADER_LEN));
}

#define FIELD(f) offsetof (struct aclone_meta_header, f), \
                 sizeof ((struct aclone_meta_header *) 0)->f

/* A valid checksum over a wrong field is still refused: every field the
 * validator checks, changed alone (or with the file resized to match
 * it), gives -EINVAL naming the file and the field.  Also headers that
 * are consistent in themselves but not a layout this version writes.
 */
static void
test_header_fields_checked (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;
  unsigned char orig[ACLONE_PAGE], page[ACLONE_PAGE];
  struct stat st;

  /* 3 MiB at 64 KiB: 48 regions, one page per bitmap, 16 KiB file. */
  create_close (f->path, 3 << 20, 65536);
  assert_int_equal (stat (f->path, &st), 0);
  const uint64_t len0 = st.st_size;
  assert_int_equal (len0, 4 * ACLONE_PAGE);
  const struct field_case cases[] = {
    { "version", FIELD (version), 2, 0, "version" },
    { "header_len", FIELD (header_len), ACLONE_HEADER_LEN - 4, 0, "header length" },
    { "header_len page", FIELD (header_len), ACLONE_PAGE, 0, "header length" },
    /* 65537 gives the same region count (48): only the size check sees it. */
    { "region_size odd", FIELD (region_size), 65537, 0, "region size" },
    { "region_size 0", FIELD (region_size), 0, 0, "region size" },
    { "region_size 2K", FIELD (region_size), 2048, 0, "region size" },
    { "region_size 32M", FIELD (region_size), 32u << 20, 0, "region size" },
    { "size 0", FIELD (size), 0, 0, "device size" },
    { "size huge", FIELD (size), UINT64_C (1) << 61, 0, "device size" },
    { "regions", FIELD (regions), 49, 0, "region count" },
    { "flags", FIELD (flags), 1u << 7, 0, "flags" },
    { "live_off", FIELD (live_off), 2 * ACLONE_PAGE, 0, "area layout" },
    { "hydrated_off", FIELD (hydrated_off), 3 * ACLONE_PAGE, 0, "area layout" },
    { "hydrated_off unaligned", FIELD (hydrated_off), 2 * ACLONE_PAGE + 8, 0,
      "area layout" },
    { "written_off", FIELD (written_off), 2 * ACLONE_PAGE, 0, "area layout" },
    { "bitmap_len", FIELD (bitmap_len), 2 * ACLONE_PAGE, 0, "area layout" },
    /* A file extended to what its header says passes the length check:
     * only the layout check refuses it.
     */
    { "file_len", FIELD (file_len), 5 * ACLONE_PAGE, 5 * ACLONE_PAGE, "area layout" },
    { "file_len short", FIELD (file_len), 3 * ACLONE_PAGE, 3 * ACLONE_PAGE,
      "area layout" },
  };

  int fd = open (f->path, O_RDWR);
  assert_true (fd >= 0);
  assert_int_equal (pread (fd, orig, sizeof orig, 0), sizeof orig);
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const struct field_case *k = &cases[i];
    memcpy (page, orig, sizeof page);
    put_le (page + k->off, k->len, k->value);
    reseal (page);
    assert_int_equal (pwrite (fd, page, sizeof page, 0), sizeof page);
    if (k->file_len)
      assert_int_equal (ftruncate (fd, k->file_len), 0);
    memset (&err, 0, sizeof err);
    int r = aclone_meta_open (f->path, ACLONE_META_READ, &m, &err);
    if (r == 0) {
      aclone_meta_close (m);
      fail_msg ("%s = %llu accepted", k->what, (unsigned long long) k->value);
    }
    if (r != -EINVAL || !strstr (err.msg, f->path) || !strstr (err.msg, k->expect))
      fail_msg ("%s: got %d \"%s\", want -EINVAL naming the file and \"%s\"",
                k->what, r, err.msg, k->expect);
    assert_int_equal (ftruncate (fd, len0), 0);
  }

  /* Consistent in itself, but not this version's layout: a second page
   * per bitmap, offsets and file length to match.
   */
  memcpy (page, orig, sizeof page);
  put_le (page + offsetof (struct aclone_meta_header, bitmap_len), 8, 2 * ACLONE_PAGE);
  put_le (page + offsetof (struct aclone_meta_header, written_off), 8, 4 * ACLONE_PAGE);
  put_le (page + offsetof (struct aclone_meta_header, file_len), 8, 6 * ACLONE_PAGE);
  reseal (page);
  assert_int_equal (pwrite (fd, page, sizeof page, 0), sizeof page);
  assert_int_equal (ftruncate (fd, 6 * ACLONE_PAGE), 0);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), -EINVAL);
  assert_non_null (strstr (err.msg, "area layout"));
  assert_non_null (strstr (err.msg, f->path));
  assert_int_equal (ftruncate (fd, len0), 0);

  /* Region size 2 KiB with the region count (1536) to match: the count
   * and layout checks pass, the region size check must not.
   */
  memcpy (page, orig, sizeof page);
  put_le (page + offsetof (struct aclone_meta_header, region_size), 4, 2048);
  put_le (page + offsetof (struct aclone_meta_header, regions), 8, 1536);
  reseal (page);
  assert_int_equal (pwrite (fd, page, sizeof page, 0), sizeof page);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), -EINVAL);
  assert_non_null (strstr (err.msg, "region size"));

  /* A source description without its terminating NUL. */
  memcpy (page, orig, sizeof page);
  memset (page + offsetof (struct aclone_meta_header, source), 'x',
          ACLONE_SOURCE_DESC_LEN);
  reseal (page);
  assert_int_equal (pwrite (fd, page, sizeof page, 0), sizeof page);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), -EINVAL);
  assert_non_null (strstr (err.msg, "source text"));

  /* The original, resealed the same way, is still good: the cases above
   * failed for their field, not for the way they were written.
   */
  memcpy (page, orig, sizeof page);
  reseal (page);
  assert_memory_equal (page, orig, sizeof page);
  assert_int_equal (pwrite (fd, orig, sizeof orig, 0), sizeof orig);
  close (fd);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err), 0);
  aclone_meta_close (m);
}

static void
test_truncated_and_extended (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;
  struct stat st;

  create_close (f->path, 64 << 20, 4096);      /* 16384 regions, 2 KiB bitmap */
  assert_int_equal (stat (f->path, &st), 0);
  assert_int_equal (truncate (f->path, st.st_size - 1), 0);
  assert_int_not_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  assert_non_null (strstr (err.msg, "truncated"));
  assert_int_equal (truncate (f->path, st.st_size + 4096), 0);
  assert_int_not_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  assert_int_equal (truncate (f->path, 100), 0);
  assert_int_not_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  assert_int_equal (truncate (f->path, 0), 0);
  assert_int_not_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
}

static void
test_not_meta (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;
  FILE *fp = fopen (f->path, "w");
  for (int i = 0; i < 20000; i++)
    fputc ('x', fp);
  fclose (fp);
  assert_int_not_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err), 0);
  assert_non_null (strstr (err.msg, "bad magic"));
  assert_int_not_equal (aclone_meta_open (f->dir, ACLONE_META_READ, &m, &err), 0);
}

static void
test_region_sizes (void **state)
{
  (void) state;
  assert_false (aclone_region_size_valid (2048));
  assert_true (aclone_region_size_valid (4096));
  assert_false (aclone_region_size_valid (4096 + 1));
  assert_false (aclone_region_size_valid (3 << 12));
  assert_true (aclone_region_size_valid (16 << 20));
  assert_false (aclone_region_size_valid (32 << 20));
  assert_int_equal (aclone_crc32c ("123456789", 9), 0xe3069283);
}

/* Size spellings handed on to nbdkit's and libbsd's parsers. */
static void
test_size_spellings (void **state)
{
  static const char *const ok[][2] = {
    { "65536", "65536" }, { "64K", "64K" }, { "64KiB", "64K" }, { "1MB", "1M" },
    { "2gib", "2g" }, { "010M", "10M" }, { "0", "0" }, { "512B", "512" },
  };
  static const char *const bad[] = { "", "K", "1.5M", "64Kx", "50Mjunk",
                                     "0x10M", "-1", "1 M", "1KK" };
  char out[32];
  (void) state;

  for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
    assert_true (aclone_size_spelling (ok[i][0], out, sizeof out));
    assert_string_equal (out, ok[i][1]);
  }
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
    assert_false (aclone_size_spelling (bad[i], out, sizeof out));
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown (test_create_reopen, setup, teardown),
    cmocka_unit_test_setup_teardown (test_create_refuses_existing, setup, teardown),
    cmocka_unit_test_setup_teardown (test_lock_exclusive, setup, teardown),
    cmocka_unit_test_setup_teardown (test_lock_probe_unlock_fork, setup, teardown),
    cmocka_unit_test_setup_teardown (test_probe_never_fails_open, setup, teardown),
    cmocka_unit_test_setup_teardown (test_header_rewrite_while_reading, setup,
                                     teardown),
    cmocka_unit_test_setup_teardown (test_torn_header_read_again, setup, teardown),
    cmocka_unit_test_setup_teardown (test_commit_bits, setup, teardown),
    cmocka_unit_test_setup_teardown (test_commit_bits_many_pages, setup, teardown),
    cmocka_unit_test_setup_teardown (test_flags, setup, teardown),
    cmocka_unit_test_setup_teardown (test_every_header_byte, setup, teardown),
    cmocka_unit_test_setup_teardown (test_header_fields_checked, setup, teardown),
    cmocka_unit_test_setup_teardown (test_truncated_and_extended, setup, teardown),
    cmocka_unit_test_setup_teardown (test_not_meta, setup, teardown),
    cmocka_unit_test (test_region_sizes),
    cmocka_unit_test (test_size_spellings),
  };
  /* ACLONE_TEST_FILTER=NAME (a glob) runs only the tests it matches:
   * tests/mutants/run picks the one that must catch a mutant.
   */
  cmocka_set_test_filter (getenv ("ACLONE_TEST_FILTER"));
  return cmocka_run_group_tests (tests, NULL, NULL);
}
