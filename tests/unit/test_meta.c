/* Unit tests: the metadata file (src/meta.c). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "aclone/meta.h"
#include "fakes.h"

struct fx {
  char *dir, *path;
};

static int
setup (void **state)
{
  struct fx *f = calloc (1, sizeof *f);
  f->dir = make_tmpdir ();
  f->path = path_join (f->dir, "meta");
  *state = f;
  return 0;
}

static int
teardown (void **state)
{
  struct fx *f = *state;
  rm_rf (f->dir);
  free (f->dir);
  free (f->path);
  free (f);
  return 0;
}

static void
create_close (const char *path, uint64_t size, uint32_t rs)
{
  struct aclone_meta *m;
  struct aclone_error err;
  assert_int_equal (aclone_meta_create (path, size, rs, 0, "nbd://src/x", &m, &err), 0);
  aclone_meta_close (m);
}

static void
test_create_reopen (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;
  struct stat st;

  create_close (f->path, (1ull << 30) + 12345, 65536);
  assert_int_equal (stat (f->path, &st), 0);
  assert_int_equal (st.st_mode & 0777, 0600);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err), 0);
  assert_int_equal (m->hdr.size, (1ull << 30) + 12345);
  assert_int_equal (m->hdr.region_size, 65536);
  assert_int_equal (m->hdr.regions, 16385);
  assert_string_equal (m->hdr.source, "nbd://src/x");
  assert_int_equal (m->live->magic, ACLONE_LIVE_MAGIC);
  assert_false (aclone_meta_bit (m, 0, 0));
  aclone_meta_close (m);
}

static void
test_create_refuses_existing (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;

  create_close (f->path, 1 << 20, 4096);
  assert_int_equal (aclone_meta_create (f->path, 1 << 20, 4096, 0, "", &m, &err),
                    -EEXIST);
  assert_non_null (strstr (err.msg, f->path));
}

static void
test_lock_exclusive (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *a, *b;
  struct aclone_error err;

  create_close (f->path, 1 << 20, 4096);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &a, &err), 0);
  assert_true (aclone_meta_in_use (f->path));
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &b, &err), -EBUSY);
  assert_non_null (strstr (err.msg, "in use"));
  assert_non_null (strstr (err.msg, f->path));
  /* Readers are not locked out. */
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &b, &err), 0);
  aclone_meta_close (b);
  aclone_meta_close (a);
  assert_false (aclone_meta_in_use (f->path));
}

static void
test_commit_bits (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;
  uint64_t idx[2] = { 0, 3 }, words[2] = { 0x5, 1ull << 63 };

  create_close (f->path, 1 << 20, 4096);       /* 256 regions */
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err), 0);
  assert_int_equal (aclone_meta_commit_bits (m, 0, idx, words, 2, &err), 0);
  assert_int_equal (aclone_meta_commit_bits (m, 1, idx, words, 1, &err), 0);
  aclone_meta_close (m);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  assert_true (aclone_meta_bit (m, 0, 0));
  assert_false (aclone_meta_bit (m, 0, 1));
  assert_true (aclone_meta_bit (m, 0, 2));
  assert_true (aclone_meta_bit (m, 0, 255));
  assert_true (aclone_meta_bit (m, 1, 2));
  assert_false (aclone_meta_bit (m, 1, 255));
  aclone_meta_close (m);
}

static void
test_flags (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;

  create_close (f->path, 1 << 20, 4096);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err), 0);
  assert_int_equal (aclone_meta_set_flags (m, ACLONE_FLAG_COMPLETE, &err), 0);
  aclone_meta_close (m);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  assert_int_equal (m->hdr.flags, ACLONE_FLAG_COMPLETE);
  assert_true (m->hdr.completed > 0);
  aclone_meta_close (m);
}

/* Flip every byte of the header, one at a time: each must be refused
 * with a message naming the file, and the file must stay unmodified.
 */
static void
test_every_header_byte (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;
  unsigned char orig[ACLONE_PAGE];

  create_close (f->path, 3 << 20, 65536);
  int fd = open (f->path, O_RDWR);
  assert_true (fd >= 0);
  assert_int_equal (pread (fd, orig, sizeof orig, 0), sizeof orig);
  for (size_t i = 0; i < ACLONE_HEADER_LEN; i++) {
    unsigned char b = orig[i] ^ 0x01;
    if (i >= offsetof (struct aclone_meta_header, pad))
      continue;                      /* padding is not covered */
    assert_int_equal (pwrite (fd, &b, 1, i), 1);
    int r = aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err);
    if (r == 0)
      fail_msg ("flipped byte %zu accepted", i);
    assert_non_null (strstr (err.msg, f->path));
    assert_int_equal (pwrite (fd, &orig[i], 1, i), 1);
  }
  close (fd);
  assert_int_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  aclone_meta_close (m);
}

static void
test_truncated_and_extended (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;
  struct stat st;

  create_close (f->path, 64 << 20, 4096);      /* 16384 regions, 2 KiB bitmap */
  assert_int_equal (stat (f->path, &st), 0);
  assert_int_equal (truncate (f->path, st.st_size - 1), 0);
  assert_int_not_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  assert_non_null (strstr (err.msg, "truncated"));
  assert_int_equal (truncate (f->path, st.st_size + 4096), 0);
  assert_int_not_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  assert_int_equal (truncate (f->path, 100), 0);
  assert_int_not_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
  assert_int_equal (truncate (f->path, 0), 0);
  assert_int_not_equal (aclone_meta_open (f->path, ACLONE_META_READ, &m, &err), 0);
}

static void
test_not_meta (void **state)
{
  struct fx *f = *state;
  struct aclone_meta *m;
  struct aclone_error err;
  FILE *fp = fopen (f->path, "w");
  for (int i = 0; i < 20000; i++)
    fputc ('x', fp);
  fclose (fp);
  assert_int_not_equal (aclone_meta_open (f->path, ACLONE_META_SERVER, &m, &err), 0);
  assert_non_null (strstr (err.msg, "bad magic"));
  assert_int_not_equal (aclone_meta_open (f->dir, ACLONE_META_READ, &m, &err), 0);
}

static void
test_region_sizes (void **state)
{
  (void) state;
  assert_false (aclone_region_size_valid (2048));
  assert_true (aclone_region_size_valid (4096));
  assert_false (aclone_region_size_valid (4096 + 1));
  assert_false (aclone_region_size_valid (3 << 12));
  assert_true (aclone_region_size_valid (16 << 20));
  assert_false (aclone_region_size_valid (32 << 20));
  assert_int_equal (aclone_parse_size ("64K"), 65536);
  assert_int_equal (aclone_parse_size ("1M"), 1 << 20);
  assert_int_equal (aclone_parse_size ("2GiB"), 2ll << 30);
  assert_int_equal (aclone_parse_size ("512"), 512);
  assert_int_equal (aclone_parse_size ("1x"), -1);
  assert_int_equal (aclone_parse_size (""), -1);
  assert_int_equal (aclone_parse_size ("99999999999999999999"), -1);
  assert_int_equal (aclone_crc32c ("123456789", 9), 0xe3069283);
  assert_int_equal (aclone_parse_bool ("TRUE"), 1);
  assert_int_equal (aclone_parse_bool ("off"), 0);
  assert_int_equal (aclone_parse_bool ("maybe"), -1);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown (test_create_reopen, setup, teardown),
    cmocka_unit_test_setup_teardown (test_create_refuses_existing, setup, teardown),
    cmocka_unit_test_setup_teardown (test_lock_exclusive, setup, teardown),
    cmocka_unit_test_setup_teardown (test_commit_bits, setup, teardown),
    cmocka_unit_test_setup_teardown (test_flags, setup, teardown),
    cmocka_unit_test_setup_teardown (test_every_header_byte, setup, teardown),
    cmocka_unit_test_setup_teardown (test_truncated_and_extended, setup, teardown),
    cmocka_unit_test_setup_teardown (test_not_meta, setup, teardown),
    cmocka_unit_test (test_region_sizes),
  };
  return cmocka_run_group_tests (tests, NULL, NULL);
}
