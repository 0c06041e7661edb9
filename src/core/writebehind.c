/* aclone: copy-on-read write-behind: a FIFO of copies and the one thread
 * that lands them.  See writebehind.h for the protocol.
 *
 * Locking: wb->lock protects the queue, pending, stopping and the
 * spares; the land callback runs without it (it does I/O), on the writer
 * thread only.
 *
 * Spare buffers: sizes are powers of two from 64 KiB (a region's worth;
 * misses of one client mostly have one size), one free list a size, the
 * link kept in the buffer itself.  When the misses change size, a miss
 * that finds no spare of its own and no room evicts one of another size,
 * so the spares follow the misses.  Stopping frees them all.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <unistd.h>

#include "writebehind.h"

#define WRITER_NICE 10
#define WB_SPARE_BYTES (8u << 20)      /* spare buffers kept, at most */
#define SPARE_MIN_SHIFT 16
#define SPARE_CLASSES 16               /* 64 KiB .. 2 GiB */

struct spare {
  struct spare *next;
};

struct item {
  struct aclone_wb_copy w;
  struct item *next;
};

struct aclone_writebehind {
  aclone_wb_land_fn land;
  void *opaque;
  size_t max_bytes;
  pthread_t thread;

  pthread_mutex_t lock;
  pthread_cond_t cond;               /* queue not empty, or stopping */
  struct item *head, *tail;
  uint64_t pending;                  /* bytes queued or landing */
  uint64_t queued;                   /* copies queued, cumulative */
  struct spare *spares[SPARE_CLASSES];
  uint64_t spare_bytes;
  bool stopping;
  bool joined;                       /* stop has joined, or is joining */
};

static void *
writer (void *arg)
{
  struct aclone_writebehind *wb = arg;

  /* Background work: below the threads serving clients, whose replies
   * no longer wait for it.  (Not idle: a full queue makes misses write
   * in line, so a starved writer would slow clients down.)
   */
  pthread_setname_np (pthread_self (), "aclone-corwb");
  setpriority (PRIO_PROCESS, gettid (), WRITER_NICE);

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
    wb->land (wb->opaque, &it->w);
    aclone_writebehind_buf_put (wb, it->w.buf, it->w.cap);
    pthread_mutex_lock (&wb->lock);
    wb->pending -= it->w.len;
    free (it);
  }
  pthread_mutex_unlock (&wb->lock);
  return NULL;
}

int
aclone_writebehind_start (aclone_wb_land_fn land, void *opaque,
                          size_t max_bytes, struct aclone_writebehind **out)
{
  struct aclone_writebehind *wb = calloc (1, sizeof *wb);
  int r;

  if (!wb)
    return -ENOMEM;
  wb->land = land;
  wb->opaque = opaque;
  wb->max_bytes = max_bytes;
  pthread_mutex_init (&wb->lock, NULL);
  pthread_cond_init (&wb->cond, NULL);
  r = pthread_create (&wb->thread, NULL, writer, wb);
  if (r != 0) {
    pthread_mutex_destroy (&wb->lock);
    pthread_cond_destroy (&wb->cond);
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
    wb->queued++;
    pthread_cond_signal (&wb->cond);
    ok = true;
  }
  pthread_mutex_unlock (&wb->lock);
  if (!ok)
    free (it);
  return ok;
}

bool
aclone_writebehind_has_room (struct aclone_writebehind *wb, size_t len)
{
  bool room;

  pthread_mutex_lock (&wb->lock);
  room = __room (wb, len);
  pthread_mutex_unlock (&wb->lock);
  return room;
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
  pthread_mutex_unlock (&wb->lock);
  if (!joined)
    pthread_join (wb->thread, NULL);
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
  free (wb);
}
