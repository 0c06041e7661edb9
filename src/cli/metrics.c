/* aclone metrics: the clones' status in the Prometheus text exposition
 * format (0.0.4), for node_exporter's textfile collector.  Each value is
 * one that "status --json" shows (load_status), as a metric family of
 * its own; the exposition is built in memory, then printed or written
 * over its file at once (write_replace), so that the collector never
 * reads half of one.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/param.h>
#include <unistd.h>

#include <bsd/string.h>

#include "aclone/meta.h"
#include "cli.h"

/* The metric families of "aclone metrics", in the order printed.  Names
 * and units follow Prometheus' conventions (base units, _total for
 * counters), and each value is the one "status --json" shows.
 */
enum metric {
  M_READABLE, M_INFO, M_SERVER, M_STATE, M_SIZE, M_REGION_SIZE, M_REGIONS,
  M_HYDRATED, M_COPIED, M_COPIED_ON_READ, M_SKIPPED, M_ERRORS, M_IN_FLIGHT,
  M_RATE, M_ETA, M_UPDATED, M_WINDOW, M_LATENCY, NMETRICS
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
  [M_COPIED_ON_READ] = { "aclone_copied_on_read_bytes_total", "counter",
    "Of the bytes copied, those copied for clients' reads (copy-on-read)",
    NULL, 1 },
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
  case M_COPIED_ON_READ: v = s->bytes_cor; break;
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
int
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
