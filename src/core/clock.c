/* aclone: clocks (see include/aclone/clock.h). */
#include <time.h>

#include "aclone/clock.h"

static unsigned long long
clock_ns (clockid_t id)
{
  struct timespec ts;
  clock_gettime (id, &ts);
  return (unsigned long long) ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

unsigned long long aclone_now_ns (void) { return clock_ns (CLOCK_MONOTONIC); }
unsigned long long aclone_wall_ns (void) { return clock_ns (CLOCK_REALTIME); }
