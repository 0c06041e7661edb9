/* aclone: the TLS relay of `aclone attach` (relay.c).  Internal to the
 * attach helper.
 */
#ifndef ACLONE_RELAY_H
#define ACLONE_RELAY_H

#include <libnbd.h>

#include "aclone/error.h"

/* Most requests the relay has at the server at once; the kernel's own
 * queue holds the rest.
 */
#define ACLONE_RELAY_MAX_IN_FLIGHT 64

/* Serve the kernel over h: h is connected (handshake and TLS done) and
 * becomes the relay's.  Returns the socket to hand the kernel (one end
 * of a socket pair; the relay thread holds the other), or -errno with
 * err set (h is closed then too).  desc names the export in messages.
 */
int aclone_relay_start (struct nbd_handle *h, const char *desc,
                        struct aclone_error *err);

#endif
