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
 *   aclone attach [--device /dev/nbdN] [--timeout S] [--reconnect S] URI
 *
 * Exit status: 0 success, 1 runtime error, 2 usage error.
 */
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/param.h>

#include <bsd/libutil.h>
#include <bsd/stdlib.h>
#include <bsd/string.h>
#include <json-c/json.h>
#include <time.h>
#include <unistd.h>
#include <endian.h>

#include <fcntl.h>

#include "aclone/attach.h"
#include "aclone/clock.h"
#include "aclone/dest.h"
#include "aclone/map.h"
#include "aclone/meta.h"
#include "aclone/size.h"
#include "aclone/source.h"
#include "aclone/verify.h"
#include "config.h"

#define EXIT_USAGE 2

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
  "  attach [--device /dev/nbdN] [--timeout S] [--reconnect S] URI\n"
  "                              attach URI to a kernel NBD device and keep\n"
  "                              it attached across server restarts\n"
  "  verify [--json] META --source URI --dest PATH\n"
  "         [--tls-certificates DIR] [--tls-psk FILE] [--no-tls-verify]\n"
  "                              compare every copied, never-written region\n"
  "                              of PATH with the source; exit 0 if all match\n"
  "\n"
  "Options: --help, --version.  Exit status: 0 ok, 1 error, 2 usage.\n"
  "See aclone(1).\n";

static int
usage (const char *msg)
{
  if (msg)
    fprintf (stderr, "aclone: %s\n", msg);
  fputs ("Try 'aclone --help'.\n", stderr);
  return EXIT_USAGE;
}

/* A snapshot of everything status-like, from the file and live page. */
struct status {
  struct aclone_meta_header hdr;
  bool in_use;
  uint64_t hydrated;
  uint64_t bytes_copied, bytes_skipped, in_flight, errors, rate;
  int64_t pid;
  double updated;              /* unix time of the live page's last update */
  const char *state;
  char last_error[256];
  double percent;
  int64_t eta;                 /* seconds, -1 unknown */
  /* The foreground-first controller, while a server hydrates. */
  uint64_t window, base_ns, cur_ns, client_cuts, cor_behind, cor_pending;
  uint64_t floor;
  const char *why;
  bool idle;
};

/* Text from the metadata file is not trusted: control characters and
 * bytes that are not valid UTF-8 become '?', so that output (and JSON)
 * stays well-formed whatever the file holds.
 */
static void
sanitize_text (char *s)
{
  unsigned char *p = (unsigned char *) s;

  while (*p) {
    /* Well-formed UTF-8 (RFC 3629): the second byte's range depends on
     * the first; no overlong forms, no surrogates, nothing past U+10FFFF.
     */
    unsigned n = 0, lo = 0x80, hi = 0xbf;
    if (*p >= 0xc2 && *p <= 0xdf) n = 1;
    else if (*p >= 0xe0 && *p <= 0xef) {
      n = 2;
      if (*p == 0xe0) lo = 0xa0;
      if (*p == 0xed) hi = 0x9f;
    }
    else if (*p >= 0xf0 && *p <= 0xf4) {
      n = 3;
      if (*p == 0xf0) lo = 0x90;
      if (*p == 0xf4) hi = 0x8f;
    }
    bool ok = *p >= 0x20 && *p != 0x7f && (*p < 0x80 || n > 0);
    for (unsigned k = 1; ok && k <= n; k++)
      ok = p[k] >= (k == 1 ? lo : 0x80) && p[k] <= (k == 1 ? hi : 0xbf);
    if (!ok) {
      *p++ = '?';
      continue;
    }
    p += n + 1;
  }
}

static uint64_t
live_u64 (const uint64_t *p)
{
  return __atomic_load_n (p, __ATOMIC_RELAXED);
}

static void
read_status (const char *path, const struct aclone_meta *m, struct status *s)
{
  const struct aclone_live *l = m->live;
  bool live_ok = live_u64 (&l->magic) == ACLONE_LIVE_MAGIC;

  memset (s, 0, sizeof *s);
  s->hdr = m->hdr;
  sanitize_text (s->hdr.source);
  s->in_use = aclone_meta_in_use (path);
  s->hydrated = aclone_meta_count (m, ACLONE_BIT_HYDRATED);
  if (live_ok) {
    if (s->in_use) {
      uint64_t h = live_u64 (&l->regions_hydrated);
      if (h <= m->hdr.regions && h > s->hydrated)
        s->hydrated = h;          /* in core, maybe not committed yet */
      s->pid = (int64_t) live_u64 ((const uint64_t *) &l->pid);
      s->in_flight = live_u64 (&l->in_flight);
      s->rate = live_u64 (&l->rate);
      s->window = live_u64 (&l->fg_window);
      s->base_ns = live_u64 (&l->fg_base_ns);
      s->cur_ns = live_u64 (&l->fg_cur_ns);
      s->why = aclone_fg_reason_name (live_u64 (&l->fg_reason));
      s->client_cuts = live_u64 (&l->fg_client_cuts);
      s->idle = live_u64 (&l->fg_idle) != 0;
      s->cor_behind = live_u64 (&l->cor_behind);
      s->cor_pending = live_u64 (&l->cor_pending);
      s->floor = live_u64 (&l->ctl_floor);
    }
    s->updated = live_u64 (&l->heartbeat_ns) / 1e9;
    s->bytes_copied = live_u64 (&l->bytes_copied);
    s->bytes_skipped = live_u64 (&l->bytes_skipped);
    s->errors = live_u64 (&l->errors);
    memcpy (s->last_error, l->last_error, sizeof s->last_error);
    s->last_error[sizeof s->last_error - 1] = '\0';
    sanitize_text (s->last_error);
  }
  uint64_t live_state = live_ok ? live_u64 (&l->state) : ACLONE_STATE_HYDRATING;
  if (s->in_use && live_state == ACLONE_STATE_FAILED)
    s->state = "failed";        /* even if complete: FLUSH fails */
  else if (m->hdr.flags & ACLONE_FLAG_COMPLETE) {
    s->state = "complete";
    s->hydrated = m->hdr.regions;
  }
  else if (!s->in_use)
    s->state = "stopped";
  else {
    switch (live_state) {
    case ACLONE_STATE_PAUSED: s->state = "paused"; break;
    case ACLONE_STATE_ERROR: s->state = "error"; break;
    case ACLONE_STATE_WAITING: s->state = "waiting"; break;
    case ACLONE_STATE_COMPLETE: s->state = "complete"; break;
    default: s->state = "hydrating"; break;
    }
  }
  s->percent = m->hdr.regions ? 100.0 * s->hydrated / m->hdr.regions : 100.0;
  uint64_t left = (m->hdr.regions - s->hydrated) * (uint64_t) m->hdr.region_size;
  s->eta = s->hydrated == m->hdr.regions ? 0
           : s->rate && s->in_use ? (int64_t) (left / s->rate) : -1;
}

/* The CLI's one parser of whole numbers (libbsd's strtonum): 0 to max.
 * Reports a bad value itself, naming what it is for.
 */
static int
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

/* v bytes for people, with at most three digits: "512 B", "1.5 KiB",
 * "16 MiB", "15 TiB" (libbsd; one decimal below 10).
 */
static const char *
human (uint64_t v, char *buf, size_t len)
{
  /* The width decides the scale: three digits, a space, "Mi", "B". */
  if (humanize_number (buf, MIN (len, 8), (int64_t) MIN (v, (uint64_t) INT64_MAX), "B",
                       HN_AUTOSCALE, HN_DECIMAL | HN_IEC_PREFIXES) < 0)
    snprintf (buf, len, "%llu B", (unsigned long long) v);
  return buf;
}

/* Print a JSON object (json-c) on one line and free it.  Strings in it
 * come from the metadata file, which the CLI does not trust: they were
 * reduced to well-formed UTF-8 (sanitize_text) before they got here.
 */
static void
json_print (struct json_object *o)
{
  puts (json_object_to_json_string_ext (o, JSON_C_TO_STRING_SPACED |
                                            JSON_C_TO_STRING_NOSLASHESCAPE));
  json_object_put (o);
}

static void
json_add_u64 (struct json_object *o, const char *key, uint64_t v)
{
  json_object_object_add (o, key, json_object_new_uint64 (v));
}

/* A number printed as fmt says ("%.2f"), not with 17 digits. */
static void
json_add_double (struct json_object *o, const char *key, double v,
                 const char *fmt)
{
  char text[64];
  snprintf (text, sizeof text, fmt, v);
  json_object_object_add (o, key, json_object_new_double_s (v, text));
}

static int
open_meta (const char *path, enum aclone_meta_mode mode, struct aclone_meta **m)
{
  struct aclone_error err = { 0 };
  if (aclone_meta_open (path, mode, m, &err) < 0) {
    fprintf (stderr, "aclone: %s\n", err.msg);
    return -1;
  }
  return 0;
}

/* Read path's status into *s (open, read, close).  Returns 0, or -1 with
 * err naming the file and *s as it was: the caller reports it, once,
 * where its output allows (wait ends its progress bar first).
 */
static int
load_status (const char *path, struct status *s, struct aclone_error *err)
{
  struct aclone_meta *m;

  if (aclone_meta_open (path, ACLONE_META_READ, &m, err) < 0)
    return -1;
  read_status (path, m, s);
  aclone_meta_close (m);
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

/* One clone's status as "status --json" prints it (the caller owns the
 * object).  Several clones give an array of exactly these.
 */
static struct json_object *
status_json (const struct status *s)
{
  struct json_object *o = json_object_new_object ();

  json_add_u64 (o, "size", s->hdr.size);
  json_add_u64 (o, "block_size", s->hdr.region_size);
  json_add_u64 (o, "regions", s->hdr.regions);
  json_add_u64 (o, "hydrated", s->hydrated);
  json_add_double (o, "percent", s->percent, "%.2f");
  json_add_u64 (o, "bytes_copied", s->bytes_copied);
  json_add_u64 (o, "bytes_skipped", s->bytes_skipped);
  json_add_u64 (o, "in_flight", s->in_flight);
  json_object_object_add (o, "state", json_object_new_string (s->state));
  json_object_object_add (o, "pid", json_object_new_int64 (s->pid));
  json_add_u64 (o, "rate", s->rate);
  json_object_object_add (o, "eta_seconds", json_object_new_int64 (s->eta));
  json_add_double (o, "updated", s->updated, "%.3f");
  json_add_u64 (o, "errors", s->errors);
  json_object_object_add (o, "last_error", json_object_new_string (s->last_error));
  json_object_object_add (o, "source", json_object_new_string (s->hdr.source));
  if (s->in_use) {
    struct json_object *f = json_object_new_object ();
    json_add_u64 (f, "window", s->window);
    json_add_double (f, "base_latency_ms", s->base_ns / 1e6, "%.3f");
    json_add_double (f, "latency_ms", s->cur_ns / 1e6, "%.3f");
    json_object_object_add (f, "limited_by", json_object_new_string (s->why));
    json_add_u64 (f, "client_cuts", s->client_cuts);
    json_object_object_add (f, "idle_priority", json_object_new_boolean (s->idle));
    json_add_u64 (f, "floor", s->floor);
    json_add_u64 (f, "cor_behind", s->cor_behind);
    json_add_u64 (f, "cor_pending", s->cor_pending);
    json_object_object_add (o, "foreground", f);
  }
  return o;
}

/* One clone's status in text, one field a line ("status META"). */
static void
print_status (const struct status *s)
{
  char b1[32], b2[32], b3[32], b4[32];

  printf ("source:        %s\n", s->hdr.source);
  printf ("size:          %llu (%s)\n", (unsigned long long) s->hdr.size,
          human (s->hdr.size, b1, sizeof b1));
  printf ("block size:    %u\n", s->hdr.region_size);
  printf ("regions:       %llu\n", (unsigned long long) s->hdr.regions);
  printf ("hydrated:      %llu (%.1f%%)\n", (unsigned long long) s->hydrated,
          s->percent);
  printf ("bytes copied:  %llu (%s)\n", (unsigned long long) s->bytes_copied,
          human (s->bytes_copied, b2, sizeof b2));
  printf ("bytes skipped: %llu (%s)\n", (unsigned long long) s->bytes_skipped,
          human (s->bytes_skipped, b3, sizeof b3));
  printf ("state:         %s\n", s->state);
  if (s->pid)
    printf ("pid:           %lld\n", (long long) s->pid);
  if (s->in_use) {
    printf ("rate:          %s/s\n", human (s->rate, b4, sizeof b4));
    if (s->eta >= 0)
      printf ("eta:           %lld s\n", (long long) s->eta);
    else
      printf ("eta:           unknown\n");
    if (s->window) {
      char b5[32];
      printf ("window:        %s in flight, limited by %s\n",
              human (s->window, b5, sizeof b5), s->why);
      printf ("source delay:  %.1f ms now, %.1f ms base\n", s->cur_ns / 1e6,
              s->base_ns / 1e6);
    }
  }
  printf ("errors:        %llu\n", (unsigned long long) s->errors);
  if (s->last_error[0])
    printf ("last error:    %s\n", s->last_error);
}

/* Longest clone name kept, with its NUL (a file name's limit). */
#define NAME_LEN 256

/* A clone's name: the META file's basename without a trailing ".meta"
 * (the systemd units call it VOLUME.meta), in buf.  The bytes are the
 * argument's: callers sanitize or escape them for their output.
 */
static void
clone_name (const char *path, char *buf, size_t len)
{
  const char *base = strrchr (path, '/');
  size_t n;

  base = base && base[1] ? base + 1 : path;
  strlcpy (buf, base, len);
  n = strlen (buf);
  if (n > 5 && strcmp (buf + n - 5, ".meta") == 0)
    buf[n - 5] = '\0';
}

/* The states read_status sets, from the worst to the best: totals count
 * them in this order, trouble first, and the metric aclone_state has one
 * series per name.
 */
static const char *const state_names[] = {
  "failed", "error", "waiting", "stopped", "paused", "hydrating", "complete",
};
#define NSTATES (sizeof state_names / sizeof state_names[0])

static size_t
state_index (const char *state)
{
  for (size_t i = 0; i < NSTATES; i++)
    if (strcmp (state, state_names[i]) == 0)
      return i;
  abort ();                     /* read_status set a state not listed */
}

/* Several clones summed up, for status's total line and wait's progress:
 * sizes and rates add up, progress is weighted by bytes (regions x region
 * size: region sizes may differ), the ETA is the longest (unknown if any
 * is: that clone may never complete), and states are counted.
 * Zero-initialised, it holds no clone.
 */
struct totals {
  unsigned clones;
  uint64_t size, bytes, hydrated_bytes, rate;
  bool eta_unknown;
  int64_t eta;
  unsigned count[NSTATES];
};

static void
totals_add (struct totals *t, const struct status *s)
{
  t->clones++;
  t->size += s->hdr.size;
  t->bytes += s->hdr.regions * (uint64_t) s->hdr.region_size;
  t->hydrated_bytes += s->hydrated * (uint64_t) s->hdr.region_size;
  t->rate += s->rate;
  if (s->eta < 0)
    t->eta_unknown = true;
  t->eta = MAX (t->eta, s->eta);
  t->count[state_index (s->state)]++;
}

/* Percent hydrated; for one clone exactly its status's percent. */
static double
totals_percent (const struct totals *t)
{
  return t->bytes ? 100.0 * t->hydrated_bytes / t->bytes : 100.0;
}

/* The states of t in buf: one clone's state as it is, several counted
 * the worst first ("1 paused, 2 hydrating, 3 complete").
 */
static const char *
totals_states (const struct totals *t, char *buf, size_t len)
{
  buf[0] = '\0';
  for (size_t i = 0; i < NSTATES; i++) {
    char one[48];
    if (!t->count[i])
      continue;
    if (t->clones == 1)
      snprintf (one, sizeof one, "%s", state_names[i]);
    else
      snprintf (one, sizeof one, "%s%u %s", buf[0] ? ", " : "", t->count[i],
                state_names[i]);
    strlcat (buf, one, len);
  }
  return buf;
}

/* An ETA for people: "m:ss", "h:mm:ss" from an hour on, "?" unknown. */
static const char *
eta_text (int64_t eta, char *buf, size_t len)
{
  long long e = eta;

  if (eta < 0)
    snprintf (buf, len, "?");
  else if (eta < 3600)
    snprintf (buf, len, "%lld:%02lld", e / 60, e % 60);
  else
    snprintf (buf, len, "%lld:%02lld:%02lld", e / 3600, e / 60 % 60, e % 60);
  return buf;
}

/* status's table: a header, one line per clone, a total. */
enum { COL_NAME, COL_SIZE, COL_HYDRATED, COL_RATE, COL_STATE, COL_ETA, NCOLS };
struct row {
  char cell[NCOLS][NAME_LEN];
};

/* Characters that sanitized text (well-formed UTF-8) takes on a
 * terminal: the bytes that start one.  (A wide character counts one.)
 */
static size_t
text_width (const char *s)
{
  size_t w = 0;

  for (; *s; s++)
    w += ((unsigned char) *s & 0xc0) != 0x80;
  return w;
}

static void
row_fill (struct row *r, const char *name, uint64_t size, double percent,
          bool has_rate, uint64_t rate, const char *state, int64_t eta)
{
  char b[32];

  strlcpy (r->cell[COL_NAME], name, NAME_LEN);
  human (size, r->cell[COL_SIZE], NAME_LEN);
  snprintf (r->cell[COL_HYDRATED], NAME_LEN, "%.1f%%", percent);
  if (has_rate)
    snprintf (r->cell[COL_RATE], NAME_LEN, "%s/s", human (rate, b, sizeof b));
  else
    strlcpy (r->cell[COL_RATE], "-", NAME_LEN);    /* no server: no rate */
  strlcpy (r->cell[COL_STATE], state, NAME_LEN);
  eta_text (eta, r->cell[COL_ETA], NAME_LEN);
}

/* Print rows in aligned columns: text left, numbers right, two spaces
 * between, no trailing blanks.
 */
static void
table_print (const struct row *rows, size_t n)
{
  static const bool left[NCOLS] = { [COL_NAME] = true, [COL_STATE] = true };
  size_t width[NCOLS] = { 0 };

  for (size_t i = 0; i < n; i++)
    for (int c = 0; c < NCOLS; c++)
      width[c] = MAX (width[c], text_width (rows[i].cell[c]));
  for (size_t i = 0; i < n; i++) {
    for (int c = 0; c < NCOLS; c++) {
      int pad = (int) (width[c] - text_width (rows[i].cell[c]));
      printf ("%s%*s%s", c ? "  " : "", left[c] ? 0 : pad, "",
              rows[i].cell[c]);
      if (left[c] && c < NCOLS - 1)
        printf ("%*s", pad, "");
    }
    putchar ('\n');
  }
}

/* "status META..." with several: the clones read (st[i].state NULL: not
 * read, already reported) in a table, then their total.
 */
static void
status_table (char **paths, const struct status *st, int n)
{
  struct row *rows = calloc ((size_t) n + 2, sizeof *rows);
  struct totals t = { 0 };
  size_t nrows = 1;

  if (!rows) {
    fprintf (stderr, "aclone: %s\n", strerror (ENOMEM));
    return;
  }
  static const char *const head[NCOLS] = { "NAME", "SIZE", "HYDRATED", "RATE",
                                           "STATE", "ETA" };
  for (int c = 0; c < NCOLS; c++)
    strlcpy (rows[0].cell[c], head[c], NAME_LEN);
  for (int i = 0; i < n; i++) {
    const struct status *s = &st[i];
    char name[NAME_LEN];
    if (!s->state)
      continue;
    clone_name (paths[i], name, sizeof name);
    sanitize_text (name);
    row_fill (&rows[nrows++], name, s->hdr.size, s->percent, s->in_use,
              s->rate, s->state, s->eta);
    totals_add (&t, s);
  }
  if (t.clones) {
    char states[NAME_LEN];
    row_fill (&rows[nrows++], "total", t.size, totals_percent (&t), true,
              t.rate, totals_states (&t, states, sizeof states),
              t.eta_unknown ? -1 : t.eta);
    table_print (rows, nrows);
  }
  free (rows);
}

static int
cmd_status (int argc, char **argv)
{
  char **paths;
  int n;
  bool json;
  int rc = flag_and_metas (argc, argv, "json", true, &json, &paths, &n);
  if (rc)
    return rc;

  /* All are read first; one that cannot be is reported and left out,
   * and the others are still shown.  calloc: state NULL until read.
   */
  struct status *st = calloc ((size_t) n, sizeof *st);
  if (!st) {
    fprintf (stderr, "aclone: %s\n", strerror (ENOMEM));
    return EXIT_FAILURE;
  }
  rc = EXIT_SUCCESS;
  for (int i = 0; i < n; i++) {
    struct aclone_error err = { 0 };
    if (load_status (paths[i], &st[i], &err) < 0) {
      fprintf (stderr, "aclone: %s\n", err.msg);
      rc = EXIT_FAILURE;
    }
  }

  if (n == 1) {
    if (st[0].state && json)
      json_print (status_json (&st[0]));
    else if (st[0].state)
      print_status (&st[0]);
  }
  else if (json) {
    /* null for a file not read: element i is always paths[i]'s. */
    struct json_object *a = json_object_new_array ();
    for (int i = 0; i < n; i++)
      json_object_array_add (a, st[i].state ? status_json (&st[i]) : NULL);
    json_print (a);
  }
  else
    status_table (paths, st, n);
  free (st);
  return rc;
}

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

/* How a clone waited for ended. */
enum wait_end { W_GOING, W_COMPLETE, W_FAILED, W_NO_SERVER, W_UNREADABLE };

struct waited {
  struct status s;              /* the last read; state NULL before one */
  enum wait_end end;
  bool told;                    /* its end was reported */
  struct aclone_error err;      /* W_UNREADABLE: why */
};

/* Before a line of its own on a terminal: end the progress bar's line
 * (the bar stays, as the progress at that moment).
 */
static void
bar_break (bool tty, bool *drawn)
{
  if (tty && *drawn) {
    printf ("\n");
    fflush (stdout);
  }
  *drawn = false;
}

/* Report how clone i ended, once.  A complete clone is named only among
 * several: alone, the last progress line says it.  Returns 1 if it did
 * not complete.
 */
static int
wait_tell (const char *path, struct waited *x, bool several, bool tty,
           bool *drawn)
{
  if (x->end == W_GOING || x->told)
    return 0;
  x->told = true;
  if (x->end == W_COMPLETE) {
    if (several) {
      char name[NAME_LEN];
      clone_name (path, name, sizeof name);
      sanitize_text (name);
      bar_break (tty, drawn);
      printf ("%s: complete\n", name);
      fflush (stdout);
    }
    return 0;
  }
  bar_break (tty, drawn);
  if (x->end == W_FAILED)
    fprintf (stderr, "aclone: %s: the clone failed: %s\n", path,
             x->s.last_error);
  else if (x->end == W_NO_SERVER)
    fprintf (stderr, "aclone: %s: no server is running, the clone is not "
             "complete\n", path);
  else
    fprintf (stderr, "aclone: %s\n", x->err.msg);
  return 1;
}

/* "wait META...": until every clone has ended, complete or not (failed,
 * no server, unreadable: each reported as it happens, and the others
 * still waited for), or the timeout passes.  Exit status 0 only if all
 * completed.
 */
static int
cmd_wait (int argc, char **argv)
{
  static const struct option opts[] = {
    { "timeout", required_argument, NULL, 't' }, { NULL, 0, NULL, 0 } };
  double timeout = -1;
  int c;

  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    unsigned seconds;
    if (c != 't')
      return usage (NULL);
    if (parse_number ("--timeout", optarg, 86400 * 365, &seconds) < 0)
      return EXIT_USAGE;
    timeout = seconds;
  }
  if (optind >= argc)
    return usage ("wait: expected one or more META files");

  char **paths = argv + optind;
  int n = argc - optind, failures = 0;
  bool several = n > 1, tty = isatty (STDOUT_FILENO), drawn = false;
  unsigned long long start = aclone_now_ns (), last_line = 0;
  struct waited *w = calloc ((size_t) n, sizeof *w);

  if (!w) {
    fprintf (stderr, "aclone: %s\n", strerror (ENOMEM));
    return EXIT_FAILURE;
  }
  for (;;) {
    /* t: every clone read, for the progress; going: those read in this
     * round, whose ETA is the one to show (one that ended before without
     * completing has none, and is no longer waited for).
     */
    struct totals t = { 0 }, going = { 0 };
    bool news = false, all_ended = true;

    for (int i = 0; i < n; i++) {
      struct waited *x = &w[i];
      if (x->end == W_GOING) {
        if (load_status (paths[i], &x->s, &x->err) < 0)
          x->end = W_UNREADABLE;
        else {
          totals_add (&going, &x->s);
          if (strcmp (x->s.state, "complete") == 0)
            x->end = W_COMPLETE;
          else if (strcmp (x->s.state, "failed") == 0)
            x->end = W_FAILED;
          else if (!x->s.in_use)
            x->end = W_NO_SERVER;
        }
        news |= x->end != W_GOING;
      }
      all_ended &= x->end != W_GOING;
      if (x->s.state)
        totals_add (&t, &x->s);
    }

    unsigned long long now = aclone_now_ns ();
    double elapsed = (now - start) / 1e9, percent = totals_percent (&t);
    char rate[32], eta[32], states[NAME_LEN];
    human (t.rate, rate, sizeof rate);
    eta_text (going.eta_unknown ? -1 : going.eta, eta, sizeof eta);
    totals_states (&t, states, sizeof states);
    if (!t.clones)
      ;                         /* nothing read: nothing to show */
    else if (tty) {
      int width = 30, fill = (int) (percent * width / 100);
      /* \033[K: the states may be shorter than the last time. */
      printf ("\r[%.*s%.*s] %5.1f%% %s/s ETA %s %s\033[K", fill,
              "##############################", width - fill,
              "..............................", percent, rate, eta, states);
      fflush (stdout);
      drawn = true;
    }
    else if (news || all_ended || last_line == 0 ||
             now - last_line >= 5000000000ull) {
      printf ("%.1f%% hydrated, %s/s, eta %s, %s\n", percent, rate, eta,
              states);
      fflush (stdout);
      last_line = now;
    }

    for (int i = 0; i < n; i++)
      failures += wait_tell (paths[i], &w[i], several, tty, &drawn);
    if (all_ended) {
      bar_break (tty, &drawn);
      free (w);
      return failures ? EXIT_FAILURE : EXIT_SUCCESS;
    }
    if (timeout >= 0 && elapsed >= timeout) {
      bar_break (tty, &drawn);
      for (int i = 0; i < n; i++)
        if (w[i].end == W_GOING)
          fprintf (stderr, "aclone: %s: timed out after %.0f s at %.1f%%, %s\n",
                   paths[i], timeout, w[i].s.percent, w[i].s.state);
      free (w);
      return EXIT_FAILURE;
    }
    /* The server publishes once a second; one clone is polled faster so
     * that its end shows at once, many slower to read fewer files.
     */
    usleep (several ? 1000000 : 200000);
  }
}

/* The metric families of "aclone metrics", in the order printed.  Names
 * and units follow Prometheus' conventions (base units, _total for
 * counters), and each value is the one "status --json" shows.
 */
enum metric {
  M_READABLE, M_INFO, M_SERVER, M_STATE, M_SIZE, M_REGION_SIZE, M_REGIONS,
  M_HYDRATED, M_COPIED, M_SKIPPED, M_ERRORS, M_IN_FLIGHT, M_RATE, M_ETA,
  M_UPDATED, M_WINDOW, M_LATENCY, NMETRICS
};

static const struct family {
  const char *name, *type, *help;
  const char *label;            /* a label beside volume, or NULL */
  size_t series;                /* series per clone */
} families[NMETRICS] = {
  [M_READABLE] = { "aclone_metadata_readable", "gauge",
    "1 if the metadata file could be read; 0: the volume has no other series",
    NULL, 1 },
  [M_INFO] = { "aclone_info", "gauge",
    "Always 1; source is the export the clone was created from", "source", 1 },
  [M_SERVER] = { "aclone_server_running", "gauge",
    "1 if a server holds the clone, else 0", NULL, 1 },
  [M_STATE] = { "aclone_state", "gauge",
    "1 for the clone's current state, 0 for the others", "state", NSTATES },
  [M_SIZE] = { "aclone_size_bytes", "gauge", "Size of the device", NULL, 1 },
  [M_REGION_SIZE] = { "aclone_region_size_bytes", "gauge",
    "Size of a region, the unit of hydration", NULL, 1 },
  [M_REGIONS] = { "aclone_regions", "gauge", "Regions of the device", NULL, 1 },
  [M_HYDRATED] = { "aclone_hydrated_regions", "gauge",
    "Regions hydrated (held by the destination)", NULL, 1 },
  [M_COPIED] = { "aclone_copied_bytes_total", "counter",
    "Bytes read from the source and written to the destination", NULL, 1 },
  [M_SKIPPED] = { "aclone_skipped_bytes_total", "counter",
    "Bytes hydrated without copying (zero on the source, trimmed, written whole)",
    NULL, 1 },
  [M_ERRORS] = { "aclone_errors_total", "counter",
    "Errors the server reported (the last one is in status's last_error)",
    NULL, 1 },
  [M_IN_FLIGHT] = { "aclone_in_flight_bytes", "gauge",
    "Bytes being copied now", NULL, 1 },
  [M_RATE] = { "aclone_hydration_rate_bytes_per_second", "gauge",
    "Recent copy rate; 0 without a server", NULL, 1 },
  [M_ETA] = { "aclone_eta_seconds", "gauge",
    "Seconds until hydration completes at the recent rate; no sample when unknown",
    NULL, 1 },
  [M_UPDATED] = { "aclone_last_update_timestamp_seconds", "gauge",
    "When a server last updated the clone's live page (unix time; 0: never)",
    NULL, 1 },
  [M_WINDOW] = { "aclone_hydration_window_bytes", "gauge",
    "Bytes hydration may have in flight (foreground-first controller); "
    "no sample without a server", NULL, 1 },
  [M_LATENCY] = { "aclone_source_latency_seconds", "gauge",
    "The source's latency for one batch read, its base and its current; "
    "no sample without a server", "kind", 2 },
};

/* The value of the series k of metric m for the clone s, as text in buf,
 * and in *label that series' value of the family's second label.  False
 * when the clone has no such sample: no ETA when it is unknown, no window
 * or latency without a server ("status --json" then has no "foreground").
 */
static bool
metric_sample (enum metric m, size_t k, const struct status *s,
               const char **label, char *buf, size_t len)
{
  static const char *const kinds[] = { "base", "current" };
  uint64_t v;

  *label = NULL;
  switch (m) {
  case M_READABLE: v = 1; break;
  case M_INFO: *label = s->hdr.source; v = 1; break;
  case M_SERVER: v = s->in_use; break;
  case M_STATE:
    *label = state_names[k];
    v = strcmp (s->state, state_names[k]) == 0;
    break;
  case M_SIZE: v = s->hdr.size; break;
  case M_REGION_SIZE: v = s->hdr.region_size; break;
  case M_REGIONS: v = s->hdr.regions; break;
  case M_HYDRATED: v = s->hydrated; break;
  case M_COPIED: v = s->bytes_copied; break;
  case M_SKIPPED: v = s->bytes_skipped; break;
  case M_ERRORS: v = s->errors; break;
  case M_IN_FLIGHT: v = s->in_flight; break;
  case M_RATE: v = s->rate; break;
  case M_ETA:
    if (s->eta < 0)
      return false;
    v = (uint64_t) s->eta;
    break;
  case M_UPDATED:
    snprintf (buf, len, "%.3f", s->updated);   /* as in "updated" */
    return true;
  case M_WINDOW:
    if (!s->in_use)
      return false;
    v = s->window;
    break;
  case M_LATENCY:
    if (!s->in_use)
      return false;
    *label = kinds[k];
    v = k ? s->cur_ns : s->base_ns;
    /* Seconds from nanoseconds in decimal: exact, no rounding; no
     * trailing zeros ("0.0015", "0").
     */
    snprintf (buf, len, "%llu.%09llu", (unsigned long long) (v / 1000000000),
              (unsigned long long) (v % 1000000000));
    for (size_t e = strlen (buf); buf[e - 1] == '0' || buf[e - 1] == '.'; e--) {
      bool dot = buf[e - 1] == '.';
      buf[e - 1] = '\0';
      if (dot)
        break;
    }
    return true;
  default:
    return false;
  }
  snprintf (buf, len, "%llu", (unsigned long long) v);
  return true;
}

/* s as a label value of the text format, in buf (2 * strlen (s) + 1
 * bytes at least, or it is cut): backslash, double quote and line feed
 * escaped (the format's only escapes), then, by sanitize_text, every
 * other control character and what is not well-formed UTF-8 (which
 * Prometheus requires) made '?'.
 */
static void
label_escape (const char *s, char *buf, size_t len)
{
  size_t o = 0;

  for (; *s && o + 2 < len; s++) {
    if (*s == '\\' || *s == '"' || *s == '\n') {
      buf[o++] = '\\';
      buf[o++] = *s == '\n' ? 'n' : *s;
    }
    else
      buf[o++] = *s;
  }
  buf[o] = '\0';
  sanitize_text (buf);
}

/* A clone in the exposition. */
struct exposed {
  struct status s;              /* readable: the clone's status */
  bool readable, left_out;      /* left_out: its volume label is taken */
  char label[2 * NAME_LEN];     /* volume="...", escaped */
};

/* Write the exposition of e[0..n) to f.  A family's samples are all
 * together, as the format requires, after its HELP and TYPE lines, once
 * (none for a family without a sample).
 */
static void
metrics_write (FILE *f, const struct exposed *e, int n)
{
  for (int m = 0; m < NMETRICS; m++) {
    const struct family *fam = &families[m];
    bool head = false;
    for (int i = 0; i < n; i++) {
      if (e[i].left_out || (!e[i].readable && m != M_READABLE))
        continue;
      for (size_t k = 0; k < fam->series; k++) {
        const char *label = NULL;
        char value[64], esc[2 * ACLONE_SOURCE_DESC_LEN];
        if (!e[i].readable)
          strlcpy (value, "0", sizeof value);
        else if (!metric_sample ((enum metric) m, k, &e[i].s, &label, value,
                                 sizeof value))
          continue;
        if (!head)
          fprintf (f, "# HELP %s %s\n# TYPE %s %s\n", fam->name, fam->help,
                   fam->name, fam->type);
        head = true;
        fprintf (f, "%s{volume=\"%s\"", fam->name, e[i].label);
        if (label) {
          label_escape (label, esc, sizeof esc);
          fprintf (f, ",%s=\"%s\"", fam->label, esc);
        }
        fprintf (f, "} %s\n", value);
      }
    }
  }
}

/* Replace path with the len bytes at text so that no reader ever sees a
 * part: node_exporter's textfile collector reads the directory at any
 * moment.  They go to PATH.tmp-PID beside it (the same file system, so
 * the rename is atomic; the collector reads only *.prom files, so it
 * skips this one), which is fsync'd before it is renamed over path.  The
 * directory is not synced: the next run (the timer's, 15 s later) writes
 * the file again.  Returns 0, or -1 after reporting, without the
 * temporary file.
 */
static int
write_replace (const char *path, const char *text, size_t len)
{
  char *tmp;
  int fd;
  size_t done = 0;

  if (asprintf (&tmp, "%s.tmp-%ld", path, (long) getpid ()) < 0) {
    fprintf (stderr, "aclone: %s: %s\n", path, strerror (ENOMEM));
    return -1;
  }
  /* 0644 less the umask: node_exporter reads it as another user.
   * O_NOFOLLOW: never write through a link planted under this name.
   */
  fd = open (tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) {
    fprintf (stderr, "aclone: %s: %s\n", tmp, strerror (errno));
    free (tmp);
    return -1;
  }
  while (done < len) {
    ssize_t r = write (fd, text + done, len - done);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0)
      goto fail;
    done += (size_t) r;
  }
  if (fsync (fd) < 0)
    goto fail;
  if (close (fd) < 0) {
    fd = -1;
    goto fail;
  }
  fd = -1;
  if (rename (tmp, path) < 0) {
    fprintf (stderr, "aclone: %s: cannot rename %s over it: %s\n", path, tmp,
             strerror (errno));
    unlink (tmp);
    free (tmp);
    return -1;
  }
  free (tmp);
  return 0;

 fail:
  fprintf (stderr, "aclone: %s: %s\n", tmp, strerror (errno));
  if (fd >= 0)
    close (fd);
  unlink (tmp);
  free (tmp);
  return -1;
}

/* "metrics [--output FILE] [META...]": the Prometheus text exposition
 * format (0.0.4) of every clone, on stdout or replacing FILE.  A META
 * that cannot be read, or whose name another took, is reported and
 * shows as aclone_metadata_readable 0 (a taken name: not at all); the
 * others are written all the same, and the exit status is then 1.
 * No META is not an error: an empty exposition clears the collector's
 * view once the last clone is gone.
 */
static int
cmd_metrics (int argc, char **argv)
{
  static const struct option opts[] = {
    { "output", required_argument, NULL, 'o' }, { NULL, 0, NULL, 0 } };
  const char *output = NULL;
  int c, rc = EXIT_SUCCESS;

  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    if (c != 'o')
      return usage (NULL);
    output = optarg;
  }
  char **paths = argv + optind;
  int n = argc - optind;
  struct exposed *e = calloc ((size_t) MAX (n, 1), sizeof *e);
  char *text = NULL;
  size_t len = 0;
  FILE *f = open_memstream (&text, &len);

  if (!e || !f) {
    fprintf (stderr, "aclone: %s\n", strerror (ENOMEM));
    free (e);
    if (f)
      fclose (f);
    free (text);
    return EXIT_FAILURE;
  }
  for (int i = 0; i < n; i++) {
    char name[NAME_LEN];
    struct aclone_error err = { 0 };
    clone_name (paths[i], name, sizeof name);
    label_escape (name, e[i].label, sizeof e[i].label);
    /* Two series alike make the collector reject the whole file. */
    for (int j = 0; j < i && !e[i].left_out; j++)
      if (!e[j].left_out && strcmp (e[j].label, e[i].label) == 0) {
        fprintf (stderr, "aclone: %s: left out: %s has the same volume "
                 "name\n", paths[i], paths[j]);
        e[i].left_out = true;
        rc = EXIT_FAILURE;
      }
    if (e[i].left_out)
      continue;
    if (load_status (paths[i], &e[i].s, &err) < 0) {
      fprintf (stderr, "aclone: %s\n", err.msg);
      rc = EXIT_FAILURE;
    }
    else
      e[i].readable = true;
  }
  metrics_write (f, e, n);
  free (e);
  if (fclose (f) != 0) {
    fprintf (stderr, "aclone: %s\n", strerror (ENOMEM));
    free (text);
    return EXIT_FAILURE;
  }
  if (output) {
    if (write_replace (output, text, len) < 0)
      rc = EXIT_FAILURE;
  }
  else if (fwrite (text, 1, len, stdout) != len || fflush (stdout) != 0) {
    fprintf (stderr, "aclone: stdout: %s\n", strerror (errno));
    rc = EXIT_FAILURE;
  }
  free (text);
  return rc;
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

static int
cmd_attach (int argc, char **argv)
{
  static const struct option opts[] = {
    { "device", required_argument, NULL, 'd' },
    { "timeout", required_argument, NULL, 't' },
    { "reconnect", required_argument, NULL, 'r' },
    { NULL, 0, NULL, 0 } };
  struct aclone_attach_config cfg = { .index = -1, .timeout_s = 60,
                                      .reconnect_s = 120 };
  struct aclone_error err = { 0 };
  int c;

  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    switch (c) {
    case 'd':
      if (sscanf (optarg, "/dev/nbd%d", &cfg.index) != 1 || cfg.index < 0)
        return usage ("attach: --device takes /dev/nbdN");
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
  if (optind != argc - 1)
    return usage ("attach: expected one NBD URI");
  cfg.uri = argv[optind];
  if (aclone_attach (&cfg, &err) < 0) {
    fprintf (stderr, "aclone: %s\n", err.msg);
    return EXIT_FAILURE;
  }
  return EXIT_SUCCESS;
}

static int
cmd_verify (int argc, char **argv)
{
  static const struct option opts[] = {
    { "json", no_argument, NULL, 'j' },
    { "source", required_argument, NULL, 's' },
    { "dest", required_argument, NULL, 'd' },
    { "tls-certificates", required_argument, NULL, 'c' },
    { "tls-psk", required_argument, NULL, 'p' },
    { "no-tls-verify", no_argument, NULL, 'n' },
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
    case 'c': scfg.tls_certificates = optarg; break;
    case 'p': scfg.tls_psk_file = optarg; break;
    case 'n': scfg.tls_no_verify = true; break;
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
  if (json) {
    struct json_object *o = json_object_new_object ();
    struct json_object *bad = json_object_new_array ();
    json_add_u64 (o, "regions", m->hdr.regions);
    json_add_u64 (o, "compared", v.compared);
    json_add_u64 (o, "mismatched", v.mismatched);
    json_add_u64 (o, "written", v.written);
    json_add_u64 (o, "unhydrated", v.unhydrated);
    for (size_t i = 0; i < v.nbad; i++) {
      struct json_object *r = json_object_new_object ();
      json_add_u64 (r, "offset", v.bad_off[i]);
      json_add_u64 (r, "length", v.bad_len[i]);
      json_object_array_add (bad, r);
    }
    json_object_object_add (o, "mismatches", bad);
    json_print (o);
  }
  else {
    printf ("compared:      %llu regions (copied, never written)\n",
            (unsigned long long) v.compared);
    printf ("mismatched:    %llu regions\n", (unsigned long long) v.mismatched);
    for (size_t i = 0; i < v.nbad; i++)
      printf ("  differs:     offset %llu length %llu\n",
              (unsigned long long) v.bad_off[i], (unsigned long long) v.bad_len[i]);
    printf ("written:       %llu regions (not compared)\n",
            (unsigned long long) v.written);
    printf ("unhydrated:    %llu regions (not compared)\n",
            (unsigned long long) v.unhydrated);
  }
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
