/* aclone: a clone's status, for the command line tool.  One place reads
 * it from the clone's metadata file and live page (struct status: the
 * file's committed bitmap, and what a running server publishes), and one
 * place presents it: "status" shows one clone field by field or in JSON,
 * several in a table with their total; wait's progress line and the
 * metrics use the same pieces (totals, sizes and ETAs for people, clone
 * names), so that all show the same numbers.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/param.h>

#include <bsd/libutil.h>
#include <bsd/string.h>
#include <json-c/json.h>

#include "aclone/meta.h"
#include "cli.h"

void
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

/* A field of the live page, which a running server writes as it goes. */
static uint64_t
live_u64 (const uint64_t *p)
{
  return __atomic_load_n (p, __ATOMIC_RELAXED);
}

/* Everything status-like of the open clone m at path, in *s.  Its
 * strings are sanitized: they are shown as they are.
 */
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
      s->lock_boosts = live_u64 (&l->fg_lock_boosts);
      s->idle = live_u64 (&l->fg_idle) != 0;
      s->cor_behind = live_u64 (&l->cor_behind);
      s->cor_pending = live_u64 (&l->cor_pending);
      s->cor_rests = live_u64 (&l->cor_rests);
      s->floor = live_u64 (&l->ctl_floor);
      s->pace = live_u64 (&l->fg_pace);
      s->pace_probes = live_u64 (&l->fg_pace_probes);
      s->pace_cuts = live_u64 (&l->fg_pace_cuts);
      s->svc_quiet_ns = live_u64 (&l->fg_svc_quiet_ns);
      s->svc_copy_ns = live_u64 (&l->fg_svc_copy_ns);
    }
    s->updated = live_u64 (&l->heartbeat_ns) / 1e9;
    s->bytes_copied = live_u64 (&l->bytes_copied);
    s->bytes_cor = live_u64 (&l->bytes_cor);
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

int
open_meta (const char *path, enum aclone_meta_mode mode, struct aclone_meta **m)
{
  struct aclone_error err = { 0 };
  if (aclone_meta_open (path, mode, m, &err) < 0) {
    fprintf (stderr, "aclone: %s\n", err.msg);
    return -1;
  }
  return 0;
}

int
load_status (const char *path, struct status *s, struct aclone_error *err)
{
  struct aclone_meta *m;

  if (aclone_meta_open (path, ACLONE_META_READ, &m, err) < 0)
    return -1;
  read_status (path, m, s);
  aclone_meta_close (m);
  return 0;
}

/* The presentations: what "status" shows, and the pieces of it that wait
 * and metrics show too.
 */

const char *
human (uint64_t v, char *buf, size_t len)
{
  /* The width decides the scale: three digits, a space, "Mi", "B". */
  if (humanize_number (buf, MIN (len, 8), (int64_t) MIN (v, (uint64_t) INT64_MAX), "B",
                       HN_AUTOSCALE, HN_DECIMAL | HN_IEC_PREFIXES) < 0)
    snprintf (buf, len, "%llu B", (unsigned long long) v);
  return buf;
}

void
json_print (struct json_object *o)
{
  puts (json_object_to_json_string_ext (o, JSON_C_TO_STRING_SPACED |
                                            JSON_C_TO_STRING_NOSLASHESCAPE));
  json_object_put (o);
}

void
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
  json_add_u64 (o, "bytes_copied_on_read", s->bytes_cor);
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
    json_add_u64 (f, "lock_boosts", s->lock_boosts);
    json_object_object_add (f, "idle_priority", json_object_new_boolean (s->idle));
    json_add_u64 (f, "floor", s->floor);
    json_add_u64 (f, "cor_behind", s->cor_behind);
    json_add_u64 (f, "cor_pending", s->cor_pending);
    json_add_u64 (f, "cor_rests", s->cor_rests);
    json_add_u64 (f, "pace", s->pace);
    json_add_u64 (f, "pace_probes", s->pace_probes);
    json_add_u64 (f, "pace_cuts", s->pace_cuts);
    json_add_double (f, "client_read_quiet_ms", s->svc_quiet_ns / 1e6, "%.4f");
    json_add_double (f, "client_read_copying_ms", s->svc_copy_ns / 1e6, "%.4f");
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
  if (s->bytes_cor) {
    char b5[32];
    printf ("  on read:     %llu (%s)\n", (unsigned long long) s->bytes_cor,
            human (s->bytes_cor, b5, sizeof b5));
  }
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
    if (s->pace_probes) {
      char b6[32];
      if (s->pace)
        printf ("pace:          %s/s while clients are served\n",
                human (s->pace, b6, sizeof b6));
      printf ("client reads:  %.3f ms copying, %.3f ms quiet (median; "
              "%llu probes, %llu cuts)\n", s->svc_copy_ns / 1e6,
              s->svc_quiet_ns / 1e6, (unsigned long long) s->pace_probes,
              (unsigned long long) s->pace_cuts);
    }
  }
  printf ("errors:        %llu\n", (unsigned long long) s->errors);
  if (s->last_error[0])
    printf ("last error:    %s\n", s->last_error);
}

void
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

const char *const state_names[] = {
  "failed", "error", "waiting", "stopped", "paused", "hydrating", "complete",
};
_Static_assert (sizeof state_names / sizeof state_names[0] == NSTATES,
                "NSTATES counts state_names");

/* Where state (one of state_names) stands in state_names. */
static size_t
state_index (const char *state)
{
  for (size_t i = 0; i < NSTATES; i++)
    if (strcmp (state, state_names[i]) == 0)
      return i;
  abort ();                     /* read_status set a state not listed */
}

void
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

double
totals_percent (const struct totals *t)
{
  return t->bytes ? 100.0 * t->hydrated_bytes / t->bytes : 100.0;
}

const char *
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

const char *
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

/* Row r: a clone, or the total, as its columns show it (no rate: "-"). */
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

int
show_status (char **paths, int n, bool json)
{
  /* All are read first; one that cannot be is reported and left out,
   * and the others are still shown.  calloc: state NULL until read.
   */
  struct status *st = calloc ((size_t) n, sizeof *st);
  if (!st) {
    fprintf (stderr, "aclone: %s\n", strerror (ENOMEM));
    return EXIT_FAILURE;
  }
  int rc = EXIT_SUCCESS;
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
