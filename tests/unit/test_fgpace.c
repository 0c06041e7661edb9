/* Unit test: the pace controller (src/core/fgpace.c), driven with a
 * made-up clock and a model of a host where copying costs the clients'
 * turns in proportion to its rate (as measured on two cores).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "fgpace.h"

#define MS 1000000ull
#define MB 1000000ull

/* The model: a client turn takes base_ns while nothing is copied, and
 * base_ns * (1 + rate / cost_rate) while copying at rate; the copy runs
 * at `full` bytes/s unless paced; each batch in flight lands drain_ms
 * after the copy goes quiet.
 */
struct model {
  struct aclone_fgpace p;
  struct aclone_svc_hist hist;
  unsigned long long now;
  uint64_t bytes;
  uint64_t base_ns, cost_rate, full, floor;
  unsigned turns_per_ms;        /* client reads per ms; 0: none local */
  unsigned drain_ms;            /* how long the last batch takes to land */
  unsigned long long quiet_since;
  bool served;
  uint64_t quiet_extra_ns;      /* writeback left over, in the quiet */
};

static uint64_t
copy_rate (const struct model *m)
{
  if (aclone_fgpace_quiet (&m->p))
    return 0;
  uint64_t pace = aclone_fgpace_rate (&m->p);
  return pace && pace < m->full ? pace : m->full;
}

static void
run_ms (struct model *m, unsigned ms)
{
  for (unsigned i = 0; i < ms; i++) {
    m->now += MS;
    uint64_t rate = m->served ? copy_rate (m) : m->full;
    m->bytes += rate / 1000;
    bool quiet = aclone_fgpace_quiet (&m->p);
    if (!quiet)
      m->quiet_since = 0;
    else if (!m->quiet_since)
      m->quiet_since = m->now;
    uint64_t in_flight = quiet && m->now - m->quiet_since < m->drain_ms * MS;
    if (!quiet)
      in_flight = 1;
    if (m->served)
      for (unsigned t = 0; t < m->turns_per_ms; t++) {
        uint64_t ns = m->base_ns + m->base_ns * rate / m->cost_rate;
        if (quiet)
          ns += m->quiet_extra_ns;
        aclone_svc_record (&m->hist, ns + t % 7);      /* a little spread */
      }
    aclone_fgpace_tick (&m->p, m->now, m->served, m->bytes, in_flight,
                        m->floor, &m->hist);
  }
}

static void
model_init (struct model *m)
{
  memset (m, 0, sizeof *m);
  aclone_fgpace_init (&m->p);
  m->now = 1000 * MS;
  m->base_ns = 25000;
  m->cost_rate = 400 * MB;      /* +13% at 50 MB/s, +160% at 650 */
  m->full = 650 * MB;
  m->turns_per_ms = 20;
  m->drain_ms = 3;
  m->served = true;
}

/* The histogram's median is within a bucket (1/16 octave) of the truth. */
static void
test_median (void **state)
{
  static struct aclone_svc_hist h;
  uint64_t before[ACLONE_SVC_BUCKETS], after[ACLONE_SVC_BUCKETS], n;

  (void) state;
  aclone_svc_snapshot (&h, before);
  assert_int_equal (aclone_svc_median (before, before, &n), 0);
  assert_int_equal (n, 0);
  for (uint64_t v = 1; v <= 1001; v++)
    aclone_svc_record (&h, 20000 + v * 20);        /* 20.02 .. 40.02 us */
  aclone_svc_record (&h, 3);                       /* tiny and huge: */
  aclone_svc_record (&h, UINT64_MAX);              /* clamped, counted */
  aclone_svc_snapshot (&h, after);
  uint64_t m = aclone_svc_median (before, after, &n);
  assert_int_equal (n, 1003);
  assert_true (m <= 30020 && m * 1.045 >= 30020);
  /* Only what came between the snapshots counts. */
  for (int i = 0; i < 100; i++)
    aclone_svc_record (&h, 1000);
  aclone_svc_snapshot (&h, before);
  for (int i = 0; i < 100; i++)
    aclone_svc_record (&h, 64000);
  aclone_svc_snapshot (&h, after);
  m = aclone_svc_median (before, after, &n);
  assert_int_equal (n, 100);
  assert_true (m <= 64000 && m * 1.045 >= 64000);
}

/* A costly copy is paced until the clients' turn is within the target
 * of the quiet one, and the pace stays there: not cut to nothing.
 */
static void
test_paces_costly_copy (void **state)
{
  static struct model m;

  (void) state;
  model_init (&m);
  run_ms (&m, 20000);
  uint64_t pace = aclone_fgpace_rate (&m.p);
  assert_true (pace > 0);
  assert_true (m.p.cuts >= 1);
  /* The model's cost at that pace is at most the target. */
  assert_true ((double) pace / m.cost_rate <= ACLONE_FGPACE_TARGET);
  /* ... and not far below it: at least half of the allowed rate. */
  assert_true ((double) pace / m.cost_rate >= ACLONE_FGPACE_TARGET / 2 / 1.1);
  /* Status figures: the base is the quiet turn. */
  assert_true (m.p.quiet_median <= m.base_ns + 7 &&
               m.p.quiet_median * 1.045 >= m.base_ns);
  /* Quiet time is a small part of the copy's, once settled. */
  uint64_t b0 = m.bytes;
  run_ms (&m, 20000);
  assert_true ((double) (m.bytes - b0) / 20 >= 0.9 * pace);
  assert_true (aclone_fgpace_rate (&m.p) >= pace * 9 / 10);
}

/* A copy that costs nothing is never paced; probes thin out to one per
 * ON_MAX.
 */
static void
test_free_copy_not_paced (void **state)
{
  static struct model m;

  (void) state;
  model_init (&m);
  m.cost_rate = 1000000 * MB;
  run_ms (&m, 30000);
  assert_int_equal (aclone_fgpace_rate (&m.p), 0);
  assert_int_equal (m.p.cuts, 0);
  assert_true (m.p.probes >= 3 && m.p.probes <= 8);
  assert_int_equal (m.p.on_ns, ACLONE_FGPACE_ON_MAX_NS);
}

/* Never below a quarter above the progress floor. */
static void
test_floor (void **state)
{
  static struct model m;

  (void) state;
  model_init (&m);
  m.floor = 100 * MB;
  run_ms (&m, 20000);
  assert_true (m.p.cuts >= 1);
  assert_int_equal (aclone_fgpace_rate (&m.p), 125 * MB);
}

/* A quiet time that still carries the copy's writeback does not raise
 * the base: the least of recent quiet medians is kept.
 */
static void
test_base_least (void **state)
{
  static struct model m;

  (void) state;
  model_init (&m);
  run_ms (&m, 20000);
  uint64_t pace = aclone_fgpace_rate (&m.p);
  uint64_t probes = m.p.probes;
  m.quiet_extra_ns = 20000;            /* quiet turns now look slow */
  run_ms (&m, 16000);
  assert_true (m.p.probes > probes && m.p.probes - probes < ACLONE_FGPACE_BASE_PROBES);
  assert_true (m.p.quiet_median * 1.045 >= m.base_ns &&
               m.p.quiet_median <= m.base_ns + 7);
  assert_true (aclone_fgpace_rate (&m.p) <= pace * 5 / 4);
}

/* The clients' turns grow for reasons of their own while the copy
 * costs nothing: the older, faster base must not blame the copy.
 */
static void
test_clients_slow_down (void **state)
{
  static struct model m;

  (void) state;
  model_init (&m);
  m.cost_rate = 1000000 * MB;
  run_ms (&m, 10000);
  assert_int_equal (m.p.cuts, 0);
  m.base_ns = 40000;
  run_ms (&m, 60000);
  assert_int_equal (m.p.cuts, 0);
  assert_int_equal (aclone_fgpace_rate (&m.p), 0);
}

/* Too few local reads: probes decide nothing, nothing is paced. */
static void
test_few_samples (void **state)
{
  static struct model m;

  (void) state;
  model_init (&m);
  m.turns_per_ms = 0;
  run_ms (&m, 10000);
  assert_int_equal (m.p.probes, 0);
  assert_int_equal (aclone_fgpace_rate (&m.p), 0);
}

/* The quiet is sampled only once every batch has landed; a batch stuck
 * past DRAIN_MAX ends the probe without a decision.
 */
static void
test_drain (void **state)
{
  static struct model m;

  (void) state;
  model_init (&m);
  m.drain_ms = 100;
  run_ms (&m, 1001 + 90);        /* ON: 1 s; then draining */
  assert_int_equal (m.p.phase, ACLONE_FGPACE_DRAIN);
  assert_true (aclone_fgpace_quiet (&m.p));
  run_ms (&m, 20);               /* the last batch landed */
  assert_int_equal (m.p.phase, ACLONE_FGPACE_QUIET);
  assert_false (m.p.sampled);    /* QUIET_SKIP_NS first */
  run_ms (&m, ACLONE_FGPACE_QUIET_SKIP_NS / MS);
  assert_true (m.p.sampled);

  model_init (&m);
  m.drain_ms = 100000;           /* never lands */
  run_ms (&m, 5000);
  assert_int_equal (m.p.probes, 0);
  assert_int_equal (aclone_fgpace_rate (&m.p), 0);
}

/* No clients: no pace, no quiet, whatever was learnt; it holds again
 * when they come back.
 */
static void
test_idle (void **state)
{
  static struct model m;

  (void) state;
  model_init (&m);
  run_ms (&m, 20000);
  uint64_t pace = aclone_fgpace_rate (&m.p);
  assert_true (pace > 0);
  m.served = false;
  run_ms (&m, 1);
  assert_int_equal (m.p.phase, ACLONE_FGPACE_IDLE);
  assert_int_equal (aclone_fgpace_rate (&m.p), 0);
  assert_false (aclone_fgpace_quiet (&m.p));
  m.served = true;
  run_ms (&m, 1);
  assert_int_equal (aclone_fgpace_rate (&m.p), pace);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_median),
    cmocka_unit_test (test_paces_costly_copy),
    cmocka_unit_test (test_free_copy_not_paced),
    cmocka_unit_test (test_floor),
    cmocka_unit_test (test_base_least),
    cmocka_unit_test (test_clients_slow_down),
    cmocka_unit_test (test_few_samples),
    cmocka_unit_test (test_drain),
    cmocka_unit_test (test_idle),
  };
  /* ACLONE_TEST_FILTER=NAME (a glob) runs only the tests it matches:
   * tests/mutants/run picks the one that must catch a mutant.
   */
  cmocka_set_test_filter (getenv ("ACLONE_TEST_FILTER"));
  return cmocka_run_group_tests (tests, NULL, NULL);
}
