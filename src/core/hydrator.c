/* aclone: the background hydrator.
 *
 * Design notes
 * ------------
 * Copy workers: one thread per core (up to 4, never more than the source
 * connections), each with its own io_uring, connections and batches, and
 * a home range of the map it sweeps first before helping with the rest.
 * The work goes in two passes:
 *
 * 1. Zero scan, by worker 0 while the others wait.  It asks the source for base:allocation over the whole
 *    device and marks every region that lies wholly inside a zero extent
 *    hydrated without copying (aclone_clone_skip_zero_locked, which zeroes
 *    dest first unless dest is known zero: invariant 4).  A 64 GiB volume
 *    holding 64 MiB of data thus copies 64 MiB.
 *
 * 2. Copy sweep.  A cursor walks the map; each step takes the next run of
 *    unhydrated regions (at most `batch` bytes), try-locks it and copies
 *    it.  Regions a client holds are skipped and picked up on a later
 *    sweep.  After a client's read miss the regions that follow it are
 *    copied first (locality).  The sweep ends when every region is
 *    hydrated; then a commit marks the clone complete, and the source is
 *    released.
 *
 * Two copy engines share the sweep:
 *   - the ring engine (NBD sources): up to `depth` batches in flight; the
 *     source reads use libnbd's asynchronous API over `connections`
 *     connections whose sockets are polled through an io_uring, and dest
 *     writes go through the same ring.  A batch is READING until libnbd
 *     calls its completion, then WRITING until its ring write completes;
 *     only then are its regions marked hydrated and unlocked.
 *   - the plain engine (any other source, e.g. unit-test fakes): one
 *     batch at a time through aclone_clone_copy_locked.
 *
 * Steering: every turn of the loop reads the live page's control fields.
 * Pause stops new batches (those in flight finish).  The rate limit is a
 * token bucket refilled at `rate` bytes/s holding at most one second's
 * worth.  Below those hard limits the foreground controller (fgctl.h)
 * sets how many batches may be in flight, so that foreground I/O goes
 * first.
 *
 * Failures: a batch whose read or write fails leaves its regions
 * unhydrated, counts an error, and backs the whole hydrator off
 * (100 ms doubling to 5 s); the sweep comes back to them.  A dead source
 * connection is closed and reopened after the backoff.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/param.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <linux/ioprio.h>

#include <libnbd.h>
#include <liburing.h>

#include "aclone/hydrator.h"
#include "clone-internal.h"
#include "fgctl.h"
#include "fgpace.h"
#include "prio.h"
#include "aclone/clock.h"


#define BACKOFF_MIN_NS   100000000ull        /* 100 ms */
#define BACKOFF_MAX_NS  5000000000ull        /* 5 s */
#define NEAR_BYTES      (4u << 20)           /* copied first after a miss */
#define MAX_CONNS        64
#define FG_WINDOW_NS      5000000ull         /* clients "active": 5 ms */
#define PUBLISH_NS      100000000ull         /* controller to live page */
#define CLIENTS_IDLE_NS 1000000000ull        /* idle priority while served */
#define MISSES_RECENT_NS 1000000000ull       /* small batches after a miss */
#define MISS_BATCH_DIV   8                   /* ...hydrate-batch / 8 */
#define MISS_HOLD_NS     50000000ull         /* held after a miss: 50 ms */
#define WRITE_PIECE_SERVED (64u << 10)      /* copy write piece while served */
#define FLOOR_DEFAULT_DIV 10                 /* floor: a tenth of the best */
#define STOP_DRAIN_NS    1000000000ull       /* reads finishing at stop */
#define STALL_CHECK_NS    200000000ull       /* how often to look for hangs */

enum batch_state { B_FREE, B_READING, B_READ_DONE, B_WRITING };

struct batch {
  enum batch_state state;
  uint64_t first, n;          /* regions copied */
  uint64_t lock_n;            /* regions locked (>= n) */
  uint64_t off, len, done;    /* bytes; done = written so far */
  uint64_t roff, rlen;        /* source read: [off, off+len) made whole
                               * min_block blocks; buf holds it */
  unsigned pending;           /* its nbd_aio_pread pieces not yet back */
  unsigned long long issued_ns;   /* when its read was sent */
  bool issuing;               /* issue_read is still sending pieces */
  int conn;
  int error;                  /* errno of the read */
  unsigned *read_done;        /* the hydrator's B_READ_DONE count */
  char *buf;
  size_t resident;            /* bytes of buf touched, page-rounded */
};

struct conn {
  struct nbd_handle *h;
  unsigned gen;               /* tags CQEs: stale polls are ignored */
  bool polled;
  unsigned busy;              /* batches reading on it */
  unsigned long long progress_ns; /* last reply, or when it became busy */
  unsigned long long retry_at;
};

/* One copy worker: a thread with its own ring, connections and batches,
 * sweeping its home range [lo, hi) of the map first, then the rest.
 */
struct worker {
  struct aclone_hydrator *hy;
  struct aclone_clone *c;
  struct aclone_hydrator_config cfg;   /* depth and rate are shares */
  unsigned id;
  pthread_t thread;
  bool started;

  uint64_t batch_regions;
  uint64_t pick_regions;      /* this turn's batch: smaller for clients */
  pid_t tid;
  bool idle;                  /* this thread runs at idle priority */
  unsigned boost_gen;         /* c->boost_gen when it last looked */
  uint64_t lo, hi;            /* regions this worker sweeps */
  uint64_t cursor;            /* next region of the sweep */
  uint64_t near, near_left;   /* locality: where and how many regions */

  /* backoff after failures */
  unsigned long long backoff_ns, resume_at;

  /* rate measurement (worker 0) */
  unsigned long long meas_time, publish_time;
  uint64_t meas_bytes, meas_missed;

  /* ring engine */
  struct io_uring ring;
  bool ring_ok;
  struct conn conns[MAX_CONNS];
  unsigned nconns, next_conn;
  struct batch *batches;
  unsigned nbatches, inflight;
  uint64_t max_request;       /* the source's limits: longest read */
  uint64_t min_block;         /* ...and its alignment */
  size_t buf_len;             /* a batch's buffer */
  unsigned nbufs;             /* batches holding a buffer */
  unsigned inflight_peak;     /* most batches in flight since trim_time */
  unsigned long long trim_time;
  unsigned read_done;         /* batches in B_READ_DONE */
  unsigned long long stall_ns;     /* source-timeout; 0: no stall checks */
  unsigned long long stall_check_at;
};

struct aclone_hydrator {
  atomic_bool stop;
  atomic_bool scanned;        /* worker 0 finished the zero scan */
  atomic_bool finishing;      /* one worker runs finish() */
  unsigned n;

  /* The foreground-first controller, shared by the workers. */
  pthread_mutex_t fg_lock;    /* protects fg */
  struct aclone_fgctl fg;
  bool idle_ok;               /* copy threads may use SCHED_IDLE (prio.h) */
  atomic_bool floor_boost;    /* below the floor: no idle priority */
  atomic_bool held;           /* a batch was held for a miss (depth_limit) */
  double miss_tokens;         /* bytes batches may begin during misses
                               * (depth_limit); under fg_lock */
  unsigned long long miss_refill_ns;  /* ...filled up to then */
  uint64_t cor_charged;       /* copy-on-read bytes charged to them */
  uint64_t smooth_rate;       /* owned by worker 0: copy rate, smoothed */
  uint64_t smooth_src;        /* ...the source's rate, all copies and misses */
  uint64_t best_rate;         /* ...and the best smooth_src seen */

  /* The pace controller (fgpace.h): owned by worker 0, which publishes
   * its decision to the others in pace_quiet and pace_rate.
   */
  struct aclone_fgpace pace;
  atomic_bool pace_quiet;     /* a probe: no new batch */
  atomic_uint_fast64_t floor; /* the progress floor now, bytes/s (worker 0) */
  atomic_uint_fast64_t link_rate; /* best_rate, for the other workers */
  atomic_uint_fast64_t pace_rate;  /* bytes/s while served, 0 none */
  atomic_uint batches;        /* batches in flight, every worker */

  /* The rate limit's token bucket, one for all workers (a share each
   * would let a worker the window shut out come back with credit for
   * the time it was out): protected by rate_lock.
   */
  pthread_mutex_t rate_lock;
  uint64_t rate;              /* bytes/s, 0: none */
  double tokens;
  unsigned long long tok_time;
  struct worker w[];
};

/* CQE tags: kind in the top byte, generation, index. */
enum { TAG_POLL = 1, TAG_WRITE = 2, TAG_CANCEL = 3, TAG_WRITEBACK = 4 };
#define TAG(kind, gen, idx) (((uint64_t) (kind) << 56) | ((uint64_t) (gen) << 24) | (idx))
#define TAG_KIND(t) ((unsigned) ((t) >> 56))
#define TAG_GEN(t)  ((unsigned) (((t) >> 24) & 0xffffffff))
#define TAG_IDX(t)  ((unsigned) ((t) & 0xffffff))

/* Stop copying: asked to, or the clone failed (nothing it copied could
 * ever be committed).
 */
static bool
stopping (struct worker *h)
{
  return atomic_load (&h->hy->stop) ||
         aclone_clone_mode (h->c) == ACLONE_MODE_FAILED;
}

static void
nap (unsigned long long ns)
{
  struct timespec ts = { ns / 1000000000ull, ns % 1000000000ull };
  nanosleep (&ts, NULL);
}

static uint64_t
ctl (struct worker *h, size_t field_off)
{
  return __atomic_load_n ((uint64_t *) ((char *) aclone_clone_live (h->c) + field_off),
                          __ATOMIC_RELAXED);
}
#define CTL(h, f) ctl ((h), offsetof (struct aclone_live, f))

static bool
paused (struct worker *h)
{
  return CTL (h, ctl_pause) != 0;
}

/* How many batches this worker may have in flight now: the controller's
 * window (never above the hard depth, hydrate-depth or `aclone set`),
 * split between the workers so that the shares add up to it exactly; a
 * window below the number of workers leaves some of them idle.
 *
 * While a client read waits for the source (a miss), or one ended less
 * than MISS_HOLD_NS ago, and the path there is bound by its bandwidth
 * (aclone_fgctl_link_bound), batches begin only while all copies, the
 * batches and the clients' copies-on-read, stay under the progress
 * floor's rate: the miss shares that path, and every byte hydration
 * sends while it waits delays it, but a client that always has a miss
 * waiting must not stop the copy (the floor is a tenth of what the
 * source gives).  The hold outlasts the miss because a guest's misses
 * come in trains (a file, then the next, each a miss after a little
 * local work): a batch begun in the gap is what the next miss waits
 * behind.  A gap longer than the hold leaves the link to the batches.
 * On a path bound by its latency (a long, fast one) a batch does not
 * delay the miss, and holding would only slow the copy.  No hold before
 * the floor is known (the first second: what the source gives is
 * measured by copying, and holding then would take the clients' few
 * misses for all a long, fast path can give), nor while backing off
 * from a failure, which only a batch that succeeds ends.
 * Otherwise the window is the controller's.  *held says that a miss
 * holds the next batch now; the share returned is the window's without
 * the hold (may_start tells whether the hold is what stops a batch).
 *
 * Also sets this turn's batch size (pick_regions):
 *
 *   - the bytes in flight are capped at twice the path's bandwidth-delay
 *     product, at least 4 MiB (aclone_fgctl_inflight_cap), but never
 *     below ACLONE_FGCTL_START_WINDOW batches (regions of 4 MiB and more
 *     would otherwise leave one batch, read and write in turn, and the
 *     other workers idle): a local source's window would otherwise grow
 *     to 32 batches of 1 MiB that copy no faster (an idle 2 GiB clone,
 *     tests/bench/run --only 11: 32 x 1 MiB 3.2-3.8 s, 16 x 256 KiB
 *     2.9-3.2 s, 8 x 1 MiB 3.5-3.7 s, nbdcopy 2.6-3.5 s), and a 1 TiB
 *     clone's buffers would be five times its map;
 *   - without clients, batches are a sixteenth of that cap, at most
 *     hydrate-batch, so that the window still holds enough of them to
 *     keep reads and writes overlapping;
 *   - while clients are active, batches are half of hydrate-batch;
 *   - while clients miss (one waits, or ended within MISSES_RECENT_NS) and the
 *     batches yield to misses as above, an eighth: a batch begun between
 *     two misses is what the next miss competes with on a link, so it is
 *     kept short.  (tests/bench/run --only 7, reading a tree over a
 *     200 Mbit/s link, against hydration off: halves, nothing held,
 *     1.29-1.34x; every batch held during misses, halves 1.17x,
 *     quarters 1.20x, eighths 1.12x, sixteenths 1.10-1.15x; with the
 *     floor's share, 1.20-1.26x; as now, the copies-on-read charged to
 *     it, 1.16x.)
 */
static unsigned
depth_limit (struct worker *h, bool *held)
{
  struct aclone_hydrator *hy = h->hy;
  unsigned shift = h->c->map.shift;
  uint64_t d = CTL (h, ctl_depth);
  unsigned cap = d ? (unsigned) MIN (d, ACLONE_HYDRATOR_MAX_DEPTH) : h->cfg.depth;
  bool client = aclone_clone_clients_active (h->c, FG_WINDOW_NS);
  uint64_t pick;

  pthread_mutex_lock (&hy->fg_lock);
  uint64_t bytes = aclone_fgctl_inflight_cap (&hy->fg);
  /* Yield to misses: the path to the source is bound by its bandwidth
   * (else a batch does not delay a miss), the floor is known, and no
   * failure is being backed off from (a batch must start to end that).
   */
  uint64_t floor = atomic_load (&hy->floor);
  uint64_t small = MAX (h->batch_regions / MISS_BATCH_DIV, 1u);
  bool yield = floor && !aclone_clone_backing_off (h->c) &&
               aclone_fgctl_link_bound (&hy->fg, small << shift,
                                        atomic_load (&hy->link_rate));
  if (yield && aclone_clone_client_missing (h->c, MISSES_RECENT_NS))
    pick = small;
  else if (client)
    pick = MAX (h->batch_regions / 2, 1u);
  else
    pick = MIN (h->batch_regions,
                MAX ((bytes / ACLONE_FGCTL_INFLIGHT_BATCHES) >> shift, 1u));
  uint64_t fit = bytes / (pick << shift);
  /* (Status says the bytes bind only when they do, not the floor.) */
  hy->fg.by_bytes = fit >= ACLONE_FGCTL_START_WINDOW && fit < cap;
  fit = MAX (fit, (uint64_t) ACLONE_FGCTL_START_WINDOW);
  cap = (unsigned) MIN (cap, fit);
  unsigned long long now = aclone_now_ns ();
  unsigned w = aclone_fgctl_window (&hy->fg, now, client, cap);
  /* The floor's share of a link clients keep busy: batches may begin
   * during misses while all copies, batches begun between misses and
   * the clients' copies-on-read too, stay under the floor's rate (a
   * bucket with debt, holding a second of it; may_start's caller
   * charges each batch, miss_charge, and copies-on-read are charged
   * here).  The floor is there so that the clone completes: a client
   * whose misses are copied on read moves it on by itself, and a batch
   * begun beside those misses would only delay them.  (The clients'
   * other copies, the rest of a region a write covers in part and
   * NBD_CMD_CACHE, are not charged: that only favours the batches.)
   */
  double fill = (double) floor * (now - hy->miss_refill_ns) / 1e9;
  uint64_t cor = aclone_clone_bytes_cor_charged (h->c);
  fill -= (double) (cor - hy->cor_charged);
  hy->cor_charged = cor;
  /* (Clamped below too: after the floor is lowered, a debt run up
   * under the old one would take old/new seconds to repay.)
   */
  hy->miss_tokens = MAX (MIN (hy->miss_tokens + fill, (double) floor),
                         -(double) floor);
  hy->miss_refill_ns = now;
  bool hold = yield && aclone_clone_client_missing (h->c, MISS_HOLD_NS);
  *held = hold && hy->miss_tokens <= 0;
  pthread_mutex_unlock (&hy->fg_lock);
  h->pick_regions = pick;
  return w / hy->n + (h->id < w % hy->n);
}

/* Token bucket with debt, shared by the workers: a batch may start
 * while the bucket is not empty, and is then charged its length
 * (rate_charge), so the long-run rate is exact whatever the batch sizes.
 * The bucket holds at most one second's worth.  The limit is the
 * operator's (hydrate-rate, `aclone set`) or the pace while clients are
 * served (fgpace.h), whichever is lower.
 */
static bool
rate_allows (struct worker *h)
{
  struct aclone_hydrator *hy = h->hy;
  uint64_t rate = CTL (h, ctl_rate);
  uint64_t pace = atomic_load (&hy->pace_rate);
  unsigned long long now = aclone_now_ns ();
  bool ok = true;

  if (pace)
    rate = rate ? MIN (rate, pace) : pace;
  pthread_mutex_lock (&hy->rate_lock);
  if (rate != hy->rate) {
    /* From no limit: start empty.  A new limit keeps the balance (a
     * debt stays owed), at most a second's worth of the new rate.
     */
    if (hy->rate == 0) {
      hy->tokens = 0;
      hy->tok_time = now;
    }
    hy->rate = rate;
  }
  if (rate) {
    hy->tokens += (double) rate * (now - hy->tok_time) / 1e9;
    hy->tok_time = now;
    if (hy->tokens > (double) rate)
      hy->tokens = (double) rate;
    ok = hy->tokens > 0;
  }
  pthread_mutex_unlock (&hy->rate_lock);
  return ok;
}

static void
rate_charge (struct worker *h, uint64_t len)
{
  struct aclone_hydrator *hy = h->hy;

  pthread_mutex_lock (&hy->rate_lock);
  if (hy->rate)
    hy->tokens -= (double) len;
  pthread_mutex_unlock (&hy->rate_lock);
}

/* Charge a batch to the floor's share (depth_limit): every batch, so
 * that those begun between misses count; the debt is at most a second
 * of the floor, so that a long spell without misses is not owed after.
 */
static void
miss_charge (struct worker *h, uint64_t len)
{
  double floor = (double) atomic_load (&h->hy->floor);

  pthread_mutex_lock (&h->hy->fg_lock);
  h->hy->miss_tokens = MAX (h->hy->miss_tokens - (double) len, -floor);
  pthread_mutex_unlock (&h->hy->fg_lock);
}

static void
failed (struct worker *h)
{
  h->backoff_ns = aclone_backoff_next (h->backoff_ns, BACKOFF_MIN_NS,
                                      BACKOFF_MAX_NS);
  h->resume_at = aclone_now_ns () + h->backoff_ns;
  aclone_clone_set_backing_off (h->c, true);
}

static void
succeeded (struct worker *h)
{
  h->backoff_ns = 0;
  aclone_clone_set_backing_off (h->c, false);
}

/* Are clients being served (a request in the last CLIENTS_IDLE_NS) and
 * the progress floor not holding us up?  Then the copy yields: idle
 * priority, writes in pieces.
 */
static bool
yielding_to_clients (struct worker *h)
{
  return aclone_clone_clients_active (h->c, CLIENTS_IDLE_NS) &&
         !atomic_load (&h->hy->floor_boost);
}

static bool
all_hydrated (struct worker *h)
{
  return atomic_load (&h->c->map.nr_hydrated) == h->c->map.regions;
}

/* This thread's priority (prio.h): idle while clients are being served
 * (a request in the last CLIENTS_IDLE_NS), when the copy threads may be
 * idle, the floor does not hold them up, and no client waits for a
 * region lock; else background.  Without clients there is nobody to
 * yield to but other background work (writeback, a local source), and
 * idle priority would only slow the copy.  A client that waits for a
 * lock sets background itself and bumps boost_gen; seeing that here
 * keeps h->idle true to what the thread has.
 */
static void
follow_priority (struct worker *h)
{
  struct aclone_clone *c = h->c;
  unsigned gen = aclone_clone_boost_gen (c);

  if (gen != h->boost_gen) {          /* a client set us to background */
    h->boost_gen = gen;
    h->idle = false;
  }
  bool idle = yielding_to_clients (h) && aclone_clone_copies_may_idle (c);
  if (idle == h->idle || aclone_prio_apply (h->tid, idle) < 0)
    return;
  h->idle = idle;
  /* A client may have begun to wait between the check and the change,
   * and set background before it: look again, after.
   */
  if (idle && !aclone_clone_copies_may_idle (c) &&
      aclone_prio_apply (h->tid, false) == 0)
    h->idle = false;
}

/* Once a second (worker 0): measure the copy rate for the live page and
 * feed it to the controller's progress floor; ten times a second, show
 * the controller's state in the live page.  Every worker follows the
 * priority decision.
 */
static void
measure (struct worker *h)
{
  struct aclone_hydrator *hy = h->hy;
  struct aclone_clone *c = h->c;
  unsigned long long now = aclone_now_ns ();
  uint64_t bytes = aclone_clone_bytes_copied (c);

  follow_priority (h);
  if (h->id != 0)
    return;
  /* The pace: probes and the rate limit while clients are served. */
  uint64_t probes = hy->pace.probes;
  aclone_fgpace_tick (&hy->pace, now, yielding_to_clients (h), bytes,
                      atomic_load (&hy->batches), atomic_load (&hy->floor),
                      aclone_clone_client_turns (c));
  if (hy->pace.probes != probes)
    aclone_clone_log (c, 0, "pace: client turn %.1f us copying at %.1f MB/s, "
                      "%.1f us quiet: pace %.1f MB/s",
                      hy->pace.copy_median / 1e3, hy->pace.on_rate / 1e6,
                      hy->pace.quiet_median / 1e3, hy->pace.pace / 1e6);
  atomic_store (&hy->pace_quiet, aclone_fgpace_quiet (&hy->pace));
  atomic_store (&hy->pace_rate, aclone_fgpace_rate (&hy->pace));
  uint64_t missed = aclone_clone_bytes_missed (c);
  if (h->meas_time == 0) {
    h->meas_time = now;
    h->meas_bytes = bytes;
    h->meas_missed = missed;
  }
  else if (now - h->meas_time >= 1000000000ull) {
    double dt = (now - h->meas_time) / 1e9;
    uint64_t r = (bytes - h->meas_bytes) / dt;
    uint64_t m = (missed - h->meas_missed) / dt;
    aclone_clone_set_rate (c, r);
    h->meas_time = now;
    h->meas_bytes = bytes;
    h->meas_missed = missed;

    /* The floor: as the operator set it, else a tenth of the best rate
     * the source gave (a tenth of the link, once it has been filled);
     * never above half the rate limit, which would hold it under the
     * floor for good.  The source's rate is all it sent: batches,
     * copy-on-read and the clients' other misses.  A client that misses
     * all the time from the start holds batches to the floor's rate
     * (depth_limit), and a floor taken from that would shrink with it.
     * The floor is held against the copy rate smoothed over a few
     * seconds: a rate limit or a slow source copies in bursts, not
     * every second.
     */
    bool could_run = !paused (h) && !aclone_clone_backing_off (c) &&
                     !all_hydrated (h);
    uint64_t limit = CTL (h, ctl_rate), floor = CTL (h, ctl_floor);
    hy->smooth_rate = hy->smooth_rate ? (3 * hy->smooth_rate + r) / 4 : r;
    hy->smooth_src = hy->smooth_src ? (3 * hy->smooth_src + r + m) / 4 : r + m;
    /* The best rate forgets (half in about 45 s): a source that slows
     * for good (a cache gone cold, a link shared) must not keep the
     * floor above what it can give, which would end client cuts.  But
     * not in a second when batches were held for misses: the copy did
     * not show what the source can give, and a floor forgotten then
     * would shrink with the copy it should keep moving.  Seconds below
     * the floor hold nothing, so a slower source is still learnt.
     */
    if (!atomic_exchange (&hy->held, false))
      hy->best_rate -= hy->best_rate / 64;
    if (could_run && hy->smooth_src > hy->best_rate)
      hy->best_rate = hy->smooth_src;
    if (!floor)
      floor = hy->best_rate / FLOOR_DEFAULT_DIV;
    if (limit)
      floor = MIN (floor, limit / 2);
    atomic_store (&hy->floor, floor);
    atomic_store (&hy->link_rate, hy->best_rate);
    pthread_mutex_lock (&hy->fg_lock);
    bool boost = aclone_fgctl_second (&hy->fg, hy->smooth_rate, floor, could_run);
    pthread_mutex_unlock (&hy->fg_lock);
    atomic_store (&hy->floor_boost, boost);
  }
  if (now - h->publish_time >= PUBLISH_NS) {
    struct aclone_live *l = aclone_clone_live (c);
    h->publish_time = now;
    pthread_mutex_lock (&hy->fg_lock);
    struct aclone_fgctl fg = hy->fg;
    pthread_mutex_unlock (&hy->fg_lock);
    __atomic_store_n (&l->fg_window,
                      (uint64_t) fg.window * (h->pick_regions << c->map.shift),
                      __ATOMIC_RELAXED);
    __atomic_store_n (&l->fg_base_ns, aclone_fgctl_base (&fg), __ATOMIC_RELAXED);
    __atomic_store_n (&l->fg_cur_ns, aclone_fgctl_current (&fg), __ATOMIC_RELAXED);
    __atomic_store_n (&l->fg_reason, fg.reason, __ATOMIC_RELAXED);
    __atomic_store_n (&l->fg_client_cuts, fg.client_cuts, __ATOMIC_RELAXED);
    __atomic_store_n (&l->fg_idle, h->idle, __ATOMIC_RELAXED);
    __atomic_store_n (&l->fg_pace, aclone_fgpace_rate (&hy->pace), __ATOMIC_RELAXED);
    __atomic_store_n (&l->fg_pace_probes, hy->pace.probes, __ATOMIC_RELAXED);
    __atomic_store_n (&l->fg_pace_cuts, hy->pace.cuts, __ATOMIC_RELAXED);
    __atomic_store_n (&l->fg_svc_quiet_ns, hy->pace.quiet_median, __ATOMIC_RELAXED);
    __atomic_store_n (&l->fg_svc_copy_ns, hy->pace.copy_median, __ATOMIC_RELAXED);
  }
}

/* 1. Zero scan ------------------------------------------------------ */

struct zscan {
  struct worker *h;
  uint64_t zstart, zend;      /* current run of zero bytes */
  uint64_t pos;               /* how far the source has answered */
  int error;
};

/* Mark the whole regions inside [start, end) hydrated-as-zero. */
static void
skip_zero_bytes (struct worker *h, uint64_t start, uint64_t end)
{
  struct aclone_clone *c = h->c;
  unsigned shift = c->map.shift;
  uint64_t r = (start + c->region_size - 1) >> shift;
  uint64_t last = end >= c->size ? c->map.regions : end >> shift;

  while (r < last && !stopping (h)) {
    r = aclone_map_next_unhydrated (&c->map, r);
    if (r >= last)
      break;
    uint64_t n = aclone_map_run (&c->map, r, MIN (last - r, 1u << 16));
    if (aclone_map_trylock (&c->map, r, n)) {
      if (aclone_clone_skip_zero_locked (c, r, n) < 0)
        failed (h);
      aclone_map_unlock (&c->map, r, n);
    }
    r += n;
  }
}

static int
zscan_cb (void *opaque, uint64_t off, uint64_t len, bool zero)
{
  struct zscan *z = opaque;

  if (zero && off == z->zend)
    z->zend = off + len;
  else {
    if (z->zend > z->zstart)
      skip_zero_bytes (z->h, z->zstart, z->zend);
    z->zstart = z->zend = zero ? off : off + len;
    if (zero)
      z->zend = off + len;
  }
  z->pos = off + len;
  return stopping (z->h);
}

static void
zero_scan (struct worker *h)
{
  struct aclone_clone *c = h->c;
  struct zscan z = { .h = h };

  while (z.pos < c->size && !stopping (h)) {
    while (paused (h) && !stopping (h))
      nap (50000000);
    if (stopping (h))
      return;
    uint64_t start = z.pos;
    struct aclone_source *src = aclone_clone_source_get (c);
    int r = -ENOTSUP;
    if (src) {
      r = src->ops->extents (src, start, c->size - start, zscan_cb, &z);
      aclone_clone_source_put (c);
    }
    if (r == -ENOTSUP)
      return;                        /* no block status: copy everything */
    if (r < 0 || z.pos <= start) {
      aclone_clone_error (c, "source %s: block status at %llu failed, "
                          "copying instead", aclone_clone_source_name (c),
                          (unsigned long long) start);
      return;
    }
  }
  if (z.zend > z.zstart)
    skip_zero_bytes (h, z.zstart, z.zend);
}

/* 2. Choosing the next batch ------------------------------------------ */

/* Find and lock the next run of unhydrated regions.  Returns false when
 * nothing can be taken now (all hydrated, or the rest locked).
 */
static bool
pick (struct worker *h, struct batch *b)
{
  struct aclone_map *m = &h->c->map;
  uint64_t hint = aclone_clone_take_hint (h->c);
  uint64_t scanned = 0;

  if (hint) {
    h->near = hint - 1;
    /* In bytes, not batches: batches shrink while clients miss. */
    h->near_left = MAX ((uint64_t) NEAR_BYTES >> m->shift, 1u);
  }
  while (scanned <= h->hi - h->lo) {
    uint64_t r, n;
    bool near = h->near_left > 0;
    if (near) {
      r = aclone_map_next_unhydrated (m, h->near);
      if (r >= m->regions || r > h->near + h->pick_regions) {
        h->near_left = 0;
        continue;
      }
      n = aclone_map_run (m, r, h->pick_regions);
      h->near = r + n;
      h->near_left -= MIN (n, h->near_left);
    }
    else {
      r = aclone_map_next_unhydrated (m, h->cursor);
      if (r >= h->hi) {
        if (h->cursor == h->lo) {
          /* Home range done: help with the rest of the device. */
          if (h->lo == 0 && h->hi == m->regions)
            return false;
          h->lo = 0;
          h->hi = m->regions;
          h->cursor = 0;
          scanned = 0;
          continue;
        }
        scanned += h->hi - h->cursor;
        h->cursor = h->lo;             /* wrap: a new sweep */
        continue;
      }
      n = aclone_map_run (m, r, MIN (h->pick_regions, h->hi - r));
      scanned += r + n - h->cursor;
      h->cursor = r + n;
    }
    if (!aclone_map_trylock (m, r, n))
      continue;                        /* a client has it: later */
    /* Under the lock the state is frozen: copy only what is still
     * unhydrated at the front.
     */
    uint64_t k = aclone_map_hydrated (m, r) ? 0 : aclone_map_run (m, r, n);
    if (k == 0) {
      aclone_map_unlock (m, r, n);
      continue;
    }
    b->first = r;
    b->n = k;
    b->lock_n = n;
    b->off = r << m->shift;
    b->len = MIN ((r + k) << m->shift, h->c->size) - b->off;
    b->done = 0;
    b->error = 0;
    return true;
  }
  return false;
}

/* May a new batch start now?  A batch held for a miss (depth_limit)
 * marks the second as held, so that the best rate does not decay from
 * it (measure), but only where the hold is what stops it: a second
 * whose batches the window, the rate limit or the pace held back did
 * show what the copy gets.
 */
static bool
may_start (struct worker *h, unsigned inflight)
{
  bool held;

  if (paused (h))
    return false;
  unsigned limit = depth_limit (h, &held);
  if (inflight >= limit || atomic_load (&h->hy->pace_quiet))
    return false;
  if (h->resume_at && aclone_now_ns () < h->resume_at)
    return false;
  if (!rate_allows (h))
    return false;
  if (held) {
    atomic_store (&h->hy->held, true);
    return false;
  }
  return true;
}

/* The plain engine ---------------------------------------------------- */

static void
run_plain (struct worker *h)
{
  struct batch b = { 0 };

  while (!stopping (h) && !all_hydrated (h)) {
    measure (h);
    if (!may_start (h, 0) || !pick (h, &b)) {
      nap (10000000);
      continue;
    }
    rate_charge (h, b.len);
    miss_charge (h, b.len);
    atomic_fetch_add (&h->hy->batches, 1);
    int r = aclone_clone_copy_locked (h->c, b.first, b.n, NULL, 0, 0);
    aclone_map_unlock (&h->c->map, b.first, b.lock_n);
    atomic_fetch_sub (&h->hy->batches, 1);
    if (r < 0)
      failed (h);
    else
      succeeded (h);
  }
}

/* The ring engine ----------------------------------------------------- */

static struct io_uring_sqe *
get_sqe (struct worker *h)
{
  struct io_uring_sqe *sqe = io_uring_get_sqe (&h->ring);
  if (!sqe) {
    io_uring_submit (&h->ring);
    sqe = io_uring_get_sqe (&h->ring);
  }
  return sqe;
}

/* libnbd completion of one piece of a batch's read: runs inside
 * nbd_aio_notify_* (or nbd_aio_pread), on this thread.  The batch is
 * read when its last piece is back.
 */
static int
read_done (void *opaque, int *error)
{
  struct batch *b = opaque;

  if (b->state == B_READING) {
    if (*error && !b->error)
      b->error = *error;
    if (--b->pending == 0 && !b->issuing) {
      b->state = B_READ_DONE;
      (*b->read_done)++;
    }
  }
  return 1;                            /* retire the command */
}

/* The page-rounded bytes of a buffer a read of len bytes may touch. */
static size_t
buf_need (struct worker *h, uint64_t len)
{
  uint64_t n = len + (h->min_block > 1 ? 2 * h->min_block : 0);

  n = (n + ACLONE_PAGE - 1) & ~(uint64_t) (ACLONE_PAGE - 1);
  return MIN (n, h->buf_len);
}

/* Batch buffers are mappings of their own, so that a freed one goes
 * back to the system at once (malloc keeps what it once had), and are
 * kept while the window uses them: each second, buffers beyond the most
 * batches in flight during that second (plus SPARE_BUFS) are unmapped
 * (trim_bufs).  Memory follows the window, whose bytes depth_limit caps:
 * a 1 TiB clone's whole map is 2 MiB, a window of 32 batches of 1 MiB
 * would be 32 MiB.  A buffer is hydrate-batch long, but only the pages
 * its batches used are resident; when batches shrink (a client went
 * away), trim_bufs gives back the pages beyond the current batch size.
 */
static char *
buf_alloc (struct worker *h)
{
  void *p = mmap (NULL, h->buf_len, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    return NULL;
  h->nbufs++;
  return p;
}

static void
buf_free (struct worker *h, struct batch *b)
{
  if (b->buf) {
    munmap (b->buf, h->buf_len);
    b->buf = NULL;
    b->resident = 0;
    h->nbufs--;
  }
}

/* Buffers kept beyond the most in flight lately. */
#define SPARE_BUFS 1

static void
trim_bufs (struct worker *h)
{
  unsigned long long now = aclone_now_ns ();

  if (now - h->trim_time < 1000000000ull)
    return;
  for (unsigned i = 0; i < h->nbatches && h->nbufs > h->inflight_peak + SPARE_BUFS; i++)
    if (h->batches[i].state == B_FREE)
      buf_free (h, &h->batches[i]);
  /* Once a second, not at each batch: batches change size each time
   * clients come and go, and a page given back is a fault to take again.
   */
  size_t want = buf_need (h, h->pick_regions << h->c->map.shift);
  for (unsigned i = 0; i < h->nbatches; i++) {
    struct batch *b = &h->batches[i];
    if (b->state == B_FREE && b->buf && b->resident > want) {
      madvise (b->buf + want, b->resident - want, MADV_DONTNEED);
      b->resident = want;
    }
  }
  h->trim_time = now;
  h->inflight_peak = h->inflight;
}

/* A batch is done: ok, its dest write landed (and is marked); else it
 * failed, and its regions stay unhydrated.  Unlocks them.
 */
static void
batch_release (struct worker *h, struct batch *b, bool ok)
{
  struct aclone_clone *c = h->c;

  if (ok)
    succeeded (h);
  else
    failed (h);
  aclone_clone_copy_ends (c, b->len);
  aclone_map_unlock (&c->map, b->first, b->lock_n);
  b->state = B_FREE;
  h->inflight--;
  atomic_fetch_sub (&h->hy->batches, 1);
}

static void
conn_close (struct worker *h, unsigned i)
{
  struct conn *k = &h->conns[i];

  if (!k->h)
    return;
  if (k->polled) {
    struct io_uring_sqe *sqe = get_sqe (h);
    if (sqe) {
      io_uring_prep_poll_remove (sqe, TAG (TAG_POLL, k->gen, i));
      io_uring_sqe_set_data64 (sqe, TAG (TAG_CANCEL, 0, i));
    }
  }
  /* Reads still outstanding on it will never complete: fail them. */
  for (unsigned j = 0; j < h->nbatches; j++) {
    struct batch *b = &h->batches[j];
    if (b->state == B_READING && b->conn == (int) i) {
      b->error = ENOTCONN;
      b->state = B_READ_DONE;
      b->conn = -1;
      h->read_done++;
    }
  }
  nbd_close (k->h);
  k->h = NULL;
  k->gen++;
  k->polled = false;
  k->busy = 0;
  k->retry_at = aclone_now_ns () + MAX (h->backoff_ns, BACKOFF_MIN_NS);
}

/* Open connections that are missing, once their backoff has passed. */
static void
conns_refill (struct worker *h)
{
  struct aclone_clone *c = h->c;
  unsigned long long now = aclone_now_ns ();

  for (unsigned i = 0; i < h->nconns; i++) {
    struct conn *k = &h->conns[i];
    if (k->h || now < k->retry_at)
      continue;
    struct aclone_source *src = aclone_clone_source_get (c);
    if (!src)
      return;                          /* released: nothing left to copy */
    k->h = src->ops->aio_connect (src);
    if (k->h)
      atomic_store (&src->outage_since_ns, 0);
    else
      aclone_source_note_outage (src);   /* status shows "waiting" */
    aclone_clone_source_put (c);
    if (!k->h) {
      failed (h);
      k->retry_at = now + h->backoff_ns;
      continue;
    }
    aclone_clone_log (c, 0, "hydrator: source connection %u open", i);
  }
}

/* Start a batch's source read on some live connection: [off, off+len)
 * widened to whole min_block blocks, in pieces of at most max_request
 * bytes (a region may be larger than the source takes at once), all on
 * that connection.  A short last block of the source is a piece of its
 * own.
 */
static bool
issue_read (struct worker *h, struct batch *b)
{
  uint64_t a = h->min_block, size = h->c->size;
  uint64_t end = b->off + b->len, whole = size - size % a;

  b->roff = b->off - b->off % a;
  if (end % a)
    end = MIN (end + (a - end % a), size);
  b->rlen = end - b->roff;
  for (unsigned t = 0; t < h->nconns; t++) {
    unsigned i = (h->next_conn + t) % h->nconns;
    struct conn *k = &h->conns[i];
    if (!k->h)
      continue;
    h->next_conn = i + 1;
    nbd_completion_callback cb = { .callback = read_done, .user_data = b };
    uint64_t pos = b->roff;
    int err = 0;
    b->state = B_READING;
    b->conn = i;
    b->error = 0;
    b->pending = 0;
    b->issuing = true;
    b->issued_ns = aclone_now_ns ();
    while (pos < end) {
      uint64_t n = MIN (end - pos, h->max_request);
      if (pos < whole && pos + n > whole)
        n = whole - pos;
      b->pending++;
      if (nbd_aio_pread (k->h, b->buf + (pos - b->roff), n, pos, cb, 0) < 0) {
        b->pending--;
        err = nbd_get_errno () ? nbd_get_errno () : EIO;
        break;
      }
      pos += n;
    }
    b->issuing = false;
    bool dead = nbd_aio_is_dead (k->h) || nbd_aio_is_closed (k->h);
    if (pos == b->roff && dead) {      /* nothing sent: another one */
      b->state = B_FREE;
      conn_close (h, i);
      continue;
    }
    if (pos == b->roff)
      /* libnbd refused it on a live connection (EINVAL, ENOMEM...): the
       * request's fault, which another connection would refuse too.  The
       * batch fails below, counted and backed off, not retried unseen.
       */
      b->conn = -1;
    else if (k->busy++ == 0)
      k->progress_ns = aclone_now_ns ();
    if (err) {
      /* Some pieces are out: the batch fails once they are back. */
      if (!b->error)
        b->error = err;
      if (dead)
        conn_close (h, i);             /* fails it now */
    }
    if (b->state == B_READING && b->pending == 0) {
      b->state = B_READ_DONE;          /* every piece already back */
      h->read_done++;
    }
    return true;
  }
  return false;
}

/* Start writeback of a batch just written (SYNC_FILE_RANGE_WRITE: start,
 * do not wait).  Writeback then runs while the copy goes on instead of
 * all at once in the next commit's fdatasync, which on this kind of disk
 * is the difference between 1x and 3x the copy time.  Durability is
 * still only the commit's business: this is a hint, its result ignored.
 */
static void
start_writeback (struct worker *h, const struct batch *b)
{
  struct io_uring_sqe *sqe;

  if (h->c->dest->is_block || !(sqe = get_sqe (h)))
    return;
  io_uring_prep_sync_file_range (sqe, h->c->dest->fd, b->len, b->off,
                                 SYNC_FILE_RANGE_WRITE);
  io_uring_sqe_set_data64 (sqe, TAG (TAG_WRITEBACK, 0, 0));
  io_uring_sqe_set_flags (sqe, IOSQE_ASYNC);
}

static void
issue_write (struct worker *h, unsigned idx)
{
  struct batch *b = &h->batches[idx];
  struct io_uring_sqe *sqe = get_sqe (h);

  if (!sqe) {                          /* cannot happen with our sizing */
    /* Pieces already written changed dest: it no longer reads zero. */
    if (b->done > 0)
      aclone_clone_dest_failed (h->c, -EBUSY, "write", b->off + b->done);
    batch_release (h, b, false);
    return;
  }
  /* While clients are served, the write goes in pieces.  A buffered
   * write copies into the page cache and allocates its pages inside the
   * kernel, in an io-wq worker that a waking client thread cannot
   * preempt until the write returns (on kernels without full
   * preemption, Debian's default): 1 MiB held hydrated 4 KiB reads for
   * up to 3 ms, their p99 8x the paused figure; 64 KiB pieces cut that
   * to 3x (tests/bench/run --only 9).  The rest follows as a short
   * write's would.  Below the progress floor the cut is off, as the
   * client cuts and idle priority are.
   */
  size_t len = b->len - b->done;
  if (len > WRITE_PIECE_SERVED && yielding_to_clients (h)) {
    len = WRITE_PIECE_SERVED;
    aclone_clone_count_write_cut (h->c);
  }
  io_uring_prep_write (sqe, h->c->dest->fd, b->buf + (b->off - b->roff) + b->done,
                       len, b->off + b->done);
  io_uring_sqe_set_data64 (sqe, TAG (TAG_WRITE, 0, idx));
  /* A buffered write would otherwise run inline in io_uring_enter, on
   * this thread, serialising the page-cache copy with our socket reads;
   * io-wq runs it on another core.
   */
  io_uring_sqe_set_flags (sqe, IOSQE_ASYNC);
  b->state = B_WRITING;
}

/* Handle batches whose source read finished. */
static void
reads_finished (struct worker *h)
{
  for (unsigned i = 0; i < h->nbatches && h->read_done > 0; i++) {
    struct batch *b = &h->batches[i];
    if (b->state != B_READ_DONE)
      continue;
    h->read_done--;
    if (b->conn >= 0 && h->conns[b->conn].busy) {
      h->conns[b->conn].busy--;
      h->conns[b->conn].progress_ns = aclone_now_ns ();
    }
    if (!b->error) {
      pthread_mutex_lock (&h->hy->fg_lock);
      aclone_fgctl_sample (&h->hy->fg, aclone_now_ns (),
                           aclone_now_ns () - b->issued_ns);
      pthread_mutex_unlock (&h->hy->fg_lock);
    }
    if (b->error) {
      aclone_clone_error (h->c, "hydrator: source %s: read %llu bytes at %llu: %s",
                          aclone_clone_source_name (h->c),
                          (unsigned long long) b->len,
                          (unsigned long long) b->off, strerror (b->error));
      batch_release (h, b, false);
    }
    else
      issue_write (h, i);
  }
}

static void
arm_polls (struct worker *h)
{
  for (unsigned i = 0; i < h->nconns; i++) {
    struct conn *k = &h->conns[i];
    if (!k->h)
      continue;
    if (nbd_aio_is_dead (k->h) || nbd_aio_is_closed (k->h)) {
      aclone_clone_log (h->c, 0, "hydrator: source connection %u lost", i);
      conn_close (h, i);
      continue;
    }
    unsigned dir = nbd_aio_get_direction (k->h);
    if (k->polled) {
      /* A request may be waiting to be sent while our poll waits only
       * for input: push it now rather than re-arming.
       */
      if (dir & LIBNBD_AIO_DIRECTION_WRITE)
        nbd_aio_notify_write (k->h);
      continue;
    }
    short mask = 0;
    if (dir & LIBNBD_AIO_DIRECTION_READ)
      mask |= POLLIN;
    if (dir & LIBNBD_AIO_DIRECTION_WRITE)
      mask |= POLLOUT;
    if (!mask || (k->busy == 0 && !(mask & POLLOUT)))
      continue;                        /* idle: nothing to wait for */
    struct io_uring_sqe *sqe = get_sqe (h);
    if (!sqe)
      return;
    io_uring_prep_poll_add (sqe, nbd_aio_get_fd (k->h), mask);
    io_uring_sqe_set_data64 (sqe, TAG (TAG_POLL, k->gen, i));
    k->polled = true;
  }
}

static void
handle_cqe (struct worker *h, struct io_uring_cqe *cqe)
{
  uint64_t tag = io_uring_cqe_get_data64 (cqe);
  unsigned idx = TAG_IDX (tag);

  switch (TAG_KIND (tag)) {
  case TAG_POLL: {
    if (idx >= h->nconns)
      return;
    struct conn *k = &h->conns[idx];
    if (TAG_GEN (tag) != k->gen || !k->h)
      return;                          /* for a closed connection */
    k->polled = false;
    int rev = cqe->res < 0 ? POLLERR : cqe->res;
    if (rev & (POLLIN | POLLERR | POLLHUP))
      nbd_aio_notify_read (k->h);
    if ((rev & POLLOUT) && k->h)
      nbd_aio_notify_write (k->h);
    break;
  }
  case TAG_WRITE: {
    struct batch *b = &h->batches[idx];
    if (cqe->res <= 0) {
      /* A full dest answers 0 bytes written, or ENOSPC. */
      aclone_clone_copy_landed (h->c, b->first, b->n, b->off + b->done,
                                b->len, cqe->res < 0 ? cqe->res : -ENOSPC,
                                false);
      batch_release (h, b, false);
    }
    else {
      b->done += cqe->res;
      if (b->done < b->len)
        issue_write (h, idx);          /* a piece or a short write: the rest */
      else {
        start_writeback (h, b);
        aclone_clone_copy_landed (h->c, b->first, b->n, b->off, b->len, 0,
                                  false);
        batch_release (h, b, true);
      }
    }
    break;
  }
  default:
    break;
  }
}

/* A free batch, one that still has a buffer if there is one. */
static struct batch *
free_batch (struct worker *h)
{
  struct batch *any = NULL;

  for (unsigned i = 0; i < h->nbatches; i++)
    if (h->batches[i].state == B_FREE) {
      if (h->batches[i].buf)
        return &h->batches[i];
      if (!any)
        any = &h->batches[i];
    }
  return any;
}

static bool
any_conn (struct worker *h)
{
  for (unsigned i = 0; i < h->nconns; i++)
    if (h->conns[i].h)
      return true;
  return false;
}

/* A source that hangs with its connection up never completes our reads
 * and never closes: treat a connection that has had reads outstanding
 * and no reply for the source timeout as lost.
 */
static void
check_stalls (struct worker *h)
{
  struct aclone_clone *c = h->c;
  unsigned long long now = aclone_now_ns ();

  /* A few times a second is plenty for a timeout of seconds, and keeps
   * this off the copy loop's hot path.
   */
  if (!h->stall_ns || now < h->stall_check_at)
    return;
  h->stall_check_at = now + STALL_CHECK_NS;
  for (unsigned i = 0; i < h->nconns; i++) {
    struct conn *k = &h->conns[i];
    if (!k->h || k->busy == 0 || now - k->progress_ns < h->stall_ns)
      continue;
    struct aclone_source *src = aclone_clone_source_get (c);
    if (src) {
      aclone_clone_error (c, "hydrator: source %s: no reply for %llu s, "
                          "reconnecting", src->desc, h->stall_ns / 1000000000ull);
      aclone_source_note_outage (src);
      aclone_clone_source_put (c);
    }
    failed (h);
    conn_close (h, i);
  }
}

/* Submit what is queued, wait up to timeout_ns for a completion, and
 * handle every completion there is.  Returns how many, or -errno of a
 * failed wait (not a timeout, not EINTR).
 */
static int
reap (struct worker *h, unsigned long long timeout_ns)
{
  struct io_uring_cqe *cqe;
  struct __kernel_timespec ts = { timeout_ns / 1000000000ull,
                                  timeout_ns % 1000000000ull };
  unsigned head, seen = 0;
  int r = io_uring_submit_and_wait_timeout (&h->ring, &cqe, 1, &ts, NULL);

  io_uring_for_each_cqe (&h->ring, head, cqe) {
    handle_cqe (h, cqe);
    seen++;
  }
  io_uring_cq_advance (&h->ring, seen);
  reads_finished (h);
  if (r < 0 && r != -ETIME && r != -EINTR)
    return r;
  return seen;
}

/* Start batches while the limits allow and there is work to pick. */
static void
start_batches (struct worker *h)
{
  struct batch *b;

  while (any_conn (h) && may_start (h, h->inflight) &&
         (b = free_batch (h)) != NULL) {
    if (!b->buf) {
      b->buf = buf_alloc (h);
      if (!b->buf)
        break;
    }
    if (!pick (h, b))
      break;
    if (!issue_read (h, b)) {
      aclone_map_unlock (&h->c->map, b->first, b->lock_n);
      break;
    }
    b->resident = MAX (b->resident, buf_need (h, b->rlen));
    rate_charge (h, b->len);
    miss_charge (h, b->len);
    aclone_clone_copy_begins (h->c, b->len);
    h->inflight++;
    atomic_fetch_add (&h->hy->batches, 1);
    h->inflight_peak = MAX (h->inflight_peak, h->inflight);
  }
}

/* Stopping, in three steps.  1. Let source reads in flight finish (for
 * at most STOP_DRAIN_NS): closing a connection in the middle of a reply
 * makes the source see a reset (and nbdkit 1.32 even asserts on it).
 * 2. Close the connections; reads still outstanding are abandoned, their
 * regions stay unhydrated.  3. Let dest writes finish.
 */
static void
ring_drain (struct worker *h)
{
  unsigned long long drain_end = aclone_now_ns () + STOP_DRAIN_NS;

  while (h->inflight > 0 && aclone_now_ns () < drain_end) {
    reads_finished (h);
    arm_polls (h);
    reap (h, 50000000);
  }
  for (unsigned i = 0; i < h->nconns; i++)
    conn_close (h, i);
  reads_finished (h);                  /* fails the abandoned reads */
  while (h->inflight > 0) {
    struct io_uring_cqe *cqe;
    io_uring_submit (&h->ring);
    int r = io_uring_wait_cqe (&h->ring, &cqe);
    if (r == -EINTR || r == -EAGAIN)
      continue;
    if (r < 0) {
      /* The kernel may still read the buffers of writes in flight
       * (hydrator_free leaves them be), and they may still land in
       * regions that are not hydrated: D is not known zero any more.
       */
      aclone_clone_dest_failed (h->c, r, "hydrator: io_uring wait at stop",
                                0);
      break;
    }
    handle_cqe (h, cqe);
    io_uring_cqe_seen (&h->ring, cqe);
    reads_finished (h);
  }
}

/* The ring engine's loop: start batches, push the sockets, reap. */
static void
run_ring (struct worker *h)
{
  unsigned long long loops = 0, cqes = 0;

  while (!stopping (h)) {
    loops++;
    if (all_hydrated (h) && h->inflight == 0)
      break;
    measure (h);
    trim_bufs (h);
    check_stalls (h);
    conns_refill (h);
    start_batches (h);
    reads_finished (h);
    arm_polls (h);
    int r = reap (h, h->inflight ? 50000000 : 20000000);
    if (r < 0) {
      aclone_clone_error (h->c, "hydrator: io_uring: %s", strerror (-r));
      nap (100000000);
    }
    else
      cqes += r;
  }
  aclone_clone_log (h->c, 0, "hydrator %u: %llu turns, %llu completions",
                    h->id, loops, cqes);
  ring_drain (h);
  /* Nothing of the sweep is left in flight: its buffers go back now,
   * not when the server stops (a complete clone keeps no copy memory).
   */
  if (h->inflight == 0)
    for (unsigned i = 0; i < h->nbatches; i++)
      buf_free (h, &h->batches[i]);
}

/* The worker ------------------------------------------------------------ */

static void
finish (struct worker *h)
{
  struct aclone_clone *c = h->c;

  /* The commits take commit_lock, which a client's FLUSH waits for: not
   * at idle priority.
   */
  if (aclone_prio_apply (h->tid, false) == 0)
    h->idle = false;
  /* A commit marks the clone complete once every bit is in the file;
   * a region hydrated during one commit needs the next.
   */
  while (aclone_clone_mode (c) == ACLONE_MODE_HYDRATING &&
         !atomic_load (&h->hy->stop)) {
    int r = aclone_clone_commit (c);
    if (aclone_clone_mode (c) == ACLONE_MODE_HYDRATING)
      nap (r < 0 ? 1000000000 : 10000000);
  }
  if (aclone_clone_mode (c) == ACLONE_MODE_COMPLETE) {
    aclone_clone_release_source (c);
    aclone_clone_set_rate (c, 0);
    __atomic_store_n (&aclone_clone_live (c)->fg_window, 0, __ATOMIC_RELAXED);
    __atomic_store_n (&aclone_clone_live (c)->fg_reason, ACLONE_FG_OPEN, __ATOMIC_RELAXED);
    /* (A failure right now shows at the ticker's next publish.) */
    if (aclone_clone_mode (c) == ACLONE_MODE_COMPLETE)
      aclone_clone_publish (c, ACLONE_STATE_COMPLETE);
    aclone_clone_log (c, 1, "hydration complete: %s holds every region of "
                      "%s (%llu bytes copied, %llu skipped); source released",
                      c->dest->path, aclone_clone_source_name (c),
                      (unsigned long long) aclone_clone_bytes_copied (c),
                      (unsigned long long) aclone_clone_bytes_skipped (c));
  }
}

static void *
worker_main (void *arg)
{
  struct worker *h = arg;
  unsigned long long t0 = aclone_now_ns (), t1, t2;
  int r;

  /* Foreground first: client requests run on nbdkit's threads at normal
   * priority; copies take what CPU is left (prio.h).  Failure only costs
   * latency.
   */
  char name[16];
  snprintf (name, sizeof name, "aclone-copy%u", h->id);
  pthread_setname_np (pthread_self (), name);
  h->tid = gettid ();
  aclone_clone_copy_thread (h->c, h->id, h->tid);
  /* Lowest best-effort I/O priority, not the idle class: a client's
   * FLUSH waits for the writeback these threads start, and the idle
   * class would make it wait behind every other I/O on the disk.  (Their
   * io_uring workers share this I/O context.)
   */
  syscall (SYS_ioprio_set, IOPRIO_WHO_PROCESS, h->tid,
           IOPRIO_PRIO_VALUE (IOPRIO_CLASS_BE, 7));
  r = aclone_prio_apply (h->tid, false);
  if (r < 0)
    aclone_clone_log (h->c, 0, "hydrator %u: background priority: %s", h->id,
                      strerror (-r));
  follow_priority (h);

  /* Worker 0 scans for zero extents first; the others wait for it, so
   * that nobody copies what the scan would skip.
   */
  if (h->id == 0) {
    zero_scan (h);
    atomic_store (&h->hy->scanned, true);
  }
  while (!atomic_load (&h->hy->scanned) && !stopping (h))
    nap (5000000);
  t1 = aclone_now_ns ();
  aclone_clone_log (h->c, 0, "hydrator %u: zero scan took %.3f s", h->id,
                    (t1 - t0) / 1e9);
  if (h->ring_ok)
    run_ring (h);
  else
    run_plain (h);
  t2 = aclone_now_ns ();
  aclone_clone_log (h->c, 0, "hydrator %u: copy sweep took %.3f s", h->id,
                    (t2 - t1) / 1e9);
  if (!stopping (h) && all_hydrated (h) &&
      !atomic_exchange (&h->hy->finishing, true)) {
    finish (h);
    aclone_clone_log (h->c, 0, "hydrator: final commit took %.3f s",
                      (aclone_now_ns () - t2) / 1e9);
  }
  aclone_clone_copy_thread (h->c, h->id, 0);
  return NULL;
}

/* Set up worker k of n; returns 0 or -errno. */
static int
worker_init (struct aclone_hydrator *hy, unsigned k, struct aclone_clone *c,
             const struct aclone_hydrator_config *cfg, unsigned conns)
{
  struct worker *h = &hy->w[k];
  int r;

  h->hy = hy;
  h->c = c;
  h->id = k;
  h->cfg = *cfg;
  h->cfg.depth = MAX (1u, MIN (cfg->depth, ACLONE_HYDRATOR_MAX_DEPTH));
  h->lo = c->map.regions * k / hy->n;
  h->hi = c->map.regions * (k + 1) / hy->n;
  h->cursor = h->lo;

  struct aclone_source *src = aclone_clone_source_get (c);
  bool nbd = src && src->ops->aio_connect;
  h->max_request = ACLONE_SOURCE_MAX_REQUEST;
  h->min_block = 1;
  if (src) {
    h->stall_ns = src->timeout_s * 1000000000ull;
    h->max_request = aclone_source_max_request (src);
    h->min_block = aclone_source_min_block (src);
    aclone_clone_source_put (c);
  }
  /* A batch is at most what the source takes in one request, in whole
   * regions, but at least one region (whose read issue_read then splits).
   */
  h->cfg.batch = MAX ((uint64_t) c->region_size,
                      MIN (cfg->batch, h->max_request) & ~((uint64_t) c->region_size - 1));
  h->batch_regions = h->cfg.batch >> c->map.shift;
  h->pick_regions = h->batch_regions;
  /* Room for the read widened to whole min_block blocks. */
  h->buf_len = (h->batch_regions << c->map.shift) +
               (h->min_block > c->region_size ? 2 * h->min_block : 0);
  if (!nbd)
    return 0;                          /* the plain engine */
  h->nconns = conns;
  h->batches = calloc (ACLONE_HYDRATOR_MAX_DEPTH, sizeof *h->batches);
  if (!h->batches)
    return -ENOMEM;
  h->nbatches = ACLONE_HYDRATOR_MAX_DEPTH;
  for (unsigned i = 0; i < h->nbatches; i++)
    h->batches[i].read_done = &h->read_done;
  r = io_uring_queue_init (2 * h->nbatches + 2 * h->nconns, &h->ring, 0);
  if (r < 0) {
    aclone_clone_log (c, 1, "hydrator: io_uring unavailable (%s), "
                      "copying without it", strerror (-r));
    return 0;
  }
  h->ring_ok = true;
  return 0;
}

static void
hydrator_free (struct aclone_hydrator *hy)
{
  for (unsigned k = 0; k < hy->n; k++) {
    struct worker *h = &hy->w[k];
    bool in_flight = false;
    for (unsigned i = 0; i < h->nbatches; i++)
      in_flight |= h->batches[i].state != B_FREE;
    if (in_flight)
      continue;      /* leak ring and buffers rather than free them under I/O */
    if (h->ring_ok)
      io_uring_queue_exit (&h->ring);
    for (unsigned i = 0; i < h->nbatches; i++)
      buf_free (h, &h->batches[i]);
    free (h->batches);
  }
  pthread_mutex_destroy (&hy->fg_lock);
  pthread_mutex_destroy (&hy->rate_lock);
  free (hy);
}

/* The command line sets the starting controls; the CLI changes them. */
void
aclone_hydrator_set_controls (struct aclone_clone *c,
                              const struct aclone_hydrator_config *cfg)
{
  struct aclone_live *live = aclone_clone_live (c);

  __atomic_store_n (&live->ctl_pause, cfg->start_paused ? 1 : 0, __ATOMIC_RELAXED);
  __atomic_store_n (&live->ctl_rate, cfg->rate, __ATOMIC_RELAXED);
  __atomic_store_n (&live->ctl_depth, 0, __ATOMIC_RELAXED);
  __atomic_store_n (&live->ctl_floor, cfg->floor, __ATOMIC_RELAXED);
  aclone_clone_publish_current (c);
}

int
aclone_hydrator_start (struct aclone_clone *c,
                       const struct aclone_hydrator_config *cfg,
                       struct aclone_error *err)
{
  struct aclone_hydrator *hy;
  unsigned n, conns;
  int r;

  if (aclone_clone_mode (c) != ACLONE_MODE_HYDRATING || c->hydrator)
    return 0;

  /* One worker per core, up to 4 and no more than connections: a single
   * event loop spends its core on socket copies while the others idle.
   * By default (connections 0) one connection per worker: two per worker
   * were no faster for one clone, and slower for many at once (64 clones
   * of 64 MiB on two cores: the last done after 8.6-15 s with two, 6.6-6.8
   * s with one; tests/bench/run --only 13).
   */
  long cpus = sysconf (_SC_NPROCESSORS_ONLN);
  unsigned per_core = MIN ((unsigned) (cpus > 0 ? cpus : 1), 4u);
  conns = cfg->connections ? MIN (cfg->connections, MAX_CONNS) : per_core;
  struct aclone_source *src = aclone_clone_source_get (c);
  if (src) {
    if (!src->multi_conn)
      conns = 1;
    aclone_clone_source_put (c);
  }
  n = MAX (1u, MIN (per_core, conns));
  if (cfg->workers)
    n = MIN (cfg->workers, conns);
  n = MIN (n, (unsigned) ACLONE_HYDRATOR_MAX_WORKERS);
  hy = calloc (1, sizeof *hy + n * sizeof (struct worker));
  if (!hy)
    return aclone_error_set (err, ENOMEM, "hydrator");
  hy->n = n;
  pthread_mutex_init (&hy->fg_lock, NULL);
  pthread_mutex_init (&hy->rate_lock, NULL);
  aclone_fgpace_init (&hy->pace);
  aclone_fgctl_init (&hy->fg, MAX (1u, MIN (cfg->depth, ACLONE_HYDRATOR_MAX_DEPTH)),
                     cfg->batch, aclone_now_ns ());
  hy->cor_charged = aclone_clone_bytes_cor_charged (c);
  hy->idle_ok = aclone_prio_idle_usable ();
  aclone_clone_allow_idle (c, hy->idle_ok);
  if (!hy->idle_ok)
    aclone_clone_log (c, 1, "copy threads at nice %d, not SCHED_IDLE: they "
                      "could not leave it (needs CAP_SYS_NICE or RLIMIT_NICE "
                      ">= %d)", ACLONE_PRIO_BACKGROUND_NICE,
                      20 - ACLONE_PRIO_BACKGROUND_NICE);

  for (unsigned k = 0; k < n; k++) {
    unsigned share = conns / n + (k < conns % n);
    r = worker_init (hy, k, c, cfg, share);
    if (r < 0) {
      hydrator_free (hy);
      return aclone_error_set (err, -r, "hydrator");
    }
  }
  for (unsigned k = 0; k < n; k++) {
    r = pthread_create (&hy->w[k].thread, NULL, worker_main, &hy->w[k]);
    if (r != 0) {
      atomic_store (&hy->stop, true);
      atomic_store (&hy->scanned, true);
      for (unsigned j = 0; j < k; j++)
        pthread_join (hy->w[j].thread, NULL);
      hydrator_free (hy);
      return aclone_error_set (err, r, "cannot start hydrator thread");
    }
    hy->w[k].started = true;
  }
  c->hydrator = hy;
  return 0;
}

void
aclone_hydrator_stop (struct aclone_clone *c)
{
  struct aclone_hydrator *hy = c->hydrator;

  if (!hy)
    return;
  atomic_store (&hy->stop, true);
  aclone_clone_cancel_source (c);
  /* Idle threads barely run while the CPU is busy: not while we wait. */
  aclone_clone_allow_idle (c, false);
  pid_t tids[ACLONE_HYDRATOR_MAX_WORKERS];
  for (unsigned k = 0; k < hy->n; k++)
    tids[k] = aclone_clone_copy_thread_tid (c, k);
  aclone_prio_apply_all (tids, hy->n, false);
  for (unsigned k = 0; k < hy->n; k++)
    if (hy->w[k].started)
      pthread_join (hy->w[k].thread, NULL);
  hydrator_free (hy);
  c->hydrator = NULL;
}
