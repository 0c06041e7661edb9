/* aclone: the foreground-first controller (aclone-design(7),
 * "FOREGROUND FIRST").  Internal to the core library.
 *
 * Hydration is background traffic: it should take the link, CPU and disk
 * the guest leaves, and no more.  This controller decides how many copy
 * batches the hydrator may have in flight (its window), in the spirit of
 * LEDBAT (RFC 6817):
 *
 *   - it tracks the source's base latency (the smallest time a batch read
 *     took, per minute, over the last BASE_MINUTES minutes) and the
 *     current latency (the smallest of the last CUR_SAMPLES reads);
 *   - current minus base is queuing delay: delay that hydration's own
 *     reads, a client's misses or other traffic add on the way to the
 *     source.  The target is the larger of the base, 5 ms, and the time one
 *     batch takes to arrive at the rate of the last second: a batch's own
 *     transfer is part of its latency, and a link that a token bucket
 *     let burst at first would otherwise show a base no steady read can
 *     reach.  So about two batches share the link.  Below the target the window grows by about one batch per
 *     window of reads; above it, it shrinks in proportion, at most by
 *     half per window of reads;
 *   - a client request in progress is the strongest signal: the window
 *     is halved, at most once per current latency (10 ms at least),
 *     down to one batch;
 *   - the bytes in flight are capped at twice the path's bandwidth-delay
 *     product, and at least a few MiB (aclone_fgctl_inflight_cap): on a
 *     local source the window would otherwise grow to the hard depth,
 *     tens of MiB of buffers that copy no faster;
 *   - a progress floor keeps a busy machine's clone moving: while the
 *     copy rate of the last second is below the floor, client cuts are
 *     suspended and the caller is told to stop idling its threads.
 *
 * The hard limits (hydrate-depth, hydrate-rate, `aclone set`) stay above
 * the controller: the window never exceeds the depth the caller gives.
 *
 * Not thread-safe: the hydrator calls it under its own lock.  Time is
 * passed in (nanoseconds, monotonic), so that unit tests drive it.
 */
#ifndef ACLONE_FGCTL_H
#define ACLONE_FGCTL_H

#include <stdbool.h>
#include <stdint.h>

#include "aclone/meta.h"

#define ACLONE_FGCTL_BASE_MINUTES  10
#define ACLONE_FGCTL_CUR_SAMPLES    4
#define ACLONE_FGCTL_TARGET_MIN_NS  5000000ull   /* 5 ms of queuing delay */
#define ACLONE_FGCTL_CUT_MIN_NS    10000000ull   /* client cuts: 10 ms apart */
#define ACLONE_FGCTL_START_WINDOW   4
#define ACLONE_FGCTL_INFLIGHT_MIN  (4u << 20)    /* bytes in flight, floor */
#define ACLONE_FGCTL_INFLIGHT_BATCHES 16         /* batches the bytes make */

struct aclone_fgctl {
  double window;                   /* batches; 1 <= window <= cap */
  unsigned cap;                    /* the hard depth, last seen */
  uint64_t batch;                  /* bytes in one batch */
  uint64_t rate;                   /* copy rate of the last second */
  uint64_t base[ACLONE_FGCTL_BASE_MINUTES];  /* per-minute minima, 0 none */
  unsigned base_slot;
  unsigned long long base_minute;  /* start of the current slot */
  uint64_t cur[ACLONE_FGCTL_CUR_SAMPLES];    /* last reads, 0 none */
  unsigned cur_slot;
  unsigned long long last_cut;     /* last cut for a client or delay */
  enum aclone_fg_reason reason;
  bool boost;                      /* below the floor */
  bool by_bytes;                   /* the caller's cap is the bytes' */
  uint64_t client_cuts;            /* how many, cumulative */
};

/* Start with a small window (ACLONE_FGCTL_START_WINDOW, at most cap);
 * batch: the bytes one batch copies.
 */
void aclone_fgctl_init (struct aclone_fgctl *f, unsigned cap, uint64_t batch,
                        unsigned long long now);

/* One hydration read finished after lat_ns. */
void aclone_fgctl_sample (struct aclone_fgctl *f, unsigned long long now,
                          uint64_t lat_ns);

/* The window, in batches (1 to cap), now.  client: a client request is
 * in progress (or began within the last few milliseconds).  cap: the
 * hard depth, or fewer batches when the bytes in flight bind (the caller
 * then sets by_bytes, which the reason shows).
 */
unsigned aclone_fgctl_window (struct aclone_fgctl *f, unsigned long long now,
                              bool client, unsigned cap);

/* Once a second: the copy rate over that second (bytes/s), the floor
 * (bytes/s, 0 none), and whether hydration could have run at all
 * (not paused, not backing off, work left).  Returns true while below
 * the floor: the caller should give its threads normal priority.
 */
bool aclone_fgctl_second (struct aclone_fgctl *f, uint64_t rate,
                          uint64_t floor, bool could_run);

/* The most bytes hydration should have in flight: twice the path's
 * bandwidth-delay product (the copy rate of the last seconds times the
 * base latency), but at least ACLONE_FGCTL_INFLIGHT_MIN.  Beyond that,
 * more in flight only queues: the copy gets no faster, and the buffers
 * are memory a large clone cannot spare.  The rate (smoothed over a
 * few seconds) follows what is in flight, so on a long path the cap
 * grows, by about a quarter a second, while the rate keeps up.
 */
uint64_t aclone_fgctl_inflight_cap (const struct aclone_fgctl *f);

/* Is the path to the source bound by its bandwidth rather than its
 * latency: does a batch of batch_bytes take at least the base latency to
 * arrive at link_rate (bytes/s, the best the source has given)?  Then a
 * batch sent while a client's miss waits delays the miss; on a long,
 * fast path it does not.  False while either is unknown (0).
 */
bool aclone_fgctl_link_bound (const struct aclone_fgctl *f,
                              uint64_t batch_bytes, uint64_t link_rate);

/* Base and current latency in ns (0: no sample yet). */
uint64_t aclone_fgctl_base (const struct aclone_fgctl *f);
uint64_t aclone_fgctl_current (const struct aclone_fgctl *f);

#endif
