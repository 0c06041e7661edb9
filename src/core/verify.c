/* aclone: the audit (see include/aclone/verify.h).
 *
 * Runs of copied, unwritten regions are compared up to 8 MiB at a time:
 * one source read and one dest read each, then region by region.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/param.h>

#include "aclone/map.h"
#include "aclone/verify.h"

#define CHUNK_BYTES (8u << 20)

static void
add_bad (struct aclone_verify *v, uint64_t off, uint64_t len)
{
  if (v->nbad && v->bad_off[v->nbad - 1] + v->bad_len[v->nbad - 1] == off) {
    v->bad_len[v->nbad - 1] += len;        /* extend the last range */
    return;
  }
  if (v->nbad == v->capbad) {
    size_t nc = v->capbad ? 2 * v->capbad : 16;
    uint64_t *o = realloc (v->bad_off, nc * sizeof *o);
    if (o)
      v->bad_off = o;
    uint64_t *l = o ? realloc (v->bad_len, nc * sizeof *l) : NULL;
    if (!l)
      return;                              /* counted, not listed */
    v->bad_len = l;
    v->capbad = nc;
  }
  v->bad_off[v->nbad] = off;
  v->bad_len[v->nbad++] = len;
}

static bool
copied (const struct aclone_meta *m, uint64_t r)
{
  return aclone_meta_bit (m, ACLONE_BIT_HYDRATED, r) &&
         !aclone_meta_bit (m, ACLONE_BIT_WRITTEN, r);
}

int
aclone_verify_run (const struct aclone_meta *m, struct aclone_source *src,
                   struct aclone_dest *dest, struct aclone_verify *v,
                   struct aclone_error *err)
{
  const uint64_t rs = m->hdr.region_size;
  const uint64_t chunk = MAX (CHUNK_BYTES / rs, 1);
  char *a = malloc (chunk * rs), *b = malloc (chunk * rs);
  int ret = 0;

  memset (v, 0, sizeof *v);
  if (!a || !b) {
    ret = aclone_error_set (err, ENOMEM, "verify");
    goto out;
  }
  for (uint64_t r = 0; r < m->hdr.regions; ) {
    if (!aclone_meta_bit (m, ACLONE_BIT_HYDRATED, r)) {
      v->unhydrated++;
      r++;
      continue;
    }
    if (aclone_meta_bit (m, ACLONE_BIT_WRITTEN, r)) {
      v->written++;
      r++;
      continue;
    }
    uint64_t n = 1;
    while (n < chunk && r + n < m->hdr.regions && copied (m, r + n))
      n++;
    uint64_t off = r * rs, len = MIN (n * rs, m->hdr.size - off);
    ret = aclone_source_pread (src, a, len, off);
    if (ret < 0) {
      aclone_error_set (err, -ret, "source %s: read at %llu", src->desc,
                        (unsigned long long) off);
      goto out;
    }
    ret = aclone_dest_pread (dest, b, len, off);
    if (ret < 0) {
      aclone_error_set (err, -ret, "dest %s: read at %llu", dest->path,
                        (unsigned long long) off);
      goto out;
    }
    for (uint64_t k = 0; k < n; k++) {
      uint64_t o = k * rs, l = MIN (rs, len - o);
      v->compared++;
      if (memcmp (a + o, b + o, l) != 0) {
        v->mismatched++;
        add_bad (v, off + o, l);
      }
    }
    r += n;
  }
 out:
  free (a);
  free (b);
  return ret;
}

void
aclone_verify_free (struct aclone_verify *v)
{
  free (v->bad_off);
  free (v->bad_len);
  v->bad_off = v->bad_len = NULL;
  v->nbad = v->capbad = 0;
}
