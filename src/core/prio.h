/* aclone: CPU priority of the copy threads (aclone-design(7), "FOREGROUND
 * FIRST").  Internal to the core library.
 *
 * Copy threads run at SCHED_IDLE when they can be brought back: a client
 * thread that wakes up preempts them at once, where a nice level only
 * shares the core out over time.  But a thread at SCHED_IDLE barely runs
 * while the CPU is busy, so whatever it holds (a region lock a client
 * waits for, the commit lock in the final commit) must not be held at
 * that priority: such moments bring the copy threads back to SCHED_OTHER
 * at nice 10 ("background").  Leaving SCHED_IDLE needs CAP_SYS_NICE or an
 * RLIMIT_NICE that allows nice 10; without either, the copy threads stay
 * at background priority for good, and never go idle.
 *
 * Every call applies to one thread and to the io_uring workers it
 * created (threads named iou-wrk-TID), which run its buffered writes and
 * inherit its policy only when they are created.
 */
#ifndef ACLONE_PRIO_H
#define ACLONE_PRIO_H

#include <stdbool.h>
#include <sys/types.h>

#define ACLONE_PRIO_BACKGROUND_NICE 10

/* May copy threads use SCHED_IDLE (can they leave it again)?  Probed
 * once per call with a scratch thread; raises the soft RLIMIT_NICE to
 * the hard one when that is what it takes.
 */
bool aclone_prio_idle_usable (void);

/* Give thread tid (and its io_uring workers) idle or background priority.
 * Returns 0, or -errno of the change to tid itself.
 */
int aclone_prio_apply (pid_t tid, bool idle);

/* The same for n threads (0 entries skipped), with one look at
 * /proc/self/task for all of them.
 */
void aclone_prio_apply_all (const pid_t *tids, unsigned n, bool idle);

#endif
