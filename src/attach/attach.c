/* aclone: attach an NBD export to a kernel /dev/nbdX, and keep it
 * attached across server restarts.
 *
 * Design notes
 * ------------
 * nbd-client (3.24) hands the kernel one socket and exits (netlink mode),
 * or reconnects only after a timeout (ioctl mode): a server that stops
 * cleanly, as aclone does at SIGTERM, leaves a dead device.  Yet the
 * kernel can do better through its netlink interface:
 *   - with NBD_ATTR_DEAD_CONN_TIMEOUT set, a request that finds no live
 *     connection waits that long for one instead of failing;
 *   - a connection's death is announced to the "nbd_mc_group" multicast
 *     group (NBD_CMD_LINK_DEAD);
 *   - NBD_CMD_RECONFIGURE hands the device a new socket for a dead one.
 * So `aclone attach` stays running: it connects, gives the socket to the
 * kernel (NBD_CMD_CONNECT), then waits for LINK_DEAD on its device,
 * reconnects with backoff (100 ms doubling to 2 s) and reconfigures.  A
 * restart of the server is then a pause for the device's users, not an
 * error.
 *
 * The handshake is libnbd's: the socket is taken from the handle once it
 * is ready (fixed newstyle, no structured replies: the kernel speaks only
 * simple replies).  nbd_close on the handle closes libnbd's descriptor,
 * not our duplicate, and sends nothing.
 *
 * Generic netlink is spoken directly (no libnl): resolve the family and
 * its multicast group, then a few fixed messages.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <sys/socket.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>

#include <libnbd.h>

#include "aclone/attach.h"
#include "aclone/clock.h"

/* NBD transmission flags (the protocol's, as NBD_ATTR_SERVER_FLAGS). */
#define NBD_FLAG_HAS_FLAGS          (1 << 0)
#define NBD_FLAG_READ_ONLY          (1 << 1)
#define NBD_FLAG_SEND_FLUSH         (1 << 2)
#define NBD_FLAG_SEND_FUA           (1 << 3)
#define NBD_FLAG_ROTATIONAL         (1 << 4)
#define NBD_FLAG_SEND_TRIM          (1 << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES  (1 << 6)
#define NBD_FLAG_CAN_MULTI_CONN     (1 << 8)

#define MSG_MAX 8192

/* Netlink messages ------------------------------------------------- */

struct msg {
  union {
    struct nlmsghdr nh;
    char buf[MSG_MAX];
  };
};

static void
msg_init (struct msg *m, uint16_t type, uint8_t cmd)
{
  memset (m, 0, sizeof (struct nlmsghdr) + GENL_HDRLEN);
  m->nh.nlmsg_len = NLMSG_LENGTH (GENL_HDRLEN);
  m->nh.nlmsg_type = type;
  m->nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
  struct genlmsghdr *g = NLMSG_DATA (&m->nh);
  g->cmd = cmd;
  g->version = 1;
}

/* Append an attribute; returns it (for nesting). */
static struct nlattr *
attr_put (struct msg *m, uint16_t type, const void *data, size_t len)
{
  struct nlattr *a = (struct nlattr *) (m->buf + NLMSG_ALIGN (m->nh.nlmsg_len));
  a->nla_type = type;
  a->nla_len = NLA_HDRLEN + len;
  if (len)
    memcpy ((char *) a + NLA_HDRLEN, data, len);
  m->nh.nlmsg_len = NLMSG_ALIGN (m->nh.nlmsg_len) + NLA_ALIGN (a->nla_len);
  return a;
}

static void
attr_u32 (struct msg *m, uint16_t type, uint32_t v)
{
  attr_put (m, type, &v, sizeof v);
}

static void
attr_u64 (struct msg *m, uint16_t type, uint64_t v)
{
  attr_put (m, type, &v, sizeof v);
}

/* Close a nest opened with attr_put (m, type | NLA_F_NESTED, NULL, 0). */
static void
attr_end (struct msg *m, struct nlattr *nest)
{
  nest->nla_len = m->buf + m->nh.nlmsg_len - (char *) nest;
}

/* The SOCKETS nest of one descriptor. */
static void
attr_socket (struct msg *m, int fd)
{
  struct nlattr *socks = attr_put (m, NBD_ATTR_SOCKETS | NLA_F_NESTED, NULL, 0);
  struct nlattr *item = attr_put (m, NBD_SOCK_ITEM | NLA_F_NESTED, NULL, 0);
  attr_u32 (m, NBD_SOCK_FD, fd);
  attr_end (m, item);
  attr_end (m, socks);
}

/* Find attribute type in [a, a+len).  NULL if absent. */
static struct nlattr *
attr_find (struct nlattr *a, int len, uint16_t type)
{
  for (; len >= NLA_HDRLEN && a->nla_len >= NLA_HDRLEN && a->nla_len <= len;
       len -= NLA_ALIGN (a->nla_len),
       a = (struct nlattr *) ((char *) a + NLA_ALIGN (a->nla_len)))
    if ((a->nla_type & NLA_TYPE_MASK) == type)
      return a;
  return NULL;
}

#define ATTR_DATA(a) ((void *) ((char *) (a) + NLA_HDRLEN))
#define ATTR_LEN(a) ((int) (a)->nla_len - NLA_HDRLEN)

/* Send m and read the answer into reply.  Returns 0, or -errno from the
 * kernel's ack or the socket.
 */
static int
transact (int nl, struct msg *m, struct msg *reply)
{
  static uint32_t seq;
  m->nh.nlmsg_seq = ++seq;
  if (send (nl, m, m->nh.nlmsg_len, 0) < 0)
    return -errno;
  for (;;) {
    ssize_t n = recv (nl, reply->buf, sizeof reply->buf, 0);
    if (n < 0)
      return -errno;
    for (struct nlmsghdr *h = &reply->nh; NLMSG_OK (h, (size_t) n);
         h = NLMSG_NEXT (h, n)) {
      if (h->nlmsg_seq != m->nh.nlmsg_seq)
        continue;
      if (h->nlmsg_type == NLMSG_ERROR) {
        struct nlmsgerr *e = NLMSG_DATA (h);
        return e->error;                  /* 0: the ack */
      }
      if (h != &reply->nh)
        memmove (reply->buf, h, h->nlmsg_len);
      /* Data first, the ack follows: read it too. */
      struct msg ack;
      ssize_t k = recv (nl, ack.buf, sizeof ack.buf, 0);
      if (k > 0 && ack.nh.nlmsg_type == NLMSG_ERROR)
        return ((struct nlmsgerr *) NLMSG_DATA (&ack.nh))->error;
      return 0;
    }
  }
}

static int
netlink_open (void)
{
  int nl = socket (AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_GENERIC);
  struct sockaddr_nl sa = { .nl_family = AF_NETLINK };
  if (nl < 0)
    return -errno;
  if (bind (nl, (struct sockaddr *) &sa, sizeof sa) < 0) {
    int e = errno;
    close (nl);
    return -e;
  }
  return nl;
}

/* The nbd family's id and its multicast group's id. */
static int
resolve_family (int nl, uint16_t *family, uint32_t *group)
{
  struct msg m, reply;
  msg_init (&m, GENL_ID_CTRL, CTRL_CMD_GETFAMILY);
  attr_put (&m, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME,
            sizeof NBD_GENL_FAMILY_NAME);
  int r = transact (nl, &m, &reply);
  if (r < 0)
    return r;
  struct nlattr *attrs = (struct nlattr *) ((char *) NLMSG_DATA (&reply.nh) + GENL_HDRLEN);
  int len = reply.nh.nlmsg_len - NLMSG_LENGTH (GENL_HDRLEN);
  struct nlattr *id = attr_find (attrs, len, CTRL_ATTR_FAMILY_ID);
  struct nlattr *groups = attr_find (attrs, len, CTRL_ATTR_MCAST_GROUPS);
  if (!id)
    return -ENOENT;
  *family = *(uint16_t *) ATTR_DATA (id);
  *group = 0;
  /* MCAST_GROUPS: a list of nests, each with a name and an id. */
  for (struct nlattr *g = groups ? ATTR_DATA (groups) : NULL;
       g && (char *) g < (char *) groups + groups->nla_len;
       g = (struct nlattr *) ((char *) g + NLA_ALIGN (g->nla_len))) {
    struct nlattr *name = attr_find (ATTR_DATA (g), ATTR_LEN (g), CTRL_ATTR_MCAST_GRP_NAME);
    struct nlattr *gid = attr_find (ATTR_DATA (g), ATTR_LEN (g), CTRL_ATTR_MCAST_GRP_ID);
    if (name && gid && strcmp (ATTR_DATA (name), NBD_GENL_MCAST_GROUP_NAME) == 0)
      *group = *(uint32_t *) ATTR_DATA (gid);
    if (g->nla_len < NLA_HDRLEN)
      break;
  }
  return *group ? 0 : -ENOENT;
}

/* NBD handshake ---------------------------------------------------- */

/* Connect to uri and return the socket, handshake done; fills size and
 * the transmission flags.  -errno with a message in err.
 */
static int
nbd_socket (const char *uri, uint64_t *size, uint64_t *flags,
            struct aclone_error *err)
{
  struct nbd_handle *h = nbd_create ();
  int fd = -1;

  if (!h)
    return aclone_error_set (err, ENOMEM, "%s", nbd_get_error ());
  if (nbd_set_request_structured_replies (h, false) < 0 ||
      nbd_connect_uri (h, uri) < 0) {
    aclone_error_set (err, 0, "%s: %s", uri, nbd_get_error ());
    nbd_close (h);
    return -ECONNREFUSED;
  }
  int64_t sz = nbd_get_size (h);
  *size = sz > 0 ? (uint64_t) sz : 0;
  *flags = NBD_FLAG_HAS_FLAGS;
  if (nbd_is_read_only (h) == 1) *flags |= NBD_FLAG_READ_ONLY;
  if (nbd_can_flush (h) == 1) *flags |= NBD_FLAG_SEND_FLUSH;
  if (nbd_can_fua (h) == 1) *flags |= NBD_FLAG_SEND_FUA;
  if (nbd_is_rotational (h) == 1) *flags |= NBD_FLAG_ROTATIONAL;
  if (nbd_can_trim (h) == 1) *flags |= NBD_FLAG_SEND_TRIM;
  if (nbd_can_zero (h) == 1) *flags |= NBD_FLAG_SEND_WRITE_ZEROES;
  if (nbd_can_multi_conn (h) == 1) *flags |= NBD_FLAG_CAN_MULTI_CONN;
  fd = fcntl (nbd_aio_get_fd (h), F_DUPFD_CLOEXEC, 0);
  if (fd < 0)
    aclone_error_set (err, errno, "%s: dup", uri);
  else
    fcntl (fd, F_SETFL, fcntl (fd, F_GETFL) & ~O_NONBLOCK);
  nbd_close (h);
  return fd < 0 ? -EIO : fd;
}

/* The daemon -------------------------------------------------------- */

static volatile sig_atomic_t stop_requested;

static void
on_stop (int sig)
{
  (void) sig;
  stop_requested = 1;
}

static void
nap_ms (unsigned ms)
{
  struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
  nanosleep (&ts, NULL);
}

/* Step 1: connect to the export and give the kernel the socket
 * (NBD_CMD_CONNECT).  *index receives the device's number, *size the
 * export's.
 */
static int
attach_connect (int nl, uint16_t family, const struct aclone_attach_config *cfg,
                int *index, uint64_t *size, struct aclone_error *err)
{
  struct msg m, reply;
  uint64_t flags;
  int fd = nbd_socket (cfg->uri, size, &flags, err);

  if (fd < 0)
    return fd;
  msg_init (&m, family, NBD_CMD_CONNECT);
  if (cfg->index >= 0)
    attr_u32 (&m, NBD_ATTR_INDEX, cfg->index);
  attr_u64 (&m, NBD_ATTR_SIZE_BYTES, *size);
  attr_u64 (&m, NBD_ATTR_BLOCK_SIZE_BYTES, cfg->block_size ? cfg->block_size : 4096);
  attr_u64 (&m, NBD_ATTR_SERVER_FLAGS, flags);
  if (cfg->timeout_s)
    attr_u64 (&m, NBD_ATTR_TIMEOUT, cfg->timeout_s);
  attr_u64 (&m, NBD_ATTR_DEAD_CONN_TIMEOUT, cfg->reconnect_s);
  attr_socket (&m, fd);
  int r = transact (nl, &m, &reply);
  close (fd);                               /* the kernel holds it now */
  if (r < 0)
    return aclone_error_set (err, -r, "/dev/nbd%d: connect", cfg->index);
  *index = cfg->index;
  struct nlattr *ia = attr_find ((struct nlattr *) ((char *) NLMSG_DATA (&reply.nh) + GENL_HDRLEN),
                                 reply.nh.nlmsg_len - NLMSG_LENGTH (GENL_HDRLEN),
                                 NBD_ATTR_INDEX);
  if (ia)
    *index = *(uint32_t *) ATTR_DATA (ia);
  return 0;
}

/* Step 2: wait until the kernel says our link died (1), or the device
 * was detached or we are asked to stop (0).
 */
static int
wait_link_dead (int events, uint16_t family, int index)
{
  struct msg reply;
  char pidfile[64];

  snprintf (pidfile, sizeof pidfile, "/sys/block/nbd%d/pid", index);
  while (!stop_requested) {
    struct pollfd p = { .fd = events, .events = POLLIN };
    if (poll (&p, 1, 1000) <= 0) {
      /* A user's disconnect (nbd-client -d) sends no event, but the
       * device's pid file goes away with its configuration.
       */
      if (access (pidfile, F_OK) < 0 && errno == ENOENT) {
        fprintf (stderr, "aclone: /dev/nbd%d: detached\n", index);
        return 0;
      }
      continue;
    }
    ssize_t n = recv (events, reply.buf, sizeof reply.buf, 0);
    if (n <= 0 || reply.nh.nlmsg_type != family)
      continue;
    struct genlmsghdr *g = NLMSG_DATA (&reply.nh);
    struct nlattr *di = attr_find ((struct nlattr *) ((char *) g + GENL_HDRLEN),
                                   reply.nh.nlmsg_len - NLMSG_LENGTH (GENL_HDRLEN),
                                   NBD_ATTR_INDEX);
    if (g->cmd == NBD_CMD_LINK_DEAD && di &&
        *(uint32_t *) ATTR_DATA (di) == (uint32_t) index)
      return 1;
  }
  return 0;
}

/* Step 3: reconnect with backoff and hand the kernel the new socket
 * (NBD_CMD_RECONFIGURE).  0 reconnected, 1 nothing left to do (stopped,
 * or the device was disconnected), or -errno (the export changed).
 */
static int
reconnect (int nl, uint16_t family, const struct aclone_attach_config *cfg,
           int index, uint64_t size, struct aclone_error *err)
{
  unsigned long long backoff = 0;
  struct msg m, reply;

  fprintf (stderr, "aclone: /dev/nbd%d: connection lost, reconnecting to %s\n",
           index, cfg->uri);
  while (!stop_requested) {
    uint64_t size2, flags2;
    struct aclone_error e2 = { 0 };
    int fd = nbd_socket (cfg->uri, &size2, &flags2, &e2);
    if (fd >= 0 && size2 != size) {
      close (fd);
      return aclone_error_set (err, EINVAL, "%s: size changed from %llu to %llu",
                               cfg->uri, (unsigned long long) size,
                               (unsigned long long) size2);
    }
    if (fd >= 0) {
      msg_init (&m, family, NBD_CMD_RECONFIGURE);
      attr_u32 (&m, NBD_ATTR_INDEX, index);
      attr_socket (&m, fd);
      int rr = transact (nl, &m, &reply);
      close (fd);
      if (rr == 0) {
        fprintf (stderr, "aclone: /dev/nbd%d: reconnected\n", index);
        return 0;
      }
      if (rr == -ENOENT || rr == -EINVAL) {
        /* The device was disconnected (nbd-client -d): we are done. */
        fprintf (stderr, "aclone: /dev/nbd%d: no longer attached\n", index);
        return 1;
      }
    }
    backoff = aclone_backoff_next (backoff, 100000000ull, 2000000000ull);
    nap_ms (backoff / 1000000);
  }
  return 1;
}

int
aclone_attach (const struct aclone_attach_config *cfg, struct aclone_error *err)
{
  uint16_t family;
  uint32_t group;
  uint64_t size;
  int r, nl, events = -1, index;

  nl = netlink_open ();
  if (nl < 0)
    return aclone_error_set (err, -nl, "netlink");
  r = resolve_family (nl, &family, &group);
  if (r < 0) {
    close (nl);
    return aclone_error_set (err, -r, "the kernel's nbd netlink family "
                             "(is the nbd module loaded?)");
  }
  r = attach_connect (nl, family, cfg, &index, &size, err);
  if (r < 0) {
    close (nl);
    return r;
  }
  printf ("/dev/nbd%d: attached to %s (%llu bytes)\n", index, cfg->uri,
          (unsigned long long) size);
  fflush (stdout);

  events = netlink_open ();
  if (events < 0 ||
      setsockopt (events, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group,
                  sizeof group) < 0) {
    r = aclone_error_set (err, errno, "netlink: nbd multicast group");
    goto out;
  }
  struct sigaction sa = { .sa_handler = on_stop };
  sigaction (SIGTERM, &sa, NULL);
  sigaction (SIGINT, &sa, NULL);
  r = 0;
  while (r == 0 && wait_link_dead (events, family, index))
    r = reconnect (nl, family, cfg, index, size, err);
  if (r > 0)
    r = 0;
 out:
  if (events >= 0)
    close (events);
  close (nl);
  return r;
}
