/* aclone: the NBD source, a pool of libnbd connections.
 *
 * Design notes
 * ------------
 * Callers (client request threads, and the hydrator for its metadata
 * queries) check a connection out of the pool, use it with libnbd's
 * synchronous API, and check it back in.  At most `connections` exist;
 * the first is opened by aclone_source_nbd_open, the others on demand.
 *
 * A connection is "dead" when libnbd says so (nbd_aio_is_dead/closed):
 * the server went away.  Dead connections are closed and the call is
 * retried on a fresh one with exponential backoff (100 ms .. 2 s) until
 * `timeout_s` has passed since the call began; then the call fails with
 * EIO.  A plain error reply on a live connection (say EIO from the
 * source's disk) is returned at once: retrying it is the hydrator's job.
 * While any call is waiting for the source, outage_since_ns says since
 * when, for the live page.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libnbd.h>
#include <bsd/string.h>

#include "aclone/source.h"

#define MAX_REQUEST (32u << 20)        /* stay under every server's limit */

struct nbd_source {
  struct aclone_source base;
  char *uri;
  unsigned timeout_s;
  unsigned max;                     /* pool size */
  bool can_extents;

  pthread_mutex_t lock;             /* protects the fields below */
  pthread_cond_t cond;
  struct nbd_handle **idle;         /* connected, not in use */
  size_t nidle;
  unsigned total;                   /* idle + checked out + connecting */
};

void
aclone_source_describe (const char *uri, char *out, size_t outlen)
{
  char buf[1024], sock[512] = "";
  strlcpy (buf, uri, sizeof buf);
  /* The query may name TLS files and users: keep only the socket path. */
  char *q = strchr (buf, '?');
  if (q) {
    char *save;
    for (char *p = strtok_r (q + 1, "&", &save); p; p = strtok_r (NULL, "&", &save))
      if (strncmp (p, "socket=", 7) == 0)
        snprintf (sock, sizeof sock, "?%.*s", (int) strcspn (p, "#"), p);
    *q = '\0';
  }
  buf[strcspn (buf, "#")] = '\0';
  char *scheme = strstr (buf, "://");
  char *at = scheme ? strchr (scheme + 3, '@') : NULL;
  char *slash = scheme ? strchr (scheme + 3, '/') : NULL;
  if (at && (!slash || at < slash))      /* userinfo */
    memmove (scheme + 3, at + 1, strlen (at + 1) + 1);
  snprintf (out, outlen, "%s%s", buf, sock);
}

/* Open one connection.  On failure fills err (when non-NULL). */
static struct nbd_handle *
connect_one (struct nbd_source *s, struct aclone_error *err)
{
  struct nbd_handle *h = nbd_create ();

  if (!h) {
    aclone_error_set (err, 0, "source %s: %s", s->base.desc, nbd_get_error ());
    return NULL;
  }
  nbd_set_handle_name (h, "aclone-source");
  /* Every read either fills the whole buffer or fails and is discarded:
   * libnbd's defensive zeroing of read buffers is pure cost here.
   */
  nbd_set_pread_initialize (h, false);
  if (nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0 ||
      nbd_connect_uri (h, s->uri) < 0) {
    aclone_error_set (err, 0, "source %s: %s", s->base.desc, nbd_get_error ());
    nbd_close (h);
    return NULL;
  }
  return h;
}

/* Check out a connection, opening one if the pool has room.  Returns
 * NULL if opening failed (the source is unreachable).
 */
static struct nbd_handle *
acquire (struct nbd_source *s)
{
  struct nbd_handle *h = NULL;

  pthread_mutex_lock (&s->lock);
  while (s->nidle == 0 && s->total >= s->max)
    pthread_cond_wait (&s->cond, &s->lock);
  if (s->nidle > 0)
    h = s->idle[--s->nidle];
  else
    s->total++;
  pthread_mutex_unlock (&s->lock);
  if (h)
    return h;

  h = connect_one (s, NULL);
  if (!h) {
    pthread_mutex_lock (&s->lock);
    s->total--;
    pthread_cond_signal (&s->cond);
    pthread_mutex_unlock (&s->lock);
  }
  return h;
}

static void
release (struct nbd_source *s, struct nbd_handle *h)
{
  bool dead = nbd_aio_is_dead (h) || nbd_aio_is_closed (h);

  if (dead)
    nbd_close (h);
  pthread_mutex_lock (&s->lock);
  if (dead)
    s->total--;
  else
    s->idle[s->nidle++] = h;
  pthread_cond_signal (&s->cond);
  pthread_mutex_unlock (&s->lock);
}

struct call {
  enum { CALL_PREAD, CALL_EXTENTS } kind;
  void *buf;
  uint64_t count, offset;
  aclone_extent_fn fn;
  void *opaque;
  bool stop;
};

static int
extent_cb (void *opaque, const char *context, uint64_t offset,
           uint32_t *entries, size_t n, int *error)
{
  struct call *c = opaque;
  (void) error;

  if (strcmp (context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  for (size_t i = 0; i + 1 < n && !c->stop; i += 2) {
    if (c->fn (c->opaque, offset, entries[i],
               (entries[i + 1] & LIBNBD_STATE_ZERO) != 0))
      c->stop = true;
    offset += entries[i];
  }
  return 0;
}

static int
run_call (struct nbd_handle *h, struct call *c)
{
  if (c->kind == CALL_PREAD)
    return nbd_pread (h, c->buf, c->count, c->offset, 0);
  nbd_extent_callback cb = { .callback = extent_cb, .user_data = c };
  return nbd_block_status (h, c->count, c->offset, cb, 0);
}

/* Run one call, riding out a lost source for up to timeout_s. */
static int
with_retry (struct nbd_source *s, struct call *c)
{
  unsigned long long start = aclone_now_ns ();
  unsigned long long deadline = start + s->timeout_s * 1000000000ull;
  unsigned long long backoff = 100000000ull;     /* 100 ms */
  bool waited = false;

  for (;;) {
    if (atomic_load (&s->base.cancelled))
      return -ESHUTDOWN;
    struct nbd_handle *h = acquire (s);
    if (h) {
      int r = run_call (h, c);
      int e = r < 0 ? nbd_get_errno () : 0;
      bool dead = nbd_aio_is_dead (h) || nbd_aio_is_closed (h);
      release (s, h);
      if (r == 0 || !dead) {
        if (waited)
          atomic_store (&s->base.outage_since_ns, 0);
        return r == 0 ? 0 : -(e ? e : EIO);
      }
    }
    /* The source is gone: note the outage, back off, try again. */
    unsigned long long zero = 0;
    atomic_compare_exchange_strong (&s->base.outage_since_ns, &zero,
                                    aclone_wall_ns ());
    waited = true;
    unsigned long long until = aclone_now_ns () + backoff;
    if (until > deadline)
      until = deadline;
    /* Sleep in slices so that a shutdown is not held up. */
    for (;;) {
      unsigned long long now = aclone_now_ns ();
      if (atomic_load (&s->base.cancelled))
        return -ESHUTDOWN;
      if (now >= until)
        break;
      unsigned long long nap = until - now < 100000000ull ? until - now : 100000000ull;
      struct timespec ts = { 0, (long) nap };
      nanosleep (&ts, NULL);
    }
    if (aclone_now_ns () >= deadline)
      return -EIO;
    backoff = backoff * 2 > 2000000000ull ? 2000000000ull : backoff * 2;
  }
}

static int
nbd_source_pread (struct aclone_source *base, void *buf, size_t count,
                  uint64_t offset)
{
  struct nbd_source *s = (struct nbd_source *) base;

  while (count > 0) {
    size_t n = count < MAX_REQUEST ? count : MAX_REQUEST;
    struct call c = { .kind = CALL_PREAD, .buf = buf, .count = n, .offset = offset };
    int r = with_retry (s, &c);
    if (r < 0)
      return r;
    buf = (char *) buf + n;
    count -= n;
    offset += n;
  }
  return 0;
}

static int
nbd_source_extents (struct aclone_source *base, uint64_t offset,
                    uint64_t count, aclone_extent_fn fn, void *opaque)
{
  struct nbd_source *s = (struct nbd_source *) base;

  if (!s->can_extents)
    return -ENOTSUP;
  if (count > (UINT32_MAX & ~UINT32_C (0xfffff)))
    count = UINT32_MAX & ~UINT32_C (0xfffff);
  struct call c = { .kind = CALL_EXTENTS, .count = count, .offset = offset,
                    .fn = fn, .opaque = opaque };
  return with_retry (s, &c);
}

static void
nbd_source_close (struct aclone_source *base)
{
  struct nbd_source *s = (struct nbd_source *) base;

  /* Idle connections have nothing in flight: closing them is a clean
   * EOF for the server, and unlike nbd_shutdown cannot block on a source
   * that hangs.
   */
  for (size_t i = 0; i < s->nidle; i++)
    nbd_close (s->idle[i]);
  pthread_mutex_destroy (&s->lock);
  pthread_cond_destroy (&s->cond);
  free (s->idle);
  free (s->uri);
  free (s);
}

static struct nbd_handle *
nbd_source_aio_connect (struct aclone_source *base)
{
  return connect_one ((struct nbd_source *) base, NULL);
}

static const struct aclone_source_ops nbd_ops = {
  .pread = nbd_source_pread,
  .extents = nbd_source_extents,
  .aio_connect = nbd_source_aio_connect,
  .close = nbd_source_close,
};

int
aclone_source_nbd_open (const struct aclone_source_config *cfg,
                        struct aclone_source **out, struct aclone_error *err)
{
  struct nbd_source *s = calloc (1, sizeof *s);
  struct nbd_handle *h;
  int64_t size;

  if (!s)
    return aclone_error_set (err, ENOMEM, "source");
  s->base.ops = &nbd_ops;
  aclone_source_describe (cfg->uri, s->base.desc, sizeof s->base.desc);
  s->uri = strdup (cfg->uri);
  s->max = cfg->connections ? cfg->connections : 1;
  s->timeout_s = cfg->timeout_s;
  s->idle = calloc (s->max, sizeof *s->idle);
  pthread_mutex_init (&s->lock, NULL);
  pthread_cond_init (&s->cond, NULL);
  if (!s->uri || !s->idle) {
    nbd_source_close (&s->base);
    return aclone_error_set (err, ENOMEM, "source");
  }

  h = connect_one (s, err);
  if (!h) {
    nbd_source_close (&s->base);
    return -EIO;
  }
  size = nbd_get_size (h);
  if (size <= 0) {
    aclone_error_set (err, 0, "source %s: %s", s->base.desc,
                      size < 0 ? nbd_get_error () : "export is empty");
    nbd_close (h);
    nbd_source_close (&s->base);
    return -EIO;
  }
  s->base.size = size;
  s->base.multi_conn = nbd_can_multi_conn (h) == 1;
  s->can_extents = nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  /* Several connections to a server without multi-conn could see each
   * other's writes out of order; we only read, but be conservative.
   */
  if (!s->base.multi_conn)
    s->max = 1;
  s->idle[s->nidle++] = h;
  s->total = 1;
  *out = &s->base;
  return 0;
}
