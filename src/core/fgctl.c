/* aclone: the foreground-first controller.  See fgctl.h for the design;
 * the numbers behind its constants are in aclone-design(7).
 */
#include <sys/param.h>

#include "fgctl.h"

#define MINUTE_NS 60000000000ull

static uint64_t
min_nonzero (const uint64_t *v, unsigned n)
{
  uint64_t m = 0;

  for (unsigned i = 0; i < n; i++)
    if (v[i] && (!m || v[i] < m))
      m = v[i];
  return m;
}

void
aclone_fgctl_init (struct aclone_fgctl *f, unsigned cap, uint64_t batch,
                   unsigned long long now)
{
  *f = (struct aclone_fgctl) { 0 };
  f->batch = batch;
  f->cap = MAX (cap, 1u);
  f->window = MIN (ACLONE_FGCTL_START_WINDOW, f->cap);
  f->base_minute = now;
}

uint64_t
aclone_fgctl_base (const struct aclone_fgctl *f)
{
  return min_nonzero (f->base, ACLONE_FGCTL_BASE_MINUTES);
}

uint64_t
aclone_fgctl_current (const struct aclone_fgctl *f)
{
  return min_nonzero (f->cur, ACLONE_FGCTL_CUR_SAMPLES);
}

/* Move the base history's slot to the minute holding now: slots of
 * minutes that passed are emptied, so that a base older than
 * BASE_MINUTES is forgotten (the route to the source may have changed).
 */
static void
base_advance (struct aclone_fgctl *f, unsigned long long now)
{
  if (now - f->base_minute >= ACLONE_FGCTL_BASE_MINUTES * MINUTE_NS) {
    for (unsigned i = 0; i < ACLONE_FGCTL_BASE_MINUTES; i++)
      f->base[i] = 0;
    f->base_minute = now;
    return;
  }
  while (now - f->base_minute >= MINUTE_NS) {
    f->base_slot = (f->base_slot + 1) % ACLONE_FGCTL_BASE_MINUTES;
    f->base[f->base_slot] = 0;
    f->base_minute += MINUTE_NS;
  }
}

void
aclone_fgctl_sample (struct aclone_fgctl *f, unsigned long long now,
                     uint64_t lat_ns)
{
  lat_ns = MAX (lat_ns, 1u);
  base_advance (f, now);
  if (!f->base[f->base_slot] || lat_ns < f->base[f->base_slot])
    f->base[f->base_slot] = lat_ns;
  f->cur[f->cur_slot] = lat_ns;
  f->cur_slot = (f->cur_slot + 1) % ACLONE_FGCTL_CUR_SAMPLES;

  uint64_t base = aclone_fgctl_base (f), cur = aclone_fgctl_current (f);
  /* Queuing delay allowed: as much as the base itself, or one batch's
   * transfer at the last second's rate (either way, a link kept full by
   * about two batches), and at least TARGET_MIN_NS (a local source's
   * base is tiny, and its jitter is not congestion).
   */
  double target = MAX (base, ACLONE_FGCTL_TARGET_MIN_NS);
  if (f->rate)
    target = MAX (target, 1e9 * f->batch / f->rate);
  /* (cur < base when the base was just forgotten and older reads are
   * still among the current ones: no delay, then.)
   */
  double delay = cur > base ? (double) (cur - base) : 0;
  double off = (target - delay) / target;                     /* <= 1 */

  if (off < -1)
    off = -1;
  if (off < 0) {
    /* Too much delay: shrink in proportion, half a batch per read at
     * most, so at most half the window per window of reads.
     */
    f->window += off / 2;
    f->reason = ACLONE_FG_LATENCY;
  }
  else if (f->reason != ACLONE_FG_CLIENT || f->boost) {
    /* Room: about one more batch per window of reads. */
    f->window += off / f->window;
    f->reason = f->window < f->cap ? ACLONE_FG_OPEN
                : f->by_bytes ? ACLONE_FG_INFLIGHT : ACLONE_FG_DEPTH;
  }
  f->window = MAX (1.0, MIN (f->window, (double) f->cap));
}

unsigned
aclone_fgctl_window (struct aclone_fgctl *f, unsigned long long now,
                     bool client, unsigned cap)
{
  f->cap = MAX (cap, 1u);
  if (client && !f->boost) {
    /* Halve at most once per current latency: a cut needs that long to
     * show in what the source and the client see.
     */
    uint64_t every = MAX (aclone_fgctl_current (f), ACLONE_FGCTL_CUT_MIN_NS);
    if (now - f->last_cut >= every) {
      f->window /= 2;
      f->last_cut = now;
      f->client_cuts++;
    }
    f->reason = ACLONE_FG_CLIENT;
  }
  else if (f->boost)
    f->reason = ACLONE_FG_FLOOR;
  else if (f->reason == ACLONE_FG_CLIENT || f->reason == ACLONE_FG_FLOOR)
    f->reason = ACLONE_FG_OPEN;          /* the next read decides */
  f->window = MAX (1.0, MIN (f->window, (double) f->cap));
  if (f->reason == ACLONE_FG_OPEN && f->window >= f->cap)
    f->reason = f->by_bytes ? ACLONE_FG_INFLIGHT : ACLONE_FG_DEPTH;
  return (unsigned) f->window;
}

bool
aclone_fgctl_link_bound (const struct aclone_fgctl *f, uint64_t batch_bytes,
                         uint64_t link_rate)
{
  uint64_t base = aclone_fgctl_base (f);

  return base && link_rate && 1e9 * batch_bytes / link_rate >= base;
}

uint64_t
aclone_fgctl_inflight_cap (const struct aclone_fgctl *f)
{
  double bdp = (double) f->rate * aclone_fgctl_base (f) / 1e9;

  return MAX ((uint64_t) (2 * bdp), (uint64_t) ACLONE_FGCTL_INFLIGHT_MIN);
}

bool
aclone_fgctl_second (struct aclone_fgctl *f, uint64_t rate, uint64_t floor,
                     bool could_run)
{
  f->rate = rate;
  if (!could_run || floor == 0)
    f->boost = false;
  else if (rate < floor)
    f->boost = true;
  else if (rate >= floor + floor / 2)
    f->boost = false;                  /* hysteresis: no flapping at it */
  return f->boost;
}
