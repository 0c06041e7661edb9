/* aclone: the clone device: the I/O semantics of aclone-design(7), built
 * on the metadata file, the region map, the source and the destination.
 *
 * All I/O functions are safe to call from many threads at once.  They
 * return 0 or -errno; -errno is what the NBD client should see.
 */
#ifndef ACLONE_CLONE_H
#define ACLONE_CLONE_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "aclone/dest.h"
#include "aclone/error.h"
#include "aclone/map.h"
#include "aclone/meta.h"
#include "aclone/source.h"

struct aclone_hydrator;

/* Block status flags, as NBD's base:allocation. */
#define ACLONE_EXTENT_HOLE 1u
#define ACLONE_EXTENT_ZERO 2u

struct aclone_clone_config {
  const char *dest_path;
  const char *meta_path;
  uint32_t region_size;          /* 0 = default for new, any for existing */
  bool copy_on_read;
};

/* Log sink: level 0 debug, 1 info, 2 error. */
typedef void (*aclone_log_fn) (void *opaque, int level, const char *msg);

/* The clone's mode: what its data allows.  One value, changed only by
 * the transitions in clone.c ("Modes"):
 *
 *   HYDRATING --(a commit finds every region hydrated)--> COMPLETE
 *   HYDRATING, COMPLETE --(dest or metadata sync fails)--> FAILED
 *
 * and never out of FAILED while the server runs (dm-clone's fail mode).
 */
enum aclone_mode {
  ACLONE_MODE_HYDRATING = 0,   /* some regions still read from the source */
  ACLONE_MODE_COMPLETE,        /* every region on dest and committed */
  ACLONE_MODE_FAILED,          /* a sync failed: nothing is committed again */
};

/* Where the server is in its life: the request gate (see
 * aclone_clone_shutdown).  RUNNING -> STOPPING -> STOPPED, once.
 */
enum aclone_run {
  ACLONE_RUN_RUNNING = 0,      /* requests pass the gate */
  ACLONE_RUN_STOPPING,         /* gate closed, requests inside drain */
  ACLONE_RUN_STOPPED,          /* final commit done */
};

struct aclone_clone;              /* opaque: see src/core/clone-internal.h */

/* The current mode (a reader that sees COMPLETE sees every region
 * hydrated).
 */
enum aclone_mode aclone_clone_mode (struct aclone_clone *c);

/* The device's size in bytes. */
uint64_t aclone_clone_size (const struct aclone_clone *c);

/* Open or create the clone.  src may be NULL only for a complete clone;
 * on success the clone owns src.  Checks everything before modifying
 * anything: on failure dest and meta are as they were.
 */
int aclone_clone_open (const struct aclone_clone_config *cfg,
                       struct aclone_source *src, aclone_log_fn log,
                       void *log_opaque, struct aclone_clone **out,
                       struct aclone_error *err);

/* Start background threads (the ticker; the hydrator is started by its
 * own module).  Call after nbdkit's fork.
 */
int aclone_clone_start (struct aclone_clone *c, struct aclone_error *err);

/* Make calls waiting for a lost or hung source give up now (-ESHUTDOWN):
 * for stopping.  The source stays open.
 */
void aclone_clone_cancel_source (struct aclone_clone *c);

/* Graceful stop, without freeing anything, so that threads still
 * calling in get -ESHUTDOWN rather than a freed clone:
 *   1. close the request gate (new requests fail with -ESHUTDOWN) and
 *      cancel waits for a lost source;
 *   2. wait up to drain_ms for requests in progress to finish;
 *   3. stop the ticker, final commit, live page says "stopped";
 *   4. release the metadata lock (only if step 2 drained: a request still
 *      inside could write after a new server took over).
 * Stop the hydrator first.  Returns 0, or -errno of the commit, or
 * -EBUSY when requests did not drain.  Runs once; later calls return 0.
 */
int aclone_clone_shutdown (struct aclone_clone *c, unsigned drain_ms);

/* aclone_clone_shutdown if not done yet, then close and free. */
void aclone_clone_close (struct aclone_clone *c);

int aclone_clone_pread (struct aclone_clone *c, void *buf, uint32_t count,
                        uint64_t offset);

/* One client connection, as the hydrator's pace controller sees it
 * (aclone-design(7), FOREGROUND FIRST): the plugin keeps one per NBD
 * connection, zeroed at open, and brackets every request it serves with
 * aclone_client_enter and aclone_client_leave.
 */
struct aclone_client {
  atomic_uint busy;                  /* requests in progress */
  atomic_uint_fast64_t last_end_ns;  /* when the last one ended, 0 never */
};

/* A request begins.  Returns when the connection's previous request
 * ended, if none has been in progress since and it ended at most
 * ACLONE_CLIENT_CYCLE_MAX_NS ago (a client issuing one request after
 * another); else 0.
 */
#define ACLONE_CLIENT_CYCLE_MAX_NS 5000000ull
uint64_t aclone_client_enter (struct aclone_client *cl);
void aclone_client_leave (struct aclone_client *cl);

/* aclone_clone_pread, for a client: since is what aclone_client_enter
 * returned.  When it is not 0, the read is at most ACLONE_SVC_MAX_READ
 * bytes and served wholly from dest, the time from since to the end of
 * the read (the client's whole turn: our reply, its next request, our
 * service) is a sample for the pace controller.
 */
int aclone_clone_pread_client (struct aclone_clone *c, void *buf,
                               uint32_t count, uint64_t offset,
                               uint64_t since);
int aclone_clone_pwrite (struct aclone_clone *c, const void *buf,
                         uint32_t count, uint64_t offset, bool fua);

/* Zero or trim.  Trim is zero that may punch; both leave the range
 * reading zero.  fast: fail with -ENOTSUP rather than copy or write.
 */
int aclone_clone_zero (struct aclone_clone *c, uint32_t count,
                       uint64_t offset, bool may_trim, bool fast, bool fua);
int aclone_clone_flush (struct aclone_clone *c);

/* Hydrate the regions covering the range (NBD_CMD_CACHE). */
int aclone_clone_cache (struct aclone_clone *c, uint32_t count, uint64_t offset);

/* Block status: call fn for consecutive extents from offset; type is
 * NBD's (bit 0 hole, bit 1 zero).  Reports at least the first extent.
 */
typedef int (*aclone_status_fn) (void *opaque, uint64_t offset,
                                 uint64_t length, uint32_t type);
int aclone_clone_extents (struct aclone_clone *c, uint32_t count,
                          uint64_t offset, bool req_one,
                          aclone_status_fn fn, void *opaque);

/* The commit protocol (invariant 1):
 *   1. swap out the dirty bits (regions hydrated/written since last commit)
 *   2. fdatasync dest
 *   3. set the written bits in the mmap'd bitmap and msync them, then
 *   4. the same for the hydrated bits
 * then, when every region is hydrated, set the header's complete flag.
 * A failed sync or metadata write moves the clone to FAILED (the kernel
 * reports a writeback error once and may have dropped the data, so no
 * later commit could be trusted): this call and every later one return
 * -EIO.  Only a lack of memory in step 1 leaves the bits for the next try.
 */
int aclone_clone_commit (struct aclone_clone *c);

#endif
