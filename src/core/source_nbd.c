/* aclone: the NBD source, a pool of libnbd connections.
 *
 * Design notes
 * ------------
 * Callers (client request threads, and the hydrator for its metadata
 * queries) check a connection out of the pool, run one command on it, and
 * check it back in.  At most `connections` exist; the first is opened by
 * aclone_source_nbd_open, the others on demand.
 *
 * Every call has a deadline, `timeout_s` after it began, and every wait
 * is bounded by it: for a free connection, for a connect and handshake,
 * for the reply.  That is why commands go through libnbd's asynchronous
 * API driven by nbd_poll in slices of at most 100 ms (also so that a
 * shutdown, `cancelled`, is seen quickly), not its blocking calls, which
 * would wait forever on a source that hangs with its socket up.
 *
 * Two ways to lose the source:
 *   - dead: libnbd says so (nbd_aio_is_dead/closed), the server went
 *     away.  The connection is closed and the call retried on a fresh one
 *     with exponential backoff (100 ms .. 2 s) until the deadline.
 *   - hung: no reply by the deadline on a live connection.  It is closed
 *     (its state is unknown: a late reply must not be taken for another
 *     command's) and the call fails.
 * Either way the call fails with EIO at its deadline.  A plain error
 * reply on a live connection (say EIO from the source's disk) is
 * returned at once: retrying it is the hydrator's job.  While the source
 * is lost, outage_since_ns says since when, for the live page.
 *
 * TLS settings are applied to every connection, the first and every
 * reconnect alike.
 *
 * Request limits: the first connection's advertised block sizes
 * (nbd_get_block_size) become the source's min_block, pref_block and
 * max_request.  aclone_source_pread (generic: it works on any source's
 * ops->pread) splits reads at max_request and widens an unaligned start
 * or end to whole min_block blocks through a bounce buffer, so that the
 * ops only ever see requests the server accepts; block status requests
 * are aligned here.  A server that advertises no maximum gets at most
 * 32 MiB, the NBD spec's safe size; 32 MiB is also the most we send to
 * one that advertises more.
 */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <libnbd.h>
#include <bsd/string.h>

#include "aclone/source.h"
#include "aclone/clock.h"

struct nbd_source {
  struct aclone_source base;
  char *uri;
  char *tls_certificates, *tls_psk_file;
  bool tls_no_verify;
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

bool
aclone_source_uri_is_tls (const char *uri)
{
  return strncasecmp (uri, "nbds:", 5) == 0 || strncasecmp (uri, "nbds+", 5) == 0;
}

static unsigned long long
deadline_after (unsigned seconds)
{
  return aclone_now_ns () + seconds * 1000000000ull;
}

/* Drive h until the connect (cookie < 0) or the command `cookie` is done,
 * the deadline passes or the source is cancelled.  Returns 0, -ETIMEDOUT,
 * -ESHUTDOWN, or another -errno with libnbd's message in its error.
 */
static int
drive (struct nbd_source *s, struct nbd_handle *h, int64_t cookie,
       unsigned long long deadline)
{
  for (;;) {
    if (cookie < 0) {
      if (!nbd_aio_is_connecting (h) && !nbd_aio_is_created (h))
        return nbd_aio_is_ready (h) ? 0 : -ECONNREFUSED;
    }
    else {
      int r = nbd_aio_command_completed (h, cookie);
      if (r == 1)
        return 0;
      if (r < 0) {
        int e = nbd_get_errno ();
        return -(e ? e : EIO);
      }
    }
    if (atomic_load (&s->base.cancelled))
      return -ESHUTDOWN;
    unsigned long long now = aclone_now_ns ();
    if (now >= deadline)
      return -ETIMEDOUT;
    unsigned long long left_ms = (deadline - now + 999999) / 1000000;
    if (nbd_poll (h, left_ms < 100 ? (int) left_ms : 100) < 0) {
      int e = nbd_get_errno ();
      return -(e ? e : EIO);
    }
  }
}

/* Open one connection, waiting at most until deadline.  On failure fills
 * err (when non-NULL) and returns NULL.
 */
static struct nbd_handle *
connect_one (struct nbd_source *s, unsigned long long deadline,
             struct aclone_error *err)
{
  struct nbd_handle *h = nbd_create ();
  int r = -EIO;

  if (!h) {
    aclone_error_set (err, 0, "source %s: %s", s->base.desc, nbd_get_error ());
    return NULL;
  }
  nbd_set_handle_name (h, "aclone-source");
  /* Every read either fills the whole buffer or fails and is discarded:
   * libnbd's defensive zeroing of read buffers is pure cost here.
   */
  nbd_set_pread_initialize (h, false);
  /* We align every request to the minimum block size ourselves, but an
   * export whose size is not a multiple of it can only be read to its
   * end with a shorter last request: let the server judge that one
   * rather than libnbd refusing it client-side (LIBNBD_STRICT_ALIGN).
   */
  int strict = nbd_get_strict_mode (h);
  if (strict >= 0)
    nbd_set_strict_mode (h, strict & ~LIBNBD_STRICT_ALIGN);
  if ((s->tls_certificates &&
       nbd_set_tls_certificates (h, s->tls_certificates) < 0) ||
      (s->tls_psk_file && nbd_set_tls_psk_file (h, s->tls_psk_file) < 0) ||
      (s->tls_no_verify && nbd_set_tls_verify_peer (h, false) < 0) ||
      nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0 ||
      nbd_aio_connect_uri (h, s->uri) < 0 ||
      (r = drive (s, h, -1, deadline)) < 0) {
    if (r == -ETIMEDOUT)
      aclone_error_set (err, 0, "source %s: no answer within %u s",
                        s->base.desc, s->timeout_s);
    else if (r == -ESHUTDOWN)
      aclone_error_set (err, 0, "source %s: shutting down", s->base.desc);
    else
      aclone_error_set (err, 0, "source %s: %s", s->base.desc,
                        nbd_get_error () ? nbd_get_error () : "cannot connect");
    nbd_close (h);
    return NULL;
  }
  return h;
}

/* Check out a connection, opening one if the pool has room.  Returns
 * NULL if opening failed (the source is unreachable) or the deadline
 * passed while every connection was busy.
 */
static struct nbd_handle *
acquire (struct nbd_source *s, unsigned long long deadline)
{
  struct nbd_handle *h = NULL;

  pthread_mutex_lock (&s->lock);
  while (s->nidle == 0 && s->total >= s->max) {
    unsigned long long now = aclone_now_ns ();
    if (now >= deadline || atomic_load (&s->base.cancelled)) {
      pthread_mutex_unlock (&s->lock);
      return NULL;
    }
    /* Bounded slices: the condition variable uses CLOCK_MONOTONIC. */
    struct timespec ts;
    clock_gettime (CLOCK_MONOTONIC, &ts);
    unsigned long long nap = deadline - now < 100000000ull ? deadline - now : 100000000ull;
    ts.tv_nsec += nap;
    if (ts.tv_nsec >= 1000000000) {
      ts.tv_sec++;
      ts.tv_nsec -= 1000000000;
    }
    pthread_cond_timedwait (&s->cond, &s->lock, &ts);
  }
  if (s->nidle > 0)
    h = s->idle[--s->nidle];
  else
    s->total++;
  pthread_mutex_unlock (&s->lock);
  if (h)
    return h;

  h = connect_one (s, deadline, NULL);
  if (!h) {
    pthread_mutex_lock (&s->lock);
    s->total--;
    pthread_cond_signal (&s->cond);
    pthread_mutex_unlock (&s->lock);
  }
  return h;
}

/* Check a connection back in; a dead one, or one we gave up waiting on
 * (discard), is closed instead.
 */
static void
release (struct nbd_source *s, struct nbd_handle *h, bool discard)
{
  bool dead = discard || nbd_aio_is_dead (h) || nbd_aio_is_closed (h);

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
  uint64_t from;                    /* extents: report from here on */
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
    uint64_t end = offset + entries[i];
    /* The request began at an aligned offset below what was asked. */
    if (end > c->from &&
        c->fn (c->opaque, offset > c->from ? offset : c->from,
               end - (offset > c->from ? offset : c->from),
               (entries[i + 1] & LIBNBD_STATE_ZERO) != 0))
      c->stop = true;
    offset = end;
  }
  return 0;
}

/* Issue c on h and wait for its reply until deadline. */
static int
run_call (struct nbd_source *s, struct nbd_handle *h, struct call *c,
          unsigned long long deadline)
{
  int64_t cookie;

  if (c->kind == CALL_PREAD)
    cookie = nbd_aio_pread (h, c->buf, c->count, c->offset,
                            NBD_NULL_COMPLETION, 0);
  else {
    nbd_extent_callback cb = { .callback = extent_cb, .user_data = c };
    cookie = nbd_aio_block_status (h, c->count, c->offset, cb,
                                   NBD_NULL_COMPLETION, 0);
  }
  if (cookie < 0) {
    int e = nbd_get_errno ();
    return -(e ? e : EIO);
  }
  return drive (s, h, cookie, deadline);
}

/* Run one call within timeout_s, riding out a lost source. */
static int
with_retry (struct nbd_source *s, struct call *c)
{
  unsigned long long deadline = deadline_after (s->timeout_s);
  unsigned long long backoff = 0;

  for (;;) {
    if (atomic_load (&s->base.cancelled))
      return -ESHUTDOWN;
    struct nbd_handle *h = acquire (s, deadline);
    if (h) {
      int r = run_call (s, h, c, deadline);
      bool gave_up = r == -ETIMEDOUT || r == -ESHUTDOWN;
      bool dead = gave_up || nbd_aio_is_dead (h) || nbd_aio_is_closed (h);
      release (s, h, gave_up);
      if (r == 0 || !dead) {
        atomic_store (&s->base.outage_since_ns, 0);
        return r;
      }
      if (r == -ESHUTDOWN)
        return r;
      if (r == -ETIMEDOUT) {
        /* Hung: the connection is up but nothing came back. */
        aclone_source_note_outage (&s->base);
        return -EIO;
      }
    }
    /* The source is gone (or every connection stayed busy): note the
     * outage, back off, try again.
     */
    aclone_source_note_outage (&s->base);
    backoff = aclone_backoff_next (backoff, 100000000ull, 2000000000ull);
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
  }
}

/* Limits ----------------------------------------------------------------- */

uint32_t
aclone_source_min_block (const struct aclone_source *s)
{
  return s->min_block ? s->min_block : 1;
}

uint32_t
aclone_source_max_request (const struct aclone_source *s)
{
  uint32_t align = aclone_source_min_block (s);
  uint32_t max = s->max_request && s->max_request < ACLONE_SOURCE_MAX_REQUEST
                 ? s->max_request : ACLONE_SOURCE_MAX_REQUEST;
  max -= max % align;
  return max ? max : align;
}

/* Read the block [b0, MIN (b0 + align, size)), which holds [pos, end) or
 * its start, through a bounce buffer; copy [pos, end) (clipped to the
 * block) to out.  Returns how many bytes were copied, or -errno.
 */
static int64_t
pread_block (struct aclone_source *s, char **bounce, uint32_t align,
             char *out, uint64_t pos, uint64_t end)
{
  uint64_t b0 = pos - pos % align;
  uint64_t b1 = b0 + align < s->size ? b0 + align : s->size;
  uint64_t n = (end < b1 ? end : b1) - pos;

  if (!*bounce && !(*bounce = malloc (align)))
    return -ENOMEM;
  int r = s->ops->pread (s, *bounce, b1 - b0, b0);
  if (r < 0)
    return r;
  memcpy (out, *bounce + (pos - b0), n);
  return n;
}

int
aclone_source_pread (struct aclone_source *s, void *buf, size_t count,
                     uint64_t offset)
{
  uint32_t align = aclone_source_min_block (s);
  uint32_t max = aclone_source_max_request (s);
  uint64_t end = offset + count;
  char *p = buf, *bounce = NULL;
  int r = 0;

  if (count == 0)
    return 0;
  if (end < offset || end > s->size)
    return -EINVAL;
  /* An unaligned start: its whole block, through the bounce buffer. */
  if (offset % align) {
    int64_t n = pread_block (s, &bounce, align, p, offset, end);
    if (n < 0) {
      r = n;
      goto out;
    }
    p += n;
    offset += n;
  }
  /* The aligned middle: straight into buf, at most max bytes a request. */
  uint64_t mid_end = end - end % align;
  while (offset < mid_end) {
    uint64_t n = mid_end - offset < max ? mid_end - offset : max;
    r = s->ops->pread (s, p, n, offset);
    if (r < 0)
      goto out;
    p += n;
    offset += n;
  }
  /* An unaligned end: its whole block, through the bounce buffer.  At
   * the end of a source whose size is not a multiple of min_block, that
   * block is short: the one unaligned request we cannot avoid (alone,
   * so that a strict server refuses only that).
   */
  if (offset < end) {
    int64_t n = pread_block (s, &bounce, align, p, offset, end);
    if (n < 0)
      r = n;
  }
 out:
  free (bounce);
  return r;
}

/* The ops ------------------------------------------------------------------ */

/* One request, within the limits (aclone_source_pread sees to that). */
static int
nbd_source_pread (struct aclone_source *base, void *buf, size_t count,
                  uint64_t offset)
{
  struct nbd_source *s = (struct nbd_source *) base;
  struct call c = { .kind = CALL_PREAD, .buf = buf, .count = count,
                    .offset = offset };

  return with_retry (s, &c);
}

static int
nbd_source_extents (struct aclone_source *base, uint64_t offset,
                    uint64_t count, aclone_extent_fn fn, void *opaque)
{
  struct nbd_source *s = (struct nbd_source *) base;
  uint64_t align = aclone_source_min_block (base);

  if (!s->can_extents)
    return -ENOTSUP;
  if (count == 0 || offset >= base->size)
    return 0;
  if (count > base->size - offset)
    count = base->size - offset;
  /* Aligned bounds; extents before `offset` are not reported. */
  uint64_t a0 = offset - offset % align, a1 = offset + count;
  if (a1 % align) {
    a1 += align - a1 % align;
    if (a1 > base->size)
      a1 = base->size;
  }
  /* A size that is not a multiple of min_block: ask for its short last
   * block alone (the caller comes back for it), so that a server that
   * refuses it refuses nothing else.
   */
  uint64_t whole = base->size - base->size % align;
  if (a1 > whole && whole > a0)
    a1 = whole;
  /* The length field is 32 bits: at most 4 GiB - 1 MiB (a multiple of
   * every minimum block size) at a time.
   */
  if (a1 - a0 > (UINT32_MAX & ~UINT32_C (0xfffff)))
    a1 = a0 + (UINT32_MAX & ~UINT32_C (0xfffff));
  struct call c = { .kind = CALL_EXTENTS, .count = a1 - a0, .offset = a0,
                    .from = offset, .fn = fn, .opaque = opaque };
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
  free (s->tls_certificates);
  free (s->tls_psk_file);
  free (s);
}

static struct nbd_handle *
nbd_source_aio_connect (struct aclone_source *base)
{
  struct nbd_source *s = (struct nbd_source *) base;
  return connect_one (s, deadline_after (s->timeout_s), NULL);
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
  s->timeout_s = cfg->timeout_s ? cfg->timeout_s : 1;
  s->base.timeout_s = s->timeout_s;
  s->tls_no_verify = cfg->tls_no_verify;
  if (cfg->tls_certificates)
    s->tls_certificates = strdup (cfg->tls_certificates);
  if (cfg->tls_psk_file)
    s->tls_psk_file = strdup (cfg->tls_psk_file);
  s->idle = calloc (s->max, sizeof *s->idle);
  pthread_mutex_init (&s->lock, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init (&ca);
  pthread_condattr_setclock (&ca, CLOCK_MONOTONIC);
  pthread_cond_init (&s->cond, &ca);
  pthread_condattr_destroy (&ca);
  if (!s->uri || !s->idle ||
      (cfg->tls_certificates && !s->tls_certificates) ||
      (cfg->tls_psk_file && !s->tls_psk_file)) {
    nbd_source_close (&s->base);
    return aclone_error_set (err, ENOMEM, "source");
  }

  if ((cfg->tls_certificates || cfg->tls_psk_file || cfg->tls_no_verify) &&
      !aclone_source_uri_is_tls (cfg->uri)) {
    aclone_error_set (err, 0, "source %s: TLS settings given, but the URI "
                      "does not ask for TLS (use nbds:// or nbds+unix://)",
                      s->base.desc);
    nbd_source_close (&s->base);
    return -EINVAL;
  }
  h = connect_one (s, deadline_after (s->timeout_s), err);
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
  /* Block size constraints (0 or -1: not advertised).  A minimum is a
   * power of two up to 64K by the spec; anything else is ignored.  A
   * maximum is used between the minimum and 32M.
   */
  int64_t bmin = nbd_get_block_size (h, LIBNBD_SIZE_MINIMUM);
  int64_t bpref = nbd_get_block_size (h, LIBNBD_SIZE_PREFERRED);
  int64_t bmax = nbd_get_block_size (h, LIBNBD_SIZE_MAXIMUM);
  s->base.min_block = bmin > 0 && bmin <= 65536 && !(bmin & (bmin - 1))
                      ? (uint32_t) bmin : 1;
  s->base.pref_block = bpref > 0 && bpref <= UINT32_MAX ? (uint32_t) bpref : 0;
  if (bmax > 0 && bmax < s->base.min_block)
    bmax = s->base.min_block;
  s->base.max_request = bmax > 0 && bmax < ACLONE_SOURCE_MAX_REQUEST
                        ? (uint32_t) bmax : ACLONE_SOURCE_MAX_REQUEST;
  s->base.max_request = aclone_source_max_request (&s->base);  /* aligned */
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
