/* aclone: the command line tool's internal header.  The tool is cut by
 * concern: cli.c parses the commands' arguments and runs them (main);
 * status.c reads a clone's state from its metadata file and presents it
 * (one clone, a table of several, their totals); wait.c is "aclone wait",
 * metrics.c "aclone metrics".  What more than one of them uses is here;
 * nothing else is: the rest stays static in its file.  None of it leaves
 * the executable, so the names need no aclone_ prefix.
 */
#ifndef ACLONE_CLI_H
#define ACLONE_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "aclone/meta.h"

struct json_object;

/* Exit status of a usage error (0: success, 1: runtime error). */
#define EXIT_USAGE 2

/* cli.c: arguments. */

/* Report a usage error: msg (if not NULL) and a pointer to --help, on
 * stderr.  Returns EXIT_USAGE, the command's exit status.
 */
int usage (const char *msg);

/* The CLI's one parser of whole numbers (libbsd's strtonum): 0 to max,
 * in *out.  Returns 0, or -1 after reporting a bad value itself, naming
 * what it is for.
 */
int parse_number (const char *what, const char *s, unsigned max,
                  unsigned *out);

/* status.c: a clone's state, read from its metadata file. */

/* A snapshot of everything status-like, from the file and live page. */
struct status {
  struct aclone_meta_header hdr;
  bool in_use;
  uint64_t hydrated;
  uint64_t bytes_copied, bytes_skipped, in_flight, errors, rate;
  uint64_t bytes_cor;           /* of bytes_copied, copied on read */
  int64_t pid;
  double updated;              /* unix time of the live page's last update */
  const char *state;
  char last_error[256];
  double percent;
  int64_t eta;                 /* seconds, -1 unknown */
  /* The foreground-first controller, while a server hydrates. */
  uint64_t window, base_ns, cur_ns, client_cuts, cor_behind, cor_pending;
  uint64_t cor_rests;
  uint64_t lock_boosts;
  uint64_t floor;
  uint64_t pace, pace_probes, pace_cuts, svc_quiet_ns, svc_copy_ns;
  const char *why;
  bool idle;
};

/* Text from the metadata file is not trusted: control characters and
 * bytes that are not valid UTF-8 become '?', in place, so that output
 * (and JSON) stays well-formed whatever the file holds.
 */
void sanitize_text (char *s);

/* Open the metadata file path (aclone_meta_open) into *m.  Returns 0, or
 * -1 after reporting why not.
 */
int open_meta (const char *path, enum aclone_meta_mode mode,
               struct aclone_meta **m);

/* Read path's status into *s (open, read, close).  Returns 0, or -1 with
 * err naming the file and *s as it was: the caller reports it, once,
 * where its output allows (wait ends its progress bar first).
 */
int load_status (const char *path, struct status *s,
                 struct aclone_error *err);

/* "status [--json] META...": the clones at paths[0..n) read, then shown:
 * one alone field by field (or as a JSON object), several in a table
 * with their total (or as a JSON array).  One that cannot be read is
 * reported and left out.  Returns the exit status.
 */
int show_status (char **paths, int n, bool json);

/* status.c: its presentations, which wait and metrics share. */

/* Longest clone name kept, with its NUL (a file name's limit). */
#define NAME_LEN 256

/* A clone's name: the META file's basename without a trailing ".meta"
 * (the systemd units call it VOLUME.meta), in buf.  The bytes are the
 * argument's: callers sanitize or escape them for their output.
 */
void clone_name (const char *path, char *buf, size_t len);

/* The states read_status sets, from the worst to the best: totals count
 * them in this order, trouble first, and the metric aclone_state has one
 * series per name.
 */
extern const char *const state_names[];
#define NSTATES 7               /* the names in state_names */

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

/* Add the clone s (read: s->state set) to t. */
void totals_add (struct totals *t, const struct status *s);

/* Percent hydrated; for one clone exactly its status's percent. */
double totals_percent (const struct totals *t);

/* The states of t in buf: one clone's state as it is, several counted
 * the worst first ("1 paused, 2 hydrating, 3 complete").
 */
const char *totals_states (const struct totals *t, char *buf, size_t len);

/* v bytes for people, with at most three digits: "512 B", "1.5 KiB",
 * "16 MiB", "15 TiB" (libbsd; one decimal below 10).  Returns buf.
 */
const char *human (uint64_t v, char *buf, size_t len);

/* An ETA for people: "m:ss", "h:mm:ss" from an hour on, "?" unknown
 * (eta < 0).  Returns buf.
 */
const char *eta_text (int64_t eta, char *buf, size_t len);

/* Print a JSON object (json-c) on one line and free it.  Strings in it
 * come from the metadata file, which the CLI does not trust: they were
 * reduced to well-formed UTF-8 (sanitize_text) before they got here.
 */
void json_print (struct json_object *o);

/* Add key: v to the JSON object o. */
void json_add_u64 (struct json_object *o, const char *key, uint64_t v);

/* wait.c */

/* "wait [--timeout S] META...": the arguments after "wait" (argv[0] is
 * "wait"); returns the exit status.
 */
int cmd_wait (int argc, char **argv);

/* metrics.c */

/* "metrics [--output FILE] [META...]": the arguments after "metrics"
 * (argv[0] is "metrics"); returns the exit status.
 */
int cmd_metrics (int argc, char **argv);

#endif /* ACLONE_CLI_H */
