/* aclone: the command line tool.  Reads a clone's metadata file, and
 * steers its server through the live page's control fields.
 *
 *   aclone status [--json] META...
 *   aclone inspect [--map] META
 *   aclone wait [--timeout S] META...
 *   aclone metrics [--output FILE] [META...]
 *   aclone pause META | aclone resume META
 *   aclone set META rate=SIZE depth=N floor=SIZE
 *   aclone verify [--json] META --source URI --dest PATH [--tls-...]
 *   aclone attach [--device /dev/nbdN] [--timeout S] [--reconnect S]
 *                 [--connections N] [--readonly] [--block-size B]
 *                 [--tls-certificates DIR] [--tls-psk FILE] [--no-tls-verify] URI
 *   aclone attach --detach /dev/nbdN
 *
 * Exit status: 0 success, 1 runtime error, 2 usage error.
 *
 * This file parses each command's arguments and runs it; what a command
 * shows of a clone's status is status.c's, and wait and metrics have
 * files of their own (cli.h says what they share).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <bsd/libutil.h>
#include <bsd/stdlib.h>
#include <json-c/json.h>

#include "aclone/attach.h"
#include "aclone/dest.h"
#include "aclone/meta.h"
#include "aclone/size.h"
#include "aclone/source.h"
#include "aclone/verify.h"
#include "cli.h"
#include "config.h"

static const char usage_text[] =
  "Usage: aclone COMMAND [OPTIONS] META\n"
  "Watch and steer an aclone clone through its metadata file META;\n"
  "attach an NBD export to a kernel NBD device (attach).\n"
  "\n"
  "Commands:\n"
  "  status [--json] META...     progress, rate, state, errors; with several\n"
  "                              META, one line per clone and a total\n"
  "  inspect [--map] META        header fields and validity; --map lists\n"
  "                              the ranges not yet hydrated\n"
  "  wait [--timeout S] META...  block until every clone is complete\n"
  "  metrics [--output FILE] [META...]\n"
  "                              Prometheus text format, for node_exporter's\n"
  "                              textfile collector; FILE is replaced\n"
  "                              atomically\n"
  "  pause META                  pause background hydration\n"
  "  resume META                 resume background hydration\n"
  "  set META [rate=SIZE] [depth=N] [floor=SIZE]\n"
  "                              hydration rate limit in bytes/s (0 = none),\n"
  "                              copies in flight (0 = server default),\n"
  "                              progress floor in bytes/s (0 = default)\n"
  "  attach [--device /dev/nbdN] [--timeout S] [--reconnect S]\n"
  "         [--connections N] [--readonly] [--block-size B]\n"
  "         [--tls-certificates DIR] [--tls-psk FILE] [--no-tls-verify] URI\n"
  "                              attach URI to a kernel NBD device and keep\n"
  "                              it attached across server restarts (TLS:\n"
  "                              nbds:// URIs, relayed for the kernel)\n"
  "  attach --detach /dev/nbdN   detach it\n"
  "  verify [--json] META --source URI --dest PATH\n"
  "         [--tls-certificates DIR] [--tls-psk FILE] [--no-tls-verify]\n"
  "                              compare every copied, never-written region\n"
  "                              of PATH with the source; exit 0 if all match\n"
  "\n"
  "Options: --help, --version.  Exit status: 0 ok, 1 error, 2 usage.\n"
  "See aclone(1).\n";

int
usage (const char *msg)
{
  if (msg)
    fprintf (stderr, "aclone: %s\n", msg);
  fputs ("Try 'aclone --help'.\n", stderr);
  return EXIT_USAGE;
}

int
parse_number (const char *what, const char *s, unsigned max, unsigned *out)
{
  const char *why = NULL;
  long long v = strtonum (s, 0, max, &why);

  if (why) {
    fprintf (stderr, "aclone: %s %s: %s (a whole number from 0 to %u)\n",
             what, s, why, max);
    return -1;
  }
  *out = (unsigned) v;
  return 0;
}

/* Parse "CMD [--FLAG] META", or "CMD [--FLAG] META..." when many: sets
 * *flag and the META arguments (*metas, *n: in argv), or returns the
 * usage exit status (non-zero) after reporting.
 */
static int
flag_and_metas (int argc, char **argv, const char *flag_name, bool many,
                bool *flag, char ***metas, int *n)
{
  const struct option opts[] = {
    { flag_name, no_argument, NULL, 'f' }, { NULL, 0, NULL, 0 } };
  int c;
  char msg[64];

  *flag = false;
  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    if (c != 'f')
      return usage (NULL);
    *flag = true;
  }
  if (many ? optind >= argc : optind != argc - 1) {
    snprintf (msg, sizeof msg, "%s: expected %s", argv[0],
              many ? "one or more META files" : "one META file");
    return usage (msg);
  }
  *metas = argv + optind;
  *n = argc - optind;
  return 0;
}

/* "status [--json] META...". */
static int
cmd_status (int argc, char **argv)
{
  char **paths;
  int n;
  bool json;
  int rc = flag_and_metas (argc, argv, "json", true, &json, &paths, &n);
  if (rc)
    return rc;
  return show_status (paths, n, json);
}

/* "inspect [--map] META": the header's fields, as they are in the file;
 * "valid: no" if it cannot be opened.
 */
static int
cmd_inspect (int argc, char **argv)
{
  char **metas;
  int n;
  bool map;
  int rc = flag_and_metas (argc, argv, "map", false, &map, &metas, &n);
  if (rc)
    return rc;
  const char *path = metas[0];

  struct aclone_meta *m;
  if (open_meta (path, ACLONE_META_READ, &m) < 0) {
    printf ("valid:         no\n");
    return EXIT_FAILURE;
  }
  const struct aclone_meta_header *h = &m->hdr;
  printf ("valid:         yes\n");
  printf ("format:        %.8s version %u\n", h->magic, h->version);
  printf ("uuid:          ");
  for (int i = 0; i < 16; i++)
    printf ("%02x%s", h->uuid[i], (i == 3 || i == 5 || i == 7 || i == 9) ? "-" : "");
  printf ("\nsize:          %llu\n", (unsigned long long) h->size);
  printf ("block size:    %u\n", h->region_size);
  printf ("regions:       %llu\n", (unsigned long long) h->regions);
  printf ("flags:         0x%x%s%s\n", h->flags,
          h->flags & ACLONE_FLAG_COMPLETE ? " complete" : "",
          h->flags & ACLONE_FLAG_DEST_ZERO ? " dest-zero" : "");
  time_t t = (time_t) h->created;
  char tbuf[64];
  strftime (tbuf, sizeof tbuf, "%Y-%m-%dT%H:%M:%SZ", gmtime (&t));
  printf ("created:       %s\n", tbuf);
  if (h->completed) {
    t = (time_t) h->completed;
    strftime (tbuf, sizeof tbuf, "%Y-%m-%dT%H:%M:%SZ", gmtime (&t));
    printf ("completed:     %s\n", tbuf);
  }
  char source[sizeof h->source];
  memcpy (source, h->source, sizeof source);
  sanitize_text (source);
  printf ("source:        %s\n", source);
  printf ("hydrated:      %llu (committed)\n",
          (unsigned long long) aclone_meta_count (m, ACLONE_BIT_HYDRATED));
  printf ("layout:        live@%llu hydrated@%llu written@%llu bitmap %llu bytes, "
          "file %llu bytes\n",
          (unsigned long long) h->live_off, (unsigned long long) h->hydrated_off,
          (unsigned long long) h->written_off, (unsigned long long) h->bitmap_len,
          (unsigned long long) h->file_len);
  printf ("in use:        %s\n", aclone_meta_in_use (path) ? "yes" : "no");
  if (map) {
    printf ("unhydrated ranges (offset length):\n");
    uint64_t r = 0;
    while (r < h->regions) {
      while (r < h->regions && aclone_meta_bit (m, 0, r))
        r++;
      uint64_t s = r;
      while (r < h->regions && !aclone_meta_bit (m, 0, r))
        r++;
      if (r > s) {
        uint64_t off = s * h->region_size;
        uint64_t end = r * h->region_size;
        if (end > h->size)
          end = h->size;
        printf ("%llu %llu\n", (unsigned long long) off,
                (unsigned long long) (end - off));
      }
    }
  }
  aclone_meta_close (m);
  return EXIT_SUCCESS;
}

/* A change to the control fields; -1 leaves a field as it is. */
struct control_change {
  int64_t pause, rate, depth, floor;
};
#define CONTROL_UNCHANGED { -1, -1, -1, -1 }

/* Write control fields: pause, resume, set. */
static int
control (const char *path, const struct control_change *ch)
{
  struct aclone_meta *m;

  if (open_meta (path, ACLONE_META_CONTROL, &m) < 0)
    return EXIT_FAILURE;
  if (!aclone_meta_in_use (path)) {
    fprintf (stderr, "aclone: %s: no server is running on this clone\n", path);
    aclone_meta_close (m);
    return EXIT_FAILURE;
  }
  struct aclone_live *l = m->live;
  if (ch->pause >= 0)
    __atomic_store_n (&l->ctl_pause, (uint64_t) ch->pause, __ATOMIC_RELAXED);
  if (ch->rate >= 0)
    __atomic_store_n (&l->ctl_rate, (uint64_t) ch->rate, __ATOMIC_RELAXED);
  if (ch->depth >= 0)
    __atomic_store_n (&l->ctl_depth, (uint64_t) ch->depth, __ATOMIC_RELAXED);
  if (ch->floor >= 0)
    __atomic_store_n (&l->ctl_floor, (uint64_t) ch->floor, __ATOMIC_RELAXED);
  __atomic_add_fetch (&l->ctl_seq, 1, __ATOMIC_RELAXED);
  aclone_meta_close (m);
  return EXIT_SUCCESS;
}

/* "pause META", "resume META". */
static int
cmd_pause_resume (int argc, char **argv, bool pause)
{
  struct control_change ch = CONTROL_UNCHANGED;

  if (argc != 2)
    return usage (pause ? "pause: expected one META file"
                        : "resume: expected one META file");
  ch.pause = pause;
  return control (argv[1], &ch);
}

/* A size in bytes/s for set's rate= and floor=; -1 if it is not one. */
static int64_t
parse_rate (const char *s)
{
  uint64_t v;
  char plain[32];

  if (!aclone_size_spelling (s, plain, sizeof plain) ||
      expand_number (plain, &v) < 0 || v > INT64_MAX)
    return -1;
  return (int64_t) v;
}

/* "set META [rate=SIZE] [depth=N] [floor=SIZE]". */
static int
cmd_set (int argc, char **argv)
{
  struct control_change ch = CONTROL_UNCHANGED;

  if (argc < 3)
    return usage ("set: expected META and rate=SIZE, depth=N and/or floor=SIZE");
  for (int i = 2; i < argc; i++) {
    if (strncmp (argv[i], "rate=", 5) == 0) {
      if ((ch.rate = parse_rate (argv[i] + 5)) < 0)
        return usage ("set: rate= takes a size in bytes/s, like 50M");
    }
    else if (strncmp (argv[i], "floor=", 6) == 0) {
      if ((ch.floor = parse_rate (argv[i] + 6)) < 0)
        return usage ("set: floor= takes a size in bytes/s, like 5M");
    }
    else if (strncmp (argv[i], "depth=", 6) == 0) {
      unsigned v;
      if (parse_number ("depth=", argv[i] + 6, 1024, &v) < 0)
        return EXIT_USAGE;
      ch.depth = v;
    }
    else
      return usage ("set: unknown setting (rate=SIZE, depth=N, floor=SIZE)");
  }
  return control (argv[1], &ch);
}

/* N of "/dev/nbdN" (digits only, below 2^20), or -1. */
static int
nbd_device_index (const char *path)
{
  const char *d = path + strlen ("/dev/nbd");
  char *end;

  if (strncmp (path, "/dev/nbd", strlen ("/dev/nbd")) != 0 ||
      *d < '0' || *d > '9')
    return -1;
  errno = 0;
  unsigned long index = strtoul (d, &end, 10);
  return *end || errno || index >= (1ul << 20) ? -1 : (int) index;
}

/* The TLS options verify and attach share, as libnbd takes them. */
enum { OPT_TLS_CERTIFICATES = 0x100, OPT_TLS_PSK, OPT_NO_TLS_VERIFY };
#define TLS_OPTIONS \
  { "tls-certificates", required_argument, NULL, OPT_TLS_CERTIFICATES }, \
  { "tls-psk", required_argument, NULL, OPT_TLS_PSK }, \
  { "no-tls-verify", no_argument, NULL, OPT_NO_TLS_VERIFY }

/* Store TLS option c (with optarg) where it belongs. */
static void
tls_option (int c, const char **certificates, const char **psk_file,
            bool *no_verify)
{
  switch (c) {
  case OPT_TLS_CERTIFICATES: *certificates = optarg; break;
  case OPT_TLS_PSK: *psk_file = optarg; break;
  case OPT_NO_TLS_VERIFY: *no_verify = true; break;
  }
}

/* "attach [--device /dev/nbdN] [--timeout S] [--reconnect S]
 * [--connections N] [--readonly] [--block-size B] [--tls-...] URI", or
 * "attach --detach /dev/nbdN".
 */
static int
cmd_attach (int argc, char **argv)
{
  static const struct option opts[] = {
    { "device", required_argument, NULL, 'd' },
    { "timeout", required_argument, NULL, 't' },
    { "reconnect", required_argument, NULL, 'r' },
    { "connections", required_argument, NULL, 'c' },
    { "readonly", no_argument, NULL, 'R' },
    { "block-size", required_argument, NULL, 'b' },
    { "detach", required_argument, NULL, 'D' },
    TLS_OPTIONS,
    { NULL, 0, NULL, 0 } };
  struct aclone_attach_config cfg = { .index = -1, .timeout_s = 60,
                                      .reconnect_s = 120, .connections = 1 };
  struct aclone_error err = { 0 };
  int c, detach = -1;

  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    switch (c) {
    case 'd':
      if ((cfg.index = nbd_device_index (optarg)) < 0)
        return usage ("attach: --device takes /dev/nbdN");
      break;
    case 'D':
      if ((detach = nbd_device_index (optarg)) < 0)
        return usage ("attach: --detach takes /dev/nbdN");
      break;
    case 'c':
      if (parse_number ("--connections", optarg, ACLONE_ATTACH_MAX_CONNECTIONS,
                        &cfg.connections) < 0)
        return EXIT_USAGE;
      if (cfg.connections == 0)
        return usage ("attach: --connections is at least 1");
      break;
    case 'R':
      cfg.readonly = true;
      break;
    case OPT_TLS_CERTIFICATES: case OPT_TLS_PSK: case OPT_NO_TLS_VERIFY:
      tls_option (c, &cfg.tls_certificates, &cfg.tls_psk_file, &cfg.tls_no_verify);
      break;
    case 'b':
      if (parse_number ("--block-size", optarg, 4096, &cfg.block_size) < 0)
        return EXIT_USAGE;
      if (cfg.block_size < 512 || (cfg.block_size & (cfg.block_size - 1)))
        return usage ("attach: --block-size is 512, 1024, 2048 or 4096");
      break;
    case 't':
      if (parse_number ("--timeout", optarg, 86400, &cfg.timeout_s) < 0)
        return EXIT_USAGE;
      break;
    case 'r':
      if (parse_number ("--reconnect", optarg, 86400, &cfg.reconnect_s) < 0)
        return EXIT_USAGE;
      break;
    default: return usage (NULL);
    }
  }
  if (detach >= 0) {
    if (optind != argc)
      return usage ("attach: --detach takes no URI");
    if (aclone_attach_detach (detach, &err) < 0) {
      fprintf (stderr, "aclone: %s\n", err.msg);
      return EXIT_FAILURE;
    }
    return EXIT_SUCCESS;
  }
  if (optind != argc - 1)
    return usage ("attach: expected one NBD URI");
  cfg.uri = argv[optind];
  if (aclone_attach (&cfg, &err) < 0) {
    fprintf (stderr, "aclone: %s\n", err.msg);
    return EXIT_FAILURE;
  }
  return EXIT_SUCCESS;
}

/* What verify found, as text or JSON ("verify META"). */
static void
print_verify (const struct aclone_meta *m, const struct aclone_verify *v,
              bool json)
{
  if (json) {
    struct json_object *o = json_object_new_object ();
    struct json_object *bad = json_object_new_array ();
    json_add_u64 (o, "regions", m->hdr.regions);
    json_add_u64 (o, "compared", v->compared);
    json_add_u64 (o, "mismatched", v->mismatched);
    json_add_u64 (o, "written", v->written);
    json_add_u64 (o, "unhydrated", v->unhydrated);
    for (size_t i = 0; i < v->nbad; i++) {
      struct json_object *r = json_object_new_object ();
      json_add_u64 (r, "offset", v->bad_off[i]);
      json_add_u64 (r, "length", v->bad_len[i]);
      json_object_array_add (bad, r);
    }
    json_object_object_add (o, "mismatches", bad);
    json_print (o);
  }
  else {
    printf ("compared:      %llu regions (copied, never written)\n",
            (unsigned long long) v->compared);
    printf ("mismatched:    %llu regions\n", (unsigned long long) v->mismatched);
    for (size_t i = 0; i < v->nbad; i++)
      printf ("  differs:     offset %llu length %llu\n",
              (unsigned long long) v->bad_off[i], (unsigned long long) v->bad_len[i]);
    printf ("written:       %llu regions (not compared)\n",
            (unsigned long long) v->written);
    printf ("unhydrated:    %llu regions (not compared)\n",
            (unsigned long long) v->unhydrated);
  }
}

/* "verify [--json] META --source URI --dest PATH [--tls-...]": exit
 * status 0 only if every region compared matches.
 */
static int
cmd_verify (int argc, char **argv)
{
  static const struct option opts[] = {
    { "json", no_argument, NULL, 'j' },
    { "source", required_argument, NULL, 's' },
    { "dest", required_argument, NULL, 'd' },
    TLS_OPTIONS,
    { NULL, 0, NULL, 0 } };
  const char *uri = NULL, *dest_path = NULL;
  struct aclone_source_config scfg = { .connections = 1, .timeout_s = 30 };
  bool json = false;
  int c;

  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    switch (c) {
    case 'j': json = true; break;
    case 's': uri = optarg; break;
    case 'd': dest_path = optarg; break;
    case OPT_TLS_CERTIFICATES: case OPT_TLS_PSK: case OPT_NO_TLS_VERIFY:
      tls_option (c, &scfg.tls_certificates, &scfg.tls_psk_file,
                  &scfg.tls_no_verify);
      break;
    default: return usage (NULL);
    }
  }
  if (optind != argc - 1 || !uri || !dest_path)
    return usage ("verify: expected META --source URI --dest PATH");
  const char *path = argv[optind];

  struct aclone_meta *m;
  struct aclone_error err = { 0 };
  struct aclone_source *src = NULL;
  if (open_meta (path, ACLONE_META_READ, &m) < 0)
    return EXIT_FAILURE;
  scfg.uri = uri;
  if (aclone_source_nbd_open (&scfg, &src, &err) < 0) {
    fprintf (stderr, "aclone: %s\n", err.msg);
    aclone_meta_close (m);
    return EXIT_FAILURE;
  }
  struct aclone_dest d = { .path = (char *) dest_path, .fd = -1 };
  d.fd = open (dest_path, O_RDONLY | O_CLOEXEC);
  int rc = EXIT_SUCCESS;
  if (d.fd < 0) {
    fprintf (stderr, "aclone: dest %s: %s\n", dest_path, strerror (errno));
    rc = EXIT_FAILURE;
    goto out;
  }
  if (src->size != m->hdr.size) {
    fprintf (stderr, "aclone: source %s is %llu bytes, %s says %llu\n",
             src->desc, (unsigned long long) src->size, path,
             (unsigned long long) m->hdr.size);
    rc = EXIT_FAILURE;
    goto out;
  }

  struct aclone_verify v;
  if (aclone_verify_run (m, src, &d, &v, &err) < 0) {
    fprintf (stderr, "aclone: %s\n", err.msg);
    rc = EXIT_FAILURE;
    goto out_v;
  }
  print_verify (m, &v, json);
  if (v.mismatched)
    rc = EXIT_FAILURE;
 out_v:
  aclone_verify_free (&v);
 out:
  if (d.fd >= 0)
    close (d.fd);
  aclone_source_close (src);
  aclone_meta_close (m);
  return rc;
}

int
main (int argc, char **argv)
{
  if (argc < 2)
    return usage ("missing command");
  const char *cmd = argv[1];
  if (strcmp (cmd, "--help") == 0 || strcmp (cmd, "-h") == 0 ||
      strcmp (cmd, "help") == 0) {
    fputs (usage_text, stdout);
    return EXIT_SUCCESS;
  }
  if (strcmp (cmd, "--version") == 0 || strcmp (cmd, "-V") == 0) {
    printf ("aclone %s\n", ACLONE_VERSION);
    return EXIT_SUCCESS;
  }
  argc--;
  argv++;
  for (int i = 1; i < argc; i++)
    if (strcmp (argv[i], "--help") == 0) {
      fputs (usage_text, stdout);
      return EXIT_SUCCESS;
    }
  if (strcmp (cmd, "status") == 0)
    return cmd_status (argc, argv);
  if (strcmp (cmd, "inspect") == 0)
    return cmd_inspect (argc, argv);
  if (strcmp (cmd, "wait") == 0)
    return cmd_wait (argc, argv);
  if (strcmp (cmd, "metrics") == 0)
    return cmd_metrics (argc, argv);
  if (strcmp (cmd, "pause") == 0)
    return cmd_pause_resume (argc, argv, true);
  if (strcmp (cmd, "resume") == 0)
    return cmd_pause_resume (argc, argv, false);
  if (strcmp (cmd, "set") == 0)
    return cmd_set (argc, argv);
  if (strcmp (cmd, "attach") == 0)
    return cmd_attach (argc, argv);
  if (strcmp (cmd, "verify") == 0)
    return cmd_verify (argc, argv);
  return usage ("unknown command");
}
