/* aclone: destination I/O (see include/aclone/dest.h).
 *
 * Zeroing (aclone_dest_zero) tries, in order:
 *   1. fallocate PUNCH_HOLE when punching is allowed (files, and block
 *      devices, where the kernel guarantees zeroes afterwards);
 *   2. fallocate ZERO_RANGE;
 *   3. for block devices, BLKZEROOUT;
 *   4. unless the caller asked for a fast zero, writing zero buffers.
 * Each step that the file system does not support falls through to the
 * next; a real I/O error stops at once.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <linux/magic.h>
#include <unistd.h>

#include "aclone/dest.h"

static bool
not_supported (int e)
{
  return e == EOPNOTSUPP || e == ENOSYS || e == EINVAL || e == ENOTTY;
}

int
aclone_dest_check (const char *path, uint64_t size, bool *exists,
                   struct aclone_error *err)
{
  struct stat st;

  if (stat (path, &st) < 0) {
    if (errno != ENOENT)
      return aclone_error_set (err, errno, "dest %s", path);
    /* Missing: fine if its directory exists, we create it. */
    char *dir = strdup (path);
    if (!dir)
      return aclone_error_set (err, ENOMEM, "dest %s", path);
    char *slash = strrchr (dir, '/');
    const char *d = slash ? (slash == dir ? "/" : (*slash = '\0', dir)) : ".";
    struct stat dst;
    int r = 0;
    if (stat (d, &dst) < 0)
      r = aclone_error_set (err, errno, "dest %s: directory %s", path, d);
    else if (!S_ISDIR (dst.st_mode))
      r = aclone_error_set (err, ENOTDIR, "dest %s: %s", path, d);
    free (dir);
    *exists = false;
    return r;
  }
  *exists = true;
  if (S_ISDIR (st.st_mode))
    return aclone_error_set (err, EISDIR, "dest %s", path);
  if (S_ISREG (st.st_mode)) {
    if ((uint64_t) st.st_size < size)
      return aclone_error_set (err, 0, "dest %s is %llu bytes, smaller than the "
                               "source (%llu bytes)", path,
                               (unsigned long long) st.st_size,
                               (unsigned long long) size);
    return 0;
  }
  if (S_ISBLK (st.st_mode)) {
    int fd = open (path, O_RDONLY | O_CLOEXEC);
    uint64_t bsize = 0;
    int r = 0;
    if (fd < 0)
      return aclone_error_set (err, errno, "dest %s", path);
    if (ioctl (fd, BLKGETSIZE64, &bsize) < 0)
      r = aclone_error_set (err, errno, "dest %s: BLKGETSIZE64", path);
    else if (bsize < size)
      r = aclone_error_set (err, 0, "dest %s is %llu bytes, smaller than the "
                            "source (%llu bytes)", path,
                            (unsigned long long) bsize,
                            (unsigned long long) size);
    close (fd);
    return r;
  }
  return aclone_error_set (err, 0, "dest %s: not a regular file or block device",
                           path);
}

int
aclone_dest_open (const char *path, uint64_t size, bool create,
                  struct aclone_dest **out, struct aclone_error *err)
{
  struct aclone_dest *d = calloc (1, sizeof *d);
  struct stat st;
  int r;

  if (!d || !(d->path = strdup (path))) {
    free (d);
    return aclone_error_set (err, ENOMEM, "dest %s", path);
  }
  d->fd = d->settle_fd = -1;
  d->size = size;
  if (create) {
    d->fd = open (path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (d->fd < 0) {
      r = aclone_error_set (err, errno, "dest %s: cannot create", path);
      goto fail;
    }
    if (ftruncate (d->fd, size) < 0) {
      r = aclone_error_set (err, errno, "dest %s: ftruncate", path);
      unlink (path);
      goto fail;
    }
    d->created = true;
  }
  else {
    d->fd = open (path, O_RDWR | O_CLOEXEC);
    if (d->fd < 0) {
      r = aclone_error_set (err, errno, "dest %s", path);
      goto fail;
    }
  }
  if (fstat (d->fd, &st) < 0) {
    r = aclone_error_set (err, errno, "dest %s: stat", path);
    goto fail;
  }
  d->is_block = S_ISBLK (st.st_mode);
  /* A second description for settling (dest.h), on ext4 and XFS only. */
  struct statfs sfs;
  if (S_ISREG (st.st_mode) && fstatfs (d->fd, &sfs) == 0 &&
      (sfs.f_type == EXT4_SUPER_MAGIC || sfs.f_type == XFS_SUPER_MAGIC)) {
    /* The same file, not the same name: the path may be renamed. */
    char self[64];
    snprintf (self, sizeof self, "/proc/self/fd/%d", d->fd);
    d->settle_fd = open (self, O_RDONLY | O_CLOEXEC);
  }
  *out = d;
  return 0;

 fail:
  aclone_dest_close (d);
  return r;
}

void
aclone_dest_close (struct aclone_dest *d)
{
  if (!d)
    return;
  if (d->fd >= 0)
    close (d->fd);
  if (d->settle_fd >= 0)
    close (d->settle_fd);
  free (d->path);
  free (d);
}

int
aclone_dest_pread (struct aclone_dest *d, void *buf, size_t count,
                   uint64_t offset)
{
  char *p = buf;

  while (count > 0) {
    ssize_t n = pread (d->fd, p, count, offset);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    if (n == 0) {                   /* past EOF of a short file: zeroes */
      memset (p, 0, count);
      return 0;
    }
    p += n;
    count -= n;
    offset += n;
  }
  return 0;
}

int
aclone_dest_pwrite (struct aclone_dest *d, const void *buf, size_t count,
                    uint64_t offset)
{
  const char *p = buf;

  while (count > 0) {
    ssize_t n = pwrite (d->fd, p, count, offset);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      return -errno;
    }
    p += n;
    count -= n;
    offset += n;
  }
  return 0;
}

static int
write_zeroes (struct aclone_dest *d, uint64_t count, uint64_t offset)
{
  size_t bufsize = count < (1 << 20) ? count : (1 << 20);
  void *zero = calloc (1, bufsize);
  int r = 0;

  if (!zero)
    return -ENOMEM;
  while (count > 0 && r == 0) {
    size_t n = count < bufsize ? count : bufsize;
    r = aclone_dest_pwrite (d, zero, n, offset);
    count -= n;
    offset += n;
  }
  free (zero);
  return r;
}

int
aclone_dest_zero (struct aclone_dest *d, uint64_t count, uint64_t offset,
                  bool punch, bool fast)
{
  if (count == 0)
    return 0;
  if (punch &&
      fallocate (d->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 offset, count) == 0)
    return 0;
  if (punch && !not_supported (errno))
    return -errno;
  if (fallocate (d->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                 offset, count) == 0)
    return 0;
  if (!not_supported (errno))
    return -errno;
  /* No hole unless punch: a client that asked for allocated zeroes
   * (NBD_CMD_FLAG_NO_HOLE) gets them, written if need be.
   */
  if (d->is_block) {
    uint64_t range[2] = { offset, count };
    if (ioctl (d->fd, BLKZEROOUT, range) == 0)
      return 0;
    if (!not_supported (errno))
      return -errno;
  }
  if (fast)
    return -ENOTSUP;
  return write_zeroes (d, count, offset);
}

int
aclone_dest_sync (struct aclone_dest *d)
{
  return fdatasync (d->fd) < 0 ? -errno : 0;
}

void
aclone_dest_settle_begin (struct aclone_dest *d, uint64_t offset,
                          uint64_t count)
{
  if (d->settle_fd >= 0)
    (void) sync_file_range (d->settle_fd, offset, count, SYNC_FILE_RANGE_WRITE);
}

int
aclone_dest_settle_wait (struct aclone_dest *d, uint64_t offset,
                         uint64_t count)
{
  if (d->settle_fd < 0)
    return 0;
  /* WAIT_BEFORE too: writeback the begin call did not start (a page
   * under writeback then) is started and waited for here.
   */
  if (sync_file_range (d->settle_fd, offset, count,
                       SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                       SYNC_FILE_RANGE_WAIT_AFTER) < 0)
    return -errno;
  return 0;
}

void
aclone_dest_drop_cached (struct aclone_dest *d, uint64_t offset,
                         uint64_t count)
{
  /* Drops clean pages only: one dirtied again meanwhile stays. */
  if (d->settle_fd >= 0)
    (void) posix_fadvise (d->settle_fd, offset, count, POSIX_FADV_DONTNEED);
}

bool
aclone_dest_settles (const struct aclone_dest *d)
{
  return d->settle_fd >= 0;
}

int
aclone_dest_probe (struct aclone_dest *d, uint64_t offset, uint64_t count,
                   bool *data, uint64_t *end)
{
  uint64_t limit = offset + count;

  *data = true;
  *end = limit;
  if (d->is_block)
    return 0;
  off_t pos = lseek (d->fd, offset, SEEK_DATA);
  if (pos < 0) {
    if (errno == ENXIO) {           /* only a hole up to EOF */
      *data = false;
      return 0;
    }
    return not_supported (errno) ? 0 : -errno;
  }
  if ((uint64_t) pos > offset) {
    *data = false;
    *end = (uint64_t) pos < limit ? (uint64_t) pos : limit;
    return 0;
  }
  pos = lseek (d->fd, offset, SEEK_HOLE);
  if (pos < 0)
    return not_supported (errno) ? 0 : -errno;
  *end = (uint64_t) pos < limit ? (uint64_t) pos : limit;
  if (*end <= offset)
    *end = limit;
  return 0;
}
