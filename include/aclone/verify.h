/* aclone: the audit behind "aclone verify".
 *
 * After a migration the source may be about to go; before it does, an
 * operator can check that every region aclone copied (committed as
 * hydrated, never written by a client) holds exactly the source's bytes.
 * Regions a client wrote are not compared (they differ on purpose), nor
 * regions not hydrated yet (they are still read from the source).
 */
#ifndef ACLONE_VERIFY_H
#define ACLONE_VERIFY_H

#include <stddef.h>
#include <stdint.h>

#include "aclone/dest.h"
#include "aclone/error.h"
#include "aclone/meta.h"
#include "aclone/source.h"

struct aclone_verify {
  uint64_t compared, mismatched, written, unhydrated;   /* regions */
  /* Byte ranges that differ, adjacent ones merged.  When memory runs
   * short they are still counted in mismatched, not listed.
   */
  uint64_t *bad_off, *bad_len;
  size_t nbad, capbad;
};

/* Compare dest with src for every region m says was copied and never
 * written.  src and dest must be the clone's (the caller checked the
 * size).  Returns 0 (differences are in *v, not an error) or -errno of a
 * read that failed, with err naming the source or dest.  Free *v with
 * aclone_verify_free.
 */
int aclone_verify_run (const struct aclone_meta *m, struct aclone_source *src,
                       struct aclone_dest *dest, struct aclone_verify *v,
                       struct aclone_error *err);

void aclone_verify_free (struct aclone_verify *v);

#endif
