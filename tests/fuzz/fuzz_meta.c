/* libFuzzer target: the metadata parser and what "aclone inspect" and
 * "aclone status" do with a file that passed it.
 *
 * Each input is written to a private file and opened as a metadata file
 * twice: as it is, and with its header checksum recomputed, so that the
 * fuzzer gets past the CRC and into the field checks.  A file that opens
 * is then walked like inspect --map walks it, and its live page read.
 *
 *   build-fuzz/tests/fuzz_meta -max_total_time=600 CORPUS_DIR
 */
#include <endian.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "aclone/meta.h"
#include "aclone/crc32c.h"

static char path[64];

static void
walk (const char *p)
{
  struct aclone_meta *m;
  struct aclone_error err;

  if (aclone_meta_open (p, ACLONE_META_READ, &m, &err) < 0) {
    if (!strstr (err.msg, p))
      abort ();                        /* every refusal names the file */
    return;
  }
  uint64_t n = 0;
  for (uint64_t r = 0; r < m->hdr.regions; r++)
    n += aclone_meta_bit (m, 0, r) + aclone_meta_bit (m, 1, r);
  volatile uint64_t sink = n + m->live->bytes_copied + m->live->state;
  char text[sizeof m->live->last_error + 1];
  memcpy (text, m->live->last_error, sizeof m->live->last_error);
  text[sizeof text - 1] = '\0';
  sink += strlen (text);
  (void) sink;
  aclone_meta_close (m);
}

static void
write_file (const uint8_t *data, size_t size)
{
  FILE *f = fopen (path, "w");
  if (!f)
    abort ();
  if (size && fwrite (data, 1, size, f) != size)
    abort ();
  fclose (f);
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  if (!path[0])
    snprintf (path, sizeof path, "/tmp/aclone-fuzz-%d.meta", (int) getpid ());
  if (size > (4u << 20))
    return 0;
  write_file (data, size);
  walk (path);

  if (size >= ACLONE_HEADER_LEN) {
    uint8_t *copy = malloc (size);
    memcpy (copy, data, size);
    struct aclone_meta_header h;
    memcpy (&h, copy, sizeof h);
    h.checksum = 0;
    uint32_t crc = htole32 (aclone_crc32c (&h, sizeof h));
    memcpy (copy + offsetof (struct aclone_meta_header, checksum), &crc, 4);
    write_file (copy, size);
    walk (path);
    free (copy);
  }
  unlink (path);                 /* leave nothing behind in /tmp */
  return 0;
}
