/* Unit test: the power-loss model for invariant 1.
 *
 * fdatasync and msync are wrapped (-Wl,--wrap=fdatasync,--wrap=msync):
 * every successful sync of dest copies dest to a "durable" image, and
 * every successful msync of the metadata mapping copies the synced range
 * into a durable image of the metadata file.  A simulated power cut then
 * builds a crash image from dest as of its last fdatasync (every write
 * not synced is lost, the worst case a power cut can do to data) and one
 * of two metadata files, the two extremes of what the kernel may have
 * written back:
 *   - the metadata file as it is *now*, synced or not: the kernel may
 *     write a mapped page back at any moment, so this is the worst case
 *     for a bit running ahead of its data;
 *   - the metadata file as of its last msync: nothing unsynced was
 *     written back, the worst case for a commit that skips its msync.
 * A cut comes either between two client requests or, on every other
 * round, inside the first flush's commit, just before its dest fdatasync
 * (whatever the commit did to the metadata file before that point is in
 * the image; it never returned, so its writes count as unflushed).
 * If a committed bit ever ran ahead of durable data, the region would read
 * as stale dest bytes (zeroes of the sparse file) after the restart; if a
 * flush returned before its bits were durable, the region would read the
 * source again.  The check: every byte reads as the source's or as a
 * value some client wrote there, and every write acknowledged by a flush
 * is present.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clone-internal.h"
#include "aclone/hydrator.h"
#include "fakes.h"

#define RS    4096u
#define SIZE  (1024u * 1024 + 777)      /* 257 regions, a short tail */
#define NVAL  16                        /* write values: 0xa0 .. 0xaf */

static const char *dest_path, *durable_path;
static char meta_real[PATH_MAX];       /* the metadata file, as /proc names it */
static const char *meta_path, *durable_meta_path;
/* Shared with the hydrator's commits, hence atomic. */
static _Atomic bool recording;         /* false while the crashed clone closes */
static int syncs, msyncs;

/* The model, per byte: values a client wrote since the last flush (bit k:
 * 0xa0+k), and what an acknowledged flush guarantees.
 */
static uint16_t *pending;
static unsigned char *flushed;

/* The power cut: crash images, and the model as it was when it came. */
static struct {
  bool meta_as_synced;         /* else the metadata file as it is now */
  const char *cdest, *cmeta;
  _Atomic bool armed;          /* cut at the test thread's next dest sync */
  pid_t tid;
  bool taken;
  uint16_t *pending;
  unsigned char *flushed;
} cut;

int __real_fdatasync (int fd);
int __real_msync (void *addr, size_t len, int flags);

static void
copy_file (const char *from, const char *to)
{
  int in = open (from, O_RDONLY), out = open (to, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  char buf[65536];
  ssize_t n;
  if (in < 0 || out < 0)
    abort ();
  while ((n = read (in, buf, sizeof buf)) > 0)
    if (write (out, buf, n) != n)
      abort ();
  close (in);
  close (out);
}

/* The crash images and the model, now. */
static void
take_cut (void)
{
  copy_file (durable_path, cut.cdest);
  copy_file (cut.meta_as_synced ? durable_meta_path : meta_path, cut.cmeta);
  memcpy (cut.flushed, flushed, SIZE);
  memcpy (cut.pending, pending, SIZE * sizeof *pending);
  cut.taken = true;
}

/* Whatever was synced is what survives: snapshot dest.  An armed cut
 * comes just before the sync.
 */
int
__wrap_fdatasync (int fd)
{
  char link[64], target[4096];
  bool is_dest = false;

  if (recording) {
    snprintf (link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink (link, target, sizeof target - 1);
    if (n > 0) {
      target[n] = '\0';
      is_dest = strcmp (target, dest_path) == 0;
    }
  }
  if (is_dest && cut.armed && gettid () == cut.tid) {
    cut.armed = false;
    take_cut ();
  }
  int r = __real_fdatasync (fd);
  if (r == 0 && is_dest) {
    copy_file (dest_path, durable_path);
    syncs++;
  }
  return r;
}

/* An msync of the metadata mapping makes exactly that range durable:
 * find the file offset of addr in /proc/self/maps, and copy the synced
 * bytes into the durable image there.
 */
int
__wrap_msync (void *addr, size_t len, int flags)
{
  int r = __real_msync (addr, len, flags);
  if (r != 0 || !recording)
    return r;
  FILE *maps = fopen ("/proc/self/maps", "r");
  char line[PATH_MAX + 256];
  if (!maps)
    abort ();
  while (fgets (line, sizeof line, maps)) {
    unsigned long lo, hi, off;
    int path_at = 0;
    if (sscanf (line, "%lx-%lx %*s %lx %*s %*s %n", &lo, &hi, &off, &path_at) < 3 ||
        path_at == 0)
      continue;
    char *path = line + path_at;
    path[strcspn (path, "\n")] = '\0';
    if ((uintptr_t) addr < lo || (uintptr_t) addr >= hi || strcmp (path, meta_real) != 0)
      continue;
    int fd = open (durable_meta_path, O_WRONLY);
    if (fd < 0 ||
        pwrite (fd, addr, len, off + ((uintptr_t) addr - lo)) != (ssize_t) len)
      abort ();
    close (fd);
    msyncs++;
    break;
  }
  fclose (maps);
  return r;
}

static uint64_t
rnd (uint64_t *s)
{
  *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
  return *s;
}

static void
power_cuts (bool meta_as_synced)
{
  char *dir = make_tmpdir ();
  char *dest = path_join (dir, "dest"), *meta = path_join (dir, "meta");
  char *durable = path_join (dir, "durable-dest");
  char *durable_meta = path_join (dir, "durable-meta");
  char *cdest = path_join (dir, "crash-dest"), *cmeta = path_join (dir, "crash-meta");
  dest_path = dest;
  durable_path = durable;
  meta_path = meta;
  durable_meta_path = durable_meta;
  syncs = msyncs = 0;
  cut.meta_as_synced = meta_as_synced;
  cut.cdest = cdest;
  cut.cmeta = cmeta;
  cut.tid = gettid ();
  struct fake_source *src = fake_source_new (SIZE, 3, 0);
  pending = calloc (SIZE, sizeof *pending);
  flushed = malloc (SIZE);
  cut.pending = malloc (SIZE * sizeof *pending);
  cut.flushed = malloc (SIZE);
  unsigned char *buf = malloc (4 * RS), *all = malloc (SIZE);
  uint64_t seed = 0x5eed;
  int cuts = 0, inner_cuts = 0, incomplete = 0;
  bool inner = false;                  /* the last cut was inside a commit */

  memcpy (flushed, src->data, SIZE);
  /* Before any sync, what survives of dest is what creating it made: a
   * sparse file of zeroes.
   */
  int fd = open (durable, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  assert_true (fd >= 0 && ftruncate (fd, SIZE) == 0);
  close (fd);
  for (int round = 0; round < 60; round++) {
    struct aclone_clone *c;
    struct aclone_error err;
    /* Reads must not hydrate, or the first check completes the clone and
     * later rounds never use the bitmap: copies come from CACHE and the
     * (slow) hydrator instead.
     */
    struct aclone_clone_config cfg = { .dest_path = dest, .meta_path = meta,
                                       .region_size = RS, .copy_on_read = false };
    src->closed = false;
    atomic_store (&src->base.cancelled, false);
    if (aclone_clone_open (&cfg, &src->base, NULL, NULL, &c, &err) < 0)
      fail_msg ("round %d: open: %s", round, err.msg);
    if (round == 0) {
      /* aclone_meta_create fsyncs the whole new file: as created, it is
       * durable.
       */
      copy_file (meta, durable_meta);
      if (!realpath (meta, meta_real))
        abort ();
      recording = true;
    }

    /* 1. After the previous power cut: every byte is the flushed value,
     * or an unflushed write's value, or (if the write was lost) the value
     * before it, which an earlier flush or the source vouches for.
     */
    if (aclone_clone_mode (c) != ACLONE_MODE_COMPLETE)
      incomplete++;
    assert_int_equal (aclone_clone_pread (c, all, SIZE, 0), 0);
    for (size_t i = 0; i < SIZE; i++) {
      unsigned v = all[i];
      bool ok = v == flushed[i] ||
                (v >= 0xa0 && v < 0xa0 + NVAL && (pending[i] >> (v - 0xa0)) & 1);
      if (!ok)
        fail_msg ("round %d, after a cut %s: byte %zu reads %02x; flushed %02x, "
                  "source %02x", round,
                  inner ? "inside a commit" : "between requests",
                  i, v, flushed[i], src->data[i]);
    }
    memcpy (flushed, all, SIZE);     /* what the clone shows is the baseline */
    memset (pending, 0, SIZE * sizeof *pending);
    if (aclone_clone_flush (c) < 0)  /* ...made durable before new writes */
      fail_msg ("round %d: flush", round);

    /* Hydration on odd rounds, to race commits with copies; on even ones
     * (single-threaded, so the same every run) the cut comes inside the
     * first flush's commit, if there is one.
     */
    struct aclone_hydrator_config hc = ACLONE_HYDRATOR_DEFAULTS;
    hc.batch = 2 * RS;
    hc.rate = 16 * 1024;
    if (round % 2) {
      aclone_hydrator_set_controls (c, &hc);
      assert_int_equal (aclone_hydrator_start (c, &hc, &err), 0);
    }
    else
      cut.armed = true;
    cut.taken = false;

    /* 2. Random writes, zeroes, flushes. */
    int ops = 1 + rnd (&seed) % 12;
    for (int k = 0; k < ops; k++) {
      uint64_t len = 1 + rnd (&seed) % (2 * RS);
      uint64_t off = rnd (&seed) % (SIZE - len);
      unsigned v = rnd (&seed) % NVAL;
      switch (rnd (&seed) % 5) {
      case 0: case 1: case 2:
        memset (buf, 0xa0 + v, len);
        assert_int_equal (aclone_clone_pwrite (c, buf, len, off, false), 0);
        for (uint64_t i = off; i < off + len; i++)
          pending[i] |= 1u << v;
        break;
      case 3:
        assert_int_equal (aclone_clone_cache (c, len, off), 0);
        break;
      case 4:
        assert_int_equal (aclone_clone_flush (c), 0);
        /* Everything written so far is durable: read it back as the new
         * flushed state (the reads are of what the clone now shows).
         */
        assert_int_equal (aclone_clone_pread (c, all, SIZE, 0), 0);
        memcpy (flushed, all, SIZE);
        memset (pending, 0, SIZE * sizeof *pending);
        break;
      }
    }
    if (round % 2)
      usleep (rnd (&seed) % 3000);

    /* 3. Power cut, unless one came inside a commit: durable dest +
     * current or durable meta, no final commit.  What the model expects
     * is what it expected at the cut.
     */
    cut.armed = false;
    inner = cut.taken;
    if (!cut.taken)
      take_cut ();
    else
      inner_cuts++;
    memcpy (flushed, cut.flushed, SIZE);
    memcpy (pending, cut.pending, SIZE * sizeof *pending);
    cuts++;
    /* The live clone goes away (its closing commit is irrelevant: its
     * files are replaced by the crash images, which are then what is
     * durable).
     */
    recording = false;
    aclone_hydrator_stop (c);
    aclone_clone_close (c);
    copy_file (cdest, dest);
    copy_file (cmeta, meta);
    copy_file (cdest, durable);
    copy_file (cmeta, durable_meta);
    recording = true;
  }
  recording = false;
  assert_true (syncs > 0);
  assert_true (msyncs > 0);
  assert_int_equal (cuts, 60);
  assert_true (inner_cuts >= 10);      /* cuts inside commits happened */
  assert_true (incomplete >= 45);      /* the bitmap was really in play */
  fake_source_free (src);
  rm_rf (dir);
  free (dir); free (dest); free (meta); free (durable); free (durable_meta);
  free (cdest); free (cmeta);
  free (pending); free (flushed); free (cut.pending); free (cut.flushed);
  free (buf); free (all);
}

/* A cut may keep any metadata page the kernel wrote back: a committed
 * bit must never run ahead of its data (fails if the commit skips the
 * dest sync, or sets bits before it).
 */
static void
test_power_cuts (void **state)
{
  (void) state;
  power_cuts (false);
}

/* A cut may keep nothing of the metadata file but what was msynced:
 * every flushed write must still be there (fails if the commit skips the
 * msync of its bitmap pages).
 */
static void
test_power_cuts_meta_as_synced (void **state)
{
  (void) state;
  power_cuts (true);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_power_cuts),
    cmocka_unit_test (test_power_cuts_meta_as_synced),
  };
  /* ACLONE_TEST_FILTER=NAME (a glob) runs only the tests it matches:
   * tests/mutants/run picks the one that must catch a mutant.
   */
  cmocka_set_test_filter (getenv ("ACLONE_TEST_FILTER"));
  return cmocka_run_group_tests (tests, NULL, NULL);
}
