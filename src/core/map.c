/* aclone: in-core region map and region locks (see include/aclone/map.h).
 *
 * The bit arrays are plain words of atomics: setting a bit is one
 * fetch_or, testing one an acquire load, so the read and write paths
 * never take a mutex for hydrated regions.  Release ordering on the set
 * pairs with the acquire on the test: whoever sees "hydrated" also sees
 * that dest holds the data.
 *
 * Region locks are a short list of locked ranges under one mutex.  The
 * list holds at most one entry per I/O in flight (clients plus hydrator
 * depth), so a linear scan beats any tree at these sizes.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <endian.h>

#include "aclone/map.h"

static _Atomic uint64_t *
alloc_bits (size_t words)
{
  return calloc (words ? words : 1, sizeof (uint64_t));
}

int
aclone_map_init (struct aclone_map *m, uint64_t size, unsigned shift)
{
  memset (m, 0, sizeof *m);
  m->size = size;
  m->shift = shift;
  m->regions = (size + (UINT64_C (1) << shift) - 1) >> shift;
  m->words = (m->regions + 63) / 64;
  m->hydrated = alloc_bits (m->words);
  m->hydrated_dirty = alloc_bits (m->words);
  m->written = alloc_bits (m->words);
  m->written_dirty = alloc_bits (m->words);
  if (!m->hydrated || !m->hydrated_dirty || !m->written || !m->written_dirty) {
    aclone_map_free (m);
    return -ENOMEM;
  }
  pthread_mutex_init (&m->lock, NULL);
  pthread_cond_init (&m->unlocked, NULL);
  return 0;
}

void
aclone_map_free (struct aclone_map *m)
{
  free ((void *) m->hydrated);
  free ((void *) m->hydrated_dirty);
  free ((void *) m->written);
  free ((void *) m->written_dirty);
  free (m->locked);
  if (m->words) {
    pthread_mutex_destroy (&m->lock);
    pthread_cond_destroy (&m->unlocked);
  }
  memset (m, 0, sizeof *m);
}

uint64_t
aclone_map_run (const struct aclone_map *m, uint64_t r, uint64_t max)
{
  return aclone_map_run_state (m, r, max, NULL);
}

uint64_t
aclone_map_run_state (const struct aclone_map *m, uint64_t r, uint64_t max,
                      bool *hydrated)
{
  bool state = aclone_map_hydrated (m, r);

  if (hydrated)
    *hydrated = state;
  uint64_t end = r + max > m->regions ? m->regions : r + max;
  uint64_t i = r + 1;

  while (i < end) {
    if (i % 64 == 0 && end - i >= 64) {
      uint64_t w = atomic_load_explicit (&m->hydrated[i / 64], memory_order_acquire);
      if (w == (state ? UINT64_MAX : 0)) {
        i += 64;
        continue;
      }
    }
    if (aclone_map_hydrated (m, i) != state)
      break;
    i++;
  }
  return i - r;
}

uint64_t
aclone_map_next_unhydrated (const struct aclone_map *m, uint64_t r)
{
  while (r < m->regions) {
    uint64_t w = ~atomic_load_explicit (&m->hydrated[r / 64], memory_order_acquire);
    w &= UINT64_MAX << (r % 64);
    if (w) {
      r = (r & ~UINT64_C (63)) + __builtin_ctzll (w);
      return r < m->regions ? r : m->regions;
    }
    r = (r & ~UINT64_C (63)) + 64;
  }
  return m->regions;
}

/* Set bits [first, first+count) in bits, and the same newly-set bits in
 * dirty.  Returns the number newly set.
 */
static uint64_t
set_range (struct aclone_map *m, _Atomic uint64_t *bits,
           _Atomic uint64_t *dirty, uint64_t first, uint64_t count)
{
  uint64_t end = first + count, newly = 0;

  while (first < end) {
    unsigned lo = first % 64;
    unsigned n = end - first < 64 - lo ? (unsigned) (end - first) : 64 - lo;
    uint64_t mask = (n == 64 ? UINT64_MAX : ((UINT64_C (1) << n) - 1)) << lo;
    uint64_t old = atomic_fetch_or_explicit (&bits[first / 64], mask,
                                             memory_order_acq_rel);
    uint64_t added = mask & ~old;
    if (added) {
      atomic_fetch_or_explicit (&dirty[first / 64], added, memory_order_release);
      newly += __builtin_popcountll (added);
    }
    first += n;
  }
  if (newly)
    atomic_store_explicit (&m->dirty, true, memory_order_release);
  return newly;
}

uint64_t
aclone_map_set_hydrated (struct aclone_map *m, uint64_t first, uint64_t count)
{
  uint64_t newly = set_range (m, m->hydrated, m->hydrated_dirty, first, count);
  atomic_fetch_add (&m->nr_hydrated, newly);
  return newly;
}

void
aclone_map_set_written (struct aclone_map *m, uint64_t first, uint64_t count)
{
  set_range (m, m->written, m->written_dirty, first, count);
}

void
aclone_map_load (struct aclone_map *m, const uint64_t *hydrated_le,
                 const uint64_t *written_le)
{
  uint64_t n = 0;
  /* Bits past the last region in the file are ignored. */
  uint64_t tail = m->regions % 64 ? (UINT64_C (1) << (m->regions % 64)) - 1
                                  : UINT64_MAX;

  for (size_t i = 0; i < m->words; i++) {
    uint64_t mask = i == m->words - 1 ? tail : UINT64_MAX;
    uint64_t h = le64toh (hydrated_le[i]) & mask;
    uint64_t w = le64toh (written_le[i]) & mask;
    if (h) {
      atomic_store (&m->hydrated[i], h);
      n += __builtin_popcountll (h);
    }
    if (w)
      atomic_store (&m->written[i], w);
  }
  atomic_store (&m->nr_hydrated, n);
}

int
aclone_map_take_dirty (struct aclone_map *m, int which,
                       uint64_t **index, uint64_t **words, size_t *cap,
                       size_t *n)
{
  _Atomic uint64_t *dirty = which ? m->written_dirty : m->hydrated_dirty;

  *n = 0;
  for (size_t i = 0; i < m->words; i++) {
    if (atomic_load_explicit (&dirty[i], memory_order_relaxed) == 0)
      continue;
    if (*n == *cap) {
      size_t nc = *cap ? *cap * 2 : 64;
      uint64_t *ni = realloc (*index, nc * sizeof **index);
      if (ni) *index = ni;
      uint64_t *nw = ni ? realloc (*words, nc * sizeof **words) : NULL;
      if (nw) *words = nw;
      if (!ni || !nw) {
        aclone_map_return_dirty (m, which, *index, *words, *n);
        *n = 0;
        return -ENOMEM;
      }
      *cap = nc;
    }
    (*index)[*n] = i;
    (*words)[*n] = atomic_exchange_explicit (&dirty[i], 0, memory_order_acq_rel);
    (*n)++;
  }
  return 0;
}

void
aclone_map_return_dirty (struct aclone_map *m, int which,
                         const uint64_t *index, const uint64_t *words, size_t n)
{
  _Atomic uint64_t *dirty = which ? m->written_dirty : m->hydrated_dirty;

  for (size_t i = 0; i < n; i++)
    atomic_fetch_or (&dirty[index[i]], words[i]);
  if (n)
    atomic_store (&m->dirty, true);
}

/* Must be called with m->lock held. */
static bool
overlaps (const struct aclone_map *m, uint64_t first, uint64_t count)
{
  for (size_t i = 0; i < m->nlocked; i++) {
    const struct aclone_range_lock *l = &m->locked[i];
    if (first < l->first + l->count && l->first < first + count)
      return true;
  }
  return false;
}

/* Is there room for one more range in the list?  Grows it by doubling.
 * Must be called with m->lock held.
 */
static bool
reserve (struct aclone_map *m)
{
  if (m->nlocked < m->caplocked)
    return true;
  size_t nc = m->caplocked ? m->caplocked * 2 : 64;
  struct aclone_range_lock *nl = realloc (m->locked, nc * sizeof *nl);
  if (!nl)
    return false;
  m->locked = nl;
  m->caplocked = nc;
  return true;
}

/* Must be called with m->lock held, no overlap and room reserved. */
static void
insert (struct aclone_map *m, uint64_t first, uint64_t count)
{
  m->locked[m->nlocked++] = (struct aclone_range_lock) { first, count };
}

/* Waits while the range overlaps a locked one, or while memory is too
 * short to record it (an unlock frees a slot): locking has no error path,
 * and both conditions are checked again after every wake-up.
 */
void
aclone_map_lock (struct aclone_map *m, uint64_t first, uint64_t count)
{
  pthread_mutex_lock (&m->lock);
  while (overlaps (m, first, count) || !reserve (m))
    pthread_cond_wait (&m->unlocked, &m->lock);
  insert (m, first, count);
  pthread_mutex_unlock (&m->lock);
}

/* Never waits: false when the range overlaps, or memory is short. */
bool
aclone_map_trylock (struct aclone_map *m, uint64_t first, uint64_t count)
{
  bool ok;

  pthread_mutex_lock (&m->lock);
  ok = !overlaps (m, first, count) && reserve (m);
  if (ok)
    insert (m, first, count);
  pthread_mutex_unlock (&m->lock);
  return ok;
}

void
aclone_map_unlock (struct aclone_map *m, uint64_t first, uint64_t count)
{
  pthread_mutex_lock (&m->lock);
  for (size_t i = 0; i < m->nlocked; i++) {
    if (m->locked[i].first == first && m->locked[i].count == count) {
      m->locked[i] = m->locked[--m->nlocked];
      break;
    }
  }
  pthread_cond_broadcast (&m->unlocked);
  pthread_mutex_unlock (&m->lock);
}
