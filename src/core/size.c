/* aclone: size spellings (see include/aclone/size.h). */
#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include "aclone/size.h"

bool
aclone_size_spelling (const char *in, char *out, size_t outlen)
{
  const char *p = in, *digits;
  char suffix = '\0';

  while (*p == '0' && isdigit ((unsigned char) p[1]))
    p++;                                 /* not octal */
  digits = p;
  while (isdigit ((unsigned char) *p))
    p++;
  size_t ndigits = p - digits;
  if (ndigits == 0)
    return false;
  if (*p && strchr ("kKmMgGtTpPeE", *p))
    suffix = *p++;
  if (suffix && (*p == 'i' || *p == 'I'))
    p++;
  if (suffix && (*p == 'b' || *p == 'B'))
    p++;
  else if (!suffix && (*p == 'b' || *p == 'B'))
    p++;                                 /* "512B" */
  if (*p != '\0' || ndigits + 2 > outlen)
    return false;
  snprintf (out, outlen, "%.*s%s", (int) ndigits, digits,
            suffix ? (char[]) { suffix, '\0' } : "");
  return true;
}
