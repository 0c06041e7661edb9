/* Unit test: the hydrator's ring engine, the one production uses.
 *
 * The other unit tests drive the plain engine through fakes; the ring
 * engine needs a real NBD server (libnbd's asynchronous API polled
 * through io_uring).  So each test starts an nbdkit of its own on a Unix
 * socket in a temporary directory (--exit-with-parent, killed at
 * teardown), opens the real source on it, and hydrates a clone with the
 * copy workers, against what the server's plugin is known to hold:
 *   - pattern: every 8-byte word is its own offset, big-endian, so dest
 *     is checked without reading the source again;
 *   - sparse-random: mostly zero with random data runs, so the zero scan
 *     and the copies both run; checked against the source read back.
 * Skipped (visibly) when nbdkit is not installed.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "aclone/hydrator.h"
#include "clone-internal.h"
#include "fakes.h"

#define SIZE (16u << 20)

struct fx {
  char *dir, *sock, *pidfile, *dest, *meta;
  _Atomic unsigned ring_conns;     /* "source connection N open" logged */
  _Atomic bool no_ring;            /* "io_uring unavailable" logged */
  pid_t nbdkit;
  struct aclone_source *src;
  struct aclone_clone *c;
};

/* The clone's log: tells whether the ring engine ran (it alone opens
 * asynchronous source connections).
 */
static void
log_sink (void *opaque, int level, const char *msg)
{
  struct fx *f = opaque;
  (void) level;
  if (strstr (msg, "hydrator: source connection") && strstr (msg, "open"))
    atomic_fetch_add (&f->ring_conns, 1);
  if (strstr (msg, "io_uring unavailable"))
    atomic_store (&f->no_ring, true);
}

/* Start nbdkit with these plugin arguments; wait for its pid file. */
static bool
server_start (struct fx *f, const char *const *plugin_args)
{
  const char *argv[32] = { "nbdkit", "-f", "--exit-with-parent", "-U", f->sock,
                           "-P", f->pidfile };
  size_t n = 7;

  for (size_t i = 0; plugin_args[i] && n < 31; i++)
    argv[n++] = plugin_args[i];
  argv[n] = NULL;
  f->nbdkit = fork ();
  if (f->nbdkit == 0) {
    int null = open ("/dev/null", O_WRONLY);
    dup2 (null, STDOUT_FILENO);
    execvp ("nbdkit", (char **) argv);
    _exit (127);
  }
  for (int i = 0; i < 2000; i++) {             /* 20 s */
    struct stat st;
    int status;
    if (stat (f->pidfile, &st) == 0)
      return true;
    if (waitpid (f->nbdkit, &status, WNOHANG) == f->nbdkit) {
      f->nbdkit = 0;
      return false;
    }
    usleep (10000);
  }
  return false;
}

static int
setup (void **state)
{
  struct fx *f = calloc (1, sizeof *f);
  f->dir = make_tmpdir ();
  f->sock = path_join (f->dir, "src.sock");
  f->pidfile = path_join (f->dir, "src.pid");
  f->dest = path_join (f->dir, "dest");
  f->meta = path_join (f->dir, "meta");
  *state = f;
  return 0;
}

static int
teardown (void **state)
{
  struct fx *f = *state;

  if (f->c) {
    aclone_hydrator_stop (f->c);
    aclone_clone_close (f->c);
  }
  if (f->nbdkit > 0) {
    kill (f->nbdkit, SIGTERM);
    waitpid (f->nbdkit, NULL, 0);
  }
  rm_rf (f->dir);
  free (f->dir); free (f->sock); free (f->pidfile); free (f->dest); free (f->meta);
  free (f);
  return 0;
}

/* Serve plugin_args, open the clone on it and hydrate it to the end;
 * before_start (if any) sees the clone before the hydrator starts.
 */
static void
hydrate_with (struct fx *f, const char *const *plugin_args,
              struct aclone_hydrator_config hc,
              void (*before_start) (struct fx *))
{
  struct aclone_error err;
  char uri[256];

  if (system ("command -v nbdkit >/dev/null") != 0)
    skip ();
  assert_true (server_start (f, plugin_args));
  snprintf (uri, sizeof uri, "nbd+unix:///?socket=%s", f->sock);
  struct aclone_source_config scfg = { .uri = uri, .connections = 4,
                                       .timeout_s = 30 };
  assert_int_equal (aclone_source_nbd_open (&scfg, &f->src, &err), 0);
  assert_non_null (f->src->ops->aio_connect);  /* so: the ring engine */
  struct aclone_clone_config cfg = { .dest_path = f->dest, .meta_path = f->meta,
                                     .region_size = 64 * 1024,
                                     .copy_on_read = true };
  assert_int_equal (aclone_clone_open (&cfg, f->src, log_sink, f, &f->c, &err), 0);
  assert_int_equal (aclone_clone_start (f->c, &err), 0);
  if (before_start)
    before_start (f);
  aclone_hydrator_set_controls (f->c, &hc);
  assert_int_equal (aclone_hydrator_start (f->c, &hc, &err), 0);
  for (int i = 0; i < 6000 && aclone_clone_mode (f->c) != ACLONE_MODE_COMPLETE; i++)
    usleep (10000);                            /* 60 s: a hang, not a speed */
  assert_int_equal (aclone_clone_mode (f->c), ACLONE_MODE_COMPLETE);
  aclone_hydrator_stop (f->c);
  assert_null (f->c->src);                     /* released */
  assert_int_equal (atomic_load (&f->c->errors), 0);
  assert_false (atomic_load (&f->no_ring));
  assert_true (atomic_load (&f->ring_conns) > 0);  /* the ring engine ran */
}

static void
hydrate (struct fx *f, const char *const *plugin_args,
         struct aclone_hydrator_config hc)
{
  hydrate_with (f, plugin_args, hc, NULL);
}

static unsigned char *
read_dest (struct fx *f)
{
  unsigned char *d = malloc (SIZE);
  int fd = open (f->dest, O_RDONLY);
  assert_true (fd >= 0);
  assert_int_equal (pread (fd, d, SIZE, 0), SIZE);
  close (fd);
  return d;
}

/* Dest holds nbdkit pattern's bytes: each word its own offset. */
static void
check_pattern (struct fx *f)
{
  unsigned char *d = read_dest (f);
  for (uint64_t off = 0; off < SIZE; off += 8) {
    uint64_t w;
    memcpy (&w, d + off, 8);
    if (be64toh (w) != off)
      fail_msg ("dest word at %llu is %llx", (unsigned long long) off,
                (unsigned long long) be64toh (w));
  }
  free (d);
}

/* Every byte copied, through several workers, batches and connections,
 * in small batches so that many are in flight.
 */
static void
test_ring_copies_pattern (void **state)
{
  struct fx *f = *state;
  static const char *const args[] = { "pattern", "16M", NULL };
  struct aclone_hydrator_config hc = ACLONE_HYDRATOR_DEFAULTS;

  hc.batch = 256 * 1024;
  hydrate (f, args, hc);
  assert_int_equal (atomic_load (&f->c->bytes_copied), SIZE);
  check_pattern (f);
  /* No client: every batch written in one piece. */
  assert_int_equal (atomic_load (&f->c->copy_write_cuts), 0);
}

/* Zero extents skipped without copying, data runs copied, dest equal to
 * the source; with depth 1 the ring still completes.
 */
static void
test_ring_sparse_source (void **state)
{
  struct fx *f = *state;
  static const char *const args[] = { "sparse-random", "16M", "percent=10",
                                      "runlength=262144", "seed=7", NULL };
  struct aclone_hydrator_config hc = ACLONE_HYDRATOR_DEFAULTS;
  struct aclone_source *check;
  struct aclone_error err;
  char uri[256];

  hc.depth = 1;
  hydrate (f, args, hc);
  uint64_t copied = atomic_load (&f->c->bytes_copied);
  uint64_t skipped = atomic_load (&f->c->bytes_skipped);
  assert_int_equal (copied + skipped, SIZE);
  assert_true (skipped > SIZE / 2);            /* ~90% zero */
  assert_true (copied > 0);
  /* The source as another client reads it. */
  snprintf (uri, sizeof uri, "nbd+unix:///?socket=%s", f->sock);
  struct aclone_source_config scfg = { .uri = uri, .connections = 1,
                                       .timeout_s = 30 };
  assert_int_equal (aclone_source_nbd_open (&scfg, &check, &err), 0);
  unsigned char *want = malloc (SIZE), *d = read_dest (f);
  for (uint64_t off = 0; off < SIZE; off += 4 << 20)
    assert_int_equal (aclone_source_pread (check, want + off, 4 << 20, off), 0);
  aclone_source_close (check);
  assert_memory_equal (d, want, SIZE);
  free (want);
  free (d);
}

/* A client request in progress from start to end, as far as the
 * hydrator can tell.
 */
static void
client_busy (struct fx *f)
{
  atomic_fetch_add (&f->c->fg_active, 1);
}

/* While clients are served, copies are written in pieces (each one a
 * shorter stretch of kernel work a client thread cannot preempt), and
 * the pieces add up: dest is whole.
 */
static void
test_ring_cuts_writes_for_clients (void **state)
{
  struct fx *f = *state;
  static const char *const args[] = { "pattern", "16M", NULL };
  struct aclone_hydrator_config hc = ACLONE_HYDRATOR_DEFAULTS;

  hydrate_with (f, args, hc, client_busy);
  atomic_fetch_sub (&f->c->fg_active, 1);
  /* Half batches (512 KiB) in 64 KiB pieces: 7 cuts each, unless the
   * progress floor stepped in; more than 2 a batch in any case.
   */
  uint64_t cuts = atomic_load (&f->c->copy_write_cuts);
  if (cuts <= 2 * (SIZE / (512u << 10)))
    fail_msg ("%llu write cuts", (unsigned long long) cuts);
  assert_int_equal (atomic_load (&f->c->bytes_copied), SIZE);
  check_pattern (f);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown (test_ring_copies_pattern, setup, teardown),
    cmocka_unit_test_setup_teardown (test_ring_sparse_source, setup, teardown),
    cmocka_unit_test_setup_teardown (test_ring_cuts_writes_for_clients, setup, teardown),
  };
  /* ACLONE_TEST_FILTER=NAME (a glob) runs only the tests it matches. */
  cmocka_set_test_filter (getenv ("ACLONE_TEST_FILTER"));
  return cmocka_run_group_tests (tests, NULL, NULL);
}
