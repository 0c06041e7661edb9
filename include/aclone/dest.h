/* aclone: the destination, D: a regular file or a block device.
 *
 * Thin, synchronous wrappers that loop over short transfers and map
 * every failure to -errno.  Zeroing picks the cheapest operation that
 * guarantees D reads zero afterwards (invariant 4).
 */
#ifndef ACLONE_DEST_H
#define ACLONE_DEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "aclone/error.h"

struct aclone_dest {
  char *path;
  int fd;
  int settle_fd;               /* D opened again, for settling; or -1 */
  bool is_block;
  uint64_t size;
  bool created;                /* we created it sparse: reads all zero */
};

/* Check path for use as dest of a device of `size` bytes without changing
 * anything.  *exists receives whether it exists.
 */
int aclone_dest_check (const char *path, uint64_t size, bool *exists,
                       struct aclone_error *err);

/* Open (create=false) or create sparse with mode 0600 (create=true). */
int aclone_dest_open (const char *path, uint64_t size, bool create,
                      struct aclone_dest **out, struct aclone_error *err);
void aclone_dest_close (struct aclone_dest *d);

int aclone_dest_pread (struct aclone_dest *d, void *buf, size_t count,
                       uint64_t offset);
int aclone_dest_pwrite (struct aclone_dest *d, const void *buf, size_t count,
                        uint64_t offset);

/* Make [offset, offset+count) read zero.  punch: deallocating is fine.
 * fast: fail with -ENOTSUP rather than write zeroes by hand.
 */
int aclone_dest_zero (struct aclone_dest *d, uint64_t count, uint64_t offset,
                      bool punch, bool fast);

int aclone_dest_sync (struct aclone_dest *d);

/* Page-cache hygiene for data written to D that nobody is about to read
 * back (copies).  Left to the kernel, such pages stay dirty until its
 * dirty limits or expiry (30 s) say, then cached: memory taken from the
 * machine, written back in bursts that stall its reads, and each new
 * page a fresh allocation (on a VM that hands free memory back to its
 * host, a fault on the host: a buffered write into fresh pages cost 10x
 * one into reused pages on the development machine).
 *
 * aclone_dest_settle_begin starts writeback of [offset, offset+count)
 * now and does not wait for it.  aclone_dest_settle_wait, called some
 * writes later, waits for it; it returns 0, or -errno if writeback of D
 * failed since the last call (anywhere in D).  aclone_dest_drop_cached
 * then drops the range's clean pages, so that the next writes reuse
 * them.  Never after a failed wait: a page whose writeback failed is
 * clean, and may hold the only good copy of its data.
 *
 * None of them changes what is durable: only aclone_dest_sync says
 * that.  They use a second open file description of D: each description
 * has its own writeback error cursor, so an error a wait sees is still
 * reported to the next aclone_dest_sync.  Only regular files on ext4
 * and XFS have one (settle_fd): on overlayfs, for one, sync_file_range
 * reaches the overlay's own (empty) mapping, not the file's, and waits
 * for nothing.  Without one, all three do nothing and the wait says 0.
 */
void aclone_dest_settle_begin (struct aclone_dest *d, uint64_t offset,
                               uint64_t count);
int aclone_dest_settle_wait (struct aclone_dest *d, uint64_t offset,
                             uint64_t count);
void aclone_dest_drop_cached (struct aclone_dest *d, uint64_t offset,
                              uint64_t count);
/* Does D settle (has a settle_fd)? */
bool aclone_dest_settles (const struct aclone_dest *d);

/* Next data/hole boundary: is the byte at offset data, and where does
 * that kind of range end (at most offset+count)?  Files without SEEK_DATA
 * and block devices report all data.
 */
int aclone_dest_probe (struct aclone_dest *d, uint64_t offset, uint64_t count,
                       bool *data, uint64_t *end);

#endif
