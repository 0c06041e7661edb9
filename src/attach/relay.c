/* aclone: the TLS relay of `aclone attach`.
 *
 * Design notes
 * ------------
 * The kernel's NBD client is handed a socket after the handshake and
 * speaks plain NBD on it: it cannot do TLS.  nbd-client answers that with
 * a userspace proxy; so do we, with libnbd on the far side, so that TLS
 * (certificates, a pre-shared key, peer verification) is set up exactly
 * as `aclone verify` and the plugin's source do.
 *
 *     kernel <-- socket pair --> relay thread <-- libnbd, TLS --> server
 *
 * One relay thread per connection.  It reads the kernel's requests
 * (simple NBD requests: READ, WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES,
 * DISC), issues each through libnbd's asynchronous calls, and writes a
 * simple reply when libnbd completes it; up to RELAY_MAX_IN_FLIGHT at
 * once, in any order, matched by the kernel's cookie.
 *
 * How it ends decides what the kernel does next:
 *   1. The kernel closes its end (the device was detached, or the
 *      connection replaced): the relay closes the handle and exits.
 *   2. DISC: the same, once the server has been told.
 *   3. The server's connection dies: the relay closes the kernel's socket
 *      *without* replying to what is in flight.  To the kernel this is a
 *      dead connection like any other: it requeues those requests on a
 *      live connection, or holds them for the reconnect (attach.c), as
 *      with a plain socket.  An error reply instead would fail them.
 * A request the server answers with an error (the connection alive) gets
 * that error, as NBD's errno codes.
 *
 * Writes to the kernel are blocking sends (MSG_NOSIGNAL): the kernel's
 * receive thread reads replies as they come, independently of its
 * sender, so a full socket buffer only waits for it.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <endian.h>

#include "relay.h"

#define REQUEST_MAGIC 0x25609513u
#define REPLY_MAGIC   0x67446698u

enum { CMD_READ = 0, CMD_WRITE = 1, CMD_DISC = 2, CMD_FLUSH = 3,
       CMD_TRIM = 4, CMD_CACHE = 5, CMD_WRITE_ZEROES = 6 };
#define CMD_FLAG_FUA     (1u << 0)
#define CMD_FLAG_NO_HOLE (1u << 1)

/* Longest READ or WRITE accepted from the kernel, whose limit is 32 MiB:
 * each needs a buffer.  TRIM and WRITE_ZEROES carry no data and may be
 * far longer (a whole-device discard is one request).
 */
#define MAX_DATA_REQUEST (64u << 20)

struct request_header {
  uint32_t magic;
  uint16_t flags, type;
  uint64_t cookie;
  uint64_t offset;
  uint32_t length;
} __attribute__ ((packed));

struct reply_header {
  uint32_t magic, error;
  uint64_t cookie;
} __attribute__ ((packed));

struct relay;

/* A request at the server.  Owned by the relay thread: libnbd calls
 * op_done from inside the relay's own nbd_aio_notify_* or nbd_close.
 */
struct op {
  struct relay *r;
  struct op *prev, *next;     /* the relay's list of ops in flight */
  uint64_t cookie;            /* the kernel's, as it sent it */
  uint16_t type;
  uint32_t length;
  char *buf;                  /* READ: the data; WRITE: the payload */
};

struct relay {
  struct nbd_handle *h;
  int fd;                     /* our end of the socket pair */
  char *desc;
  struct op *ops;             /* in flight */
  unsigned in_flight;
  bool server_dead;           /* step 3: no more replies */
  bool kernel_gone;           /* its end is closed: no more replies */
};

/* NBD's error codes for an errno. */
static uint32_t
nbd_errno (int e)
{
  switch (e) {
  case 0: return 0;
  case EPERM: return 1;
  case EIO: return 5;
  case ENOMEM: return 12;
  case EINVAL: return 22;
  case ENOSPC: return 28;
  case EOVERFLOW: return 75;
  case ENOTSUP: return 95;
  case ESHUTDOWN: return 108;
  default: return 5;
  }
}

/* Errors that mean the connection died, not that the server refused. */
static bool
connection_error (int e)
{
  return e == ENOTCONN || e == ECONNRESET || e == EPIPE || e == ESHUTDOWN ||
         e == ECONNABORTED;
}

/* Read exactly len bytes from the kernel: 0, or -1 at EOF or error. */
static int
read_full (int fd, void *buf, size_t len)
{
  char *p = buf;

  while (len > 0) {
    ssize_t n = read (fd, p, len);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return -1;
    p += n;
    len -= (size_t) n;
  }
  return 0;
}

/* Send a simple reply (and a READ's data) to the kernel.  A kernel that
 * closed its end makes the relay stop.
 */
static void
reply (struct relay *r, uint64_t cookie, int error, const void *data,
       size_t len)
{
  struct reply_header rh = {
    .magic = htobe32 (REPLY_MAGIC), .error = htobe32 (nbd_errno (error)),
    .cookie = cookie,           /* opaque: sent back as received */
  };
  struct iovec iov[2] = { { &rh, sizeof rh }, { (void *) data, data ? len : 0 } };
  struct msghdr mh = { .msg_iov = iov, .msg_iovlen = data ? 2 : 1 };

  if (r->kernel_gone || r->server_dead)
    return;
  while (mh.msg_iovlen > 0) {
    ssize_t n = sendmsg (r->fd, &mh, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      r->kernel_gone = true;
      return;
    }
    while (mh.msg_iovlen > 0 && (size_t) n >= mh.msg_iov[0].iov_len) {
      n -= (ssize_t) mh.msg_iov[0].iov_len;
      mh.msg_iov++;
      mh.msg_iovlen--;
    }
    if (mh.msg_iovlen > 0) {
      mh.msg_iov[0].iov_base = (char *) mh.msg_iov[0].iov_base + n;
      mh.msg_iov[0].iov_len -= (size_t) n;
    }
  }
}

static void
op_free (struct op *o)
{
  struct relay *r = o->r;

  if (o->prev)
    o->prev->next = o->next;
  else
    r->ops = o->next;
  if (o->next)
    o->next->prev = o->prev;
  r->in_flight--;
  free (o->buf);
  free (o);
}

/* libnbd's completion: reply, unless the connection died (step 3: libnbd
 * then ends what was in flight with ENOTCONN).  Runs inside libnbd, with
 * the handle locked: no libnbd call on it from here.
 */
static int
op_done (void *opaque, int *error)
{
  struct op *o = opaque;
  struct relay *r = o->r;

  if (*error && connection_error (*error))
    r->server_dead = true;
  else
    reply (r, o->cookie, *error, o->type == CMD_READ && !*error ? o->buf : NULL,
           o->length);
  op_free (o);
  return 1;                             /* retire it */
}

/* Read one request from the kernel and start it.  Returns 0, or 1 when
 * the relay should end (EOF, DISC, a request it cannot parse).
 */
static int
take_request (struct relay *r)
{
  struct request_header rq;

  if (read_full (r->fd, &rq, sizeof rq) < 0) {
    r->kernel_gone = true;
    return 1;
  }
  uint16_t type = be16toh (rq.type), flags = be16toh (rq.flags);
  uint64_t offset = be64toh (rq.offset);
  uint32_t length = be32toh (rq.length);
  if (be32toh (rq.magic) != REQUEST_MAGIC) {
    r->kernel_gone = true;              /* out of step: nothing to save */
    return 1;
  }
  if (type == CMD_DISC) {
    if (r->in_flight == 0)
      nbd_shutdown (r->h, 0);           /* tell the server, as the kernel did */
    r->kernel_gone = true;
    return 1;
  }

  bool data = type == CMD_READ || type == CMD_WRITE;
  int refuse = data && length > MAX_DATA_REQUEST ? EINVAL : 0;
  struct op *o = refuse ? NULL : calloc (1, sizeof *o);
  if (o && data && !(o->buf = malloc (length ? length : 1))) {
    free (o);
    o = NULL;
  }
  if (!o) {
    /* Refused (too long, or no memory): an error reply, not a hang-up,
     * which the kernel would take for a dead connection and retry.
     */
    if (type == CMD_WRITE) {            /* keep in step: drop the payload */
      char sink[4096];
      for (uint32_t left = length; left > 0; ) {
        uint32_t n = left < sizeof sink ? left : sizeof sink;
        if (read_full (r->fd, sink, n) < 0) {
          r->kernel_gone = true;
          return 1;
        }
        left -= n;
      }
    }
    reply (r, rq.cookie, refuse ? refuse : ENOMEM, NULL, 0);
    return 0;
  }
  o->r = r;
  o->cookie = rq.cookie;
  o->type = type;
  o->length = length;
  if (type == CMD_WRITE && read_full (r->fd, o->buf, length) < 0) {
    free (o->buf);
    free (o);
    r->kernel_gone = true;
    return 1;
  }
  o->next = r->ops;
  if (r->ops)
    r->ops->prev = o;
  r->ops = o;
  r->in_flight++;

  nbd_completion_callback cb = { .callback = op_done, .user_data = o };
  uint32_t f = (flags & CMD_FLAG_FUA) ? LIBNBD_CMD_FLAG_FUA : 0;
  int64_t c;
  switch (type) {
  case CMD_READ:
    c = nbd_aio_pread (r->h, o->buf, length, offset, cb, 0);
    break;
  case CMD_WRITE:
    c = nbd_aio_pwrite (r->h, o->buf, length, offset, cb, f);
    break;
  case CMD_FLUSH:
    c = nbd_aio_flush (r->h, cb, 0);
    break;
  case CMD_TRIM:
    c = nbd_aio_trim (r->h, length, offset, cb, f);
    break;
  case CMD_CACHE:
    c = nbd_aio_cache (r->h, length, offset, cb, 0);
    break;
  case CMD_WRITE_ZEROES:
    if (flags & CMD_FLAG_NO_HOLE)
      f |= LIBNBD_CMD_FLAG_NO_HOLE;
    c = nbd_aio_zero (r->h, length, offset, cb, f);
    break;
  default:                              /* e.g. BLOCK_STATUS */
    c = -2;
    break;
  }
  if (c < 0) {
    /* Not issued, so not called back: answer here.  A dead handle is
     * step 3; anything else the kernel hears about.
     */
    int e = c == -2 || !nbd_get_errno () ? EINVAL : nbd_get_errno ();
    if (nbd_aio_is_dead (r->h) || nbd_aio_is_closed (r->h))
      r->server_dead = true;
    else
      reply (r, o->cookie, e, NULL, 0);
    op_free (o);
  }
  return 0;
}

static void
relay_free (struct relay *r)
{
  /* Nothing more goes to the kernel from here on (callbacks that
   * nbd_close may run included); then whatever libnbd did not call back.
   */
  r->kernel_gone = true;
  nbd_close (r->h);
  while (r->ops)
    op_free (r->ops);
  close (r->fd);
  free (r->desc);
  free (r);
}

static void *
relay_main (void *arg)
{
  struct relay *r = arg;

  /* The device's writeback may wait for this thread: its own memory
   * allocations must not wait for that writeback (as for any userspace
   * block driver; needs CAP_SYS_RESOURCE, which attach has as root).
   */
  if (prctl (PR_SET_IO_FLUSHER, 1, 0, 0, 0) < 0)
    fprintf (stderr, "aclone: %s: relay: PR_SET_IO_FLUSHER: %s (writeback "
             "under memory pressure may stall)\n", r->desc, strerror (errno));

  while (!r->kernel_gone && !r->server_dead) {
    unsigned dir = nbd_aio_get_direction (r->h);
    struct pollfd p[2] = {
      { .fd = r->fd,
        .events = r->in_flight < ACLONE_RELAY_MAX_IN_FLIGHT ? POLLIN : 0 },
      { .fd = nbd_aio_get_fd (r->h),
        .events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                  ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0) },
    };
    if (p[1].fd < 0) {
      r->server_dead = true;
      break;
    }
    if (poll (p, 2, -1) < 0) {
      if (errno == EINTR)
        continue;
      break;
    }
    if ((p[1].revents & (POLLIN | POLLHUP | POLLERR)) &&
        (dir & LIBNBD_AIO_DIRECTION_READ) && nbd_aio_notify_read (r->h) < 0)
      r->server_dead = true;
    else if ((p[1].revents & POLLOUT) && nbd_aio_notify_write (r->h) < 0)
      r->server_dead = true;
    if (nbd_aio_is_dead (r->h) || nbd_aio_is_closed (r->h))
      r->server_dead = true;
    if (!r->server_dead && (p[0].revents & (POLLIN | POLLHUP | POLLERR)) &&
        take_request (r) == 1)
      break;
  }
  if (r->server_dead && !r->kernel_gone)
    fprintf (stderr, "aclone: %s: connection lost (relay)\n", r->desc);
  relay_free (r);
  return NULL;
}

int
aclone_relay_start (struct nbd_handle *h, const char *desc,
                    struct aclone_error *err)
{
  int sv[2];
  struct relay *r = calloc (1, sizeof *r);

  if (!r || !(r->desc = strdup (desc))) {
    free (r);
    nbd_close (h);
    return aclone_error_set (err, ENOMEM, "%s: relay", desc);
  }
  if (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
    int e = errno;
    free (r->desc);
    free (r);
    nbd_close (h);
    return aclone_error_set (err, e, "%s: socketpair", desc);
  }
  r->h = h;
  r->fd = sv[1];

  pthread_attr_t attr;
  pthread_t t;
  pthread_attr_init (&attr);
  pthread_attr_setdetachstate (&attr, PTHREAD_CREATE_DETACHED);
  int e = pthread_create (&t, &attr, relay_main, r);
  pthread_attr_destroy (&attr);
  if (e != 0) {
    close (sv[0]);
    relay_free (r);
    return aclone_error_set (err, e, "%s: relay thread", desc);
  }
  return sv[0];
}
