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
#include <sys/mman.h>
#include <sys/param.h>
#include <unistd.h>

#include "aclone/map.h"

#define PAGE 4096u

static size_t
round_page (size_t n)
{
  return (n + PAGE - 1) & ~(size_t) (PAGE - 1);
}

/* An array of zero words in a mapping of its own: pages are allocated
 * only where a bit is set (reading untouched ones maps the zero page),
 * and the hydrated array can be replaced with MAP_FIXED, which must not
 * happen inside malloc's heap.
 */
static _Atomic uint64_t *
alloc_bits (size_t len)
{
  void *p = mmap (NULL, len, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? NULL : p;
}

static void
free_bits (_Atomic uint64_t *p, size_t len)
{
  if (p)
    munmap ((void *) p, len);
}

int
aclone_map_init (struct aclone_map *m, uint64_t size, unsigned shift)
{
  memset (m, 0, sizeof *m);
  m->size = size;
  m->shift = shift;
  m->regions = (size + (UINT64_C (1) << shift) - 1) >> shift;
  m->words = (m->regions + 63) / 64;
  m->bits_len = round_page (MAX (m->words, 1u) * sizeof (uint64_t));
  m->dirty_len = round_page ((m->words + 63) / 64 * sizeof (uint64_t) + 8);
  m->hydrated = alloc_bits (m->bits_len);
  m->hydrated_dirty = alloc_bits (m->dirty_len);
  m->written = alloc_bits (m->bits_len);
  m->written_dirty = alloc_bits (m->dirty_len);
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
  free_bits (m->hydrated, m->bits_len);
  free_bits (m->hydrated_dirty, m->dirty_len);
  free_bits (m->written, m->bits_len);
  free_bits (m->written_dirty, m->dirty_len);
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

/* Set bits [first, first+count) in bits, and the dirty bit of every word
 * that changed (after the word: a commit that sees the dirty bit reads
 * the word after it).  Returns the number newly set.
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
      uint64_t w = first / 64;
      atomic_fetch_or_explicit (&dirty[w / 64], UINT64_C (1) << (w % 64),
                                memory_order_release);
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
aclone_map_load (struct aclone_map *m, int which, size_t first,
                 const uint64_t *le, size_t n)
{
  _Atomic uint64_t *bits = which ? m->written : m->hydrated;
  uint64_t count = 0;
  /* Bits past the last region in the file are ignored. */
  uint64_t tail = m->regions % 64 ? (UINT64_C (1) << (m->regions % 64)) - 1
                                  : UINT64_MAX;

  for (size_t k = 0; k < n && first + k < m->words; k++) {
    size_t i = first + k;
    uint64_t v = le64toh (le[k]) & (i == m->words - 1 ? tail : UINT64_MAX);
    if (v) {
      atomic_store (&bits[i], v);
      count += __builtin_popcountll (v);
    }
  }
  if (which == ACLONE_BIT_HYDRATED)
    atomic_fetch_add (&m->nr_hydrated, count);
}

/* Append word i of value v to l, merging full words into runs.
 * Returns false when out of memory.
 */
static bool
dirty_append (struct aclone_dirty_list *l, uint64_t i, uint64_t v)
{
  if (l->n && v == UINT64_MAX) {
    struct aclone_dirty_words *last = &l->v[l->n - 1];
    if (last->value == UINT64_MAX && last->index + last->count == i) {
      last->count++;
      return true;
    }
  }
  if (l->n == l->cap) {
    size_t nc = l->cap ? l->cap * 2 : 64;
    struct aclone_dirty_words *nv = realloc (l->v, nc * sizeof *nv);
    if (!nv)
      return false;
    l->v = nv;
    l->cap = nc;
  }
  l->v[l->n++] = (struct aclone_dirty_words) { i, 1, v };
  return true;
}

int
aclone_map_take_dirty (struct aclone_map *m, int which,
                       struct aclone_dirty_list *out)
{
  _Atomic uint64_t *dirty = which ? m->written_dirty : m->hydrated_dirty;
  _Atomic uint64_t *bits = which ? m->written : m->hydrated;
  size_t nd = (m->words + 63) / 64;

  out->n = 0;
  for (size_t d = 0; d < nd; d++) {
    if (atomic_load_explicit (&dirty[d], memory_order_relaxed) == 0)
      continue;
    uint64_t x = atomic_exchange_explicit (&dirty[d], 0, memory_order_acq_rel);
    while (x) {
      unsigned b = __builtin_ctzll (x);
      uint64_t i = d * 64 + b;
      /* Read after the swap (acquire): whatever it holds was set before
       * the commit's dest sync, which comes after this.
       */
      uint64_t v = atomic_load_explicit (&bits[i], memory_order_acquire);
      if (!dirty_append (out, i, v)) {
        atomic_fetch_or (&dirty[d], x);          /* not taken after all */
        aclone_map_return_dirty (m, which, out);
        out->n = 0;
        return -ENOMEM;
      }
      x &= x - 1;
    }
  }
  return 0;
}

void
aclone_map_return_dirty (struct aclone_map *m, int which,
                         const struct aclone_dirty_list *l)
{
  _Atomic uint64_t *dirty = which ? m->written_dirty : m->hydrated_dirty;

  for (size_t k = 0; k < l->n; k++)
    for (uint64_t i = l->v[k].index; i < l->v[k].index + l->v[k].count; i++)
      atomic_fetch_or (&dirty[i / 64], UINT64_C (1) << (i % 64));
  if (l->n)
    atomic_store (&m->dirty, true);
}

int
aclone_map_hydrated_from_file (struct aclone_map *m, int fd, uint64_t off)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  if (sysconf (_SC_PAGESIZE) != PAGE || off % PAGE)
    return -ENOTSUP;
  void *p = mmap ((void *) m->hydrated, m->bits_len, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fd, off);
  if (p == MAP_FAILED)
    return -errno;
  atomic_store (&m->nr_hydrated, m->regions);
  return 0;
#else
  (void) m; (void) fd; (void) off;
  return -ENOTSUP;                /* the file's words are little-endian */
#endif
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
