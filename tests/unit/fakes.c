#include <errno.h>
#include <ftw.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fakes.h"

void
fill_pattern (unsigned char *buf, size_t len, unsigned seed, uint64_t offset)
{
  for (size_t i = 0; i < len; i++) {
    uint64_t x = (offset + i) * 0x9e3779b97f4a7c15ull ^ (seed * 0xbf58476d1ce4e5b9ull);
    x ^= x >> 31;
    buf[i] = (unsigned char) (x * 0x94d049bb133111ebull >> 56);
  }
}

static int
fake_pread (struct aclone_source *base, void *buf, size_t count, uint64_t off)
{
  struct fake_source *s = (struct fake_source *) base;
  unsigned d = s->delay_us;
  long long fo = s->fail_offset;

  if (d)
    usleep (d);
  s->reads++;
  unsigned long long seen = s->max_seen;
  while (count > seen &&
         !atomic_compare_exchange_weak (&s->max_seen, &seen, count))
    ;
  if (s->enforce_limits) {
    uint64_t align = s->base.min_block ? s->base.min_block : 1;
    if (count > s->base.max_request || off % align ||
        (count % align && off + count != s->base.size)) {
      s->violations++;
      return -EINVAL;
    }
  }
  if (s->fail_errno && (fo < 0 || ((uint64_t) fo >= off && (uint64_t) fo < off + count)))
    return -s->fail_errno;
  if (off + count > s->base.size)
    return -EINVAL;
  memcpy (buf, s->data + off, count);
  s->read_bytes += count;
  return 0;
}

static int
fake_extents (struct aclone_source *base, uint64_t off, uint64_t count,
              aclone_extent_fn fn, void *opaque)
{
  struct fake_source *s = (struct fake_source *) base;
  uint64_t end = off + count > s->base.size ? s->base.size : off + count;

  if (!s->has_extents)
    return -ENOTSUP;
  /* 4 KiB granularity, like a file system. */
  while (off < end) {
    uint64_t blk = off & ~UINT64_C (4095), e = blk + 4096;
    if (e > s->base.size)
      e = s->base.size;
    bool zero = true;
    for (uint64_t i = blk; i < e && zero; i++)
      zero = s->data[i] == 0;
    uint64_t len = e - off;
    if (fn (opaque, off, len, zero))
      return 0;
    off = e;
  }
  return 0;
}

static void
fake_close (struct aclone_source *base)
{
  ((struct fake_source *) base)->closed = true;
}

static const struct aclone_source_ops fake_ops = {
  .pread = fake_pread,
  .extents = fake_extents,
  .close = fake_close,
};

struct fake_source *
fake_source_new (uint64_t size, unsigned seed, unsigned zero_every_mib)
{
  struct fake_source *s = calloc (1, sizeof *s);
  s->base.ops = &fake_ops;
  s->base.size = size;
  s->base.multi_conn = true;
  s->base.min_block = 1;
  s->base.pref_block = 4096;
  s->base.max_request = ACLONE_SOURCE_MAX_REQUEST;
  strcpy (s->base.desc, "fake://source");
  s->data = malloc (size);
  s->fail_offset = -1;
  s->has_extents = true;
  fill_pattern (s->data, size, seed, 0);
  if (zero_every_mib)
    for (uint64_t m = 0; m * (1 << 20) < size; m++)
      if (m % zero_every_mib == 0) {
        uint64_t e = (m + 1) << 20;
        memset (s->data + (m << 20), 0, (e > size ? size : e) - (m << 20));
      }
  return s;
}

void
fake_source_set_limits (struct fake_source *s, uint32_t min_block,
                        uint32_t pref_block, uint32_t max_request)
{
  s->base.min_block = min_block ? min_block : 1;
  s->base.pref_block = pref_block;
  s->base.max_request = max_request ? max_request : ACLONE_SOURCE_MAX_REQUEST;
  s->enforce_limits = true;
}

void
fake_source_free (struct fake_source *s)
{
  if (s) {
    free (s->data);
    free (s);
  }
}

char *
make_tmpdir (void)
{
  char *t = strdup ("/tmp/aclone-unit-XXXXXX");
  if (!mkdtemp (t))
    abort ();
  return t;
}

static int
rm_one (const char *p, const struct stat *st, int flag, struct FTW *f)
{
  (void) st; (void) flag; (void) f;
  return remove (p);
}

void
rm_rf (const char *dir)
{
  nftw (dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

char *
path_join (const char *dir, const char *name)
{
  char *p;
  if (asprintf (&p, "%s/%s", dir, name) < 0)
    abort ();
  return p;
}
