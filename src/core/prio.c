/* aclone: CPU priority of the copy threads.  See prio.h. */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "prio.h"

/* Apply policy to one thread; -errno on failure. */
static int
apply_one (pid_t tid, bool idle)
{
  struct sched_param sp = { 0 };
  int r = sched_setscheduler (tid, idle ? SCHED_IDLE : SCHED_OTHER, &sp);

  if (r < 0)
    r = -errno;
  /* Nice counts only under SCHED_OTHER; setting it under SCHED_IDLE too
   * keeps it right for the way back.
   */
  setpriority (PRIO_PROCESS, tid, ACLONE_PRIO_BACKGROUND_NICE);
  return r;
}

/* Is comm "iou-wrk-T" for one of the n tids? */
static bool
io_worker_of (const char *comm, const pid_t *tids, unsigned n)
{
  static const char prefix[] = "iou-wrk-";

  if (strncmp (comm, prefix, sizeof prefix - 1) != 0)
    return false;
  pid_t owner = atoi (comm + sizeof prefix - 1);
  for (unsigned i = 0; i < n; i++)
    if (tids[i] && tids[i] == owner)
      return true;
  return false;
}

/* Apply policy to the io_uring workers of the n tids. */
static void
apply_io_workers (const pid_t *tids, unsigned n, bool idle)
{
  DIR *d = opendir ("/proc/self/task");
  struct dirent *e;

  while (d && (e = readdir (d)) != NULL) {
    char path[300], comm[32] = "";
    if (e->d_name[0] == '.')
      continue;
    snprintf (path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
    FILE *f = fopen (path, "r");
    if (!f)
      continue;
    if (fgets (comm, sizeof comm, f) && io_worker_of (comm, tids, n))
      apply_one (atoi (e->d_name), idle);
    fclose (f);
  }
  if (d)
    closedir (d);
}

void
aclone_prio_apply_all (const pid_t *tids, unsigned n, bool idle)
{
  for (unsigned i = 0; i < n; i++)
    if (tids[i])
      apply_one (tids[i], idle);
  apply_io_workers (tids, n, idle);
}

int
aclone_prio_apply (pid_t tid, bool idle)
{
  int r = apply_one (tid, idle);

  if (r == 0)
    apply_io_workers (&tid, 1, idle);
  return r;
}

/* The probe: can a thread at background nice go to SCHED_IDLE and back? */
static void *
probe (void *arg)
{
  struct sched_param sp = { 0 };
  bool *ok = arg;

  *ok = setpriority (PRIO_PROCESS, gettid (), ACLONE_PRIO_BACKGROUND_NICE) == 0 &&
        sched_setscheduler (0, SCHED_IDLE, &sp) == 0 &&
        sched_setscheduler (0, SCHED_OTHER, &sp) == 0;
  return NULL;
}

bool
aclone_prio_idle_usable (void)
{
  struct rlimit rl;
  pthread_t t;
  bool ok = false;

  /* Back from SCHED_IDLE needs nice 10 allowed: RLIMIT_NICE >= 20 - 10. */
  if (getrlimit (RLIMIT_NICE, &rl) == 0 && rl.rlim_cur < rl.rlim_max &&
      rl.rlim_cur < 20 - ACLONE_PRIO_BACKGROUND_NICE) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit (RLIMIT_NICE, &rl);
  }
  if (pthread_create (&t, NULL, probe, &ok) != 0)
    return false;
  pthread_join (t, NULL);
  return ok;
}
