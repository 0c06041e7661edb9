/* aclone: CRC-32C (Castagnoli), the metadata header's checksum. */
#ifndef ACLONE_CRC32C_H
#define ACLONE_CRC32C_H

#include <stddef.h>

/* CRC-32C of len bytes ("123456789" gives 0xe3069283). */
unsigned aclone_crc32c (const void *buf, size_t len);

#endif
