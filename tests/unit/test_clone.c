/* Unit tests: clone semantics (src/clone.c) and the hydrator's plain
 * engine (src/hydrator.c), over a fake source, a real dest file and a
 * real metadata file.  Every data test compares against a model.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#endif

#include "clone-internal.h"
#include "writebehind.h"
#include "aclone/hydrator.h"
#include "fakes.h"

#define RS      65536u
#define SIZE    ((4u << 20) + 1234)     /* odd tail region */
#define REGIONS ((SIZE + RS - 1) / RS)

struct fx {
  char *dir, *dest, *meta;
  struct fake_source *src;
  struct aclone_clone *c;
  unsigned char *model;
};

static int
setup (void **state)
{
  struct fx *f = calloc (1, sizeof *f);
  f->dir = make_tmpdir ();
  f->dest = path_join (f->dir, "dest");
  f->meta = path_join (f->dir, "meta");
  f->src = fake_source_new (SIZE, 1, 0);
  f->model = malloc (SIZE);
  memcpy (f->model, f->src->data, SIZE);
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
  fake_source_free (f->src);
  rm_rf (f->dir);
  free (f->dir); free (f->dest); free (f->meta); free (f->model);
  free (f);
  return 0;
}

static int
open_clone (struct fx *f, bool cor, struct aclone_error *err)
{
  struct aclone_clone_config cfg = {
    .dest_path = f->dest, .meta_path = f->meta, .region_size = RS,
    .copy_on_read = cor,
  };
  return aclone_clone_open (&cfg, f->src ? &f->src->base : NULL, NULL, NULL,
                            &f->c, err);
}

static void
must_open (struct fx *f, bool cor)
{
  struct aclone_error err;
  if (open_clone (f, cor, &err) < 0)
    fail_msg ("open: %s", err.msg);
}

static void
reopen (struct fx *f, bool cor)
{
  aclone_hydrator_stop (f->c);
  aclone_clone_close (f->c);
  f->c = NULL;
  f->src->closed = false;
  must_open (f, cor);
}

/* The whole device must equal the model. */
static void
check_model (struct fx *f)
{
  unsigned char *buf = malloc (SIZE);
  assert_int_equal (aclone_clone_pread (f->c, buf, SIZE, 0), 0);
  for (size_t i = 0; i < SIZE; i++)
    if (buf[i] != f->model[i])
      fail_msg ("byte %zu differs: clone %02x model %02x", i, buf[i], f->model[i]);
  free (buf);
}

static void
read_file (const char *path, void *buf, size_t len, off_t off)
{
  int fd = open (path, O_RDONLY);
  assert_true (fd >= 0);
  assert_int_equal (pread (fd, buf, len, off), (ssize_t) len);
  close (fd);
}

static void
test_read_copy_on_read (void **state)
{
  struct fx *f = *state;
  unsigned char buf[3000], d[RS];

  must_open (f, true);
  assert_int_equal (aclone_clone_pread (f->c, buf, sizeof buf, RS + 100), 0);
  assert_memory_equal (buf, f->model + RS + 100, sizeof buf);
  assert_int_equal (f->src->reads, 1);
  assert_true (aclone_map_hydrated (&f->c->map, 1));
  assert_false (aclone_map_hydrated (&f->c->map, 2));
  read_file (f->dest, d, RS, RS);                 /* whole region on dest */
  assert_memory_equal (d, f->model + RS, RS);
  assert_int_equal (aclone_clone_pread (f->c, buf, sizeof buf, RS + 100), 0);
  assert_int_equal (f->src->reads, 1);            /* served from dest */
  /* Spanning hydrated and unhydrated regions, unaligned at both ends. */
  unsigned char big[3 * RS];
  assert_int_equal (aclone_clone_pread (f->c, big, sizeof big, RS - 7), 0);
  assert_memory_equal (big, f->model + RS - 7, sizeof big);
  /* The tail region is short. */
  assert_int_equal (aclone_clone_pread (f->c, buf, 1234, SIZE - 1234), 0);
  assert_memory_equal (buf, f->model + SIZE - 1234, 1234);
  assert_true (aclone_map_hydrated (&f->c->map, REGIONS - 1));
  /* Copied: region 1, then 0, 2 and 3, then the tail; all on read. */
  assert_int_equal (atomic_load (&f->c->bytes_copied), 4 * RS + 1234);
  assert_int_equal (aclone_clone_bytes_copied_on_read (f->c), 4 * RS + 1234);
}

/* Make dest refuse writes from now on (EBADF): the clone's fd becomes a
 * read-only one of the same file.
 */
static void
dest_refuses_writes (struct fx *f)
{
  int fd = open (f->dest, O_RDONLY | O_CLOEXEC);
  assert_true (fd >= 0);
  assert_int_equal (dup2 (fd, f->c->dest->fd), f->c->dest->fd);
  close (fd);
}

/* A copy-on-read whose dest write fails still serves the read; the
 * region stays unhydrated, the error is counted, D is no longer known
 * zero, and copy-on-read rests (the next miss does not copy).
 */
static void
test_read_copy_on_read_dest_fails (void **state)
{
  struct fx *f = *state;
  unsigned char buf[3000];

  must_open (f, true);
  dest_refuses_writes (f);
  assert_int_equal (aclone_clone_pread (f->c, buf, sizeof buf, RS + 100), 0);
  assert_memory_equal (buf, f->model + RS + 100, sizeof buf);
  assert_false (aclone_map_hydrated (&f->c->map, 1));
  assert_int_equal (atomic_load (&f->c->errors), 1);
  assert_false (atomic_load (&f->c->dest_zero));
  assert_int_equal (aclone_clone_pread (f->c, buf, sizeof buf, 3 * RS), 0);
  assert_memory_equal (buf, f->model + 3 * RS, sizeof buf);
  assert_int_equal (atomic_load (&f->c->errors), 1);   /* no copy tried */
  assert_int_equal (atomic_load (&f->c->bytes_copied), 0);
  assert_int_equal (aclone_clone_bytes_copied_on_read (f->c), 0);
}

/* Started, copy-on-read writes behind its replies: the reply holds the
 * source's data; the region is hydrated once the write lands (at the
 * latest when shutdown drains the writer), and D holds it.  A write that
 * fails behind the reply leaves its region unhydrated.
 */
static void
test_read_copy_on_read_behind (void **state)
{
  struct fx *f = *state;
  struct aclone_error err;
  unsigned char buf[3000], d[RS];

  must_open (f, true);
  assert_int_equal (aclone_clone_start (f->c, &err), 0);
  assert_non_null (f->c->wb);
  assert_int_equal (aclone_clone_pread (f->c, buf, sizeof buf, RS + 100), 0);
  assert_memory_equal (buf, f->model + RS + 100, sizeof buf);
  for (int i = 0; i < 2000 && !aclone_map_hydrated (&f->c->map, 1); i++)
    usleep (1000);
  assert_true (aclone_map_hydrated (&f->c->map, 1));
  read_file (f->dest, d, RS, RS);
  assert_memory_equal (d, f->model + RS, RS);
  dest_refuses_writes (f);
  assert_int_equal (aclone_clone_pread (f->c, buf, sizeof buf, 2 * RS), 0);
  assert_memory_equal (buf, f->model + 2 * RS, sizeof buf);
  assert_int_equal (aclone_clone_shutdown (f->c, 1000), 0);
  assert_int_equal (aclone_writebehind_queued (f->c->wb), 2);
  assert_int_equal (aclone_writebehind_pending (f->c->wb), 0);
  assert_false (aclone_map_hydrated (&f->c->map, 2));
  assert_int_equal (atomic_load (&f->c->errors), 1);
  assert_int_equal (atomic_load (&f->c->bytes_copied), RS);
  assert_int_equal (aclone_clone_bytes_copied_on_read (f->c), RS);
  assert_int_equal (atomic_load (&f->c->in_flight), 0);
}

static void
land_nothing (void *opaque, const struct aclone_wb_copy *w)
{
  (void) opaque;
  (void) w;
}

/* What a write-behind's settle callback was told, in order. */
struct settle_log {
  pthread_mutex_t lock;
  unsigned n;
  struct { uint64_t off; size_t len; bool end; } e[64];
};

static void
settle_record (void *opaque, uint64_t off, size_t len, bool end)
{
  struct settle_log *log = opaque;

  pthread_mutex_lock (&log->lock);
  if (log->n < 64)
    log->e[log->n++] = (typeof (log->e[0])) { off, len, end };
  pthread_mutex_unlock (&log->lock);
}

static unsigned
settle_count (struct settle_log *log)
{
  pthread_mutex_lock (&log->lock);
  unsigned n = log->n;
  pthread_mutex_unlock (&log->lock);
  return n;
}

/* Each landed copy begins to settle, in landing order, and ends once
 * more than 4 MiB have begun after it, oldest first; when no more come,
 * the rest end too.
 */
static void
test_writebehind_settles (void **state)
{
  struct settle_log log = { .lock = PTHREAD_MUTEX_INITIALIZER };
  struct aclone_wb_ops ops = { .land = land_nothing, .settle = settle_record };
  struct aclone_writebehind *wb;
  size_t cap;

  (void) state;
  assert_int_equal (aclone_writebehind_start (&ops, &log, 64 << 20, &wb), 0);
  for (uint64_t i = 0; i < 20; i++) {
    char *buf = aclone_writebehind_buf (wb, 1 << 20, &cap);
    struct aclone_wb_copy w = { i, 1, i << 20, 1 << 20, buf, cap };
    assert_true (aclone_writebehind_queue (wb, &w));
  }
  for (int i = 0; i < 5000 && settle_count (&log) < 40; i++)
    usleep (1000);
  usleep (20000);                    /* nothing more comes */
  assert_int_equal (settle_count (&log), 40);
  uint64_t begun = 0, ended = 0;
  for (unsigned k = 0; k < log.n; k++) {
    assert_int_equal (log.e[k].len, 1 << 20);
    if (!log.e[k].end)
      assert_int_equal (log.e[k].off, (begun++) << 20);
    else {
      assert_int_equal (log.e[k].off, (ended++) << 20);
      assert_true (ended <= begun);
    }
    assert_true (begun - ended <= 5);          /* 4 MiB, and the new one */
  }
  assert_int_equal (begun, 20);
  assert_int_equal (ended, 20);
  aclone_writebehind_free (wb);
}

/* CPU time of this thread, ns. */
static uint64_t
thread_cpu_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_THREAD_CPUTIME_ID, &ts);
  return (uint64_t) ts.tv_sec * 1000000000u + (uint64_t) ts.tv_nsec;
}

/* A landing that costs the writer 300 us of CPU. */
static void
land_burning (void *opaque, const struct aclone_wb_copy *w)
{
  uint64_t until = thread_cpu_ns () + 300000;

  (void) opaque;
  (void) w;
  while (thread_cpu_ns () < until)
    ;
}

static void *
hog (void *arg)
{
  atomic_bool *stop = arg;

  while (!atomic_load (stop))
    ;
  return NULL;
}

static bool
wb_landed (struct aclone_writebehind *wb, int ms)
{
  for (int i = 0; i < ms && aclone_writebehind_pending (wb) > 0; i++)
    usleep (1000);
  return aclone_writebehind_pending (wb) == 0;
}

static void
queue_small (struct aclone_writebehind *wb, unsigned n)
{
  size_t cap;

  for (unsigned i = 0; i < n; i++) {
    char *buf = aclone_writebehind_buf (wb, 64 << 10, &cap);
    struct aclone_wb_copy w = { i, 1, (uint64_t) i << 16, 64 << 10, buf, cap };
    assert_true (aclone_writebehind_queue (wb, &w));
  }
}

static bool
may_rest_flag (void *opaque)
{
  return atomic_load ((atomic_bool *) opaque);
}

/* On a CPU another thread keeps busy, the writer (nice 10) waits for it
 * longer than it runs, and rests between landings; not while may_rest
 * says someone waits, nor for a while after aclone_writebehind_hurry.
 */
static void
test_writebehind_rests_when_contended (void **state)
{
  struct aclone_writebehind *wb;
  cpu_set_t saved, one;
  pthread_t t;
  atomic_bool stop = false, may = true;
  struct aclone_wb_ops ops = { .land = land_burning, .may_rest = may_rest_flag };

  (void) state;
#ifdef RUNNING_ON_VALGRIND
  /* Valgrind runs one thread at a time under its own lock: the kernel
   * sees no thread waiting for a CPU.
   */
  if (RUNNING_ON_VALGRIND)
    skip ();
#endif
  if (access ("/proc/thread-self/schedstat", R_OK) != 0)
    skip ();                         /* no scheduler statistics: no rests */
  /* One CPU for the threads created from here: the hog and the writer. */
  assert_int_equal (sched_getaffinity (0, sizeof saved, &saved), 0);
  CPU_ZERO (&one);
  for (int cpu = 0; cpu < CPU_SETSIZE; cpu++)
    if (CPU_ISSET (cpu, &saved)) {
      CPU_SET (cpu, &one);
      break;
    }
  assert_int_equal (sched_setaffinity (0, sizeof one, &one), 0);
  assert_int_equal (pthread_create (&t, NULL, hog, &stop), 0);
  assert_int_equal (aclone_writebehind_start (&ops, &may, 16 << 20, &wb), 0);
  assert_int_equal (sched_setaffinity (0, sizeof saved, &saved), 0);

  queue_small (wb, 10);
  assert_true (wb_landed (wb, 10000));
  uint64_t rests = aclone_writebehind_rests (wb);
  assert_true (rests > 0);

  /* A hurry holds off rests for 200 ms: landings within it take none.
   * (A round that took longer, the machine stalling, says nothing.)
   */
  bool judged = false;
  for (int round = 0; round < 10 && !judged; round++) {
    uint64_t r0 = aclone_writebehind_rests (wb), t0 = aclone_now_ns ();
    aclone_writebehind_hurry (wb);
    queue_small (wb, 5);
    assert_true (wb_landed (wb, 10000));
    if (aclone_now_ns () - t0 < 150000000u) {
      assert_int_equal (aclone_writebehind_rests (wb), r0);
      judged = true;
    }
  }
  assert_true (judged);

  /* A hurry ends a rest under way: the next landing comes long before
   * the rest (50 ms) would have ended.  (Judged on a round where it came
   * within 25 ms; without the cut, none does.)
   */
  bool cut = false;
  for (int round = 0; round < 10 && !cut; round++) {
    usleep (300000);                 /* the last hurry long over */
    uint64_t r0 = aclone_writebehind_rests (wb);
    queue_small (wb, 40);
    uint64_t t0 = aclone_now_ns ();
    while (aclone_writebehind_rests (wb) == r0 &&
           aclone_now_ns () - t0 < 5000000000u)
      usleep (100);
    assert_true (aclone_writebehind_rests (wb) > r0);
    uint64_t p0 = aclone_writebehind_pending (wb);
    t0 = aclone_now_ns ();
    aclone_writebehind_hurry (wb);
    while (aclone_writebehind_pending (wb) == p0 && p0 > 0 &&
           aclone_now_ns () - t0 < 1000000000u)
      usleep (100);
    cut = p0 > 0 && aclone_now_ns () - t0 < 25000000u;
    assert_true (wb_landed (wb, 10000));
  }
  assert_true (cut);

  /* Someone waits: no rests, however long (the hurry long over). */
  usleep (300000);
  atomic_store (&may, false);
  uint64_t r0 = aclone_writebehind_rests (wb);
  queue_small (wb, 20);
  assert_true (wb_landed (wb, 10000));
  assert_int_equal (aclone_writebehind_rests (wb), r0);

  atomic_store (&stop, true);
  pthread_join (t, NULL);
  aclone_writebehind_free (wb);
}

/* A landed copy's buffer is the next miss's, a size class a list (powers
 * of two from 64 KiB); spares are kept up to 8 MiB, the rest freed; a
 * miss of a new size evicts a spare of another when there is no room; a
 * buffer given back with a size no class has is not kept; a stopped
 * write-behind keeps none.
 */
static void
test_writebehind_spares (void **state)
{
  struct aclone_writebehind *wb;
  size_t cap, cap2;
  char *bufs[9];

  (void) state;
  struct aclone_wb_ops ops = { .land = land_nothing };
  assert_int_equal (aclone_writebehind_start (&ops, NULL, 32 << 20, &wb), 0);
  char *a = aclone_writebehind_buf (wb, 100000, &cap);
  assert_non_null (a);
  assert_int_equal (cap, 128 << 10);
  struct aclone_wb_copy w = { 0, 1, 0, 100000, a, cap };
  assert_true (aclone_writebehind_queue (wb, &w));
  for (int i = 0; i < 2000 && aclone_writebehind_pending (wb) > 0; i++)
    usleep (1000);
  assert_int_equal (aclone_writebehind_pending (wb), 0);
  assert_int_equal (aclone_writebehind_spare_bytes (wb), 128 << 10);
  char *b = aclone_writebehind_buf (wb, 64 << 10, &cap2);   /* another size */
  assert_int_equal (cap2, 64 << 10);
  assert_ptr_not_equal (b, a);
  assert_ptr_equal (aclone_writebehind_buf (wb, 128 << 10, &cap), a);
  assert_int_equal (aclone_writebehind_spare_bytes (wb), 0);
  aclone_writebehind_buf_put (wb, a, cap);
  aclone_writebehind_buf_put (wb, b, cap2);
  assert_int_equal (aclone_writebehind_spare_bytes (wb), 192 << 10);

  for (int i = 0; i < 9; i++)
    bufs[i] = aclone_writebehind_buf (wb, 1 << 20, &cap);
  for (int i = 0; i < 9; i++)
    aclone_writebehind_buf_put (wb, bufs[i], cap);
  assert_int_equal (aclone_writebehind_spare_bytes (wb),
                    (192 << 10) + 7 * (1 << 20));
  /* 2 MiB: no spare of that size and no room: two 1 MiB ones go. */
  char *big = aclone_writebehind_buf (wb, 2 << 20, &cap);
  assert_int_equal (aclone_writebehind_spare_bytes (wb),
                    (192 << 10) + 5 * (1 << 20));
  aclone_writebehind_buf_put (wb, big, cap);
  assert_int_equal (aclone_writebehind_spare_bytes (wb),
                    (192 << 10) + 7 * (1 << 20));
  aclone_writebehind_buf_put (wb, malloc (100000), 100000);    /* not kept */
  assert_int_equal (aclone_writebehind_spare_bytes (wb),
                    (192 << 10) + 7 * (1 << 20));
  aclone_writebehind_stop (wb);
  assert_int_equal (aclone_writebehind_spare_bytes (wb), 0);
  aclone_writebehind_buf_put (wb, aclone_writebehind_buf (wb, 1 << 20, &cap), cap);
  assert_int_equal (aclone_writebehind_spare_bytes (wb), 0);
  aclone_writebehind_free (wb);
}

static void
test_read_without_copy (void **state)
{
  struct fx *f = *state;
  unsigned char buf[5000];

  must_open (f, false);
  assert_int_equal (aclone_clone_pread (f->c, buf, sizeof buf, 3 * RS - 10), 0);
  assert_memory_equal (buf, f->model + 3 * RS - 10, sizeof buf);
  assert_false (aclone_map_hydrated (&f->c->map, 2));
  assert_int_equal (f->src->read_bytes, sizeof buf);    /* only what was asked */
  assert_int_equal (atomic_load (&f->c->map.nr_hydrated), 0);
}

static void
test_write_whole_regions_no_copy (void **state)
{
  struct fx *f = *state;
  unsigned char *buf = malloc (2 * RS);

  must_open (f, true);
  fill_pattern (buf, 2 * RS, 99, 0);
  assert_int_equal (aclone_clone_pwrite (f->c, buf, 2 * RS, 4 * RS, false), 0);
  assert_int_equal (f->src->reads, 0);
  assert_true (aclone_map_hydrated (&f->c->map, 4));
  assert_true (aclone_map_hydrated (&f->c->map, 5));
  memcpy (f->model + 4 * RS, buf, 2 * RS);
  check_model (f);
  /* The tail region written whole (it is short) copies nothing either. */
  unsigned reads = f->src->reads;
  assert_int_equal (aclone_clone_pwrite (f->c, buf, 1234, SIZE - 1234, false), 0);
  memcpy (f->model + SIZE - 1234, buf, 1234);
  assert_int_equal (f->src->reads, reads);
  free (buf);
}

static void
test_write_partial_rmw (void **state)
{
  struct fx *f = *state;
  unsigned char buf[100];
  unsigned char d[RS];

  must_open (f, true);
  memset (buf, 0xab, sizeof buf);
  assert_int_equal (aclone_clone_pwrite (f->c, buf, sizeof buf, 5, false), 0);
  assert_int_equal (f->src->reads, 1);
  assert_true (aclone_map_hydrated (&f->c->map, 0));
  memcpy (f->model + 5, buf, sizeof buf);
  read_file (f->dest, d, RS, 0);
  assert_memory_equal (d, f->model, RS);     /* dest holds the merged region */
  /* A write straddling two unhydrated regions: two RMWs. */
  unsigned char s[RS];
  fill_pattern (s, RS, 7, 0);
  assert_int_equal (aclone_clone_pwrite (f->c, s, RS, 2 * RS + RS / 2, false), 0);
  memcpy (f->model + 2 * RS + RS / 2, s, RS);
  assert_int_equal (f->src->reads, 3);
  check_model (f);
}

static void
test_zero_and_trim (void **state)
{
  struct fx *f = *state;

  must_open (f, true);
  /* Whole unhydrated regions: hydrated with no copy. */
  assert_int_equal (aclone_clone_zero (f->c, 2 * RS, 6 * RS, false, false, false), 0);
  assert_int_equal (f->src->reads, 0);
  memset (f->model + 6 * RS, 0, 2 * RS);
  /* Fast zero of a partial unhydrated region is refused, changes nothing. */
  assert_int_equal (aclone_clone_zero (f->c, 100, 9 * RS + 1, false, true, false), -ENOTSUP);
  assert_false (aclone_map_hydrated (&f->c->map, 9));
  /* ...but fast zero of whole regions is fine. */
  assert_int_equal (aclone_clone_zero (f->c, RS, 10 * RS, true, true, false), 0);
  memset (f->model + 10 * RS, 0, RS);
  /* Trim partial: region hydrates, range reads zero. */
  assert_int_equal (aclone_clone_zero (f->c, 1000, 12 * RS + 500, true, false, false), 0);
  memset (f->model + 12 * RS + 500, 0, 1000);
  assert_int_equal (f->src->reads, 1);
  /* Zero a hydrated range. */
  assert_int_equal (aclone_clone_zero (f->c, 70000, 12 * RS + 3, false, false, false), 0);
  memset (f->model + 12 * RS + 3, 0, 70000);
  check_model (f);
  assert_true (atomic_load (&f->c->bytes_skipped) >= 3 * RS);
}

static void
test_flush_commits (void **state)
{
  struct fx *f = *state;
  unsigned char buf[RS];

  must_open (f, true);
  fill_pattern (buf, RS, 3, 0);
  assert_int_equal (aclone_clone_pwrite (f->c, buf, RS, 3 * RS, false), 0);
  assert_false (aclone_meta_bit (f->c->meta, ACLONE_BIT_HYDRATED, 3));
  assert_int_equal (aclone_clone_flush (f->c), 0);
  assert_true (aclone_meta_bit (f->c->meta, ACLONE_BIT_HYDRATED, 3));
  assert_true (aclone_meta_bit (f->c->meta, ACLONE_BIT_WRITTEN, 3));
  /* FUA commits too, before the call returns: writes and zeroes. */
  assert_int_equal (aclone_clone_pwrite (f->c, buf, 10, 5 * RS, true), 0);
  assert_true (aclone_meta_bit (f->c->meta, ACLONE_BIT_HYDRATED, 5));
  assert_true (aclone_meta_bit (f->c->meta, ACLONE_BIT_WRITTEN, 5));
  assert_int_equal (aclone_clone_zero (f->c, RS, 9 * RS, true, false, true), 0);
  assert_true (aclone_meta_bit (f->c->meta, ACLONE_BIT_HYDRATED, 9));
  assert_true (aclone_meta_bit (f->c->meta, ACLONE_BIT_WRITTEN, 9));
  /* A copy-on-read region is hydrated but not written. */
  assert_int_equal (aclone_clone_pread (f->c, buf, 10, 7 * RS), 0);
  assert_int_equal (aclone_clone_flush (f->c), 0);
  assert_true (aclone_meta_bit (f->c->meta, ACLONE_BIT_HYDRATED, 7));
  assert_false (aclone_meta_bit (f->c->meta, ACLONE_BIT_WRITTEN, 7));
}

static void
copy_file (const char *from, const char *to)
{
  int in = open (from, O_RDONLY), out = open (to, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  char buf[65536];
  ssize_t n;
  assert_true (in >= 0 && out >= 0);
  while ((n = read (in, buf, sizeof buf)) > 0)
    assert_int_equal (write (out, buf, n), n);
  close (in);
  close (out);
}

/* A crash after an unflushed write: the region is not committed, so the
 * clone reads the source there again; the flushed write survives.
 */
static void
test_crash_loses_only_unflushed (void **state)
{
  struct fx *f = *state;
  unsigned char a[RS], b[RS];

  must_open (f, true);
  fill_pattern (a, RS, 11, 0);
  fill_pattern (b, RS, 12, 0);
  assert_int_equal (aclone_clone_pwrite (f->c, a, RS, 1 * RS, false), 0);
  assert_int_equal (aclone_clone_flush (f->c), 0);
  assert_int_equal (aclone_clone_pwrite (f->c, b, RS, 2 * RS, false), 0);
  /* "Crash": take the files as they are now, without the close's commit. */
  char *cd = path_join (f->dir, "crash-dest"), *cm = path_join (f->dir, "crash-meta");
  copy_file (f->dest, cd);
  copy_file (f->meta, cm);
  aclone_clone_close (f->c);
  f->c = NULL;
  struct aclone_clone_config cfg = { .dest_path = cd, .meta_path = cm,
                                     .copy_on_read = true };
  struct aclone_error err;
  f->src->closed = false;
  assert_int_equal (aclone_clone_open (&cfg, &f->src->base, NULL, NULL, &f->c, &err), 0);
  memcpy (f->model + RS, a, RS);            /* flushed: kept */
  check_model (f);                          /* region 2: source data again */
  free (cd);
  free (cm);
}

static void
test_resume_with_changed_source (void **state)
{
  struct fx *f = *state;
  unsigned char buf[RS];

  must_open (f, true);
  assert_int_equal (aclone_clone_pread (f->c, buf, 10, 0), 0);          /* COR */
  fill_pattern (buf, RS, 5, 0);
  assert_int_equal (aclone_clone_pwrite (f->c, buf, RS, 2 * RS, false), 0);
  memcpy (f->model + 2 * RS, buf, RS);
  aclone_clone_close (f->c);                /* clean stop commits */
  f->c = NULL;
  /* Change the source everywhere. */
  fill_pattern (f->src->data, SIZE, 77, 0);
  memcpy (f->model + RS, f->src->data + RS, RS);
  memcpy (f->model + 3 * RS, f->src->data + 3 * RS, SIZE - 3 * RS);
  f->src->closed = false;
  must_open (f, true);
  check_model (f);
  assert_int_equal (aclone_clone_pread (f->c, buf, 10, 0), 0);
  assert_int_equal (aclone_clone_pread (f->c, buf, 10, 2 * RS), 0);
}

struct writer_arg {
  struct aclone_clone *c;
  const unsigned char *buf;
  int ret;
};

static void *
cache_thread (void *arg)
{
  struct writer_arg *w = arg;
  w->ret = aclone_clone_cache (w->c, 4 * RS, 0);
  return NULL;
}

/* Invariant 3: a write to a region being copied waits, and the copy
 * never overwrites it.
 */
static void
test_copy_never_overwrites_write (void **state)
{
  struct fx *f = *state;
  unsigned char buf[RS];
  pthread_t t;

  must_open (f, true);
  f->src->delay_us = 300000;
  struct writer_arg w = { f->c, NULL, 0 };
  pthread_create (&t, NULL, cache_thread, &w);
  usleep (100000);                          /* the copy holds regions 0..3 */
  fill_pattern (buf, RS, 21, 0);
  assert_int_equal (aclone_clone_pwrite (f->c, buf, RS, RS, false), 0);
  pthread_join (t, NULL);
  assert_int_equal (w.ret, 0);
  f->src->delay_us = 0;
  memcpy (f->model + RS, buf, RS);
  check_model (f);
}

struct cache_arg {
  struct aclone_clone *c;
  uint64_t off;
  int ret;
};

static void *
cache_4_regions (void *arg)
{
  struct cache_arg *a = arg;
  a->ret = aclone_clone_cache (a->c, 4 * RS, a->off);
  return NULL;
}

/* Invariant 3, without relying on timing: while a copy is known to be
 * inside its source read (holding the region lock), a partial write and
 * a whole-region write into its range return only after the copy is done,
 * and the data is the write's.
 */
static void
test_write_waits_for_copy_in_flight (void **state)
{
  struct fx *f = *state;
  unsigned char buf[RS];

  must_open (f, true);
  for (int k = 0; k < 2; k++) {
    bool partial = k == 0;
    uint64_t first = 4 * k;                   /* regions 0..3, then 4..7 */
    struct cache_arg a = { f->c, first * RS, 1 };
    pthread_t t;

    atomic_store (&f->src->delay_us, 300000);
    pthread_create (&t, NULL, cache_4_regions, &a);
    /* in_flight counts the copy from before its source read until its
     * dest write is done, all under the region lock.
     */
    for (int i = 0; i < 10000 && atomic_load (&f->c->in_flight) == 0; i++)
      usleep (1000);
    assert_true (atomic_load (&f->c->in_flight) > 0);
    /* The copy sleeps with the delay it read; a read-modify-write
     * need not.
     */
    atomic_store (&f->src->delay_us, 0);
    uint64_t off = (first + 1) * RS + (partial ? 100 : 0);
    uint32_t len = partial ? RS / 2 : RS;
    fill_pattern (buf, len, 31 + k, off);
    assert_int_equal (aclone_clone_pwrite (f->c, buf, len, off, false), 0);
    if (atomic_load (&f->c->in_flight) != 0)
      fail_msg ("%s write returned while the copy was in flight",
                partial ? "partial" : "whole-region");
    memcpy (f->model + off, buf, len);
    pthread_join (t, NULL);
    assert_int_equal (a.ret, 0);
  }
  check_model (f);
}

struct ext {
  uint64_t off[64], len[64];
  uint32_t type[64];
  int n;
};

/* Collects extents, merging neighbours of one type as nbdkit does. */
static int
ext_cb (void *opaque, uint64_t off, uint64_t len, uint32_t type)
{
  struct ext *e = opaque;
  if (e->n > 0 && e->type[e->n - 1] == type &&
      e->off[e->n - 1] + e->len[e->n - 1] == off) {
    e->len[e->n - 1] += len;
    return 0;
  }
  if (e->n < 64) {
    e->off[e->n] = off;
    e->len[e->n] = len;
    e->type[e->n] = type;
    e->n++;
  }
  return 0;
}

static void
test_extents (void **state)
{
  struct fx *f = *state;
  struct ext e = { .n = 0 };
  unsigned char buf[RS];

  fake_source_free (f->src);
  f->src = fake_source_new (SIZE, 1, 2);    /* MiB 0 and 2 zero */
  memcpy (f->model, f->src->data, SIZE);
  must_open (f, true);
  assert_int_equal (aclone_clone_extents (f->c, 3 << 20, 0, false, ext_cb, &e), 0);
  assert_true (e.n >= 3);
  assert_int_equal (e.off[0], 0);
  assert_int_equal (e.len[0], 1 << 20);
  assert_int_equal (e.type[0], ACLONE_EXTENT_HOLE | ACLONE_EXTENT_ZERO);
  assert_int_equal (e.type[1], 0);
  assert_int_equal (e.off[1], 1 << 20);
  /* Hydrated regions report dest: data where written, hole where trimmed. */
  fill_pattern (buf, RS, 1, 0);
  assert_int_equal (aclone_clone_pwrite (f->c, buf, RS, 0, false), 0);
  assert_int_equal (aclone_clone_zero (f->c, RS, (1 << 20), true, false, false), 0);
  e.n = 0;
  assert_int_equal (aclone_clone_extents (f->c, RS, 0, true, ext_cb, &e), 0);
  assert_int_equal (e.n, 1);
  assert_int_equal (e.type[0], 0);
  e.n = 0;
  assert_int_equal (aclone_clone_extents (f->c, RS, 1 << 20, true, ext_cb, &e), 0);
  assert_int_equal (e.type[0], ACLONE_EXTENT_HOLE | ACLONE_EXTENT_ZERO);
  /* Extents cover the request contiguously from its offset. */
  e.n = 0;
  assert_int_equal (aclone_clone_extents (f->c, SIZE - 100, 100, false, ext_cb, &e), 0);
  assert_int_equal (e.off[0], 100);
  uint64_t pos = 100;
  for (int i = 0; i < e.n; i++) {
    assert_int_equal (e.off[i], pos);
    pos += e.len[i];
  }
  assert_true (pos <= SIZE);
}

static uint64_t
rnd (uint64_t *s)
{
  *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
  return *s;
}

/* Random operations against a model, then a restart, then the model. */
static void
test_random_model (void **state)
{
  struct fx *f = *state;
  uint64_t seed = 0x1234567;
  unsigned char *buf = malloc (3 * RS), *rb = malloc (3 * RS);

  must_open (f, true);
  for (int i = 0; i < 3000; i++) {
    uint64_t len = 1 + rnd (&seed) % (3 * RS - 1);
    uint64_t off = rnd (&seed) % (SIZE - len);
    switch (rnd (&seed) % 7) {
    case 0: case 1:
      assert_int_equal (aclone_clone_pread (f->c, rb, len, off), 0);
      assert_memory_equal (rb, f->model + off, len);
      break;
    case 2: case 3:
      fill_pattern (buf, len, i, off);
      assert_int_equal (aclone_clone_pwrite (f->c, buf, len, off, i % 5 == 0), 0);
      memcpy (f->model + off, buf, len);
      break;
    case 4:
      assert_int_equal (aclone_clone_zero (f->c, len, off, i & 1, false, false), 0);
      memset (f->model + off, 0, len);
      break;
    case 5:
      assert_int_equal (aclone_clone_cache (f->c, len, off), 0);
      break;
    case 6:
      assert_int_equal (aclone_clone_flush (f->c), 0);
      break;
    }
    if (i == 1500)
      reopen (f, i & 1);
  }
  check_model (f);
  reopen (f, true);
  check_model (f);
  free (buf);
  free (rb);
}

static void
wait_complete (struct aclone_clone *c, int seconds)
{
  for (int i = 0; i < seconds * 100 && aclone_clone_mode (c) != ACLONE_MODE_COMPLETE; i++)
    usleep (10000);
  assert_int_equal (aclone_clone_mode (c), ACLONE_MODE_COMPLETE);
}

/* Is the page at p mapped from the file at path (/proc/self/maps)? */
static bool
mapped_from (const volatile void *p, const char *path)
{
  FILE *f = fopen ("/proc/self/maps", "r");
  char line[4096], real[4096];
  bool found = false;

  assert_non_null (f);
  assert_non_null (realpath (path, real));
  while (fgets (line, sizeof line, f)) {
    unsigned long lo, hi;
    if (sscanf (line, "%lx-%lx", &lo, &hi) == 2 &&
        (uintptr_t) p >= lo && (uintptr_t) p < hi) {
      found = strstr (line, real) != NULL;
      break;
    }
  }
  fclose (f);
  return found;
}

static void
test_hydrator_plain (void **state)
{
  struct fx *f = *state;
  struct aclone_error err;
  struct aclone_hydrator_config hc = ACLONE_HYDRATOR_DEFAULTS;
  unsigned char *d = malloc (SIZE);

  fake_source_free (f->src);
  f->src = fake_source_new (SIZE, 9, 2);     /* half the MiBs are zero */
  memcpy (f->model, f->src->data, SIZE);
  must_open (f, true);
  assert_int_equal (aclone_clone_start (f->c, &err), 0);
  aclone_hydrator_set_controls (f->c, &hc);
  assert_int_equal (aclone_hydrator_start (f->c, &hc, &err), 0);
  wait_complete (f->c, 20);
  /* The worker releases the source just after marking the clone
   * complete: join it before looking.
   */
  aclone_hydrator_stop (f->c);
  assert_true (f->src->closed);               /* source released */
  assert_null (f->c->src);
  assert_true (aclone_meta_bit (f->c->meta, 0, REGIONS - 1));
  assert_true (f->c->meta->hdr.flags & ACLONE_FLAG_COMPLETE);
  /* Complete: the in-core hydrated bits are the file's now (a private
   * mapping of the metadata file), and still say hydrated everywhere.
   */
  assert_true (mapped_from (f->c->map.hydrated, f->meta));
  for (uint64_t r = 0; r < REGIONS; r++)
    assert_true (aclone_map_hydrated (&f->c->map, r));
  /* Zero MiBs (0, 2 and the 1234-byte tail) were skipped, not copied. */
  assert_int_equal (atomic_load (&f->c->bytes_skipped), (2u << 20) + 1234);
  assert_int_equal (f->src->read_bytes, SIZE - (2u << 20) - 1234);
  read_file (f->dest, d, SIZE, 0);
  assert_memory_equal (d, f->model, SIZE);
  /* Complete: reads never touch the source, even with it gone. */
  check_model (f);
  aclone_clone_close (f->c);
  f->c = NULL;
  struct fake_source *keep = f->src;
  f->src = NULL;
  must_open (f, true);                        /* no source needed */
  check_model (f);
  f->src = keep;
  free (d);
}

/* Hydration racing client writes: the final clone equals the model. */
static void
test_hydrator_with_writes (void **state)
{
  struct fx *f = *state;
  struct aclone_error err;
  struct aclone_hydrator_config hc = ACLONE_HYDRATOR_DEFAULTS;
  uint64_t seed = 99;
  unsigned char *buf = malloc (2 * RS);

  hc.batch = 2 * RS;
  must_open (f, true);
  f->src->delay_us = 2000;
  assert_int_equal (aclone_clone_start (f->c, &err), 0);
  aclone_hydrator_set_controls (f->c, &hc);
  assert_int_equal (aclone_hydrator_start (f->c, &hc, &err), 0);
  for (int i = 0; i < 400; i++) {
    uint64_t len = 1 + rnd (&seed) % (2 * RS - 1);
    uint64_t off = rnd (&seed) % (SIZE - len);
    if (i % 3 == 0) {
      assert_int_equal (aclone_clone_zero (f->c, len, off, true, false, false), 0);
      memset (f->model + off, 0, len);
    }
    else {
      fill_pattern (buf, len, i + 1000, off);
      assert_int_equal (aclone_clone_pwrite (f->c, buf, len, off, false), 0);
      memcpy (f->model + off, buf, len);
    }
  }
  f->src->delay_us = 0;
  wait_complete (f->c, 30);
  unsigned char *d = malloc (SIZE);
  read_file (f->dest, d, SIZE, 0);
  assert_memory_equal (d, f->model, SIZE);
  free (d);
  free (buf);
}

static void
test_hydrator_pause_and_failures (void **state)
{
  struct fx *f = *state;
  struct aclone_error err;
  struct aclone_hydrator_config hc = ACLONE_HYDRATOR_DEFAULTS;

  hc.start_paused = true;
  must_open (f, true);
  /* Started paused, as the plugin starts it: the controls publish the
   * state they make at once, before the clone and its hydrator start
   * (the plugin sets them before nbdkit writes its pid file).
   */
  __atomic_store_n (&f->c->meta->live->ctl_pause, 0, __ATOMIC_RELAXED);
  aclone_hydrator_set_controls (f->c, &hc);
  assert_int_equal (__atomic_load_n (&f->c->meta->live->state, __ATOMIC_RELAXED),
                    ACLONE_STATE_PAUSED);
  assert_int_equal (aclone_clone_start (f->c, &err), 0);
  assert_int_equal (__atomic_load_n (&f->c->meta->live->state, __ATOMIC_RELAXED),
                    ACLONE_STATE_PAUSED);
  assert_int_equal (aclone_hydrator_start (f->c, &hc, &err), 0);
  usleep (300000);
  assert_int_equal (atomic_load (&f->c->map.nr_hydrated), 0);  /* paused */
  /* A failing region: never hydrated, counted, retried after. */
  f->src->fail_errno = EIO;
  f->src->fail_offset = 2 * RS + 17;
  __atomic_store_n (&f->c->meta->live->ctl_pause, 0, __ATOMIC_RELAXED);
  for (int i = 0; i < 300 && atomic_load (&f->c->map.nr_hydrated) < REGIONS - 16; i++)
    usleep (10000);
  usleep (200000);
  assert_false (aclone_map_hydrated (&f->c->map, 2));
  assert_int_equal (aclone_clone_mode (f->c), ACLONE_MODE_HYDRATING);
  assert_true (atomic_load (&f->c->errors) > 0);
  assert_non_null (strstr (f->c->last_error, "fake://source"));
  assert_true (atomic_load (&f->c->backing_off));  /* status: "error" */
  f->src->fail_errno = 0;                     /* source heals */
  wait_complete (f->c, 30);
  assert_false (atomic_load (&f->c->backing_off));
  check_model (f);
}

/* The rate limit holds: however long the copy ran, it copied at most the
 * rate times the time that passed, plus a full bucket (a second's worth)
 * and the one batch per worker that a bucket with credit may start.  (An
 * upper bound only: a slow machine copies less and passes.)  Lifted, the
 * copy completes exactly.
 */
static void
test_hydrator_rate_limit (void **state)
{
  struct fx *f = *state;
  struct aclone_error err;
  struct aclone_hydrator_config hc = ACLONE_HYDRATOR_DEFAULTS;
  const uint64_t rate = 256 * 1024;

  hc.rate = rate;
  hc.batch = RS;
  must_open (f, true);
  unsigned long long t0 = aclone_now_ns ();
  aclone_hydrator_set_controls (f->c, &hc);
  assert_int_equal (aclone_hydrator_start (f->c, &hc, &err), 0);
  usleep (500000);
  uint64_t copied = atomic_load (&f->c->bytes_copied);
  double elapsed = (aclone_now_ns () - t0) / 1e9;
  uint64_t bound = rate * (elapsed + 1) + 4 * RS;   /* at most 4 workers */
  if (copied > bound)
    fail_msg ("copied %llu bytes in %.3f s at %llu bytes/s (bound %llu)",
              (unsigned long long) copied, elapsed, (unsigned long long) rate,
              (unsigned long long) bound);
  __atomic_store_n (&f->c->meta->live->ctl_rate, 0, __ATOMIC_RELAXED);
  wait_complete (f->c, 30);
  check_model (f);
  /* The hydrator's copies are not copies on read. */
  assert_int_equal (aclone_clone_bytes_copied_on_read (f->c), 0);
}

static void
file_sum (const char *path, unsigned long long *sum, long long *size)
{
  int fd = open (path, O_RDONLY);
  unsigned char buf[65536];
  ssize_t n;
  *sum = 1469598103934665603ull;
  *size = -1;
  if (fd < 0)
    return;
  *size = 0;
  while ((n = read (fd, buf, sizeof buf)) > 0) {
    for (ssize_t i = 0; i < n; i++)
      *sum = (*sum ^ buf[i]) * 1099511628211ull;
    *size += n;
  }
  close (fd);
}

static void
test_open_errors_modify_nothing (void **state)
{
  struct fx *f = *state;
  struct aclone_error err;
  unsigned long long s1, s2, m1, m2;
  long long z1, z2, y1, y2;
  unsigned char buf[10];

  must_open (f, true);
  assert_int_equal (aclone_clone_pread (f->c, buf, 10, 0), 0);
  aclone_clone_close (f->c);
  f->c = NULL;
  file_sum (f->dest, &s1, &z1);
  file_sum (f->meta, &m1, &y1);

  /* Source of another size. */
  struct fake_source *other = fake_source_new (SIZE + 4096, 1, 0);
  struct aclone_clone_config cfg = { .dest_path = f->dest, .meta_path = f->meta,
                                     .copy_on_read = true };
  assert_true (aclone_clone_open (&cfg, &other->base, NULL, NULL, &f->c, &err) < 0);
  assert_non_null (strstr (err.msg, f->meta));
  assert_non_null (strstr (err.msg, "fake://source"));
  /* Another region size. */
  cfg.region_size = 4096;
  assert_true (aclone_clone_open (&cfg, &f->src->base, NULL, NULL, &f->c, &err) < 0);
  assert_non_null (strstr (err.msg, f->meta));
  cfg.region_size = 0;
  /* No source for an incomplete clone. */
  assert_true (aclone_clone_open (&cfg, NULL, NULL, NULL, &f->c, &err) < 0);
  assert_non_null (strstr (err.msg, "source="));
  /* Held by another server. */
  struct aclone_meta *held;
  assert_int_equal (aclone_meta_open (f->meta, ACLONE_META_SERVER, &held, &err), 0);
  assert_true (aclone_clone_open (&cfg, &f->src->base, NULL, NULL, &f->c, &err) < 0);
  assert_non_null (strstr (err.msg, "in use"));
  aclone_meta_close (held);
  /* Dest missing while meta exists. */
  char *moved = path_join (f->dir, "moved");
  assert_int_equal (rename (f->dest, moved), 0);
  assert_true (aclone_clone_open (&cfg, &f->src->base, NULL, NULL, &f->c, &err) < 0);
  assert_non_null (strstr (err.msg, f->dest));
  assert_int_equal (rename (moved, f->dest), 0);
  free (moved);
  /* Dest smaller than the source (new meta). */
  char *small = path_join (f->dir, "small"), *m2p = path_join (f->dir, "m2");
  assert_int_equal (truncate (small, 0) < 0 ? (close (open (small, O_CREAT | O_WRONLY, 0600)), truncate (small, 4096)) : 0, 0);
  cfg.dest_path = small;
  cfg.meta_path = m2p;
  assert_true (aclone_clone_open (&cfg, &f->src->base, NULL, NULL, &f->c, &err) < 0);
  assert_non_null (strstr (err.msg, "smaller"));
  assert_non_null (strstr (err.msg, small));
  assert_int_equal (access (m2p, F_OK), -1);          /* no meta created */
  /* Dest is a directory. */
  cfg.dest_path = f->dir;
  assert_true (aclone_clone_open (&cfg, &f->src->base, NULL, NULL, &f->c, &err) < 0);
  assert_non_null (strstr (err.msg, f->dir));
  assert_int_equal (access (m2p, F_OK), -1);

  file_sum (f->dest, &s2, &z2);
  file_sum (f->meta, &m2, &y2);
  assert_true (s1 == s2 && z1 == z2);
  assert_true (m1 == m2 && y1 == y2);
  fake_source_free (other);
  free (small);
  free (m2p);
}

struct bg_read {
  struct aclone_clone *c;
  unsigned char *buf;
  uint64_t off;
  int r;
};

static void *
bg_read_main (void *arg)
{
  struct bg_read *b = arg;
  b->r = aclone_clone_pread (b->c, b->buf, RS, b->off);
  return NULL;
}

/* Graceful stop: a request inside finishes first; later ones are
 * refused; the final commit covers unflushed writes; the lock is free
 * for a new server while the old clone is not yet freed.
 */
static void
test_shutdown_drains_and_unlocks (void **state)
{
  struct fx *f = *state;
  struct aclone_error err;
  unsigned char w[4096], buf[4096];

  must_open (f, true);
  memset (w, 0x5a, sizeof w);
  assert_int_equal (aclone_clone_pwrite (f->c, w, sizeof w, 100000, false), 0);
  memcpy (f->model + 100000, w, sizeof w);

  struct bg_read b = { .c = f->c, .buf = malloc (RS), .off = 2 * RS, .r = 1 };
  atomic_store (&f->src->delay_us, 200000);
  pthread_t t;
  pthread_create (&t, NULL, bg_read_main, &b);
  /* Stop while the read is known to be inside, in its source read (not
   * after a sleep, which a busy machine may stretch past the read).
   */
  for (int i = 0; i < 10000 && atomic_load (&f->c->in_flight) == 0; i++)
    usleep (1000);
  assert_true (atomic_load (&f->c->in_flight) > 0);
  assert_int_equal (aclone_clone_shutdown (f->c, 2000), 0);   /* drained */
  assert_int_equal (atomic_load (&f->c->in_flight), 0);      /* waited for it */
  /* Drained: dest (created sparse) is promised zero again. */
  assert_true (f->c->meta->hdr.flags & ACLONE_FLAG_DEST_ZERO);
  pthread_join (t, NULL);
  assert_int_equal (b.r, 0);
  assert_memory_equal (b.buf, f->model + 2 * RS, RS);
  free (b.buf);

  assert_int_equal (aclone_clone_pread (f->c, buf, sizeof buf, 0), -ESHUTDOWN);
  assert_int_equal (aclone_clone_pwrite (f->c, w, sizeof w, 0, false), -ESHUTDOWN);
  assert_int_equal (aclone_clone_flush (f->c), -ESHUTDOWN);
  assert_int_equal (aclone_clone_shutdown (f->c, 0), 0);   /* once */

  /* A new server takes over at once and sees the unflushed write. */
  struct fake_source *src2 = fake_source_new (SIZE, 1, 0);
  struct aclone_clone *c2;
  struct aclone_clone_config cfg = {
    .dest_path = f->dest, .meta_path = f->meta, .region_size = RS,
    .copy_on_read = true,
  };
  if (aclone_clone_open (&cfg, &src2->base, NULL, NULL, &c2, &err) < 0)
    fail_msg ("second open: %s", err.msg);
  unsigned char *all = malloc (SIZE);
  assert_int_equal (aclone_clone_pread (c2, all, SIZE, 0), 0);
  assert_memory_equal (all, f->model, SIZE);
  free (all);
  aclone_clone_close (c2);
  fake_source_free (src2);
}

/* A request that does not finish keeps the lock: it could still write
 * after a new server had taken over.
 */
static void
test_shutdown_keeps_lock_when_stuck (void **state)
{
  struct fx *f = *state;
  struct aclone_error err;
  struct aclone_clone *c2 = NULL;

  must_open (f, true);
  atomic_fetch_add (&f->c->requests, 1);        /* stuck inside */
  assert_int_equal (aclone_clone_shutdown (f->c, 50), -EBUSY);
  /* The stuck request could still write into an unhydrated region, so
   * dest is not promised to read zero there.
   */
  assert_false (f->c->meta->hdr.flags & ACLONE_FLAG_DEST_ZERO);
  struct aclone_clone_config cfg = {
    .dest_path = f->dest, .meta_path = f->meta, .region_size = RS,
  };
  assert_true (aclone_clone_open (&cfg, &f->src->base, NULL, NULL, &c2, &err) < 0);
  assert_non_null (strstr (err.msg, f->meta));
  atomic_fetch_sub (&f->c->requests, 1);
}

int
main (void)
{
#define T(name) cmocka_unit_test_setup_teardown (name, setup, teardown)
  const struct CMUnitTest tests[] = {
    T (test_read_copy_on_read),
    T (test_read_copy_on_read_dest_fails),
    T (test_read_copy_on_read_behind),
    T (test_writebehind_spares),
    T (test_writebehind_settles),
    T (test_writebehind_rests_when_contended),
    T (test_read_without_copy),
    T (test_write_whole_regions_no_copy),
    T (test_write_partial_rmw),
    T (test_zero_and_trim),
    T (test_flush_commits),
    T (test_crash_loses_only_unflushed),
    T (test_resume_with_changed_source),
    T (test_copy_never_overwrites_write),
    T (test_write_waits_for_copy_in_flight),
    T (test_extents),
    T (test_random_model),
    T (test_hydrator_plain),
    T (test_hydrator_with_writes),
    T (test_hydrator_pause_and_failures),
    T (test_hydrator_rate_limit),
    T (test_open_errors_modify_nothing),
    T (test_shutdown_drains_and_unlocks),
    T (test_shutdown_keeps_lock_when_stuck),
  };
  /* ACLONE_TEST_FILTER=NAME (a glob) runs only the tests it matches:
   * tests/mutants/run picks the one that must catch a mutant.
   */
  cmocka_set_test_filter (getenv ("ACLONE_TEST_FILTER"));
  return cmocka_run_group_tests (tests, NULL, NULL);
}
