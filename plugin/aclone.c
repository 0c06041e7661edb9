/* nbdkit-aclone-plugin: nbdkit glue for the aclone core library.
 *
 * This file only parses parameters, maps nbdkit callbacks onto
 * aclone_clone_* calls and reports errors.  It is the only place with
 * global state: nbdkit loads one plugin instance per process, and all
 * client connections share one clone (so multi-conn is safe: a flush on
 * any connection commits everything).
 *
 * Lifecycle:
 *   config / config_complete   parse and check parameters
 *   get_ready                  connect to the source, open dest and meta
 *                              (before the fork, so errors reach the
 *                              terminal and nbdkit exits non-zero)
 *   after_fork                 start the commit thread and the hydrator
 *                              (DESIGN.md invariant 6)
 *   cleanup                    stop threads, final commit, unlock
 */
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

#include <errno.h>
#include <stdio.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <nbdkit-plugin.h>

#include "aclone/clone.h"
#include "aclone/hydrator.h"
#include "aclone/source.h"
#include "config.h"

static char *source_uri;
static char *dest_path;
static char *meta_path;
static uint32_t block_size;
static bool copy_on_read = true;
static unsigned source_connections = 4;
static unsigned source_timeout = 30;
static struct aclone_hydrator_config hcfg = ACLONE_HYDRATOR_DEFAULTS;

static struct aclone_clone *the_clone;

static void
aclone_unload (void)
{
  free (source_uri);
  free (dest_path);
  free (meta_path);
}

static int
parse_size (const char *key, const char *value, uint64_t min, uint64_t max,
            uint64_t *out)
{
  long long v = aclone_parse_size (value);
  if (v < 0) {
    nbdkit_error ("%s=%s: not a size (examples: 65536, 64K, 1M)", key, value);
    return -1;
  }
  if ((uint64_t) v < min || (uint64_t) v > max) {
    nbdkit_error ("%s=%s: out of range", key, value);
    return -1;
  }
  *out = v;
  return 0;
}

static int
parse_bool (const char *key, const char *value, bool *out)
{
  int b = aclone_parse_bool (value);
  if (b < 0) {
    nbdkit_error ("%s=%s: expected true or false", key, value);
    return -1;
  }
  *out = b;
  return 0;
}

static int
parse_uint (const char *key, const char *value, unsigned min, unsigned max,
            unsigned *out)
{
  unsigned v;
  if (nbdkit_parse_unsigned (key, value, &v) < 0)
    return -1;
  if (v < min || v > max) {
    nbdkit_error ("%s=%s: must be between %u and %u", key, value, min, max);
    return -1;
  }
  *out = v;
  return 0;
}

static int
aclone_config (const char *key, const char *value)
{
  uint64_t v;

  if (strcmp (key, "source") == 0) {
    free (source_uri);
    source_uri = strdup (value);
    return source_uri ? 0 : -1;
  }
  if (strcmp (key, "dest") == 0) {
    free (dest_path);
    dest_path = nbdkit_absolute_path (value);
    return dest_path ? 0 : -1;
  }
  if (strcmp (key, "meta") == 0) {
    free (meta_path);
    meta_path = nbdkit_absolute_path (value);
    return meta_path ? 0 : -1;
  }
  if (strcmp (key, "block-size") == 0) {
    if (parse_size (key, value, 1, UINT32_MAX, &v) < 0)
      return -1;
    if (!aclone_region_size_valid (v)) {
      nbdkit_error ("block-size=%s: must be a power of two from 4K to 16M", value);
      return -1;
    }
    block_size = v;
    return 0;
  }
  if (strcmp (key, "copy-on-read") == 0)
    return parse_bool (key, value, &copy_on_read);
  if (strcmp (key, "source-connections") == 0)
    return parse_uint (key, value, 1, 64, &source_connections);
  if (strcmp (key, "source-timeout") == 0)
    return parse_uint (key, value, 0, 86400, &source_timeout);
  if (strcmp (key, "hydrate") == 0) {
    bool on;
    if (parse_bool (key, value, &on) < 0)
      return -1;
    hcfg.start_paused = !on;
    return 0;
  }
  if (strcmp (key, "hydrate-rate") == 0)
    return parse_size (key, value, 0, INT64_MAX, &hcfg.rate);
  if (strcmp (key, "hydrate-batch") == 0) {
    if (parse_size (key, value, 4096, 64 << 20, &v) < 0)
      return -1;
    hcfg.batch = v;
    return 0;
  }
  if (strcmp (key, "hydrate-depth") == 0)
    return parse_uint (key, value, 1, 1024, &hcfg.depth);

  nbdkit_error ("unknown parameter '%s' (see nbdkit aclone --help)", key);
  return -1;
}

static int
aclone_config_complete (void)
{
  if (!dest_path || !meta_path) {
    nbdkit_error ("dest= and meta= are required (and source= for a clone "
                  "that is not complete)");
    return -1;
  }
  return 0;
}

#define aclone_config_help \
  "source=NBD_URI         Source export (nbd://, nbds://, nbd+unix://...).\n" \
  "                       Optional once the clone is complete.\n" \
  "dest=PATH              (required) Destination file or block device; a\n" \
  "                       missing file is created sparse.\n" \
  "meta=PATH              (required) Metadata file; created when missing,\n" \
  "                       else the clone resumes from it.\n" \
  "block-size=SIZE        Region size for a new clone, power of two,\n" \
  "                       4K..16M (default 64K).\n" \
  "copy-on-read=BOOL      Reads of uncopied regions also hydrate them\n" \
  "                       (default true).\n" \
  "source-connections=N   Connections to the source (default 4; 1 when the\n" \
  "                       source lacks multi-conn).\n" \
  "source-timeout=SECS    How long a read waits for a lost source before\n" \
  "                       failing with EIO (default 30).\n" \
  "hydrate=BOOL           Run background hydration (default true; false\n" \
  "                       starts paused: 'aclone resume META').\n" \
  "hydrate-rate=SIZE      Hydration rate limit in bytes/s (default 0 =\n" \
  "                       unlimited).\n" \
  "hydrate-batch=SIZE     Largest copy in one request (default 1M).\n" \
  "hydrate-depth=N        Copies in flight (default 32)."

static void
aclone_dump_plugin (void)
{
  printf ("aclone_version=%s\n", ACLONE_VERSION);
  printf ("aclone_params=source,dest,meta,block-size,copy-on-read,"
          "source-connections,source-timeout,hydrate,hydrate-rate,"
          "hydrate-batch,hydrate-depth\n");
}

/* Errors through nbdkit_error (stderr or syslog, as nbdkit logs);
 * information, like the completion line, on stderr; debug with -v.
 */
static void
log_to_nbdkit (void *opaque, int level, const char *msg)
{
  (void) opaque;
  if (level >= 2)
    nbdkit_error ("%s", msg);
  else if (level == 1)
    fprintf (stderr, "nbdkit: aclone: %s\n", msg);
  else
    nbdkit_debug ("%s", msg);
}

static int
aclone_get_ready (void)
{
  struct aclone_error err = { 0 };
  struct aclone_source *src = NULL;
  struct aclone_clone_config cfg = {
    .dest_path = dest_path,
    .meta_path = meta_path,
    .region_size = block_size,
    .copy_on_read = copy_on_read,
  };

  if (source_uri) {
    struct aclone_source_config scfg = {
      .uri = source_uri,
      .connections = source_connections,
      .timeout_s = source_timeout,
    };
    if (aclone_source_nbd_open (&scfg, &src, &err) < 0) {
      nbdkit_error ("%s", err.msg);
      return -1;
    }
  }
  if (aclone_clone_open (&cfg, src, log_to_nbdkit, NULL, &the_clone, &err) < 0) {
    aclone_source_close (src);
    nbdkit_error ("%s", err.msg);
    return -1;
  }
  return 0;
}

static int
aclone_after_fork (void)
{
  struct aclone_error err = { 0 };

  /* The hydrator sets the live page's controls; start it first so that
   * the first published state already reflects them.
   */
  hcfg.connections = source_connections;
  if (aclone_hydrator_start (the_clone, &hcfg, &err) < 0 ||
      aclone_clone_start (the_clone, &err) < 0) {
    nbdkit_error ("%s", err.msg);
    return -1;
  }
  return 0;
}

static void
aclone_cleanup (void)
{
  if (the_clone) {
    aclone_hydrator_stop (the_clone);
    aclone_clone_close (the_clone);
    the_clone = NULL;
  }
}

static void *
aclone_open (int readonly)
{
  (void) readonly;
  return the_clone;
}

static int64_t
aclone_get_size (void *h)
{
  return ((struct aclone_clone *) h)->size;
}

static int aclone_can_true (void *h) { (void) h; return 1; }
static int aclone_can_fua (void *h) { (void) h; return NBDKIT_FUA_NATIVE; }
static int aclone_can_cache (void *h) { (void) h; return NBDKIT_CACHE_NATIVE; }

/* Map a core result to nbdkit's convention. */
static int
ret (int r)
{
  if (r < 0) {
    nbdkit_set_error (-r);
    return -1;
  }
  return 0;
}

static int
aclone_pread (void *h, void *buf, uint32_t count, uint64_t offset,
              uint32_t flags)
{
  (void) flags;
  return ret (aclone_clone_pread (h, buf, count, offset));
}

static int
aclone_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset,
               uint32_t flags)
{
  return ret (aclone_clone_pwrite (h, buf, count, offset,
                                   flags & NBDKIT_FLAG_FUA));
}

static int
aclone_flush (void *h, uint32_t flags)
{
  (void) flags;
  return ret (aclone_clone_flush (h));
}

static int
aclone_trim (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  return ret (aclone_clone_zero (h, count, offset, true, false,
                                 flags & NBDKIT_FLAG_FUA));
}

static int
aclone_zero (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  return ret (aclone_clone_zero (h, count, offset, flags & NBDKIT_FLAG_MAY_TRIM,
                                 flags & NBDKIT_FLAG_FAST_ZERO,
                                 flags & NBDKIT_FLAG_FUA));
}

static int
aclone_cache (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  return ret (aclone_clone_cache (h, count, offset));
}

static int
add_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t type)
{
  return nbdkit_add_extent (opaque, offset, length, type) < 0 ? -EIO : 0;
}

static int
aclone_extents (void *h, uint32_t count, uint64_t offset, uint32_t flags,
                struct nbdkit_extents *extents)
{
  return ret (aclone_clone_extents (h, count, offset,
                                    flags & NBDKIT_FLAG_REQ_ONE,
                                    add_extent, extents));
}

static struct nbdkit_plugin plugin = {
  .name              = "aclone",
  .longname          = "aclone asynchronous block clone",
  .version           = ACLONE_VERSION,
  .description       = "Serve a clone of an NBD export while copying it "
                       "to a local file or device in the background.",
  .unload            = aclone_unload,
  .config            = aclone_config,
  .config_complete   = aclone_config_complete,
  .config_help       = aclone_config_help,
  .dump_plugin       = aclone_dump_plugin,
  .get_ready         = aclone_get_ready,
  .after_fork        = aclone_after_fork,
  .cleanup           = aclone_cleanup,
  .open              = aclone_open,
  .get_size          = aclone_get_size,
  .can_write         = aclone_can_true,
  .can_flush         = aclone_can_true,
  .can_trim          = aclone_can_true,
  .can_zero          = aclone_can_true,
  .can_fast_zero     = aclone_can_true,
  .can_extents       = aclone_can_true,
  .can_multi_conn    = aclone_can_true,
  .can_fua           = aclone_can_fua,
  .can_cache         = aclone_can_cache,
  .pread             = aclone_pread,
  .pwrite            = aclone_pwrite,
  .flush             = aclone_flush,
  .trim              = aclone_trim,
  .zero              = aclone_zero,
  .extents           = aclone_extents,
  .cache             = aclone_cache,
  .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN (plugin)
