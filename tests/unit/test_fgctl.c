/* Unit test: the foreground-first controller (src/core/fgctl.c), driven
 * with a made-up clock and made-up latencies.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include "fgctl.h"

#define MS 1000000ull
#define BATCH (1u << 20)

/* n reads of lat each, one every `every`, from *now; no client. */
static void
reads (struct aclone_fgctl *f, unsigned long long *now, unsigned n,
       uint64_t lat, unsigned long long every, unsigned cap)
{
  for (unsigned i = 0; i < n; i++) {
    *now += every;
    aclone_fgctl_window (f, *now, false, cap);
    aclone_fgctl_sample (f, *now, lat);
  }
}

/* A steady source: the window grows to the hard depth, never past it. */
static void
test_grows_to_cap (void **state)
{
  struct aclone_fgctl f;
  unsigned long long now = 1000 * MS;

  aclone_fgctl_init (&f, 16, BATCH, now);
  assert_int_equal (aclone_fgctl_window (&f, now, false, 16), 4);
  reads (&f, &now, 400, 2 * MS, MS, 16);
  assert_int_equal (aclone_fgctl_window (&f, now, false, 16), 16);
  assert_int_equal (f.reason, ACLONE_FG_DEPTH);
  /* A lower depth from `aclone set` caps it at once. */
  assert_int_equal (aclone_fgctl_window (&f, now, false, 3), 3);
}

/* A client in progress halves the window, once per current latency (at
 * least 10 ms), down to one batch; it stays there while the client is
 * busy, and grows again after.
 */
static void
test_client_cuts (void **state)
{
  struct aclone_fgctl f;
  unsigned long long now = 1000 * MS;

  aclone_fgctl_init (&f, 32, BATCH, now);
  reads (&f, &now, 800, 2 * MS, MS, 32);
  assert_int_equal (aclone_fgctl_window (&f, now, false, 32), 32);
  assert_int_equal (aclone_fgctl_window (&f, now, true, 32), 16);
  assert_int_equal (aclone_fgctl_window (&f, now + 5 * MS, true, 32), 16);
  assert_int_equal (aclone_fgctl_window (&f, now + 10 * MS, true, 32), 8);
  for (int i = 2; i < 20; i++)
    aclone_fgctl_window (&f, now + i * 10 * MS, true, 32);
  now += 200 * MS;
  assert_int_equal (aclone_fgctl_window (&f, now, true, 32), 1);
  assert_int_equal (f.reason, ACLONE_FG_CLIENT);
  assert_true (f.client_cuts >= 5);
  /* Reads finishing while the client is busy do not grow it. */
  for (int i = 0; i < 50; i++) {
    now += MS;
    aclone_fgctl_sample (&f, now, 2 * MS);
    assert_int_equal (aclone_fgctl_window (&f, now, true, 32), 1);
  }
  /* Client gone: it grows again. */
  reads (&f, &now, 100, 2 * MS, MS, 32);
  assert_true (aclone_fgctl_window (&f, now, false, 32) > 4);
}

/* Latency rising above base + target shrinks the window; the target is
 * at least one batch's transfer time at the measured rate.
 */
static void
test_latency_shrinks (void **state)
{
  struct aclone_fgctl f;
  unsigned long long now = 1000 * MS;

  aclone_fgctl_init (&f, 32, BATCH, now);
  reads (&f, &now, 800, 2 * MS, MS, 32);
  assert_int_equal (aclone_fgctl_window (&f, now, false, 32), 32);
  reads (&f, &now, 40, 40 * MS, MS, 32);        /* 38 ms of queuing */
  assert_int_equal (f.reason, ACLONE_FG_LATENCY);
  assert_true (aclone_fgctl_window (&f, now, false, 32) <= 16);  /* halved */
  assert_int_equal (aclone_fgctl_base (&f), 2 * MS);
  assert_int_equal (aclone_fgctl_current (&f), 40 * MS);

  /* At 25 MB/s a 1 MiB batch takes 42 ms by itself: 30 ms reads are no
   * congestion then, and the window grows.
   */
  aclone_fgctl_second (&f, 25000000, 0, true);
  unsigned w = aclone_fgctl_window (&f, now, false, 32);
  reads (&f, &now, 60, 30 * MS, MS, 32);
  assert_true (aclone_fgctl_window (&f, now, false, 32) > w);
}

/* The base forgets minima older than BASE_MINUTES minutes. */
static void
test_base_history (void **state)
{
  struct aclone_fgctl f;
  unsigned long long now = 1000 * MS, minute = 60000 * MS;

  aclone_fgctl_init (&f, 8, BATCH, now);
  reads (&f, &now, 10, 1 * MS, MS, 8);
  assert_int_equal (aclone_fgctl_base (&f), 1 * MS);
  for (int m = 0; m < ACLONE_FGCTL_BASE_MINUTES - 1; m++) {
    now += minute;
    aclone_fgctl_sample (&f, now, 9 * MS);
    assert_int_equal (aclone_fgctl_base (&f), 1 * MS);
  }
  now += minute;
  aclone_fgctl_sample (&f, now, 9 * MS);
  assert_int_equal (aclone_fgctl_base (&f), 9 * MS);
  now += 100 * minute;                          /* long idle: all gone */
  unsigned w = aclone_fgctl_window (&f, now, false, 8);
  aclone_fgctl_sample (&f, now, 30 * MS);
  assert_int_equal (aclone_fgctl_base (&f), 30 * MS);
  /* The current reads still hold older, smaller latencies than the new
   * base: no delay, no cut.
   */
  assert_true (aclone_fgctl_current (&f) < aclone_fgctl_base (&f));
  assert_true (aclone_fgctl_window (&f, now, false, 8) >= w);
  assert_int_not_equal (f.reason, ACLONE_FG_LATENCY);
}

/* Below the floor: boost (no client cuts), with hysteresis; never when
 * hydration could not run anyway, or without a floor.
 */
static void
test_floor (void **state)
{
  struct aclone_fgctl f;
  unsigned long long now = 1000 * MS;

  aclone_fgctl_init (&f, 8, BATCH, now);
  assert_false (aclone_fgctl_second (&f, 100, 0, true));
  assert_false (aclone_fgctl_second (&f, 100, 1000, false));
  assert_true (aclone_fgctl_second (&f, 100, 1000, true));
  assert_int_equal (aclone_fgctl_window (&f, now, true, 8), 4);   /* no cut */
  assert_int_equal (f.reason, ACLONE_FG_FLOOR);
  assert_true (aclone_fgctl_second (&f, 1200, 1000, true));       /* hysteresis */
  assert_false (aclone_fgctl_second (&f, 1500, 1000, true));
  assert_int_equal (aclone_fgctl_window (&f, now, true, 8), 2);
  assert_int_equal (f.reason, ACLONE_FG_CLIENT);
}

/* The bytes in flight: at least 4 MiB; twice the bandwidth-delay
 * product (copy rate times base latency) once that is larger.
 */
static void
test_inflight_cap (void **state)
{
  struct aclone_fgctl f;
  unsigned long long now = 1000 * MS;

  aclone_fgctl_init (&f, 32, BATCH, now);
  assert_int_equal (aclone_fgctl_inflight_cap (&f), ACLONE_FGCTL_INFLIGHT_MIN);
  /* Near: 1 GB/s at 0.5 ms is 1 MB; twice that is under the floor. */
  reads (&f, &now, 10, MS / 2, MS, 32);
  aclone_fgctl_second (&f, 1000000000, 0, true);
  assert_int_equal (aclone_fgctl_inflight_cap (&f), ACLONE_FGCTL_INFLIGHT_MIN);
  /* Far: 100 MB/s at 100 ms is 10 MB; 20 MB in flight. */
  aclone_fgctl_init (&f, 32, BATCH, now);
  reads (&f, &now, 10, 100 * MS, MS, 32);
  aclone_fgctl_second (&f, 100000000, 0, true);
  assert_int_equal (aclone_fgctl_inflight_cap (&f), 20000000);
  /* No rate yet (a stalled copy): the floor. */
  aclone_fgctl_second (&f, 0, 0, true);
  assert_int_equal (aclone_fgctl_inflight_cap (&f), ACLONE_FGCTL_INFLIGHT_MIN);
}

/* Bound by bandwidth: a batch's transfer at the link's rate takes at
 * least the base latency.  Unknown base or rate: not.
 */
static void
test_link_bound (void **state)
{
  struct aclone_fgctl f;
  unsigned long long now = 1000 * MS;

  aclone_fgctl_init (&f, 32, BATCH, now);
  assert_false (aclone_fgctl_link_bound (&f, 128 << 10, 25 << 20));
  /* A link: 1.3 ms, 25 MiB/s; 128 KiB take 5 ms. */
  aclone_fgctl_sample (&f, now, 1300000);
  assert_true (aclone_fgctl_link_bound (&f, 128 << 10, 25 << 20));
  assert_false (aclone_fgctl_link_bound (&f, 128 << 10, 0));
  /* A long, fast path: 20 ms, 50 MiB/s; 128 KiB take 2.5 ms. */
  aclone_fgctl_init (&f, 32, BATCH, now);
  aclone_fgctl_sample (&f, now, 20 * MS);
  assert_false (aclone_fgctl_link_bound (&f, 128 << 10, 50 << 20));
  /* The same path at 5 MiB/s: 25 ms. */
  assert_true (aclone_fgctl_link_bound (&f, 128 << 10, 5 << 20));
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_grows_to_cap),
    cmocka_unit_test (test_client_cuts),
    cmocka_unit_test (test_latency_shrinks),
    cmocka_unit_test (test_base_history),
    cmocka_unit_test (test_floor),
    cmocka_unit_test (test_inflight_cap),
    cmocka_unit_test (test_link_bound),
  };
  return cmocka_run_group_tests (tests, NULL, NULL);
}
