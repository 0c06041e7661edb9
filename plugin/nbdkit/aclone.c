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
 *                              (invariant 6 of aclone-design(7)), and the stop
 *                              watcher
 *   cleanup                    stop threads, final commit, unlock
 *
 * Graceful stop.  nbdkit (1.32, and later versions too) answers SIGTERM
 * by waiting for every client to disconnect before it calls .cleanup;
 * an attached kernel client never does, so the clone would stay locked
 * until SIGKILL.  So we chain a handler onto nbdkit's for the signals it
 * quits on; it wakes the stop watcher thread, which:
 *   1. shuts down the read side of every accepted client socket, so that
 *      nbdkit reads EOF, answers the requests it already has, and closes
 *      the connection (the client sees the server go away, as at a
 *      restart; `aclone attach` and qemu with reconnect-delay reconnect);
 *   2. waits up to STOP_CLIENTS_MS for the connections to close;
 *   3. stops the hydrator (source reads in flight get up to 1 s);
 *   4. aclone_clone_shutdown: gate closed, final commit, lock released.
 * Only the read side is shut down: a reply nbdkit is still writing goes
 * out whole, and nbdkit 1.32 aborts if a reply write fails while another
 * thread has one queued.
 */
#define NBDKIT_API_VERSION 2
#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdbool.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <netinet/in.h>

#include <nbdkit-plugin.h>

#include "aclone/clone.h"
#include "aclone/clock.h"
#include "aclone/hydrator.h"
#include "aclone/size.h"
#include "aclone/source.h"
#include "config.h"

/* Parameters ------------------------------------------------------ */

static char *source_uri;
static char *dest_path;
static char *meta_path;
static uint64_t block_size;
static bool copy_on_read = true;
static unsigned source_connections;     /* 0: the defaults below */
static unsigned source_timeout = 30;
static char *tls_certificates;
static char *tls_psk_file;
static bool tls_verify = true;
static bool hydrate = true;
static struct aclone_hydrator_config hcfg = ACLONE_HYDRATOR_DEFAULTS;

/* One table drives config, config_help and dump_plugin; a test checks
 * that the man page and README list the same parameters.  Each row:
 * key, how to parse it, where it goes, its bounds, its --help text.
 */
enum param_kind { P_URI, P_PATH, P_SIZE, P_BOOL, P_UINT };

#define ACLONE_PARAMS(P) \
  P ("source", P_URI, &source_uri, 0, 0, \
     "source=NBD_URI         Source export (nbd://, nbds://, nbd+unix://...).\n" \
     "                       Optional once the clone is complete.\n") \
  P ("dest", P_PATH, &dest_path, 0, 0, \
     "dest=PATH              (required) Destination file or block device; a\n" \
     "                       missing file is created sparse.\n") \
  P ("meta", P_PATH, &meta_path, 0, 0, \
     "meta=PATH              (required) Metadata file; created when missing,\n" \
     "                       else the clone resumes from it.\n") \
  P ("block-size", P_SIZE, &block_size, 4096, 16 << 20, \
     "block-size=SIZE        Region size for a new clone, power of two,\n" \
     "                       4K..16M (default 64K).\n") \
  P ("copy-on-read", P_BOOL, &copy_on_read, 0, 0, \
     "copy-on-read=BOOL      Reads of uncopied regions also hydrate them\n" \
     "                       (default true).\n") \
  P ("source-connections", P_UINT, &source_connections, 1, 64, \
     "source-connections=N   Connections to the source (default: 4 for\n" \
     "                       reads, one per copy thread for hydration; 1\n" \
     "                       when the source lacks multi-conn).\n") \
  P ("source-timeout", P_UINT, &source_timeout, 1, 86400, \
     "source-timeout=SECS    How long a source read may take, the source\n" \
     "                       lost or hung, before EIO (default 30).\n") \
  P ("source-tls-certificates", P_PATH, &tls_certificates, 0, 0, \
     "source-tls-certificates=DIR  CA and client certificates for nbds://.\n") \
  P ("source-tls-psk", P_PATH, &tls_psk_file, 0, 0, \
     "source-tls-psk=FILE    Pre-shared keys file (user:hexkey) for nbds://.\n") \
  P ("source-tls-verify", P_BOOL, &tls_verify, 0, 0, \
     "source-tls-verify=BOOL Check the source's certificate (default true).\n") \
  P ("hydrate", P_BOOL, &hydrate, 0, 0, \
     "hydrate=BOOL           Run background hydration (default true; false\n" \
     "                       starts paused: 'aclone resume META').\n") \
  P ("hydrate-rate", P_SIZE, &hcfg.rate, 0, INT64_MAX, \
     "hydrate-rate=SIZE      Hydration rate limit in bytes/s (default 0 =\n" \
     "                       unlimited).\n") \
  P ("hydrate-batch", P_SIZE, &hcfg.batch, 4096, 64 << 20, \
     "hydrate-batch=SIZE     Largest copy in one request (default 1M; at most\n" \
     "                       the source's maximum request, 32M if none).\n") \
  P ("hydrate-depth", P_UINT, &hcfg.depth, 1, ACLONE_HYDRATOR_MAX_DEPTH, \
     "hydrate-depth=N        Most copies in flight (default 32); a controller\n" \
     "                       keeps fewer while clients are busy.\n") \
  P ("hydrate-floor", P_SIZE, &hcfg.floor, 0, INT64_MAX, \
     "hydrate-floor=SIZE     Progress floor in bytes/s: below it, clients no\n" \
     "                       longer slow hydration (default 0 = a tenth of\n" \
     "                       the best rate the source gave).\n")


struct param {
  const char *key;
  enum param_kind kind;
  void *out;
  uint64_t min, max;
};

#define PARAM_ROW(key, kind, out, min, max, help) { key, kind, out, min, max },
static const struct param params[] = { ACLONE_PARAMS (PARAM_ROW) };
#define PARAM_HELP(key, kind, out, min, max, help) help
#define aclone_config_help ACLONE_PARAMS (PARAM_HELP)

static struct aclone_clone *the_clone;

/* Graceful stop (see the top of the file). */
#define STOP_CLIENTS_MS 500
#define STOP_REQUESTS_MS 300
static const int quit_signals[] = { SIGINT, SIGQUIT, SIGTERM, SIGHUP };
#define NQUIT (sizeof quit_signals / sizeof *quit_signals)
static struct sigaction nbdkit_actions[NQUIT];
static int stop_pipe[2] = { -1, -1 };
static pthread_t stop_thread;
static bool stop_thread_running;

static void
aclone_unload (void)
{
  free (source_uri);
  free (dest_path);
  free (meta_path);
  free (tls_certificates);
  free (tls_psk_file);
}

/* Parse one value into p->out; nbdkit's parsers report their own errors,
 * so that sizes and booleans read as in every other nbdkit plugin.
 */
static int
param_set (const struct param *p, const char *value)
{
  switch (p->kind) {
  case P_URI:                  /* empty: none (an unset variable in the */
    free (*(char **) p->out);  /* systemd unit's environment file) */
    *(char **) p->out = NULL;
    if (!*value)
      return 0;
    return (*(char **) p->out = strdup (value)) ? 0 : -1;
  case P_PATH:                 /* absolute: nbdkit may chdir when it forks */
    free (*(char **) p->out);
    return (*(char **) p->out = nbdkit_absolute_path (value)) ? 0 : -1;
  case P_BOOL: {
    int b = nbdkit_parse_bool (value);
    if (b < 0)
      return -1;
    *(bool *) p->out = b;
    return 0;
  }
  case P_SIZE: {
    char plain[32];                /* "64KiB" as nbdkit spells it, "64K" */
    int64_t v = nbdkit_parse_size (aclone_size_spelling (value, plain, sizeof plain)
                                   ? plain : value);
    if (v < 0)
      return -1;
    if ((uint64_t) v < p->min || (uint64_t) v > p->max) {
      nbdkit_error ("%s=%s: must be from %" PRIu64 " to %" PRIu64,
                    p->key, value, p->min, p->max);
      return -1;
    }
    *(uint64_t *) p->out = v;
    return 0;
  }
  case P_UINT: {
    unsigned v;
    if (nbdkit_parse_unsigned (p->key, value, &v) < 0)
      return -1;
    if (v < p->min || v > p->max) {
      nbdkit_error ("%s=%s: must be from %" PRIu64 " to %" PRIu64,
                    p->key, value, p->min, p->max);
      return -1;
    }
    *(unsigned *) p->out = v;
    return 0;
  }
  }
  abort ();
}

static int
aclone_config (const char *key, const char *value)
{
  for (size_t i = 0; i < sizeof params / sizeof *params; i++)
    if (strcmp (key, params[i].key) == 0)
      return param_set (&params[i], value);
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
  if (block_size && !aclone_region_size_valid (block_size)) {
    nbdkit_error ("block-size=%" PRIu64 ": must be a power of two from 4K "
                  "to 16M", block_size);
    return -1;
  }
  hcfg.start_paused = !hydrate;
  /* Check now what libnbd would only find at the first connect, and so
   * that the message names the parameter.  Only the file's readability
   * is checked: aclone never reads the keys itself.
   */
  if (tls_psk_file && access (tls_psk_file, R_OK) < 0) {
    nbdkit_error ("source-tls-psk=%s: %m", tls_psk_file);
    return -1;
  }
  if (tls_certificates && access (tls_certificates, R_OK | X_OK) < 0) {
    nbdkit_error ("source-tls-certificates=%s: %m", tls_certificates);
    return -1;
  }
  if ((tls_psk_file || tls_certificates || !tls_verify) &&
      (!source_uri || !aclone_source_uri_is_tls (source_uri))) {
    nbdkit_error ("source-tls-* given, but source= is not an nbds:// or "
                  "nbds+unix:// URI");
    return -1;
  }
  return 0;
}

static void
aclone_dump_plugin (void)
{
  printf ("aclone_version=%s\n", ACLONE_VERSION);
  printf ("aclone_params=");
  for (size_t i = 0; i < sizeof params / sizeof *params; i++)
    printf ("%s%s", i ? "," : "", params[i].key);
  printf ("\n");
}

/* Stop watcher --------------------------------------------------- */

static void
on_quit_signal (int sig)
{
  int saved = errno;

  for (size_t i = 0; i < NQUIT; i++) {
    if (quit_signals[i] != sig)
      continue;
    void (*fn) (int) = nbdkit_actions[i].sa_handler;
    if (fn != SIG_DFL && fn != SIG_IGN)
      fn (sig);                            /* nbdkit's: sets its quit flag */
  }
  if (write (stop_pipe[1], "q", 1) < 0) {
    /* The pipe is full: the watcher has been woken already. */
  }
  errno = saved;
}

/* Two socket addresses are the same endpoint: a Unix path, or an IP
 * port (the listener's address may be the wildcard).
 */
static bool
same_endpoint (const struct sockaddr_storage *l, const struct sockaddr_storage *a)
{
  if (l->ss_family != a->ss_family)
    return false;
  switch (l->ss_family) {
  case AF_UNIX: {
    const struct sockaddr_un *x = (const void *) l, *y = (const void *) a;
    return x->sun_path[0] && strncmp (x->sun_path, y->sun_path,
                                      sizeof x->sun_path) == 0;
  }
  case AF_INET:
    return ((const struct sockaddr_in *) l)->sin_port ==
           ((const struct sockaddr_in *) a)->sin_port;
  case AF_INET6:
    return ((const struct sockaddr_in6 *) l)->sin6_port ==
           ((const struct sockaddr_in6 *) a)->sin6_port;
  default:
    return false;
  }
}

/* One socket of this process: its fd, whether it listens, its address. */
struct sock {
  int fd;
  bool listening;
  struct sockaddr_storage addr;
};

/* Fill socks (up to max) with this process's sockets, skipping the fds
 * in skip[nskip].  Returns how many.
 */
static size_t
scan_sockets (struct sock *socks, size_t max, const int *skip, size_t nskip)
{
  size_t n = 0;
  DIR *d = opendir ("/proc/self/fd");

  if (!d) {
    nbdkit_error ("/proc/self/fd: %m");
    return 0;
  }
  struct dirent *e;
  while ((e = readdir (d)) != NULL && n < max) {
    int fd = atoi (e->d_name);
    struct stat st;
    int acc = 0;
    socklen_t len = sizeof acc;
    bool skipped = false;
    for (size_t k = 0; k < nskip; k++)
      skipped |= skip[k] == fd;
    if (skipped || e->d_name[0] == '.' || fd == dirfd (d) ||
        fstat (fd, &st) < 0 || !S_ISSOCK (st.st_mode) ||
        getsockopt (fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &len) < 0)
      continue;
    socks[n].fd = fd;
    socks[n].listening = acc != 0;
    len = sizeof socks[n].addr;
    memset (&socks[n].addr, 0, sizeof socks[n].addr);
    if (getsockname (fd, (struct sockaddr *) &socks[n].addr, &len) < 0)
      continue;
    n++;
  }
  closedir (d);
  return n;
}

/* nbdkit's listening sockets, found once at after_fork, before nbdkit's
 * main loop runs: at a stop nbdkit closes them while the stop watcher
 * looks for clients, so the watcher must not touch those fds then.
 */
#define MAX_LISTENERS 16
static struct sock listeners[MAX_LISTENERS];
static size_t nlisteners;
static int listener_fds[MAX_LISTENERS];

static void
find_listeners (void)
{
  struct sock socks[256];
  size_t n = scan_sockets (socks, 256, NULL, 0);

  for (size_t i = 0; i < n && nlisteners < MAX_LISTENERS; i++)
    if (socks[i].listening) {
      listener_fds[nlisteners] = socks[i].fd;
      listeners[nlisteners++] = socks[i];
    }
}

/* Find the client connections nbdkit accepted: the sockets whose local
 * address is that of one of nbdkit's listening sockets (our own source
 * connections have other local addresses).  With shut, shut down their
 * read side.  Returns how many there are.  (nbdkit has no API for this
 * before 1.34's nbdkit_disconnect, and that one only acts on the calling
 * connection.  Nor can .close count them: nbdkit skips it once it is
 * quitting.)
 */
static unsigned
client_sockets (bool shut)
{
  struct sock socks[256];
  size_t n = scan_sockets (socks, 256, listener_fds, nlisteners);
  unsigned done = 0;

  for (size_t i = 0; i < n; i++) {
    if (socks[i].listening)
      continue;
    for (size_t j = 0; j < nlisteners; j++)
      if (same_endpoint (&listeners[j].addr, &socks[i].addr)) {
        if (shut)
          shutdown (socks[i].fd, SHUT_RD);
        done++;
        break;
      }
  }
  return done;
}

static void *
stop_watcher (void *arg)
{
  char why = 0;
  (void) arg;

  while (read (stop_pipe[0], &why, 1) < 0 && errno == EINTR)
    ;
  unsigned long long t0 = aclone_now_ns ();
  if (why == 'q') {
    /* 1, 2: the clients go first, so that their last requests are
     * answered rather than refused.
     */
    unsigned n = client_sockets (true), left = n;
    unsigned long long end = t0 + STOP_CLIENTS_MS * 1000000ull;
    while (left > 0 && aclone_now_ns () < end) {
      struct timespec ts = { 0, 2000000 };
      nanosleep (&ts, NULL);
      left = client_sockets (false);
    }
    if (n)
      fprintf (stderr, "nbdkit: aclone: stopping: disconnected %u client "
               "connection(s)%s\n", n, left ? ", some still closing" : "");
  }
  /* 3, 4 */
  aclone_hydrator_stop (the_clone);
  int r = aclone_clone_shutdown (the_clone, STOP_REQUESTS_MS);
  if (why == 'q')
    fprintf (stderr, "nbdkit: aclone: stopped in %llu ms%s\n",
             (aclone_now_ns () - t0) / 1000000,
             r == 0 ? ", metadata committed and unlocked" : "");
  return NULL;
}

/* Chain our handler onto nbdkit's (installed before after_fork). */
static int
start_stop_watcher (void)
{
  if (pipe2 (stop_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
    nbdkit_error ("pipe: %m");
    return -1;
  }
  /* Only the write end is non-blocking: the watcher blocks on read. */
  fcntl (stop_pipe[0], F_SETFL, 0);
  int err = pthread_create (&stop_thread, NULL, stop_watcher, NULL);
  if (err) {
    errno = err;
    nbdkit_error ("cannot start the stop watcher: %m");
    return -1;
  }
  stop_thread_running = true;
  for (size_t i = 0; i < NQUIT; i++) {
    struct sigaction sa = { .sa_handler = on_quit_signal, .sa_flags = SA_RESTART };
    sigfillset (&sa.sa_mask);
    sigaction (quit_signals[i], &sa, &nbdkit_actions[i]);
  }
  return 0;
}

/* At .cleanup: restore nbdkit's handlers, wake the watcher if no signal
 * did, and wait for it.
 */
static void
stop_stop_watcher (void)
{
  if (!stop_thread_running)
    return;
  for (size_t i = 0; i < NQUIT; i++)
    sigaction (quit_signals[i], &nbdkit_actions[i], NULL);
  if (write (stop_pipe[1], "c", 1) < 0) {
    /* Full: it has been woken. */
  }
  pthread_join (stop_thread, NULL);
  stop_thread_running = false;
  close (stop_pipe[0]);
  close (stop_pipe[1]);
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
      .connections = source_connections ? source_connections : 4,
      .timeout_s = source_timeout,
      .tls_certificates = tls_certificates,
      .tls_psk_file = tls_psk_file,
      .tls_no_verify = !tls_verify,
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
  /* The command line's controls, shown before nbdkit writes its pid
   * file (the sign that the server is up): status must not call a clone
   * started paused hydrating.  Once only: after this they are the
   * operator's.
   */
  aclone_hydrator_set_controls (the_clone, &hcfg);
  return 0;
}

static int
aclone_after_fork (void)
{
  struct aclone_error err = { 0 };

  /* First, while no thread of ours opens or closes sockets. */
  find_listeners ();
  hcfg.connections = source_connections;
  /* The clone, then the hydrator: the clone's threads (the ticker, the
   * copy-on-read writer) are there before it, which may complete at once.
   */
  if (aclone_clone_start (the_clone, &err) < 0 ||
      aclone_hydrator_start (the_clone, &hcfg, &err) < 0) {
    nbdkit_error ("%s", err.msg);
    return -1;
  }
  return start_stop_watcher ();
}

static void
aclone_cleanup (void)
{
  if (the_clone) {
    stop_stop_watcher ();
    aclone_hydrator_stop (the_clone);
    aclone_clone_close (the_clone);
    the_clone = NULL;
  }
}

/* A connection: the clone, and what the pace controller learns from
 * this client's turns (aclone_client_enter).
 */
struct conn {
  struct aclone_clone *c;
  struct aclone_client cl;
};

static void *
aclone_open (int readonly)
{
  (void) readonly;
  struct conn *h = calloc (1, sizeof *h);

  if (!h) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  h->c = the_clone;
  return h;
}

static void
aclone_close (void *h)
{
  free (h);
}

static int64_t
aclone_get_size (void *h)
{
  return aclone_clone_size (((struct conn *) h)->c);
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

/* Run a request as connection h's: conn_ is the connection, c_ its
 * clone, since_ what aclone_client_enter returned.
 */
#define REQUEST(h, call) ({                                      \
      struct conn *conn_ = (h);                                  \
      struct aclone_clone *c_ = conn_->c;                        \
      uint64_t since_ = aclone_client_enter (&conn_->cl);        \
      (void) since_;                    /* reads use it */          \
      int r_ = (call);                                           \
      aclone_client_leave (&conn_->cl);                          \
      ret (r_);                                                  \
    })

static int
aclone_pread (void *h, void *buf, uint32_t count, uint64_t offset,
              uint32_t flags)
{
  (void) flags;
  return REQUEST (h, aclone_clone_pread_client (c_, buf, count, offset, since_));
}

static int
aclone_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset,
               uint32_t flags)
{
  return REQUEST (h, aclone_clone_pwrite (c_, buf, count, offset,
                                         flags & NBDKIT_FLAG_FUA));
}

static int
aclone_flush (void *h, uint32_t flags)
{
  (void) flags;
  return REQUEST (h, aclone_clone_flush (c_));
}

static int
aclone_trim (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  return REQUEST (h, aclone_clone_zero (c_, count, offset, true, false,
                                       flags & NBDKIT_FLAG_FUA));
}

static int
aclone_zero (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  return REQUEST (h, aclone_clone_zero (c_, count, offset,
                                       flags & NBDKIT_FLAG_MAY_TRIM,
                                       flags & NBDKIT_FLAG_FAST_ZERO,
                                       flags & NBDKIT_FLAG_FUA));
}

static int
aclone_cache (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  (void) flags;
  return REQUEST (h, aclone_clone_cache (c_, count, offset));
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
  return REQUEST (h, aclone_clone_extents (c_, count, offset,
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
  .close             = aclone_close,
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
