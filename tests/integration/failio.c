/* Test interposer (LD_PRELOAD): make dest I/O fail on demand.
 *
 * The integrity tests need a dest whose sync or writes fail the way a
 * disk's do, at a moment the test chooses, inside a real nbdkit server.
 * While the file named by FAILIO_SYNC_TRIGGER exists, fdatasync and
 * fsync of the file FAILIO_PATH fail with EIO; while FAILIO_WRITE_TRIGGER
 * exists, pwrite to it fails with EIO; while FAILIO_HOLD_TRIGGER exists,
 * pwrite to it waits (up to 12 s), a dest write that has not landed yet;
 * while FAILIO_SETTLE_TRIGGER exists, the next sync_file_range that waits
 * for writeback of it (SYNC_FILE_RANGE_WAIT_AFTER) does its work, then
 * fails with EIO, as when writeback of the file failed, and removes the
 * trigger: one error.
 * Every other call, and every call
 * on another file, goes to libc.  (The hydrator's io_uring writes are not
 * seen here: they fail through a full dest instead, in the tests.)
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Is fd the target file, and does the trigger file exist? */
static int
should_fail (int fd, const char *trigger_var)
{
  const char *trigger = getenv (trigger_var), *path = getenv ("FAILIO_PATH");
  char link[64], target[4096];
  ssize_t n;

  if (!trigger || !path || access (trigger, F_OK) != 0)
    return 0;
  snprintf (link, sizeof link, "/proc/self/fd/%d", fd);
  n = readlink (link, target, sizeof target - 1);
  if (n <= 0)
    return 0;
  target[n] = '\0';
  return strcmp (target, path) == 0;
}

int
fdatasync (int fd)
{
  static int (*real) (int);

  if (!real)
    real = (int (*) (int)) dlsym (RTLD_NEXT, "fdatasync");
  if (should_fail (fd, "FAILIO_SYNC_TRIGGER")) {
    errno = EIO;
    return -1;
  }
  return real (fd);
}

int
fsync (int fd)
{
  static int (*real) (int);

  if (!real)
    real = (int (*) (int)) dlsym (RTLD_NEXT, "fsync");
  if (should_fail (fd, "FAILIO_SYNC_TRIGGER")) {
    errno = EIO;
    return -1;
  }
  return real (fd);
}

ssize_t
pwrite (int fd, const void *buf, size_t count, off_t offset)
{
  static ssize_t (*real) (int, const void *, size_t, off_t);

  if (!real)
    real = (ssize_t (*) (int, const void *, size_t, off_t)) dlsym (RTLD_NEXT, "pwrite");
  if (should_fail (fd, "FAILIO_WRITE_TRIGGER")) {
    errno = EIO;
    return -1;
  }
  for (int i = 0; i < 1200 && should_fail (fd, "FAILIO_HOLD_TRIGGER"); i++)
    usleep (10000);
  return real (fd, buf, count, offset);
}

ssize_t pwrite64 (int fd, const void *buf, size_t count, off_t offset)
  __attribute__ ((alias ("pwrite")));

int
sync_file_range (int fd, off_t offset, off_t nbytes, unsigned int flags)
{
  static int (*real) (int, off_t, off_t, unsigned int);

  if (!real)
    real = (int (*) (int, off_t, off_t, unsigned int)) dlsym (RTLD_NEXT, "sync_file_range");
  if ((flags & SYNC_FILE_RANGE_WAIT_AFTER) &&
      should_fail (fd, "FAILIO_SETTLE_TRIGGER") &&
      unlink (getenv ("FAILIO_SETTLE_TRIGGER")) == 0) {
    real (fd, offset, nbytes, flags);
    errno = EIO;
    return -1;
  }
  return real (fd, offset, nbytes, flags);
}
