/* aclone: clocks, in nanoseconds. */
#ifndef ACLONE_CLOCK_H
#define ACLONE_CLOCK_H

/* CLOCK_MONOTONIC: for intervals and deadlines. */
unsigned long long aclone_now_ns (void);

/* CLOCK_REALTIME: for what the live page shows (heartbeat, start). */
unsigned long long aclone_wall_ns (void);

/* Exponential backoff, the one rule for every retry loop: the wait after
 * `prev` ns (0: the first failure) is min, then doubles up to max.
 */
static inline unsigned long long
aclone_backoff_next (unsigned long long prev, unsigned long long min,
                     unsigned long long max)
{
  return prev == 0 ? min : prev * 2 > max ? max : prev * 2;
}

#endif
