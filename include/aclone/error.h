/* aclone: error reports.
 *
 * The core library never prints.  A function that fails fills a
 * struct aclone_error with one line naming the file or URI at fault;
 * its caller (the nbdkit glue or the CLI) reports that line once.
 */
#ifndef ACLONE_ERROR_H
#define ACLONE_ERROR_H

#include <stddef.h>

struct aclone_error {
  int errnum;            /* positive errno, 0 if none */
  char msg[512];
};

/* Set *e (when e is non-NULL) to the formatted message; when errnum is
 * non-zero ": strerror(errnum)" is appended.  Returns -errnum, or -EINVAL
 * when errnum is 0, so callers can write "return aclone_error_set (...)".
 */
int aclone_error_set (struct aclone_error *e, int errnum, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));

#endif
