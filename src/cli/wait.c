/* aclone wait: block until every clone named has ended.  It polls each
 * META file's status (load_status) until the clone is complete, or will
 * not be (failed, no server, unreadable), and shows the progress of all
 * together (struct totals): a bar redrawn in place on a terminal, else a
 * line now and then, for logs.  How each clone ended is told once, as it
 * happens, between the progress lines.
 */
#include <errno.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "aclone/clock.h"
#include "aclone/meta.h"
#include "cli.h"

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

/* One round: read every clone still waited for and note which ended.
 * t gets the totals of every clone read so far; going: those read
 * in this round, whose ETA is the one to show (one that ended before
 * without completing has none, and is no longer waited for).  *news:
 * some clone ended in this round.  Returns whether all have ended.
 */
static bool
wait_round (char **paths, struct waited *w, int n, struct totals *t,
            struct totals *going, bool *news)
{
  bool all_ended = true;

  for (int i = 0; i < n; i++) {
    struct waited *x = &w[i];
    if (x->end == W_GOING) {
      if (load_status (paths[i], &x->s, &x->err) < 0)
        x->end = W_UNREADABLE;
      else {
        totals_add (going, &x->s);
        if (strcmp (x->s.state, "complete") == 0)
          x->end = W_COMPLETE;
        else if (strcmp (x->s.state, "failed") == 0)
          x->end = W_FAILED;
        else if (!x->s.in_use)
          x->end = W_NO_SERVER;
      }
      *news |= x->end != W_GOING;
    }
    all_ended &= x->end != W_GOING;
    if (x->s.state)
      totals_add (t, &x->s);
  }
  return all_ended;
}

/* Show the progress: a bar redrawn in place on a terminal; else a line
 * when something changed (force), at first, and every 5 s.
 */
static void
wait_progress (const struct totals *t, const struct totals *going, bool tty,
               bool force, unsigned long long now, bool *drawn,
               unsigned long long *last_line)
{
  double percent = totals_percent (t);
  char rate[32], eta[32], states[NAME_LEN];

  if (!t->clones)
    return;                     /* nothing read: nothing to show */
  human (t->rate, rate, sizeof rate);
  eta_text (going->eta_unknown ? -1 : going->eta, eta, sizeof eta);
  totals_states (t, states, sizeof states);
  if (tty) {
    int width = 30, fill = (int) (percent * width / 100);
    /* \033[K: the states may be shorter than the last time. */
    printf ("\r[%.*s%.*s] %5.1f%% %s/s ETA %s %s\033[K", fill,
            "##############################", width - fill,
            "..............................", percent, rate, eta, states);
    fflush (stdout);
    *drawn = true;
  }
  else if (force || *last_line == 0 || now - *last_line >= 5000000000ull) {
    printf ("%.1f%% hydrated, %s/s, eta %s, %s\n", percent, rate, eta,
            states);
    fflush (stdout);
    *last_line = now;
  }
}

/* "wait META...": until every clone has ended, complete or not (failed,
 * no server, unreadable: each reported as it happens, and the others
 * still waited for), or the timeout passes.  Exit status 0 only if all
 * completed.
 */
int
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
    struct totals t = { 0 }, going = { 0 };
    bool news = false;
    bool all_ended = wait_round (paths, w, n, &t, &going, &news);
    unsigned long long now = aclone_now_ns ();
    double elapsed = (now - start) / 1e9;

    wait_progress (&t, &going, tty, news || all_ended, now, &drawn,
                   &last_line);

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
