/* aclone: the background hydrator (aclone-design(7), "THREADS AND LOCKS").
 *
 * Copy workers (one thread per core, up to 4) copy every region that is
 * not hydrated from the source to dest; then one of them commits and
 * marks the clone complete.
 * It is steered through the live page's control fields (pause, rate,
 * depth), which "aclone pause|resume|set" write and it polls.
 */
#ifndef ACLONE_HYDRATOR_H
#define ACLONE_HYDRATOR_H

#include <stdbool.h>
#include <stdint.h>

#include "aclone/clone.h"
#include "aclone/error.h"

struct aclone_hydrator_config {
  bool start_paused;           /* hydrate=false */
  uint64_t rate;               /* bytes/s, 0 = unlimited */
  uint64_t floor;              /* progress floor, bytes/s, 0 = default */
  uint64_t batch;              /* bytes per copy request */
  unsigned depth;              /* copies in flight */
  unsigned connections;        /* async source connections, all workers;
                                * 0 = one per worker */
  unsigned workers;            /* copy threads; 0 = one per core, up to 4 */
};

#define ACLONE_HYDRATOR_DEFAULTS \
  { .start_paused = false, .rate = 0, .batch = 1u << 20, .depth = 32, \
    .connections = 0, .workers = 0 }

#define ACLONE_HYDRATOR_MAX_DEPTH 1024
#define ACLONE_HYDRATOR_MAX_WORKERS 64

/* Set the live page's controls from cfg (pause, rate and floor as the
 * command line gives them, no depth override) and publish the state
 * they make.  Call it once, right after aclone_clone_open: aclone status
 * may ask as soon as the server's pid file is there, and must see a
 * clone started paused as paused; and from then on the controls are the
 * operator's (aclone pause, resume, set), which nothing may overwrite.
 */
void aclone_hydrator_set_controls (struct aclone_clone *c,
                                   const struct aclone_hydrator_config *cfg);

/* Start the copy workers (after nbdkit's fork), steered by the live
 * page's controls (aclone_hydrator_set_controls).  Does nothing for a
 * clone that is not hydrating.
 */
int aclone_hydrator_start (struct aclone_clone *c,
                           const struct aclone_hydrator_config *cfg,
                           struct aclone_error *err);

/* Stop and join the workers: copies in flight to dest are finished,
 * reads in flight from the source get up to a second, then are abandoned
 * (their regions stay unhydrated).  Safe when not started.
 */
void aclone_hydrator_stop (struct aclone_clone *c);

#endif
