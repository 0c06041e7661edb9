/* aclone: attach an NBD export to a kernel NBD device and keep it
 * attached across server restarts (`aclone attach`, see src/attach/attach.c).
 */
#ifndef ACLONE_ATTACH_H
#define ACLONE_ATTACH_H

#include <stdbool.h>
#include <stdint.h>

#include "aclone/error.h"

struct aclone_attach_config {
  const char *uri;             /* nbd://host:port/name, nbd+unix://... */
  int index;                   /* N of /dev/nbdN, or -1: the kernel picks */
  unsigned block_size;         /* 0: 4096 */
  unsigned timeout_s;          /* request timeout; 0: none (never resent) */
  unsigned reconnect_s;        /* how long I/O waits for a new connection */
  unsigned connections;        /* sockets the device spreads I/O over; 0: 1 */
  bool readonly;               /* attach read-only whatever the export says */
  /* TLS, for nbds:// and nbds+unix:// URIs (which require it): as in
   * `aclone verify`.  The kernel cannot speak TLS: each connection is
   * then relayed through a thread of ours (src/attach/relay.c).
   */
  const char *tls_certificates;  /* directory, or NULL */
  const char *tls_psk_file;      /* username:hexkey lines, or NULL */
  bool tls_no_verify;            /* do not verify the server's certificate */
};

#define ACLONE_ATTACH_MAX_CONNECTIONS 16

/* Connect, attach, then run until SIGTERM/SIGINT or until the device is
 * detached (nbd-client -d), reconnecting whenever the kernel reports the
 * connection dead.  Returns 0 or -errno with err set.
 */
int aclone_attach (const struct aclone_attach_config *cfg,
                   struct aclone_error *err);

/* The socket the kernel gets for one connection to cfg's export: for a
 * plain URI, libnbd's own after the handshake; for TLS, one end of a
 * socket pair served by a relay thread.  Fills the export's size and
 * transmission flags (the protocol's NBD_FLAG_*).  -errno with err set.
 * Exposed for tests, which speak NBD on it as the kernel would.
 */
int aclone_attach_socket (const struct aclone_attach_config *cfg,
                          uint64_t *size, uint64_t *flags,
                          struct aclone_error *err);

/* Detach /dev/nbd<index> (NBD_CMD_DISCONNECT), as nbd-client -d does; an
 * `aclone attach` serving it then exits.  0 or -errno with err set.
 */
int aclone_attach_detach (int index, struct aclone_error *err);

#endif
