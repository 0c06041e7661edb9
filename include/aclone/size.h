/* aclone: size spellings.
 *
 * The plugin parses sizes with nbdkit_parse_size and the CLI with libbsd's
 * expand_number, so that they mean what they mean elsewhere.  Neither
 * takes "64KiB" or "1MB", which aclone always accepted (and systemd
 * environment files may hold), and expand_number reads "010M" as octal.
 * This only rewrites such spellings for them; it parses nothing itself.
 */
#ifndef ACLONE_SIZE_H
#define ACLONE_SIZE_H

#include <stdbool.h>
#include <stddef.h>

/* If in is decimal digits, then at most one of the suffixes K M G T P E
 * (any case), then optionally "B" or "iB" (any case), write into out the
 * digits without leading zeros and the bare suffix letter ("0064KiB" ->
 * "64K") and return true.  Otherwise return false and leave out alone,
 * so that the real parser reports the bad value.
 */
bool aclone_size_spelling (const char *in, char *out, size_t outlen);

#endif
