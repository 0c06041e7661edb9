/* aclone: CRC-32C (see include/aclone/crc32c.h). */
#include <stdint.h>

#include "aclone/crc32c.h"

/* Bitwise: the header is a few hundred bytes read once, so a table buys
 * nothing.
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
