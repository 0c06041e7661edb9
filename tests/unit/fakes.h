/* Test fakes: an in-memory source with read counting, optional block
 * status, delay and failure injection; temporary directories.
 */
#ifndef ACLONE_TEST_FAKES_H
#define ACLONE_TEST_FAKES_H

#include <stdbool.h>
#include <stdint.h>
#include <pthread.h>

#include "aclone/source.h"

struct fake_source {
  struct aclone_source base;
  unsigned char *data;
  bool has_extents;
  _Atomic unsigned reads;          /* pread calls */
  _Atomic unsigned long long read_bytes;
  _Atomic unsigned delay_us;       /* sleep in every pread */
  _Atomic int fail_errno;          /* fail every pread with this */
  _Atomic long long fail_offset;   /* ...or only reads covering this byte (-1 none) */
  /* Request limits, as an NBD server advertises them: base.min_block,
   * base.pref_block, base.max_request (fake_source_new: 1, 4096, 32M).
   * With enforce_limits, a pread above max_request or not aligned to
   * min_block (the end may be the source's end) fails with -EINVAL, as a
   * strict server would, and counts a violation.
   */
  bool enforce_limits;
  _Atomic unsigned violations;     /* preads refused for the limits */
  _Atomic unsigned long long max_seen; /* largest pread count asked */
  bool closed;
};

/* A source of `size` bytes filled from a seeded PRNG, with zero runs
 * where zero_every is non-zero (every zero_every-th MiB is zero).
 * The clone owns it after aclone_clone_open; the test keeps the pointer
 * (closing only marks it closed; free it with fake_source_free).
 */
struct fake_source *fake_source_new (uint64_t size, unsigned seed,
                                     unsigned zero_every_mib);
void fake_source_free (struct fake_source *s);

/* Advertise these limits and enforce them (see enforce_limits); 0 for
 * min_block means 1, for max_request ACLONE_SOURCE_MAX_REQUEST.  E.g.
 * fake_source_set_limits (s, 4096, 4096, 64 * 1024): a 64K maximum.
 */
void fake_source_set_limits (struct fake_source *s, uint32_t min_block,
                             uint32_t pref_block, uint32_t max_request);

/* Fill buf with deterministic bytes for (seed, offset). */
void fill_pattern (unsigned char *buf, size_t len, unsigned seed, uint64_t offset);

/* mkdtemp under /tmp; returns a malloc'd path.  rm_rf removes it. */
char *make_tmpdir (void);
void rm_rf (const char *dir);
char *path_join (const char *dir, const char *name);

#endif
