/* aclone: the pace controller, foreground first on the CPU
 * (aclone-design(7), "FOREGROUND FIRST").  Internal to the core library.
 *
 * fgctl.h keeps hydration from queuing ahead of clients at the source.
 * On the clone's own host the copy also takes CPU, memory bandwidth and
 * caches from the guest: on two cores, an unlimited local copy (about
 * 650 MB/s) doubled the CPU time nbdkit spent per 4 KiB read of hydrated
 * data, although the copy threads ran at idle priority.  No priority
 * helps there; only copying less while the guest works does.  How much
 * less is what this controller finds, by asking the clients' requests
 * themselves:
 *
 *   - Samples.  Every client read of 64 KiB or less served wholly from
 *     dest records its service time (in the plugin, from the call to the
 *     return) in a histogram (struct aclone_svc_hist: logarithmic
 *     buckets, 16 per octave, one relaxed atomic add per read).
 *   - Probes.  While clients are being served, hydration runs ON for a
 *     while, then goes QUIET: no new batch starts; once those in flight
 *     have landed and QUIET_SKIP_NS more have passed (dest writeback of
 *     what they wrote goes on), the clients' reads are sampled for
 *     PROBE_NS.  What is left of the copy's work still inflates that
 *     median, never deflates it: the base is the least of the last
 *     BASE_PROBES quiet medians (as LEDBAT's base delay).  The median
 *     while copying over the base is the copy's cost to the guest.
 *   - Pace.  Above 1 + TARGET, the pace (a rate limit that holds only
 *     while clients are served) becomes the rate copied while ON scaled
 *     down in proportion to the cost seen (at most 3/5 of it); below
 *     1 + TARGET/2 it grows by an eighth (at least 4 MiB/s) up to twice
 *     that rate; in between it holds (two medians of a noisy workload
 *     differ by a few percent anyway).  Never below a quarter above the
 *     progress floor, which would then take over and copy at full speed.
 *     ON lasts 1 s after a cut and doubles after each probe that found
 *     no cost, up to 8 s, so that a probe costs a few percent of the
 *     copy when there is nothing to find.
 *   - A probe without enough samples on either side (a guest that barely
 *     reads hydrated data) decides nothing: no cost was seen.
 *
 * Above it stay the hard limits (hydrate-rate, `aclone set`); the
 * progress floor (fgctl.h) overrides it: below the floor the caller
 * neither applies the pace nor goes quiet.
 *
 * Not thread-safe: one copy worker drives it; others read its decision
 * through atomics the caller keeps.  Time and counters are passed in,
 * so that unit tests drive it.
 */
#ifndef ACLONE_FGPACE_H
#define ACLONE_FGPACE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

/* Service-time histogram ------------------------------------------------ */

#define ACLONE_SVC_PER_OCTAVE  16
#define ACLONE_SVC_MIN_SHIFT    4          /* below 16 ns: first bucket */
#define ACLONE_SVC_BUCKETS    (ACLONE_SVC_PER_OCTAVE * 22)   /* to ~67 ms */
#define ACLONE_SVC_MAX_READ   (64u << 10)  /* larger reads are not sampled */

struct aclone_svc_hist {
  atomic_uint_fast64_t bucket[ACLONE_SVC_BUCKETS];
};

/* Count one service time (ns).  Thread-safe, lock-free. */
void aclone_svc_record (struct aclone_svc_hist *h, uint64_t ns);

/* Copy the counts into snap (ACLONE_SVC_BUCKETS words). */
void aclone_svc_snapshot (const struct aclone_svc_hist *h, uint64_t *snap);

/* Median service time (ns, the lower edge of its bucket) of the samples
 * counted between snapshots `before` and `after`; *count gets how many
 * there were.  0 when there were none.
 */
uint64_t aclone_svc_median (const uint64_t *before, const uint64_t *after,
                            uint64_t *count);

/* The controller -------------------------------------------------------- */

#define ACLONE_FGPACE_ON_MIN_NS     1000000000ull   /* ON after a cut */
#define ACLONE_FGPACE_ON_MAX_NS     8000000000ull   /* ON after no cost */
#define ACLONE_FGPACE_SETTLE_NS      200000000ull   /* ON's start unsampled */
#define ACLONE_FGPACE_QUIET_SKIP_NS   50000000ull   /* QUIET, unsampled */
#define ACLONE_FGPACE_PROBE_NS       100000000ull   /* QUIET, sampled */
#define ACLONE_FGPACE_BASE_PROBES    8              /* base: least of these */
#define ACLONE_FGPACE_DRAIN_MAX_NS   500000000ull   /* QUIET before sampling */
#define ACLONE_FGPACE_MIN_SAMPLES   50
#define ACLONE_FGPACE_TARGET        0.15            /* cost allowed */
#define ACLONE_FGPACE_STEP     (4ull << 20)         /* growth, at least */

enum aclone_fgpace_phase {
  ACLONE_FGPACE_IDLE,           /* no clients: nothing to measure */
  ACLONE_FGPACE_ON,             /* copying, at the pace */
  ACLONE_FGPACE_DRAIN,          /* quiet, copies in flight landing */
  ACLONE_FGPACE_QUIET,          /* quiet, sampling */
};

struct aclone_fgpace {
  enum aclone_fgpace_phase phase;
  unsigned long long since;     /* phase start */
  unsigned long long on_ns;     /* how long ON lasts now */
  uint64_t pace;                /* bytes/s while served, 0 = none */
  bool sampled;                 /* ON: mark taken */
  unsigned long long mark_ns;   /* when mark was taken */
  uint64_t mark_bytes;          /* bytes copied then */
  uint64_t mark[ACLONE_SVC_BUCKETS];
  uint64_t on_median, on_rate;  /* the last ON's, for the decision */
  uint64_t base[ACLONE_FGPACE_BASE_PROBES];  /* last quiet medians, 0 none */
  unsigned base_slot;
  /* For status: the last probe's medians (quiet: the base), and counts. */
  uint64_t quiet_median, copy_median;
  uint64_t probes, cuts;
};

void aclone_fgpace_init (struct aclone_fgpace *p);

/* Advance the controller.  served: clients are being served and the
 * floor does not hold us up; bytes: bytes copied so far (cumulative);
 * in_flight: batches being copied now; floor: the progress floor
 * (bytes/s, 0 none); hist: the clients' histogram.
 * Call often (every turn of the copy loop): it does little between
 * phase changes.
 */
void aclone_fgpace_tick (struct aclone_fgpace *p, unsigned long long now,
                         bool served, uint64_t bytes, uint64_t in_flight,
                         uint64_t floor, const struct aclone_svc_hist *hist);

/* May no new batch start now (a probe's quiet time)? */
static inline bool
aclone_fgpace_quiet (const struct aclone_fgpace *p)
{
  return p->phase == ACLONE_FGPACE_DRAIN || p->phase == ACLONE_FGPACE_QUIET;
}

/* The rate limit while served, bytes/s (0: none). */
static inline uint64_t
aclone_fgpace_rate (const struct aclone_fgpace *p)
{
  return p->phase == ACLONE_FGPACE_IDLE ? 0 : p->pace;
}

#endif
