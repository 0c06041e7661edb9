/* Unit test: the power-loss model for invariant 1.
 *
 * fdatasync is wrapped (-Wl,--wrap=fdatasync): every successful sync of
 * dest copies dest to a "durable" image.  A simulated power cut then
 * builds a crash image from
 *   - dest as of its last fdatasync: every write not synced is lost, the
 *     worst case a power cut can do to data; and
 *   - the metadata file as it is *now*, synced or not: the kernel may
 *     write a mapped page back at any moment, so this is the worst case
 *     for the bitmap.
 * If a committed bit ever ran ahead of durable data, the region would read
 * as stale dest bytes (zeroes of the sparse file) after the restart.  The
 * check: every byte reads as the source's or as a value some client wrote
 * there, and every write acknowledged by a flush is present.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "aclone/clone.h"
#include "aclone/hydrator.h"
#include "fakes.h"

#define RS    4096u
#define SIZE  (1024u * 1024 + 777)      /* 257 regions, a short tail */
#define NVAL  16                        /* write values: 0xa0 .. 0xaf */

static const char *dest_path, *durable_path;
static int syncs;

int __real_fdatasync (int fd);

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

/* Whatever was synced is what survives: snapshot dest. */
int
__wrap_fdatasync (int fd)
{
  int r = __real_fdatasync (fd);
  if (r == 0 && dest_path) {
    char link[64], target[4096];
    snprintf (link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink (link, target, sizeof target - 1);
    if (n > 0) {
      target[n] = '\0';
      if (strcmp (target, dest_path) == 0) {
        copy_file (dest_path, durable_path);
        syncs++;
      }
    }
  }
  return r;
}

static uint64_t
rnd (uint64_t *s)
{
  *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
  return *s;
}

static void
test_power_cuts (void **state)
{
  (void) state;
  char *dir = make_tmpdir ();
  char *dest = path_join (dir, "dest"), *meta = path_join (dir, "meta");
  char *durable = path_join (dir, "durable-dest");
  char *cdest = path_join (dir, "crash-dest"), *cmeta = path_join (dir, "crash-meta");
  dest_path = dest;
  durable_path = durable;
  struct fake_source *src = fake_source_new (SIZE, 3, 0);
  /* Per byte: values a client wrote since the last flush (bit k: 0xa0+k),
   * and what an acknowledged flush guarantees.
   */
  uint16_t *pending = calloc (SIZE, sizeof *pending);
  unsigned char *flushed = malloc (SIZE);
  unsigned char *buf = malloc (4 * RS), *all = malloc (SIZE);
  uint64_t seed = 0x5eed;
  int cuts = 0, incomplete = 0;

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

    /* 1. After the previous power cut: every byte is the flushed value,
     * or an unflushed write's value, or (if the write was lost) the value
     * before it, which an earlier flush or the source vouches for.
     */
    if (!atomic_load (&c->complete))
      incomplete++;
    assert_int_equal (aclone_clone_pread (c, all, SIZE, 0), 0);
    for (size_t i = 0; i < SIZE; i++) {
      unsigned v = all[i];
      bool ok = v == flushed[i] ||
                (v >= 0xa0 && v < 0xa0 + NVAL && (pending[i] >> (v - 0xa0)) & 1);
      if (!ok)
        fail_msg ("round %d: byte %zu reads %02x; flushed %02x, source %02x",
                  round, i, v, flushed[i], src->data[i]);
    }
    memcpy (flushed, all, SIZE);     /* what the clone shows is the baseline */
    memset (pending, 0, SIZE * sizeof *pending);
    if (aclone_clone_flush (c) < 0)  /* ...made durable before new writes */
      fail_msg ("round %d: flush", round);

    /* Hydration on half the rounds, to race commits with copies. */
    struct aclone_hydrator_config hc = ACLONE_HYDRATOR_DEFAULTS;
    hc.batch = 2 * RS;
    hc.rate = 16 * 1024;
    if (round % 2)
      assert_int_equal (aclone_hydrator_start (c, &hc, &err), 0);

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

    /* 3. Power cut: durable dest + current meta, no final commit. */
    copy_file (durable, cdest);
    copy_file (meta, cmeta);
    cuts++;
    aclone_hydrator_stop (c);
    /* The live clone goes away (its closing commit is irrelevant: its
     * files are replaced by the crash images).
     */
    aclone_clone_close (c);
    copy_file (cdest, dest);
    copy_file (cmeta, meta);
  }
  assert_true (syncs > 0);
  assert_int_equal (cuts, 60);
  assert_true (incomplete >= 45);      /* the bitmap was really in play */
  fake_source_free (src);
  rm_rf (dir);
  free (dir); free (dest); free (meta); free (durable); free (cdest); free (cmeta);
  free (pending); free (flushed); free (buf); free (all);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_power_cuts),
  };
  return cmocka_run_group_tests (tests, NULL, NULL);
}
