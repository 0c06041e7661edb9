/* Unit tests: region map and region locks (src/map.c). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "aclone/map.h"

static void
test_bits_and_runs (void **state)
{
  struct aclone_map m;
  (void) state;

  assert_int_equal (aclone_map_init (&m, 1000 * 4096 + 1, 12), 0);
  assert_int_equal (m.regions, 1001);
  assert_int_equal (aclone_map_run (&m, 0, 5000), 1001);
  assert_int_equal (aclone_map_set_hydrated (&m, 10, 100), 100);
  assert_int_equal (aclone_map_set_hydrated (&m, 50, 100), 40);   /* 60 overlap */
  assert_int_equal (atomic_load (&m.nr_hydrated), 140);
  assert_false (aclone_map_hydrated (&m, 9));
  assert_true (aclone_map_hydrated (&m, 10));
  assert_true (aclone_map_hydrated (&m, 149));
  assert_false (aclone_map_hydrated (&m, 150));
  assert_int_equal (aclone_map_run (&m, 0, 5000), 10);
  assert_int_equal (aclone_map_run (&m, 10, 5000), 140);
  assert_int_equal (aclone_map_run (&m, 10, 7), 7);
  assert_int_equal (aclone_map_run (&m, 150, 5000), 851);
  assert_int_equal (aclone_map_next_unhydrated (&m, 10), 150);
  assert_int_equal (aclone_map_next_unhydrated (&m, 0), 0);
  aclone_map_set_hydrated (&m, 150, 851);
  aclone_map_set_hydrated (&m, 0, 10);
  assert_int_equal (aclone_map_next_unhydrated (&m, 0), 1001);
  assert_int_equal (atomic_load (&m.nr_hydrated), 1001);
  aclone_map_free (&m);
}

static void
test_dirty_take_return (void **state)
{
  struct aclone_map m;
  struct aclone_dirty_list l = { 0 };
  (void) state;

  assert_int_equal (aclone_map_init (&m, 1 << 30, 12), 0);   /* 262144 regions */
  aclone_map_set_hydrated (&m, 0, 2);
  aclone_map_set_hydrated (&m, 64 * 100 + 5, 1);
  aclone_map_set_written (&m, 7, 1);
  assert_true (atomic_load (&m.dirty));
  assert_int_equal (aclone_map_take_dirty (&m, ACLONE_BIT_HYDRATED, &l), 0);
  assert_int_equal (l.n, 2);
  assert_int_equal (l.v[0].index, 0);
  assert_int_equal (l.v[0].count, 1);
  assert_int_equal (l.v[0].value, 3);
  assert_int_equal (l.v[1].index, 100);
  assert_int_equal (l.v[1].value, 1 << 5);
  /* Taken: a second take finds nothing. */
  assert_int_equal (aclone_map_take_dirty (&m, ACLONE_BIT_HYDRATED, &l), 0);
  assert_int_equal (l.n, 0);
  /* A failed commit gives them back. */
  struct aclone_dirty_words w0 = { 0, 1, 3 };
  struct aclone_dirty_list back = { &w0, 1, 1 };
  aclone_map_return_dirty (&m, ACLONE_BIT_HYDRATED, &back);
  assert_int_equal (aclone_map_take_dirty (&m, ACLONE_BIT_HYDRATED, &l), 0);
  assert_int_equal (l.n, 1);
  assert_int_equal (l.v[0].value, 3);
  /* Setting an already hydrated bit does not dirty it again. */
  aclone_map_set_hydrated (&m, 0, 1);
  assert_int_equal (aclone_map_take_dirty (&m, ACLONE_BIT_HYDRATED, &l), 0);
  assert_int_equal (l.n, 0);
  assert_int_equal (aclone_map_take_dirty (&m, ACLONE_BIT_WRITTEN, &l), 0);
  assert_int_equal (l.n, 1);
  assert_int_equal (l.v[0].value, 1 << 7);
  /* A long hydrated run is one entry; a word set later in the same
   * take's span is read as it is after the swap.
   */
  aclone_map_set_hydrated (&m, 64 * 200, 64 * 1000);
  aclone_map_set_hydrated (&m, 64 * 1200 + 1, 3);
  assert_int_equal (aclone_map_take_dirty (&m, ACLONE_BIT_HYDRATED, &l), 0);
  assert_int_equal (l.n, 2);
  assert_int_equal (l.v[0].index, 200);
  assert_int_equal (l.v[0].count, 1000);
  assert_int_equal (l.v[0].value, UINT64_MAX);
  assert_int_equal (l.v[1].index, 1200);
  assert_int_equal (l.v[1].value, 0xe);
  /* Given back, the run dirties every one of its words again. */
  aclone_map_return_dirty (&m, ACLONE_BIT_HYDRATED, &l);
  assert_int_equal (aclone_map_take_dirty (&m, ACLONE_BIT_HYDRATED, &l), 0);
  assert_int_equal (l.n, 2);
  assert_int_equal (l.v[0].count, 1000);
  free (l.v);
  aclone_map_free (&m);
}

static void
test_load_ignores_tail (void **state)
{
  struct aclone_map m;
  uint64_t h[2] = { UINT64_MAX, UINT64_MAX }, w[2] = { 0, 0 };
  (void) state;
  assert_int_equal (aclone_map_init (&m, 70 * 4096, 12), 0);
  aclone_map_load (&m, ACLONE_BIT_HYDRATED, 0, h, 2);
  aclone_map_load (&m, ACLONE_BIT_WRITTEN, 0, w, 2);
  assert_int_equal (atomic_load (&m.nr_hydrated), 70);
  assert_false (aclone_map_written (&m, 3));
  /* In pieces, from word 1 on: counted once. */
  aclone_map_free (&m);
  assert_int_equal (aclone_map_init (&m, 70 * 4096, 12), 0);
  aclone_map_load (&m, ACLONE_BIT_HYDRATED, 1, h, 1);
  aclone_map_load (&m, ACLONE_BIT_HYDRATED, 0, h, 1);
  assert_int_equal (atomic_load (&m.nr_hydrated), 70);
  aclone_map_free (&m);
}

struct locker {
  struct aclone_map *m;
  _Atomic int got;
};

static void *
lock_thread (void *arg)
{
  struct locker *l = arg;
  aclone_map_lock (l->m, 5, 10);
  l->got = 1;
  aclone_map_unlock (l->m, 5, 10);
  return NULL;
}

static void
test_locks (void **state)
{
  struct aclone_map m;
  pthread_t t;
  (void) state;

  assert_int_equal (aclone_map_init (&m, 1 << 20, 12), 0);
  aclone_map_lock (&m, 10, 4);
  assert_false (aclone_map_trylock (&m, 13, 1));
  assert_false (aclone_map_trylock (&m, 0, 11));
  assert_true (aclone_map_trylock (&m, 14, 1));
  assert_true (aclone_map_trylock (&m, 0, 10));
  aclone_map_unlock (&m, 14, 1);
  aclone_map_unlock (&m, 0, 10);

  struct locker l = { &m, 0 };
  pthread_create (&t, NULL, lock_thread, &l);
  usleep (100000);
  assert_int_equal (l.got, 0);        /* blocked by [10, 14) */
  aclone_map_unlock (&m, 10, 4);
  pthread_join (t, NULL);
  assert_int_equal (l.got, 1);
  assert_int_equal (m.nlocked, 0);
  /* Many locks at once grow the list. */
  for (int i = 0; i < 200; i++)
    assert_true (aclone_map_trylock (&m, i, 1));
  for (int i = 0; i < 200; i++)
    aclone_map_unlock (&m, i, 1);
  assert_int_equal (m.nlocked, 0);
  aclone_map_free (&m);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_bits_and_runs),
    cmocka_unit_test (test_dirty_take_return),
    cmocka_unit_test (test_load_ignores_tail),
    cmocka_unit_test (test_locks),
  };
  /* ACLONE_TEST_FILTER=NAME (a glob) runs only the tests it matches:
   * tests/mutants/run picks the one that must catch a mutant.
   */
  cmocka_set_test_filter (getenv ("ACLONE_TEST_FILTER"));
  return cmocka_run_group_tests (tests, NULL, NULL);
}
