/* Test helper: the socket `aclone attach` would hand the kernel, handed
 * to a command instead, which speaks NBD on it as the kernel would.
 *
 *   attach_socket [--tls-psk FILE] [--tls-certificates DIR]
 *                 [--no-tls-verify] URI -- COMMAND [ARG...]
 *
 * COMMAND runs with the socket as file descriptor 3 and the export's
 * size and transmission flags in ACLONE_EXPORT_SIZE and
 * ACLONE_EXPORT_FLAGS; the relay thread, for a TLS URI, runs here
 * meanwhile.  Exits with COMMAND's status, or 1 (the error on stderr).
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "aclone/attach.h"

int
main (int argc, char **argv)
{
  static const struct option opts[] = {
    { "tls-psk", required_argument, NULL, 'p' },
    { "tls-certificates", required_argument, NULL, 'c' },
    { "no-tls-verify", no_argument, NULL, 'n' },
    { NULL, 0, NULL, 0 } };
  struct aclone_attach_config cfg = { .index = -1 };
  struct aclone_error err = { 0 };
  int c;

  while ((c = getopt_long (argc, argv, "", opts, NULL)) != -1) {
    switch (c) {
    case 'p': cfg.tls_psk_file = optarg; break;
    case 'c': cfg.tls_certificates = optarg; break;
    case 'n': cfg.tls_no_verify = true; break;
    default: return 2;
    }
  }
  if (argc - optind < 2) {
    fprintf (stderr, "usage: attach_socket [--tls-...] URI -- COMMAND...\n");
    return 2;
  }
  cfg.uri = argv[optind];
  uint64_t size, flags;
  int fd = aclone_attach_socket (&cfg, &size, &flags, &err);
  if (fd < 0) {
    fprintf (stderr, "attach_socket: %s\n", err.msg);
    return 1;
  }
  char env[64];
  snprintf (env, sizeof env, "%" PRIu64, size);
  setenv ("ACLONE_EXPORT_SIZE", env, 1);
  snprintf (env, sizeof env, "%" PRIu64, flags);
  setenv ("ACLONE_EXPORT_FLAGS", env, 1);
  pid_t pid = fork ();
  if (pid < 0) {
    perror ("attach_socket: fork");
    return 1;
  }
  if (pid == 0) {
    if (dup2 (fd, 3) < 0) {            /* dup2 clears close-on-exec */
      perror ("attach_socket: dup2");
      _exit (1);
    }
    execvp (argv[optind + 1], argv + optind + 1);
    perror (argv[optind + 1]);
    _exit (127);
  }
  close (fd);
  int status;
  if (waitpid (pid, &status, 0) < 0) {
    perror ("attach_socket: waitpid");
    return 1;
  }
  return WIFEXITED (status) ? WEXITSTATUS (status) : 1;
}
