/* aclone: the in-core region map and region locks.
 *
 * Per region, four atomic bits:
 *   hydrated       dest holds this region's data (routing: read from dest)
 *   hydrated_dirty hydrated since the last commit, not yet in the meta file
 *   written        a client wrote to this region
 *   written_dirty  likewise, not yet committed
 * Bits only ever go from 0 to 1, except the dirty bits, which a commit
 * swaps out (aclone_map_take_dirty) and gives back if it fails.
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
  _Atomic uint64_t *hydrated;
  _Atomic uint64_t *hydrated_dirty;
  _Atomic uint64_t *written;
  _Atomic uint64_t *written_dirty;
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

/* Load committed state (LE words from the meta file) at start.  Only
 * non-zero words are stored, so untouched parts of the in-core arrays
 * stay unallocated zero pages.
 */
void aclone_map_load (struct aclone_map *m, const uint64_t *hydrated_le,
                      const uint64_t *written_le);

/* Commit support: move every set dirty bit of kind `which` out of the
 * map into (index[], words[]), growing them with realloc.  *n receives the
 * count.  Returns 0 or -ENOMEM (nothing lost: bits stay dirty).
 */
int aclone_map_take_dirty (struct aclone_map *m, int which,
                           uint64_t **index, uint64_t **words, size_t *cap,
                           size_t *n);

/* Give bits taken by aclone_map_take_dirty back after a failed commit. */
void aclone_map_return_dirty (struct aclone_map *m, int which,
                              const uint64_t *index, const uint64_t *words,
                              size_t n);

/* Region locks. */
void aclone_map_lock (struct aclone_map *m, uint64_t first, uint64_t count);
bool aclone_map_trylock (struct aclone_map *m, uint64_t first, uint64_t count);
void aclone_map_unlock (struct aclone_map *m, uint64_t first, uint64_t count);

#endif
