/* aclone: error reports (see include/aclone/error.h). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "aclone/error.h"

int
aclone_error_set (struct aclone_error *e, int errnum, const char *fmt, ...)
{
  if (e) {
    va_list ap;
    va_start (ap, fmt);
    int n = vsnprintf (e->msg, sizeof e->msg, fmt, ap);
    va_end (ap);
    if (errnum && n >= 0 && (size_t) n < sizeof e->msg)
      snprintf (e->msg + n, sizeof e->msg - n, ": %s", strerror (errnum));
    e->errnum = errnum;
  }
  return errnum ? -errnum : -EINVAL;
}
