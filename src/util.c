/* aclone: small utilities shared by the library and the CLI: error
 * messages, CRC-32C, size parsing, clocks.
 */
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

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

/* Bitwise CRC-32C: the header is a few hundred bytes read once, so a
 * table buys nothing.
 */
unsigned
aclone_crc32c (const void *buf, size_t len)
{
  const unsigned char *p = buf;
  uint32_t crc = 0xffffffff;

  while (len--) {
    crc ^= *p++;
    for (int k = 0; k < 8; k++)
      crc = (crc >> 1) ^ (0x82f63b78 & (0u - (crc & 1)));
  }
  return crc ^ 0xffffffff;
}

long long
aclone_parse_size (const char *str)
{
  const char *p = str;
  unsigned long long v = 0;

  if (!str || !isdigit ((unsigned char) *p))
    return -1;
  while (isdigit ((unsigned char) *p)) {
    unsigned d = *p++ - '0';
    if (v > (unsigned long long) (INT64_MAX - d) / 10)
      return -1;
    v = v * 10 + d;
  }
  unsigned shift = 0;
  switch (tolower ((unsigned char) *p)) {
  case '\0': break;
  case 'b': shift = 0; p++; break;
  case 'k': shift = 10; p++; break;
  case 'm': shift = 20; p++; break;
  case 'g': shift = 30; p++; break;
  case 't': shift = 40; p++; break;
  case 'p': shift = 50; p++; break;
  default: return -1;
  }
  if (shift && (*p == 'i' || *p == 'I') && (p[1] == 'B' || p[1] == 'b'))
    p += 2;
  else if (shift && (*p == 'B' || *p == 'b'))
    p++;
  if (*p != '\0')
    return -1;
  if (shift && v > ((unsigned long long) INT64_MAX >> shift))
    return -1;
  return (long long) (v << shift);
}

int
aclone_parse_bool (const char *str)
{
  static const char *const yes[] = { "1", "true", "yes", "on" };
  static const char *const no[] = { "0", "false", "no", "off" };

  for (size_t i = 0; i < 4; i++) {
    if (strcasecmp (str, yes[i]) == 0)
      return 1;
    if (strcasecmp (str, no[i]) == 0)
      return 0;
  }
  return -1;
}

static unsigned long long
clock_ns (clockid_t id)
{
  struct timespec ts;
  clock_gettime (id, &ts);
  return (unsigned long long) ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

unsigned long long aclone_now_ns (void) { return clock_ns (CLOCK_MONOTONIC); }
unsigned long long aclone_wall_ns (void) { return clock_ns (CLOCK_REALTIME); }
