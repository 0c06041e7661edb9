/* aclone: copy-on-read write-behind: a FIFO of copies and the one thread
 * that lands them.  See writebehind.h for the protocol.
 *
 * Locking: wb->lock protects the queue, pending (pending_hint mirrors
 * it for aclone_writebehind_has_room, a hint), stopping, the settle
 * queue and the spares; the callbacks run without it (they do I/O), land
 * on the writer thread only, settle on the settler thread only.
 *
 * Rests: the writer reads its own scheduler statistics (run time and
 * time spent waiting for a CPU, /proc/thread-self/schedstat) after each
 * landing; a landing's share is what changed since the last one, so it
 * includes the wait to run again after the queue woke the writer.  Once
 * the landings since its last look add up to WB_REST_SAMPLE_NS, it
 * looks: if they waited for a CPU longer than they ran, and at least
 * WB_REST_MIN_WAIT_NS each (an idle machine also takes a few
 * microseconds to wake a thread, longer than a small landing runs), the
 * CPU is contended, and the writer rests WB_REST_FACTOR times that long,
 * at most WB_REST_MAX_NS, on rest_cond.
 * No rest while stopping, while may_rest says someone waits for a region
 * (a queued copy may hold it), or until hurry_until_ns; hurry and stop
 * end a rest early.  Without schedstat, no rests.
 *
 * Settling: the writer hands each landed copy to the settler thread
 * (the settle queue, WB_SETTLE_SLOTS; when it is full the copy is not
 * settled, its pages stay cached).  The settler begins each at once and
 * ends the oldest begun while they hold more than WB_SETTLE_BYTES (or
 * its ring is full), and all of them when the queue runs dry: enough
 * for their writeback to be done, mostly, when it is waited for.  Its
 * own thread because both may wait for writeback, seconds on a busy
 * disk, while the writer's queued copies hold their regions' locks.
 *
 * Spare buffers: sizes are powers of two from 64 KiB (a region's worth;
 * misses of one client mostly have one size), one free list a size, the
 * link kept in the buffer itself.  When the misses change size, a miss
 * that finds no spare of its own and no room evicts one of another size,
 * so the spares follow the misses.  Stopping frees them all.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "aclone/clock.h"
#include "writebehind.h"

#define WRITER_NICE 10
#define WB_SPARE_BYTES (8u << 20)      /* spare buffers kept, at most */
#define SPARE_MIN_SHIFT 16
#define SPARE_CLASSES 16               /* 64 KiB .. 2 GiB */
#define WB_SETTLE_BYTES (4u << 20)     /* begun, not ended, at most */
#define WB_SETTLE_SLOTS 64
#define WB_SETTLE_WAKE (1u << 20)      /* wake an idle settler for this */
#define WB_REST_SAMPLE_NS 2000000ull   /* landing time (run + wait) judged */
#define WB_REST_MIN_WAIT_NS 100000ull  /* a landing's wait, on average */
#define WB_REST_FACTOR 31              /* contended: busy 1/32 of the time */
#define WB_REST_MAX_NS 50000000ull
#define WB_HURRY_NS 200000000ull       /* as BOOST_NS, clone.c */

struct spare {
  struct spare *next;
};

struct item {
  struct aclone_wb_copy w;
  struct item *next;
};

struct settling {
  uint64_t off;
  size_t len;
};

/* A FIFO of settling copies. */
struct settle_ring {
  struct settling e[WB_SETTLE_SLOTS];
  unsigned head, n;
  uint64_t bytes;
};

static void
ring_push (struct settle_ring *r, uint64_t off, size_t len)
{
  r->e[(r->head + r->n) % WB_SETTLE_SLOTS] = (struct settling) { off, len };
  r->n++;
  r->bytes += len;
}

static struct settling
ring_pop (struct settle_ring *r)
{
  struct settling e = r->e[r->head];

  r->head = (r->head + 1) % WB_SETTLE_SLOTS;
  r->n--;
  r->bytes -= e.len;
  return e;
}

struct aclone_writebehind {
  struct aclone_wb_ops ops;
  void *opaque;
  size_t max_bytes;
  pthread_t thread, settler;
  bool has_settler;

  pthread_mutex_t lock;
  pthread_cond_t cond;               /* queue not empty, or stopping */
  pthread_cond_t rest_cond;          /* hurry, or stopping (monotonic) */
  uint64_t hurry_until_ns;           /* no rests before */
  uint64_t rests;                    /* cumulative */
  struct item *head, *tail;
  uint64_t pending;                  /* bytes queued or landing */
  _Atomic uint64_t pending_hint;     /* pending, for has_room: no lock */
  uint64_t queued;                   /* copies queued, cumulative */
  struct spare *spares[SPARE_CLASSES];
  uint64_t spare_bytes;
  bool stopping;
  bool joined;                       /* stop has joined, or is joining */

  struct settle_ring settle_q;        /* landed, for the settler */
  pthread_cond_t settle_cond;        /* settle_q not empty, or stopping */
  bool settler_idle;                 /* waiting on settle_cond */
};

/* Hand a landed copy to the settler.  Must be called with wb->lock held. */
static void
settle_queue (struct aclone_writebehind *wb, uint64_t off, size_t len)
{
  struct settle_ring *q = &wb->settle_q;

  if (q->n < WB_SETTLE_SLOTS)
    ring_push (q, off, len);
  /* else: behind, this one stays cached. */
  /* One wake-up for a few copies while more are coming (but a full ring
   * of small ones is a few too).
   */
  if (wb->settler_idle &&
      (q->bytes >= WB_SETTLE_WAKE || q->n >= WB_SETTLE_SLOTS / 2 || !wb->head))
    pthread_cond_signal (&wb->settle_cond);
}

static void *
settler (void *arg)
{
  struct aclone_writebehind *wb = arg;
  struct settle_ring begun = { 0 };

  pthread_setname_np (pthread_self (), "aclone-corset");
  setpriority (PRIO_PROCESS, gettid (), WRITER_NICE);
  pthread_mutex_lock (&wb->lock);
  while (!wb->stopping) {
    if (wb->settle_q.n == 0) {
      if (begun.n > 0) {
        /* Nothing new: end what was begun (one at a time: stop need
         * not wait for all their writeback).
         */
        struct settling o = ring_pop (&begun);
        pthread_mutex_unlock (&wb->lock);
        wb->ops.settle (wb->opaque, o.off, o.len, true);
        pthread_mutex_lock (&wb->lock);
        continue;
      }
      wb->settler_idle = true;
      pthread_cond_wait (&wb->settle_cond, &wb->lock);
      wb->settler_idle = false;
      continue;
    }
    struct settling e = ring_pop (&wb->settle_q);
    pthread_mutex_unlock (&wb->lock);
    wb->ops.settle (wb->opaque, e.off, e.len, false);
    while (begun.n > 0 && (begun.n == WB_SETTLE_SLOTS ||
                           begun.bytes + e.len > WB_SETTLE_BYTES)) {
      struct settling o = ring_pop (&begun);
      wb->ops.settle (wb->opaque, o.off, o.len, true);
    }
    ring_push (&begun, e.off, e.len);
    pthread_mutex_lock (&wb->lock);
  }
  pthread_mutex_unlock (&wb->lock);
  return NULL;
}

/* This thread's CPU time and time spent waiting for a CPU, in ns, from
 * fd (its /proc/thread-self/schedstat).  false if unreadable.
 */
static bool
cpu_times (int fd, uint64_t *run, uint64_t *wait)
{
  char b[96];
  unsigned long long r, w;
  ssize_t n = fd < 0 ? -1 : pread (fd, b, sizeof b - 1, 0);

  if (n <= 0)
    return false;
  b[n] = '\0';
  if (sscanf (b, "%llu %llu", &r, &w) != 2)
    return false;
  *run = r;
  *wait = w;
  return true;
}

/* n landings took `run` ns on a CPU and waited `wait` ns for one: rest
 * if that wait says the CPU is contended (see the top of the file).  Must
 * be called with wb->lock held; returns with it held.
 */
static void
rest_if_contended (struct aclone_writebehind *wb, uint64_t run, uint64_t wait,
                   uint64_t n)
{
  uint64_t now = aclone_now_ns ();

  if (wait <= run || wait < n * WB_REST_MIN_WAIT_NS)
    return;                          /* not contended */
  if (wb->stopping || now < wb->hurry_until_ns ||
      (wb->ops.may_rest && !wb->ops.may_rest (wb->opaque)))
    return;
  uint64_t nap = (run + wait) * WB_REST_FACTOR;
  uint64_t until = now + (nap < WB_REST_MAX_NS ? nap : WB_REST_MAX_NS);
  struct timespec ts = { (time_t) (until / 1000000000u),
                         (long) (until % 1000000000u) };
  wb->rests++;
  while (!wb->stopping && aclone_now_ns () < until &&
         aclone_now_ns () >= wb->hurry_until_ns &&
         pthread_cond_timedwait (&wb->rest_cond, &wb->lock, &ts) != ETIMEDOUT)
    ;
}

static void *
writer (void *arg)
{
  struct aclone_writebehind *wb = arg;
  uint64_t run0 = 0, wait0 = 0, run1, wait1, run_sum = 0, wait_sum = 0;
  uint64_t landings = 0;

  /* Background work: below the threads serving clients, whose replies
   * no longer wait for it.  (Not idle: a client write to a region whose
   * copy is queued waits for the writer; rests give way instead.)
   */
  pthread_setname_np (pthread_self (), "aclone-corwb");
  setpriority (PRIO_PROCESS, gettid (), WRITER_NICE);
  int stat_fd = open ("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
  bool timed = cpu_times (stat_fd, &run0, &wait0);

  pthread_mutex_lock (&wb->lock);
  for (;;) {
    while (!wb->head && !wb->stopping)
      pthread_cond_wait (&wb->cond, &wb->lock);
    struct item *it = wb->head;
    if (!it)
      break;                         /* stopping, and nothing left */
    wb->head = it->next;
    if (!wb->head)
      wb->tail = NULL;
    pthread_mutex_unlock (&wb->lock);
    wb->ops.land (wb->opaque, &it->w);
    aclone_writebehind_buf_put (wb, it->w.buf, it->w.cap);
    if (timed && cpu_times (stat_fd, &run1, &wait1)) {
      run_sum += run1 - run0;
      wait_sum += wait1 - wait0;
      landings++;
      run0 = run1;
      wait0 = wait1;
    }
    pthread_mutex_lock (&wb->lock);
    wb->pending -= it->w.len;
    atomic_store_explicit (&wb->pending_hint, wb->pending, memory_order_relaxed);
    if (wb->has_settler)
      settle_queue (wb, it->w.off, it->w.len);
    free (it);
    if (run_sum + wait_sum >= WB_REST_SAMPLE_NS) {
      rest_if_contended (wb, run_sum, wait_sum, landings);
      run_sum = wait_sum = landings = 0;
    }
  }
  pthread_mutex_unlock (&wb->lock);
  if (stat_fd >= 0)
    close (stat_fd);
  return NULL;
}

int
aclone_writebehind_start (const struct aclone_wb_ops *ops, void *opaque,
                          size_t max_bytes, struct aclone_writebehind **out)
{
  struct aclone_writebehind *wb = calloc (1, sizeof *wb);
  pthread_condattr_t ca;
  int r;

  if (!wb)
    return -ENOMEM;
  wb->ops = *ops;
  wb->opaque = opaque;
  wb->max_bytes = max_bytes;
  pthread_mutex_init (&wb->lock, NULL);
  pthread_cond_init (&wb->cond, NULL);
  pthread_cond_init (&wb->settle_cond, NULL);
  pthread_condattr_init (&ca);
  pthread_condattr_setclock (&ca, CLOCK_MONOTONIC);
  pthread_cond_init (&wb->rest_cond, &ca);
  pthread_condattr_destroy (&ca);
  r = pthread_create (&wb->thread, NULL, writer, wb);
  if (r == 0 && ops->settle) {
    r = pthread_create (&wb->settler, NULL, settler, wb);
    pthread_mutex_lock (&wb->lock);
    if (r == 0)
      wb->has_settler = true;
    else {
      wb->stopping = true;
      pthread_cond_signal (&wb->cond);
    }
    pthread_mutex_unlock (&wb->lock);
    if (r != 0)
      pthread_join (wb->thread, NULL);
  }
  if (r != 0) {
    pthread_mutex_destroy (&wb->lock);
    pthread_cond_destroy (&wb->cond);
    pthread_cond_destroy (&wb->settle_cond);
    pthread_cond_destroy (&wb->rest_cond);
    free (wb);
    return -r;
  }
  *out = wb;
  return 0;
}

static size_t
class_size (unsigned k)
{
  return (size_t) 1 << (k + SPARE_MIN_SHIFT);
}

/* The size class of a len-byte buffer, the smallest whose class_size
 * holds it; SPARE_CLASSES for a size no spare is kept of.
 */
static unsigned
spare_class (size_t len)
{
  unsigned k = 0;

  while (k < SPARE_CLASSES && class_size (k) < len)
    k++;
  return k;
}

/* Take a spare of class k off its list.  Must be called with wb->lock
 * held.
 */
static struct spare *
spare_pop (struct aclone_writebehind *wb, unsigned k)
{
  struct spare *s = wb->spares[k];

  if (s) {
    wb->spares[k] = s->next;
    wb->spare_bytes -= class_size (k);
  }
  return s;
}

char *
aclone_writebehind_buf (struct aclone_writebehind *wb, size_t len, size_t *cap)
{
  unsigned k = spare_class (len);
  struct spare *s, *evicted = NULL;

  if (k == SPARE_CLASSES) {
    *cap = len;
    return malloc (len);
  }
  *cap = class_size (k);
  pthread_mutex_lock (&wb->lock);
  s = spare_pop (wb, k);
  /* None of this size: make room for it, largest spares first. */
  for (unsigned j = SPARE_CLASSES; !s && j-- > 0; ) {
    struct spare *e;
    while (wb->spare_bytes + *cap > WB_SPARE_BYTES &&
           (e = spare_pop (wb, j)) != NULL) {
      e->next = evicted;
      evicted = e;
    }
  }
  pthread_mutex_unlock (&wb->lock);
  while (evicted) {
    struct spare *e = evicted;
    evicted = e->next;
    free (e);
  }
  return s ? (char *) s : malloc (*cap);
}

void
aclone_writebehind_buf_put (struct aclone_writebehind *wb, char *buf,
                            size_t cap)
{
  unsigned k = spare_class (cap);
  bool kept = false;

  if (!buf)
    return;
  pthread_mutex_lock (&wb->lock);
  if (k < SPARE_CLASSES && cap == class_size (k) && !wb->stopping &&
      wb->spare_bytes + cap <= WB_SPARE_BYTES) {
    struct spare *s = (struct spare *) buf;
    s->next = wb->spares[k];
    wb->spares[k] = s;
    wb->spare_bytes += cap;
    kept = true;
  }
  pthread_mutex_unlock (&wb->lock);
  if (!kept)
    free (buf);
}

/* Is there room for len more bytes?  One copy larger than the bound
 * still goes, into an empty queue.  Must be called with wb->lock held.
 */
static bool
__room (const struct aclone_writebehind *wb, size_t len)
{
  return !wb->stopping &&
         (wb->pending == 0 || wb->pending + len <= wb->max_bytes);
}

bool
aclone_writebehind_queue (struct aclone_writebehind *wb,
                          const struct aclone_wb_copy *w)
{
  struct item *it;
  bool ok = false;

  if (!wb || !(it = malloc (sizeof *it)))
    return false;
  it->w = *w;
  it->next = NULL;
  pthread_mutex_lock (&wb->lock);
  if (__room (wb, w->len)) {
    if (wb->tail)
      wb->tail->next = it;
    else
      wb->head = it;
    wb->tail = it;
    wb->pending += w->len;
    atomic_store_explicit (&wb->pending_hint, wb->pending, memory_order_relaxed);
    wb->queued++;
    pthread_cond_signal (&wb->cond);
    ok = true;
  }
  pthread_mutex_unlock (&wb->lock);
  if (!ok)
    free (it);
  return ok;
}

/* A hint, as its contract says: so no lock, which every miss of every
 * client would otherwise take while the queue is full.
 */
bool
aclone_writebehind_has_room (struct aclone_writebehind *wb, size_t len)
{
  uint64_t pending = atomic_load_explicit (&wb->pending_hint,
                                           memory_order_relaxed);

  return pending == 0 || pending + len <= wb->max_bytes;
}

/* One of wb's counters, read under wb->lock. */
static uint64_t
locked_read (struct aclone_writebehind *wb, const uint64_t *field)
{
  uint64_t v;

  pthread_mutex_lock (&wb->lock);
  v = *field;
  pthread_mutex_unlock (&wb->lock);
  return v;
}

uint64_t
aclone_writebehind_pending (struct aclone_writebehind *wb)
{
  return locked_read (wb, &wb->pending);
}

uint64_t
aclone_writebehind_spare_bytes (struct aclone_writebehind *wb)
{
  return locked_read (wb, &wb->spare_bytes);
}

uint64_t
aclone_writebehind_queued (struct aclone_writebehind *wb)
{
  return locked_read (wb, &wb->queued);
}

uint64_t
aclone_writebehind_rests (struct aclone_writebehind *wb)
{
  return locked_read (wb, &wb->rests);
}

void
aclone_writebehind_hurry (struct aclone_writebehind *wb)
{
  pthread_mutex_lock (&wb->lock);
  wb->hurry_until_ns = aclone_now_ns () + WB_HURRY_NS;
  pthread_cond_signal (&wb->rest_cond);
  pthread_mutex_unlock (&wb->lock);
}

/* Free every spare.  Must be called with wb->lock held. */
static void
spares_free (struct aclone_writebehind *wb)
{
  for (unsigned k = 0; k < SPARE_CLASSES; k++) {
    struct spare *s;
    while ((s = spare_pop (wb, k)) != NULL)
      free (s);
  }
}

void
aclone_writebehind_stop (struct aclone_writebehind *wb)
{
  if (!wb)
    return;
  pthread_mutex_lock (&wb->lock);
  bool joined = wb->joined;
  wb->stopping = true;
  wb->joined = true;
  pthread_cond_signal (&wb->cond);
  pthread_cond_signal (&wb->rest_cond);
  pthread_cond_signal (&wb->settle_cond);
  pthread_mutex_unlock (&wb->lock);
  if (!joined) {
    pthread_join (wb->thread, NULL);
    if (wb->has_settler)
      pthread_join (wb->settler, NULL);
  }
  pthread_mutex_lock (&wb->lock);
  spares_free (wb);                  /* none are kept once stopping */
  pthread_mutex_unlock (&wb->lock);
}

void
aclone_writebehind_free (struct aclone_writebehind *wb)
{
  if (!wb)
    return;
  aclone_writebehind_stop (wb);
  pthread_mutex_destroy (&wb->lock);
  pthread_cond_destroy (&wb->cond);
  pthread_cond_destroy (&wb->settle_cond);
  pthread_cond_destroy (&wb->rest_cond);
  free (wb);
}
