/* aclone: the source, S.
 *
 * An interface so that the clone logic can be tested against fakes.  The
 * real one (aclone_source_nbd_open) is a pool of libnbd connections to an
 * NBD URI, reconnecting with backoff when the source drops.  A call takes
 * at most `timeout_s` seconds, whether the source is gone or hangs with
 * its connection up; then it fails with EIO.
 */
#ifndef ACLONE_SOURCE_H
#define ACLONE_SOURCE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stddef.h>

#include "aclone/error.h"
#include "aclone/clock.h"

/* Extent callback: called in offset order; zero is true when the source
 * says the range reads as zeroes.  Return non-zero to stop early.
 */
typedef int (*aclone_extent_fn) (void *opaque, uint64_t offset,
                                 uint64_t length, bool zero);

struct aclone_source;
struct nbd_handle;

/* Largest read aclone sends a source that does not advertise a maximum
 * block size (and never more, whatever it advertises): the NBD spec's
 * "safe" size, which every server takes.
 */
#define ACLONE_SOURCE_MAX_REQUEST (32u << 20)

struct aclone_source_ops {
  /* Read exactly count bytes at offset.  0 or -errno.  Called through
   * aclone_source_pread only, so within the source's limits: count <=
   * max_request, and offset and count multiples of min_block (count may
   * instead end at the source's size).
   */
  int (*pread) (struct aclone_source *s, void *buf, size_t count,
                uint64_t offset);
  /* Report extents covering at least the first byte of [offset,
   * offset+count).  -ENOTSUP when the source has no block status.
   */
  int (*extents) (struct aclone_source *s, uint64_t offset, uint64_t count,
                  aclone_extent_fn fn, void *opaque);
  /* Open a new connection for libnbd's asynchronous API, owned by the
   * caller (the hydrator).  NULL when unreachable, or when the source is
   * not NBD (the hydrator then copies through pread).  Optional.
   */
  struct nbd_handle *(*aio_connect) (struct aclone_source *s);
  void (*close) (struct aclone_source *s);
};

struct aclone_source {
  const struct aclone_source_ops *ops;
  uint64_t size;
  bool multi_conn;             /* source advertises multi-conn */
  char desc[256];              /* URI without query string: no secrets */
  unsigned timeout_s;          /* longest wait for a reply; 0 = none */
  /* Request limits, from the source's advertised block sizes (NBD
   * NBD_INFO_BLOCK_SIZE), fixed at open.  Every request sent to the
   * source, synchronous or asynchronous, must be at most max_request
   * bytes and, in offset and length, a multiple of min_block (the length
   * may instead end at `size`).  aclone_source_pread does that for any
   * read; code using aio_connect handles must do it itself.
   *   min_block:   advertised minimum, else 1 (no alignment needed)
   *   pref_block:  advertised preferred size, else 0 (none); advisory
   *   max_request: advertised maximum, else ACLONE_SOURCE_MAX_REQUEST,
   *                never above it; a multiple of min_block, >= min_block
   * A source that leaves them 0 is treated as 1, 0 and
   * ACLONE_SOURCE_MAX_REQUEST.
   */
  uint32_t min_block, pref_block, max_request;
  /* Set by the pool, read by status reporting. */
  _Atomic unsigned long long outage_since_ns; /* 0 = connected */
  /* Set at shutdown: calls waiting for a lost source give up at once. */
  _Atomic bool cancelled;
};

struct aclone_source_config {
  const char *uri;
  unsigned connections;        /* pool size, >= 1 */
  unsigned timeout_s;          /* how long a call may wait, >= 1 */
  /* TLS, for nbds:// and nbds+unix:// URIs (NULL: libnbd's default).
   * The PSK file is only handed to libnbd: its keys are never read, kept
   * or logged by aclone.
   */
  const char *tls_certificates;  /* directory */
  const char *tls_psk_file;
  bool tls_no_verify;            /* do not check the server's certificate */
};

/* True when uri asks for TLS (nbds:// or nbds+unix:// and the like). */
bool aclone_source_uri_is_tls (const char *uri);

/* Connect once to learn the size and check reachability, and set up the
 * pool (its other connections open on demand).  Returns 0 or -errno.
 */
int aclone_source_nbd_open (const struct aclone_source_config *cfg,
                            struct aclone_source **out,
                            struct aclone_error *err);

/* Copy of uri with any query string and userinfo removed. */
void aclone_source_describe (const char *uri, char *out, size_t outlen);

/* Read exactly count bytes at offset, any offset and count within the
 * source: split into requests of at most max_request bytes, and an
 * unaligned start or end read as whole min_block blocks through a bounce
 * buffer.  0 or -errno (-EINVAL beyond the end).
 */
int aclone_source_pread (struct aclone_source *s, void *buf, size_t count,
                         uint64_t offset);

/* s's limits with defaults for unset (0) fields, as described above. */
uint32_t aclone_source_min_block (const struct aclone_source *s);
uint32_t aclone_source_max_request (const struct aclone_source *s);

/* The source is lost (0 = connected): record since when, once, for the
 * live page's "waiting" state.
 */
static inline void
aclone_source_note_outage (struct aclone_source *s)
{
  unsigned long long zero = 0;
  atomic_compare_exchange_strong (&s->outage_since_ns, &zero, aclone_wall_ns ());
}

static inline void
aclone_source_close (struct aclone_source *s)
{
  if (s)
    s->ops->close (s);
}

#endif
