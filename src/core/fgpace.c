/* aclone: the pace controller.  See fgpace.h for the design; the
 * measurements behind it are in aclone-design(7).
 */
#include <string.h>
#include <sys/param.h>

#include "fgpace.h"

/* Service-time histogram ------------------------------------------------ */

/* Bucket of a service time: the octave (from 16 ns) and the next four
 * bits below the top one, so buckets are 1/16 octave (4.4%) wide.
 */
static unsigned
svc_bucket (uint64_t ns)
{
  if (ns < (1u << ACLONE_SVC_MIN_SHIFT))
    return 0;
  unsigned msb = 63 - __builtin_clzll (ns);
  unsigned sub = (ns >> (msb - ACLONE_SVC_MIN_SHIFT)) & (ACLONE_SVC_PER_OCTAVE - 1);
  unsigned i = (msb - ACLONE_SVC_MIN_SHIFT) * ACLONE_SVC_PER_OCTAVE + sub;
  return MIN (i, ACLONE_SVC_BUCKETS - 1u);
}

/* The smallest time that falls in bucket i. */
static uint64_t
svc_bucket_floor (unsigned i)
{
  return (uint64_t) (ACLONE_SVC_PER_OCTAVE + i % ACLONE_SVC_PER_OCTAVE)
         << (i / ACLONE_SVC_PER_OCTAVE);
}

void
aclone_svc_record (struct aclone_svc_hist *h, uint64_t ns)
{
  atomic_fetch_add_explicit (&h->bucket[svc_bucket (ns)], 1,
                             memory_order_relaxed);
}

void
aclone_svc_snapshot (const struct aclone_svc_hist *h, uint64_t *snap)
{
  for (unsigned i = 0; i < ACLONE_SVC_BUCKETS; i++)
    snap[i] = atomic_load_explicit (&h->bucket[i], memory_order_relaxed);
}

uint64_t
aclone_svc_median (const uint64_t *before, const uint64_t *after,
                   uint64_t *count)
{
  uint64_t n = 0, seen = 0;

  for (unsigned i = 0; i < ACLONE_SVC_BUCKETS; i++)
    n += after[i] - before[i];
  *count = n;
  if (n == 0)
    return 0;
  for (unsigned i = 0; i < ACLONE_SVC_BUCKETS; i++) {
    seen += after[i] - before[i];
    if (2 * seen >= n)
      return svc_bucket_floor (i);
  }
  return 0;                            /* not reached */
}

/* The controller -------------------------------------------------------- */

void
aclone_fgpace_init (struct aclone_fgpace *p)
{
  memset (p, 0, sizeof *p);
  p->phase = ACLONE_FGPACE_IDLE;
  p->on_ns = ACLONE_FGPACE_ON_MIN_NS;
}

static void
enter_on (struct aclone_fgpace *p, unsigned long long now)
{
  p->phase = ACLONE_FGPACE_ON;
  p->since = now;
  p->sampled = false;
}

/* A probe ended with the quiet median q of n samples: set the pace. */
static void
decide (struct aclone_fgpace *p, uint64_t q, uint64_t n, uint64_t floor)
{
  if (n < ACLONE_FGPACE_MIN_SAMPLES || q == 0)
    return;                           /* nobody to ask: no cost seen */
  p->probes++;
  p->base[p->base_slot] = q;
  p->base_slot = (p->base_slot + 1) % ACLONE_FGPACE_BASE_PROBES;
  uint64_t own = q;                   /* this probe's quiet median */
  for (unsigned i = 0; i < ACLONE_FGPACE_BASE_PROBES; i++)
    if (p->base[i] && p->base[i] < q)
      q = p->base[i];
  p->quiet_median = q;
  p->copy_median = p->on_median;
  /* A cost is a copying median above the base, and above this probe's
   * own quiet one: when the clients' turns grew for reasons of their
   * own, the older, faster base alone would blame the copy.
   */
  if (p->on_median > q * (1 + ACLONE_FGPACE_TARGET) && p->on_median > own) {
    /* The copy costs the clients: back off from what it really copied
     * (the pace may be far above it, e.g. when the link limits).  The
     * cost grew about in proportion to the rate (on two cores, 13% at
     * 51 MB/s, 26% at 102, 167% at 650): aim at four fifths of the
     * target in one step, and cut by two fifths at least.
     */
    double excess = (double) p->on_median / (double) q - 1;
    double keep = MIN (0.6, 0.8 * ACLONE_FGPACE_TARGET / excess);
    p->pace = MAX ((uint64_t) (p->on_rate * keep), ACLONE_FGPACE_STEP);
    p->pace = MAX (p->pace, floor + floor / 4);
    p->cuts++;
    p->on_ns = ACLONE_FGPACE_ON_MIN_NS;
  }
  else {
    if (p->pace &&
        p->on_median < q * (1 + ACLONE_FGPACE_TARGET / 2)) {
      /* Grow, but not far beyond what was copied: a pace that does not
       * hold is not a measurement, and would take long to come down.
       */
      uint64_t grown = p->pace + MAX (p->pace / 8, ACLONE_FGPACE_STEP);
      p->pace = MIN (grown, MAX (p->pace, 2 * p->on_rate + ACLONE_FGPACE_STEP));
    }
    p->on_ns = MIN (p->on_ns * 2, ACLONE_FGPACE_ON_MAX_NS);
  }
}

void
aclone_fgpace_tick (struct aclone_fgpace *p, unsigned long long now,
                    bool served, uint64_t bytes, uint64_t in_flight,
                    uint64_t floor, const struct aclone_svc_hist *hist)
{
  uint64_t snap[ACLONE_SVC_BUCKETS], n;

  if (!served) {
    /* The pace is kept for next time; the base is not: the clients that
     * come back may be others, doing other work.
     */
    if (p->phase != ACLONE_FGPACE_IDLE)
      memset (p->base, 0, sizeof p->base);
    p->phase = ACLONE_FGPACE_IDLE;
    return;
  }
  switch (p->phase) {
  case ACLONE_FGPACE_IDLE:
    enter_on (p, now);
    break;

  case ACLONE_FGPACE_ON:
    /* 1. After SETTLE_NS (the copy back to its pace after a quiet),
     *    mark where the samples and the bytes copied stand.
     * 2. At the end of ON, the median and rate since the mark; then go
     *    quiet, unless there were too few samples to compare.
     */
    if (!p->sampled) {
      if (now - p->since >= MIN (ACLONE_FGPACE_SETTLE_NS, p->on_ns / 2)) {
        aclone_svc_snapshot (hist, p->mark);
        p->mark_ns = now;
        p->mark_bytes = bytes;
        p->sampled = true;
      }
    }
    else if (now - p->since >= p->on_ns && now > p->mark_ns) {
      aclone_svc_snapshot (hist, snap);
      p->on_median = aclone_svc_median (p->mark, snap, &n);
      p->on_rate = (uint64_t) ((double) (bytes - p->mark_bytes) * 1e9 /
                               (double) (now - p->mark_ns));
      if (n < ACLONE_FGPACE_MIN_SAMPLES)
        enter_on (p, now);
      else {
        p->phase = ACLONE_FGPACE_DRAIN;
        p->since = now;
      }
    }
    break;

  case ACLONE_FGPACE_DRAIN:
    /* 3. No new batch; sample once the last one has landed (a batch
     *    stuck at the source ends the probe: no decision).
     */
    if (in_flight == 0) {
      p->phase = ACLONE_FGPACE_QUIET;
      p->since = now;
      p->sampled = false;
    }
    else if (now - p->since >= ACLONE_FGPACE_DRAIN_MAX_NS)
      enter_on (p, now);
    break;

  case ACLONE_FGPACE_QUIET:
    /* 4. After QUIET_SKIP_NS, mark; after PROBE_NS more, compare and
     *    set the pace; copy again.
     */
    if (!p->sampled) {
      /* (A batch may have started just as the drain was seen done.) */
      if (now - p->since >= ACLONE_FGPACE_QUIET_SKIP_NS && in_flight == 0) {
        aclone_svc_snapshot (hist, p->mark);
        p->since = now;
        p->sampled = true;
      }
      else if (now - p->since >= ACLONE_FGPACE_DRAIN_MAX_NS)
        enter_on (p, now);
    }
    else if (now - p->since >= ACLONE_FGPACE_PROBE_NS) {
      aclone_svc_snapshot (hist, snap);
      uint64_t q = aclone_svc_median (p->mark, snap, &n);
      decide (p, q, n, floor);
      enter_on (p, now);
    }
    break;
  }
}
