/* aclone: the in-core region map and region locks.
 *
 * Per region, two atomic bits:
 *   hydrated       dest holds this region's data (routing: read from dest)
 *   written        a client wrote to this region
 * and per word of 64 regions, two dirty bits (a bit per 64 regions keeps
 * them at 1/64 of a bitmap: 0.5 MiB at 15 TiB):
 *   hydrated_dirty a hydrated bit of the word was set since the last
 *                  commit, and is maybe not in the meta file yet
 *   written_dirty  likewise for written bits
 * Bits only ever go from 0 to 1, except the dirty bits, which a commit
 * swaps out (aclone_map_take_dirty) and gives back if it fails.  A commit
 * writes a dirty word's whole value as it reads it after the swap: every
 * bit in it was set after its data reached dest, and before the commit's
 * dest sync, which follows the swap (invariant 1).
 *
 * The arrays are anonymous mappings of their own, touched only where a
 * bit is set.  Once the clone is complete and committed, the hydrated
 * array is replaced by a private mapping of the file's bitmap, all ones
 * (aclone_map_hydrated_from_file), so that a complete clone holds no
 * in-core map.
 *
 * Region locks (invariant 3 of aclone-design(7)) are logical: a range
 * of regions is locked by whoever is copying into it or writing it while
 * it is not hydrated.  They are not mutexes and may be held across I/O.
 * A client request holds at most one range at a time; a copy worker holds
 * up to its depth of ranges, but takes every one with try-lock and never
 * waits while holding one, so there is no lock order to get wrong.
 */
#ifndef ACLONE_MAP_H
#define ACLONE_MAP_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "aclone/meta.h"              /* ACLONE_BIT_* */

struct aclone_range_lock {
  uint64_t first, count;
};

struct aclone_map {
  uint64_t size;
  uint64_t regions;
  unsigned shift;                  /* log2 region size */
  size_t words;
  size_t bits_len;                 /* bytes mapped for each bit array */
  size_t dirty_len;                /* ...and each dirty array */
  _Atomic uint64_t *hydrated;
  _Atomic uint64_t *hydrated_dirty;  /* one bit per word of hydrated */
  _Atomic uint64_t *written;
  _Atomic uint64_t *written_dirty;   /* one bit per word of written */
  atomic_uint_fast64_t nr_hydrated;
  atomic_bool dirty;               /* some dirty bit may be set */

  pthread_mutex_t lock;            /* protects locked[] */
  pthread_cond_t unlocked;
  struct aclone_range_lock *locked;
  size_t nlocked, caplocked;
};


int aclone_map_init (struct aclone_map *m, uint64_t size, unsigned shift);
void aclone_map_free (struct aclone_map *m);

static inline uint64_t
aclone_map_region (const struct aclone_map *m, uint64_t offset)
{
  return offset >> m->shift;
}

static inline bool
aclone_map_hydrated (const struct aclone_map *m, uint64_t r)
{
  return (atomic_load_explicit (&m->hydrated[r / 64], memory_order_acquire)
          >> (r % 64)) & 1;
}

static inline bool
aclone_map_written (const struct aclone_map *m, uint64_t r)
{
  return (atomic_load_explicit (&m->written[r / 64], memory_order_acquire)
          >> (r % 64)) & 1;
}

/* Length of the run of regions starting at r, at most max regions, that
 * share r's hydrated state.
 */
uint64_t aclone_map_run (const struct aclone_map *m, uint64_t r, uint64_t max);

/* The same, and *hydrated = the state the run was measured against.  A
 * caller that routes on the state must take it from here, not from a
 * second aclone_map_hydrated (r): r may become hydrated in between, and
 * the run of unhydrated regions behind it would then be read from dest,
 * where nothing was ever copied.
 */
uint64_t aclone_map_run_state (const struct aclone_map *m, uint64_t r,
                               uint64_t max, bool *hydrated);

/* Next unhydrated region at or after r, or m->regions. */
uint64_t aclone_map_next_unhydrated (const struct aclone_map *m, uint64_t r);

/* Mark count regions from first hydrated (and dirty).  Only call after
 * dest holds their data; the caller must hold their region lock.
 * Returns how many were newly hydrated.
 */
uint64_t aclone_map_set_hydrated (struct aclone_map *m, uint64_t first,
                                  uint64_t count);

/* Mark regions written by a client (and dirty), after dest holds it. */
void aclone_map_set_written (struct aclone_map *m, uint64_t first, uint64_t count);

/* Load committed state at start: n little-endian words of bitmap
 * `which` (from the meta file) from word `first` on.  Only non-zero
 * words are stored, so untouched parts of the in-core arrays stay
 * unallocated zero pages; bits past the last region are ignored.
 */
void aclone_map_load (struct aclone_map *m, int which, size_t first,
                      const uint64_t *le, size_t n);

/* A commit's scratch list of dirty words, owned by the committer. */
struct aclone_dirty_list {
  struct aclone_dirty_words *v;
  size_t n, cap;
};

/* Commit support: swap out every dirty bit of kind `which` and list the
 * words they mark, each with its value read after the swap; runs of
 * full words are one entry.  Returns 0 or -ENOMEM (nothing lost: the
 * bits are dirty again).
 */
int aclone_map_take_dirty (struct aclone_map *m, int which,
                           struct aclone_dirty_list *out);

/* Give words taken by aclone_map_take_dirty back after a failed commit. */
void aclone_map_return_dirty (struct aclone_map *m, int which,
                              const struct aclone_dirty_list *l);

/* Once every region is hydrated and committed: replace the in-core
 * hydrated array by a private mapping of the metadata file's hydrated
 * bitmap (fd, at offset off), which then reads all ones, count every
 * region hydrated, and give the array's memory back.  Readers racing
 * with it see either array, never a hole (mmap with MAP_FIXED replaces
 * the pages under the address-space lock).  Returns 0, or -ENOTSUP with
 * the array unchanged where the file's words cannot stand in for the
 * array's (a big-endian host, pages other than 4 KiB), or another -errno
 * of mmap: kernels before 6.12 may then have unmapped the array, which a
 * complete clone no longer reads (COMPLETE routes every read to dest).
 */
int aclone_map_hydrated_from_file (struct aclone_map *m, int fd, uint64_t off);

/* Region locks. */
void aclone_map_lock (struct aclone_map *m, uint64_t first, uint64_t count);
bool aclone_map_trylock (struct aclone_map *m, uint64_t first, uint64_t count);
void aclone_map_unlock (struct aclone_map *m, uint64_t first, uint64_t count);

#endif
