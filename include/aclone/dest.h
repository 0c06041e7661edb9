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

/* Next data/hole boundary: is the byte at offset data, and where does
 * that kind of range end (at most offset+count)?  Files without SEEK_DATA
 * and block devices report all data.
 */
int aclone_dest_probe (struct aclone_dest *d, uint64_t offset, uint64_t count,
                       bool *data, uint64_t *end);

#endif
