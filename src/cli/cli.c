/* aclone: the command line tool.  Reads a clone's metadata file, and
 * steers its server through the live page's control fields.
 *
 *   aclone status [--json] META
 *   aclone inspect [--map] META
 *   aclone wait [--timeout S] META
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
  "  status [--json] META        progress, rate, state, errors\n"
  "  inspect [--map] META        header fields and validity; --map lists\n"
  "                              the ranges not yet hydrated\n"
  "  wait [--timeout S] META     block until the clone is complete\n"
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

/* Parse "CMD [--FLAG] META": sets *flag and *meta, or returns the usage
 * exit status (non-zero) after reporting.
 */
static int
flag_and_meta (int argc, char **argv, const char *flag_name, bool *flag,
               const char **meta)
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
  if (optind != argc - 1) {
    snprintf (msg, sizeof msg, "%s: expected one META file", argv[0]);
    return usage (msg);
  }
  *meta = argv[optind];
  return 0;
}

static int
cmd_status (int argc, char **argv)
{
  const char *path;
  bool json;
  int rc = flag_and_meta (argc, argv, "json", &json, &path);
  if (rc)
    return rc;

  struct aclone_meta *m;
  struct status s;
  if (open_meta (path, ACLONE_META_READ, &m) < 0)
    return EXIT_FAILURE;
  read_status (path, m, &s);
  aclone_meta_close (m);

  if (json) {
    struct json_object *o = json_object_new_object ();
    json_add_u64 (o, "size", s.hdr.size);
    json_add_u64 (o, "block_size", s.hdr.region_size);
    json_add_u64 (o, "regions", s.hdr.regions);
    json_add_u64 (o, "hydrated", s.hydrated);
    json_add_double (o, "percent", s.percent, "%.2f");
    json_add_u64 (o, "bytes_copied", s.bytes_copied);
    json_add_u64 (o, "bytes_skipped", s.bytes_skipped);
    json_add_u64 (o, "in_flight", s.in_flight);
    json_object_object_add (o, "state", json_object_new_string (s.state));
    json_object_object_add (o, "pid", json_object_new_int64 (s.pid));
    json_add_u64 (o, "rate", s.rate);
    json_object_object_add (o, "eta_seconds", json_object_new_int64 (s.eta));
    json_add_double (o, "updated", s.updated, "%.3f");
    json_add_u64 (o, "errors", s.errors);
    json_object_object_add (o, "last_error", json_object_new_string (s.last_error));
    json_object_object_add (o, "source", json_object_new_string (s.hdr.source));
    if (s.in_use) {
      struct json_object *f = json_object_new_object ();
      json_add_u64 (f, "window", s.window);
      json_add_double (f, "base_latency_ms", s.base_ns / 1e6, "%.3f");
      json_add_double (f, "latency_ms", s.cur_ns / 1e6, "%.3f");
      json_object_object_add (f, "limited_by", json_object_new_string (s.why));
      json_add_u64 (f, "client_cuts", s.client_cuts);
      json_object_object_add (f, "idle_priority", json_object_new_boolean (s.idle));
      json_add_u64 (f, "floor", s.floor);
      json_add_u64 (f, "cor_behind", s.cor_behind);
      json_add_u64 (f, "cor_pending", s.cor_pending);
      json_object_object_add (o, "foreground", f);
    }
    json_print (o);
    return EXIT_SUCCESS;
  }

  char b1[32], b2[32], b3[32], b4[32];
  printf ("source:        %s\n", s.hdr.source);
  printf ("size:          %llu (%s)\n", (unsigned long long) s.hdr.size,
          human (s.hdr.size, b1, sizeof b1));
  printf ("block size:    %u\n", s.hdr.region_size);
  printf ("regions:       %llu\n", (unsigned long long) s.hdr.regions);
  printf ("hydrated:      %llu (%.1f%%)\n", (unsigned long long) s.hydrated,
          s.percent);
  printf ("bytes copied:  %llu (%s)\n", (unsigned long long) s.bytes_copied,
          human (s.bytes_copied, b2, sizeof b2));
  printf ("bytes skipped: %llu (%s)\n", (unsigned long long) s.bytes_skipped,
          human (s.bytes_skipped, b3, sizeof b3));
  printf ("state:         %s\n", s.state);
  if (s.pid)
    printf ("pid:           %lld\n", (long long) s.pid);
  if (s.in_use) {
    printf ("rate:          %s/s\n", human (s.rate, b4, sizeof b4));
    if (s.eta >= 0)
      printf ("eta:           %lld s\n", (long long) s.eta);
    else
      printf ("eta:           unknown\n");
    if (s.window) {
      char b5[32];
      printf ("window:        %s in flight, limited by %s\n",
              human (s.window, b5, sizeof b5), s.why);
      printf ("source delay:  %.1f ms now, %.1f ms base\n", s.cur_ns / 1e6,
              s.base_ns / 1e6);
    }
  }
  printf ("errors:        %llu\n", (unsigned long long) s.errors);
  if (s.last_error[0])
    printf ("last error:    %s\n", s.last_error);
  return EXIT_SUCCESS;
}

static int
cmd_inspect (int argc, char **argv)
{
  const char *path;
  bool map;
  int rc = flag_and_meta (argc, argv, "map", &map, &path);
  if (rc)
    return rc;

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
  if (optind != argc - 1)
    return usage ("wait: expected one META file");

  const char *path = argv[optind];
  bool tty = isatty (STDOUT_FILENO);
  unsigned long long start = aclone_now_ns (), last_line = 0;

  for (;;) {
    struct aclone_meta *m;
    struct status s;
    if (open_meta (path, ACLONE_META_READ, &m) < 0)
      return EXIT_FAILURE;
    read_status (path, m, &s);
    aclone_meta_close (m);

    unsigned long long now = aclone_now_ns ();
    double elapsed = (now - start) / 1e9;
    bool done = strcmp (s.state, "complete") == 0;
    char rate[32], eta[32];
    human (s.rate, rate, sizeof rate);
    if (s.eta >= 0)
      snprintf (eta, sizeof eta, "%lld:%02lld", (long long) s.eta / 60,
                (long long) s.eta % 60);
    else
      snprintf (eta, sizeof eta, "?");
    if (tty) {
      int width = 30, fill = (int) (s.percent * width / 100);
      printf ("\r[%.*s%.*s] %5.1f%% %s/s ETA %s %s   ", fill,
              "##############################", width - fill,
              "..............................", s.percent, rate, eta, s.state);
      if (done)
        printf ("\n");
      fflush (stdout);
    }
    else if (done || last_line == 0 || now - last_line >= 5000000000ull) {
      printf ("%.1f%% hydrated, %s/s, eta %s, %s\n", s.percent, rate, eta, s.state);
      fflush (stdout);
      last_line = now;
    }
    if (done)
      return EXIT_SUCCESS;
    if (strcmp (s.state, "failed") == 0) {
      if (tty)
        printf ("\n");
      fprintf (stderr, "aclone: %s: the clone failed: %s\n", path, s.last_error);
      return EXIT_FAILURE;
    }
    if (!s.in_use) {
      if (tty)
        printf ("\n");
      fprintf (stderr, "aclone: %s: no server is running, the clone is not "
               "complete\n", path);
      return EXIT_FAILURE;
    }
    if (timeout >= 0 && elapsed >= timeout) {
      if (tty)
        printf ("\n");
      fprintf (stderr, "aclone: %s: timed out after %.0f s at %.1f%%\n", path,
               timeout, s.percent);
      return EXIT_FAILURE;
    }
    usleep (200000);
  }
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
