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
 * not our duplicate, and sends nothing.  Over TLS the kernel cannot have
 * the socket: a relay thread keeps the handle and serves the kernel
 * through a socket pair (relay.c).
 *
 * Generic netlink goes through libnl-genl-3, which nbd-client uses too:
 * it resolves the family and its multicast group, builds the nested
 * socket attributes and matches acks to requests, which we wrote by hand
 * before (160 lines with their own bounds checks).
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

#include <linux/nbd-netlink.h>
#include <netlink/attr.h>
#include <netlink/genl/ctrl.h>
#include <netlink/genl/genl.h>
#include <netlink/msg.h>

#include <libnbd.h>

#include "aclone/attach.h"
#include "aclone/clock.h"
#include "aclone/source.h"
#include "relay.h"

/* NBD transmission flags (the protocol's, as NBD_ATTR_SERVER_FLAGS). */
#define NBD_FLAG_HAS_FLAGS          (1 << 0)
#define NBD_FLAG_READ_ONLY          (1 << 1)
#define NBD_FLAG_SEND_FLUSH         (1 << 2)
#define NBD_FLAG_SEND_FUA           (1 << 3)
#define NBD_FLAG_ROTATIONAL         (1 << 4)
#define NBD_FLAG_SEND_TRIM          (1 << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES  (1 << 6)
#define NBD_FLAG_CAN_MULTI_CONN     (1 << 8)

/* Netlink, through libnl-genl-3 (as nbd-client does) ----------------- */

struct nbd_netlink {
  struct nl_sock *sk;              /* requests and their answers */
  int family;                      /* the "nbd" generic netlink family */
  int group;                       /* its "nbd_mc_group" */
};

/* A libnl error as -errno: the reconnect loop tells a detached device
 * (ENOENT, EINVAL) from the rest.
 */
static int
nl_to_errno (int nlerr)
{
  switch (nlerr < 0 ? -nlerr : nlerr) {
  case NLE_OBJ_NOTFOUND: return -ENOENT;
  case NLE_INVAL: return -EINVAL;
  case NLE_BUSY: return -EBUSY;
  case NLE_PERM: return -EPERM;
  case NLE_NOMEM: return -ENOMEM;
  case NLE_EXIST: return -EEXIST;
  case NLE_OPNOTSUPP: return -EOPNOTSUPP;
  default: return -EIO;
  }
}

/* Connect a generic netlink socket and resolve the nbd family and its
 * multicast group.  0, or -errno with err set.
 */
static int
netlink_open (struct nbd_netlink *n, struct aclone_error *err)
{
  int r;

  n->sk = nl_socket_alloc ();
  if (!n->sk)
    return aclone_error_set (err, ENOMEM, "netlink");
  if ((r = genl_connect (n->sk)) < 0)
    return aclone_error_set (err, -nl_to_errno (r), "netlink: %s", nl_geterror (r));
  n->family = genl_ctrl_resolve (n->sk, NBD_GENL_FAMILY_NAME);
  n->group = genl_ctrl_resolve_grp (n->sk, NBD_GENL_FAMILY_NAME,
                                    NBD_GENL_MCAST_GROUP_NAME);
  if (n->family < 0 || n->group < 0)
    return aclone_error_set (err, ENOENT, "the kernel's nbd netlink family "
                             "(is the nbd module loaded?)");
  return 0;
}

static void
netlink_close (struct nbd_netlink *n)
{
  nl_socket_free (n->sk);            /* (NULL is fine) */
  n->sk = NULL;
}

/* A request of the nbd family; NULL when out of memory. */
static struct nl_msg *
nbd_request (const struct nbd_netlink *n, uint8_t cmd)
{
  struct nl_msg *m = nlmsg_alloc ();

  if (m && !genlmsg_put (m, NL_AUTO_PORT, NL_AUTO_SEQ, n->family, 0, 0, cmd, 0)) {
    nlmsg_free (m);
    m = NULL;
  }
  return m;
}

/* Add the SOCKETS nest of n descriptors.  0 or a libnl error. */
static int
put_sockets (struct nl_msg *m, const int *fds, unsigned n)
{
  struct nlattr *socks = nla_nest_start (m, NBD_ATTR_SOCKETS);

  if (!socks)
    return -NLE_NOMEM;
  for (unsigned i = 0; i < n; i++) {
    struct nlattr *item = nla_nest_start (m, NBD_SOCK_ITEM);
    if (!item || nla_put_u32 (m, NBD_SOCK_FD, fds[i]) < 0)
      return -NLE_NOMEM;
    nla_nest_end (m, item);
  }
  nla_nest_end (m, socks);
  return 0;
}

/* NBD_ATTR_INDEX of an nbd message, or -1. */
static int
msg_index (struct nl_msg *msg)
{
  struct genlmsghdr *g = genlmsg_hdr (nlmsg_hdr (msg));
  struct nlattr *a = nla_find (genlmsg_attrdata (g, 0), genlmsg_attrlen (g, 0),
                               NBD_ATTR_INDEX);
  return a ? (int) nla_get_u32 (a) : -1;
}

/* The answer to NBD_CMD_CONNECT names the device the kernel picked. */
static int
on_connect_reply (struct nl_msg *msg, void *arg)
{
  int i = msg_index (msg);
  if (i >= 0)
    *(int *) arg = i;
  return NL_OK;
}

/* Send m (freed), wait for the kernel's ack; with on_reply, answers go
 * to it.  0 or -errno.
 */
static int
transact (const struct nbd_netlink *n, struct nl_msg *m,
          nl_recvmsg_msg_cb_t on_reply, void *arg)
{
  if (!m)
    return -ENOMEM;
  nl_socket_modify_cb (n->sk, NL_CB_VALID, NL_CB_CUSTOM, on_reply, arg);
  int r = nl_send_sync (n->sk, m);
  nl_socket_modify_cb (n->sk, NL_CB_VALID, NL_CB_DEFAULT, NULL, NULL);
  return r < 0 ? nl_to_errno (r) : 0;
}

/* NBD handshake ---------------------------------------------------- */

int
aclone_attach_socket (const struct aclone_attach_config *cfg, uint64_t *size,
                      uint64_t *flags, struct aclone_error *err)
{
  const char *uri = cfg->uri;
  struct nbd_handle *h = nbd_create ();
  bool tls = aclone_source_uri_is_tls (uri);
  int fd = -1;

  if (!h)
    return aclone_error_set (err, ENOMEM, "%s", nbd_get_error ());
  if (nbd_set_request_structured_replies (h, false) < 0 ||
      (cfg->tls_certificates &&
       nbd_set_tls_certificates (h, cfg->tls_certificates) < 0) ||
      (cfg->tls_psk_file && nbd_set_tls_psk_file (h, cfg->tls_psk_file) < 0) ||
      (cfg->tls_no_verify && nbd_set_tls_verify_peer (h, false) < 0) ||
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
  if (tls)
    return aclone_relay_start (h, uri, err);
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

static unsigned
connection_count (const struct aclone_attach_config *cfg)
{
  return cfg->connections ? cfg->connections : 1;
}

/* Is /dev/nbd<index> configured?  Its pid file goes with the
 * configuration (also when a user's nbd-client -d sent no event).
 */
static bool
device_attached (int index)
{
  char pidfile[64];

  snprintf (pidfile, sizeof pidfile, "/sys/block/nbd%d/pid", index);
  return access (pidfile, F_OK) == 0 || errno != ENOENT;
}

static void
nap_ms (unsigned ms)
{
  struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
  nanosleep (&ts, NULL);
}

/* Open the first n connections of an attach; the first gives size and
 * flags, the others must agree on the size.  Several need the export's
 * multi-conn: without it the server does not promise that a FLUSH on one
 * connection covers writes completed on another, which the kernel
 * assumes.  Returns 0 with fds[] filled, or -errno with err set.
 */
static int
open_sockets (const struct aclone_attach_config *cfg, unsigned n, int *fds,
              uint64_t *size, uint64_t *flags, struct aclone_error *err)
{
  unsigned i;
  int r = 0;

  for (i = 0; i < n; i++) {
    uint64_t sz, fl;
    fds[i] = aclone_attach_socket (cfg, i ? &sz : size, i ? &fl : flags, err);
    if (fds[i] < 0) {
      r = fds[i];
      break;
    }
    if (i == 0 && n > 1 && !(*flags & NBD_FLAG_CAN_MULTI_CONN)) {
      r = aclone_error_set (err, 0, "%s: the export does not advertise "
                            "multi-conn: one connection only", cfg->uri);
      i++;
      break;
    }
    if (i > 0 && sz != *size) {
      r = aclone_error_set (err, 0, "%s: connection %u sees %llu bytes, "
                            "not %llu", cfg->uri, i + 1,
                            (unsigned long long) sz, (unsigned long long) *size);
      i++;
      break;
    }
  }
  if (r < 0)
    while (i-- > 0)
      close (fds[i]);
  return r;
}

/* The socket that hears the nbd family's multicast events.  Events come
 * unasked: no sequence numbers to match.  A large buffer, so that the
 * deaths of many connections at once are not dropped (if some are all
 * the same, wait_link_dead sees the overflow).  NULL on failure.
 */
static struct nl_sock *
events_open (const struct nbd_netlink *n)
{
  struct nl_sock *events = nl_socket_alloc ();

  if (!events || genl_connect (events) < 0 ||
      (nl_socket_disable_seq_check (events),
       nl_socket_add_membership (events, n->group) < 0)) {
    nl_socket_free (events);
    return NULL;
  }
  nl_socket_set_buffer_size (events, 1 << 20, 0);
  return events;
}

/* Step 1: connect to the export, then open netlink (n, and *events
 * before the device exists, so that no death goes unheard) and give the
 * kernel the sockets (NBD_CMD_CONNECT): what is wrong with the export is
 * said first, whatever the kernel lacks.  *index receives the device's
 * number, *size the export's.
 */
static int
attach_connect (struct nbd_netlink *n, struct nl_sock **events,
                const struct aclone_attach_config *cfg,
                int *index, uint64_t *size, struct aclone_error *err)
{
  unsigned nconn = connection_count (cfg);
  int fds[ACLONE_ATTACH_MAX_CONNECTIONS];
  uint64_t flags;

  if (nconn > ACLONE_ATTACH_MAX_CONNECTIONS)
    return aclone_error_set (err, EINVAL, "at most %d connections",
                             ACLONE_ATTACH_MAX_CONNECTIONS);
  int r = open_sockets (cfg, nconn, fds, size, &flags, err);
  if (r < 0)
    return r;
  r = netlink_open (n, err);
  if (r == 0 && !(*events = events_open (n)))
    r = aclone_error_set (err, EIO, "netlink: nbd multicast group");
  if (r < 0) {
    for (unsigned i = 0; i < nconn; i++)
      close (fds[i]);
    return r;
  }
  if (cfg->readonly)
    flags |= NBD_FLAG_READ_ONLY;
  struct nl_msg *m = nbd_request (n, NBD_CMD_CONNECT);
  r = -NLE_NOMEM;
  if (m &&
      (cfg->index < 0 || nla_put_u32 (m, NBD_ATTR_INDEX, cfg->index) == 0) &&
      nla_put_u64 (m, NBD_ATTR_SIZE_BYTES, *size) == 0 &&
      nla_put_u64 (m, NBD_ATTR_BLOCK_SIZE_BYTES,
                   cfg->block_size ? cfg->block_size : 4096) == 0 &&
      nla_put_u64 (m, NBD_ATTR_SERVER_FLAGS, flags) == 0 &&
      (!cfg->timeout_s || nla_put_u64 (m, NBD_ATTR_TIMEOUT, cfg->timeout_s) == 0) &&
      nla_put_u64 (m, NBD_ATTR_DEAD_CONN_TIMEOUT, cfg->reconnect_s) == 0 &&
      (r = put_sockets (m, fds, nconn)) == 0) {
    *index = cfg->index;
    r = transact (n, m, on_connect_reply, index);
    m = NULL;                               /* sent and freed */
  }
  else
    r = -ENOMEM;
  nlmsg_free (m);
  for (unsigned i = 0; i < nconn; i++)
    close (fds[i]);                         /* the kernel holds them now */
  if (r < 0)
    return aclone_error_set (err, -r, "/dev/nbd%d: connect", cfg->index);
  return 0;
}

/* The multicast events of the nbd family: how many of our device's
 * connections died?  (One event per connection.)
 */
struct link_watch {
  int index;
  unsigned dead;
};

static int
on_event (struct nl_msg *msg, void *arg)
{
  struct link_watch *w = arg;
  struct genlmsghdr *g = genlmsg_hdr (nlmsg_hdr (msg));

  if (g->cmd == NBD_CMD_LINK_DEAD && msg_index (msg) == w->index)
    w->dead++;
  return NL_OK;
}

/* Step 2: wait until the kernel says connections of ours died (how
 * many), or the device was detached or we are asked to stop (0).  When
 * events were lost (the socket's buffer overflowed), any of our nconn
 * may be dead: all of them are counted, and a reconnect that finds none
 * dead costs only a connection (the kernel takes no socket then).
 */
static unsigned
wait_link_dead (struct nl_sock *events, int index, unsigned nconn)
{
  struct link_watch w = { index, 0 };

  nl_socket_modify_cb (events, NL_CB_VALID, NL_CB_CUSTOM, on_event, &w);
  while (!stop_requested && !w.dead) {
    struct pollfd p = { .fd = nl_socket_get_fd (events), .events = POLLIN };
    if (poll (&p, 1, 1000) <= 0) {
      /* A user's disconnect (nbd-client -d) sends no event. */
      if (!device_attached (index)) {
        fprintf (stderr, "aclone: /dev/nbd%d: detached\n", index);
        return 0;
      }
      continue;
    }
    if (nl_recvmsgs_default (events) < 0) {
      fprintf (stderr, "aclone: /dev/nbd%d: netlink events lost, "
               "reconnecting every connection\n", index);
      w.dead += nconn;
    }
  }
  return w.dead;
}

/* Backoff between reconnects, across deaths: a server that accepts and
 * then drops connections (or a request timeout that keeps killing them)
 * must not make us loop.  Each connection may come back once at once
 * (a restart kills them all); beyond that, within STABLE_NS of the last
 * reconnect, each waits the backoff first.
 */
struct reconnect_pace {
  unsigned long long backoff, last_ok_ns;
  unsigned quick;             /* reconnects since the last stable stretch */
};
#define STABLE_NS 10000000000ull

/* Step 3: reconnect with backoff and hand the kernel the new socket
 * (NBD_CMD_RECONFIGURE).  0 reconnected, 1 nothing left to do (stopped,
 * or the device was disconnected), or -errno (the export changed).
 */
static int
reconnect (const struct nbd_netlink *n, const struct aclone_attach_config *cfg,
           int index, uint64_t size, struct reconnect_pace *pace,
           struct aclone_error *err)
{
  unsigned nconn = connection_count (cfg);

  if (!pace->last_ok_ns || aclone_now_ns () - pace->last_ok_ns >= STABLE_NS) {
    pace->backoff = 0;
    pace->quick = 0;
  }
  unsigned long long backoff = pace->backoff;
  if (pace->quick >= nconn) {
    backoff = aclone_backoff_next (backoff, 100000000ull, 2000000000ull);
    nap_ms (backoff / 1000000);
  }
  fprintf (stderr, "aclone: /dev/nbd%d: connection lost, reconnecting to %s\n",
           index, cfg->uri);
  while (!stop_requested) {
    uint64_t size2, flags2;
    struct aclone_error e2 = { 0 };
    int fd = aclone_attach_socket (cfg, &size2, &flags2, &e2);
    if (fd >= 0 && size2 != size) {
      close (fd);
      return aclone_error_set (err, EINVAL, "%s: size changed from %llu to %llu",
                               cfg->uri, (unsigned long long) size,
                               (unsigned long long) size2);
    }
    if (fd >= 0) {
      struct nl_msg *m = nbd_request (n, NBD_CMD_RECONFIGURE);
      int rr = -ENOMEM;
      if (m && nla_put_u32 (m, NBD_ATTR_INDEX, index) == 0 &&
          put_sockets (m, &fd, 1) == 0) {
        rr = transact (n, m, NULL, NULL);
        m = NULL;
      }
      nlmsg_free (m);
      close (fd);
      if (rr == 0) {
        /* (Also when no connection was dead after all: then the kernel
         * dropped the socket.)
         */
        fprintf (stderr, "aclone: /dev/nbd%d: reconnected\n", index);
        pace->backoff = backoff;
        pace->last_ok_ns = aclone_now_ns ();
        pace->quick++;
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
  struct nbd_netlink n = { 0 };
  struct nl_sock *events = NULL;
  uint64_t size;
  int r, index;

  struct reconnect_pace pace = { 0, 0, 0 };
  unsigned nconn = connection_count (cfg);

  if ((cfg->tls_certificates || cfg->tls_psk_file || cfg->tls_no_verify) &&
      !aclone_source_uri_is_tls (cfg->uri)) {
    aclone_error_set (err, 0, "%s: TLS settings given, but the URI does not "
                      "ask for TLS (use nbds:// or nbds+unix://)", cfg->uri);
    return -EINVAL;
  }

  r = attach_connect (&n, &events, cfg, &index, &size, err);
  if (r < 0)
    goto out;
  printf ("/dev/nbd%d: attached to %s (%llu bytes)\n", index, cfg->uri,
          (unsigned long long) size);
  fflush (stdout);
  struct sigaction sa = { .sa_handler = on_stop };
  sigaction (SIGTERM, &sa, NULL);
  sigaction (SIGINT, &sa, NULL);
  /* The kernel puts a new socket in place of a dead one, any one
   * (and takes none when none is dead): one reconnect per death.
   */
  for (unsigned dead; r == 0 && (dead = wait_link_dead (events, index, nconn)) > 0; )
    while (r == 0 && dead-- > 0)
      r = reconnect (&n, cfg, index, size, &pace, err);
  bool gone = r > 0 || !device_attached (index);  /* detached already */
  if (r > 0)
    r = 0;
  /* Over TLS the device lives on our relays, which end with us: detach
   * it first, so that its I/O fails now rather than after --reconnect
   * seconds of waiting for connections that cannot come.
   */
  if (aclone_source_uri_is_tls (cfg->uri) && !gone) {
    struct nl_msg *m = nbd_request (&n, NBD_CMD_DISCONNECT);
    if (m && nla_put_u32 (m, NBD_ATTR_INDEX, index) < 0) {
      nlmsg_free (m);
      m = NULL;
    }
    if (transact (&n, m, NULL, NULL) == 0) {     /* (frees m) */
      fprintf (stderr, "aclone: /dev/nbd%d: detached (its TLS relays end "
               "with aclone attach)\n", index);
      /* Best effort: a moment for the relays to pass the kernel's DISC
       * on and close their TLS sessions cleanly; nothing depends on it.
       */
      nap_ms (200);
    }
  }
 out:
  nl_socket_free (events);
  netlink_close (&n);
  return r;
}

int
aclone_attach_detach (int index, struct aclone_error *err)
{
  struct nbd_netlink n = { 0 };

  /* The kernel answers a disconnect of an idle device with success. */
  if (!device_attached (index))
    return aclone_error_set (err, 0, "/dev/nbd%d: not attached", index);
  int r = netlink_open (&n, err);

  if (r == 0) {
    struct nl_msg *m = nbd_request (&n, NBD_CMD_DISCONNECT);
    if (m && nla_put_u32 (m, NBD_ATTR_INDEX, index) < 0) {
      nlmsg_free (m);
      m = NULL;
    }
    r = transact (&n, m, NULL, NULL);
    if (r < 0)
      aclone_error_set (err, -r, "/dev/nbd%d: disconnect", index);
  }
  netlink_close (&n);
  return r;
}
