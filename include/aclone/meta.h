/* aclone: the metadata file.
 *
 * One file per clone, mapped shared.  Layout (all integers little-endian,
 * every area page aligned, page = 4096 bytes):
 *
 *   page 0          header: identity and geometry of the clone, CRC-32C
 *   page 1          live page: status the server publishes, control
 *                   fields the CLI writes (not crash-consistent)
 *   hydrated_off    committed "hydrated" bitmap, one bit per region
 *   written_off     committed "written by a client" bitmap
 *
 * The bitmaps hold committed state only (invariant 1 of aclone-design(7)): bits are
 * set by aclone_meta_commit_bits after the caller made the data durable.
 * The server that uses the file holds an exclusive OFD lock on it
 * (fcntl F_OFD_SETLK, F_WRLCK, whole file).  An OFD lock belongs to the
 * open file description, as flock does, so it survives nbdkit's fork and
 * is released by the last close (or aclone_meta_unlock).  Unlike flock it
 * can be tested without taking it (F_OFD_GETLK): aclone_meta_in_use never
 * makes a server that starts at the same instant fail.  (flock and fcntl
 * locks do not see each other on Linux: everything here uses OFD locks.)
 */
#ifndef ACLONE_META_H
#define ACLONE_META_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "aclone/error.h"

#define ACLONE_META_MAGIC       "ACLONEMD"
#define ACLONE_META_VERSION     1
#define ACLONE_PAGE             4096u
#define ACLONE_MIN_REGION_SHIFT 12          /* 4 KiB */
#define ACLONE_MAX_REGION_SHIFT 24          /* 16 MiB */
#define ACLONE_DEFAULT_REGION   (64u * 1024)
#define ACLONE_SOURCE_DESC_LEN  256

/* Header flags. */
#define ACLONE_FLAG_COMPLETE    (1u << 0)   /* every region hydrated */
#define ACLONE_FLAG_DEST_ZERO   (1u << 1)   /* unhydrated regions read zero on dest */

struct aclone_meta_header {
  char     magic[8];          /*   0 */
  uint32_t version;           /*   8 */
  uint32_t header_len;        /*  12: bytes covered by the checksum */
  uint8_t  uuid[16];          /*  16 */
  uint64_t size;              /*  32: device size in bytes */
  uint32_t region_size;       /*  40 */
  uint32_t flags;             /*  44 */
  uint64_t regions;           /*  48 */
  uint64_t created;           /*  56: unix seconds */
  uint64_t completed;         /*  64: unix seconds, 0 if not complete */
  uint64_t live_off;          /*  72 */
  uint64_t hydrated_off;      /*  80 */
  uint64_t written_off;       /*  88 */
  uint64_t bitmap_len;        /*  96: bytes of each bitmap area (page multiple) */
  uint64_t file_len;          /* 104: expected file length */
  char     source[ACLONE_SOURCE_DESC_LEN]; /* 112: NUL-terminated, no secrets */
  uint32_t checksum;          /* 368: CRC-32C of bytes 0..header_len with this field zero */
  uint32_t pad;               /* 372 */
} __attribute__ ((packed));

#define ACLONE_HEADER_LEN ((uint32_t) sizeof (struct aclone_meta_header))

/* The two bitmaps, in the file and in core (which: for the functions
 * below and the map's).
 */
enum { ACLONE_BIT_HYDRATED = 0, ACLONE_BIT_WRITTEN = 1 };

/* Server states published in the live page. */
enum aclone_state {
  ACLONE_STATE_STOPPED = 0,
  ACLONE_STATE_HYDRATING = 1,
  ACLONE_STATE_PAUSED = 2,
  ACLONE_STATE_COMPLETE = 3,
  ACLONE_STATE_ERROR = 4,
  ACLONE_STATE_WAITING = 5,      /* source unreachable, retrying */
  ACLONE_STATE_FAILED = 6,       /* a sync failed: nothing more is committed */
};

/* Why hydration's window is what it is (the foreground-first controller,
 * aclone-design(7)), published in the live page.
 */
enum aclone_fg_reason {
  ACLONE_FG_OPEN = 0,            /* growing: the source is fast, no client */
  ACLONE_FG_DEPTH = 1,           /* at the hard depth (hydrate-depth, set) */
  ACLONE_FG_CLIENT = 2,          /* cut: client requests in progress */
  ACLONE_FG_LATENCY = 3,         /* cut: the source's latency rose */
  ACLONE_FG_FLOOR = 4,           /* below the progress floor: no cuts */
  ACLONE_FG_INFLIGHT = 5,        /* at the cap on bytes in flight */
};

static inline const char *
aclone_fg_reason_name (uint64_t r)
{
  static const char *const names[] = { "open", "depth", "client",
                                       "latency", "floor", "inflight" };
  return r < sizeof names / sizeof names[0] ? names[r] : "unknown";
}

#define ACLONE_LIVE_MAGIC 0x4556494c454e4f4cULL   /* "LONELIVE" */

/* Live page.  Every field is read and written with relaxed atomics as a
 * whole 64-bit word; readers must treat it as advisory and possibly torn
 * across fields.  Counters are cumulative for the clone (the server loads
 * them at start), not for one server run.
 */
struct aclone_live {
  uint64_t magic;
  int64_t  pid;               /* server pid, 0 when stopped */
  uint64_t heartbeat_ns;      /* CLOCK_REALTIME of the last update */
  uint64_t state;             /* enum aclone_state */
  uint64_t regions_hydrated;
  uint64_t bytes_copied;      /* read from the source and written to dest */
  uint64_t bytes_skipped;     /* hydrated without copying (zero, trim, whole writes) */
  uint64_t in_flight;         /* bytes being copied now */
  uint64_t errors;
  uint64_t rate;              /* bytes/s copied, recent */
  uint64_t started_ns;        /* CLOCK_REALTIME when this server started */
  /* The foreground-first controller (0 when not hydrating). */
  uint64_t fg_window;         /* bytes hydration may have in flight */
  uint64_t fg_base_ns;        /* the source's base latency, one batch read */
  uint64_t fg_cur_ns;         /* its current latency */
  uint64_t fg_reason;         /* enum aclone_fg_reason */
  uint64_t fg_client_cuts;    /* window cuts for clients, this run */
  uint64_t fg_idle;           /* 1: copy threads at idle CPU/IO priority */
  uint64_t cor_behind;        /* copy-on-read replies sent before their
                               * dest write, this run */
  uint64_t cor_pending;       /* bytes of such writes not landed yet */
  uint64_t ctl_floor;         /* control: progress floor, bytes/s
                               * (0 = default, a tenth of the best rate) */
  uint64_t fg_lock_boosts;    /* clients that, about to wait for a region
                               * lock, lifted idle copy threads, this run */
  /* The pace controller (while clients are served; this run). */
  uint64_t fg_pace;           /* bytes/s hydration may copy now, 0 = no pace */
  uint64_t fg_pace_probes;    /* probes that compared clients' reads */
  uint64_t fg_pace_cuts;      /* ...and found the copy cost them */
  uint64_t fg_svc_quiet_ns;   /* last probe: median client read, quiet */
  uint64_t fg_svc_copy_ns;    /* ...and while copying */
  uint64_t bytes_cor;         /* of bytes_copied, those copied for clients'
                               * reads (copy-on-read) */
  uint64_t cor_rests;         /* rests the copy-on-read writer took, the
                               * CPU being contended, this run */
  uint64_t reserved[4];
  char     last_error[256];
  /* Control: written by "aclone pause|resume|set", polled by the server. */
  uint64_t ctl_pause;         /* 1 = paused */
  uint64_t ctl_rate;          /* bytes/s, 0 = unlimited */
  uint64_t ctl_depth;         /* 0 = server default */
  uint64_t ctl_seq;           /* bumped on every CLI change */
};

struct aclone_meta {
  char *path;
  int fd;
  bool locked;
  bool writable;
  uint8_t *map;               /* whole file, MAP_SHARED */
  size_t map_len;
  struct aclone_meta_header hdr;  /* validated host-endian copy */
  struct aclone_live *live;
  uint64_t *hydrated;         /* committed bitmaps inside map (LE words) */
  uint64_t *written;
};

/* Geometry helpers. */
static inline uint64_t
aclone_region_count (uint64_t size, uint32_t region_size)
{
  return (size + region_size - 1) / region_size;
}

/* Is v a power of two within the allowed region sizes? */
bool aclone_region_size_valid (uint64_t v);

/* Create a new metadata file at path for a device of size bytes.
 * The file is built under a temporary name, synced, locked, then renamed
 * into place without replacing anything, so a crash never leaves a
 * half-written file under path.  flags: ACLONE_FLAG_*.
 * On success *out is open, mapped and exclusively locked.
 */
int aclone_meta_create (const char *path, uint64_t size, uint32_t region_size,
                        uint32_t flags, const char *source_desc,
                        struct aclone_meta **out, struct aclone_error *err);

/* How aclone_meta_open maps the file. */
enum aclone_meta_mode {
  ACLONE_META_SERVER,   /* read-write, exclusive lock (EBUSY if held) */
  ACLONE_META_READ,     /* read-only, no lock: status, inspect */
  ACLONE_META_CONTROL,  /* read-write, no lock: the CLI writes only the
                           control fields of the live page */
};

/* Open and validate an existing file.  A header that fails validation
 * while another process holds the lock is read again a few times (1 ms
 * apart): the server may be rewriting it (aclone_meta_set_flags).
 * ACLONE_META_SERVER fails with -EBUSY, "in use by another aclone server
 * (pid N)", N from the live page, if the lock is held.
 */
int aclone_meta_open (const char *path, enum aclone_meta_mode mode,
                      struct aclone_meta **out, struct aclone_error *err);

/* Validate a header read from a file of file_len bytes.  Returns 0 or
 * -EINVAL with a message in err (which names path).  Pure: used by the
 * fuzzer and by aclone_meta_open.
 */
int aclone_meta_validate (const char *path, const void *page, size_t page_len,
                          uint64_t file_len, struct aclone_meta_header *out,
                          struct aclone_error *err);

/* Rewrite the header's flags (and completed time) and msync page 0.
 * The page is encoded aside and copied into the mapping at once; a
 * reader racing with the copy fails the checksum, and aclone_meta_open
 * then reads again while a server holds the file.
 */
int aclone_meta_set_flags (struct aclone_meta *m, uint32_t flags,
                           struct aclone_error *err);

/* One piece of a commit: bitmap words [index, index+count), each OR'ed
 * with value.  count > 1 only for a run of full words (value all ones),
 * so that a commit of a long hydrated run costs one entry, not one per
 * 64 regions.
 */
struct aclone_dirty_words {
  uint64_t index, count, value;
};

/* Set the given bits in the committed bitmaps (which: 0 hydrated,
 * 1 written), msync the pages touched, and drop them from this process's
 * page tables (they stay in the page cache): a commit then leaves no
 * resident bitmap pages behind, which at 15 TiB would be 30 MiB.  The
 * caller guarantees the data is durable.  Values are OR'ed atomically
 * (aclone_meta_written_ahead may set bits of the same words).
 */
int aclone_meta_commit_bits (struct aclone_meta *m, int which,
                             const struct aclone_dirty_words *v, size_t n,
                             struct aclone_error *err);

/* Set "written" bits [first, first+count) in the mapping now, before the
 * client's data is written, without msync.  Ahead of the commit on
 * purpose: a written bit only keeps a region out of the audit (verify),
 * so one too many is harmless, while one missing after a crash (the
 * write reached dest's page cache, the process died before the commit)
 * would make verify report the client's data as a bad copy.  A process
 * crash keeps the mapping's pages; only a power cut can lose them.
 */
void aclone_meta_written_ahead (struct aclone_meta *m, uint64_t first,
                                uint64_t count);

/* Is a server holding the lock on this file?  (For the CLI.)  Tests the
 * lock with F_OFD_GETLK and takes nothing, so it never makes a server's
 * aclone_meta_open or aclone_meta_create fail.
 */
bool aclone_meta_in_use (const char *path);

/* How many regions have their committed bit set (which: 0 hydrated,
 * 1 written); bits past the last region do not count.
 */
uint64_t aclone_meta_count (const struct aclone_meta *m, int which);

/* Test a committed bit. */
bool aclone_meta_bit (const struct aclone_meta *m, int which, uint64_t region);

/* Release the lock early, keeping the mapping (a graceful stop that
 * frees later).  Nothing may write the file afterwards.
 */
void aclone_meta_unlock (struct aclone_meta *m);

/* Unmap, unlock, close, free.  Safe on NULL. */
void aclone_meta_close (struct aclone_meta *m);

#endif
