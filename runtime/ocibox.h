/* ocibox-runtime: shared types and the functions each concern exports. */
#ifndef OCIBOX_H
#define OCIBOX_H

#define _GNU_SOURCE
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/types.h>

#define PROG "ocibox-runtime"
#define EXIT_RUNTIME 125
#define EXIT_CANNOT_EXEC 126
#define EXIT_NOT_FOUND 127

/* ---- util.c: errors and small helpers ---- */
_Noreturn void die(const char *step, const char *path);               /* uses errno */
_Noreturn void die_msg(const char *step, const char *path, const char *msg);
void notice(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void write_file(const char *step, const char *path, const char *text); /* dies on failure */
int try_write_file(const char *path, const char *text);               /* -1 + errno */
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void *xcalloc(size_t n, size_t size);
int exit_code_of(int status); /* a wait status as a shell reports it: the code, or 128 + signal */

/* ---- config.c: the subset of an OCI runtime-spec config.json ---- */
struct idmap {
    unsigned long inside, outside, count;
};

struct mount_cfg {
    const char *dest, *source, *type;
    unsigned long flags;       /* MS_* flags from options */
    unsigned long propagation; /* MS_PRIVATE, MS_SLAVE, ... with MS_REC when r-prefixed */
    char *data;                /* options that are not flags, comma-joined */
    bool bind, recursive;
};

struct rlimit_cfg {
    int resource;
    rlim_t soft, hard;
};

enum cap_set { CS_BOUNDING, CS_EFFECTIVE, CS_INHERITABLE, CS_PERMITTED, CS_AMBIENT, CS_NSETS };

struct resources {
    bool any;
    int64_t mem_limit, mem_reservation, mem_swap; /* -1 = unset */
    int64_t swappiness;                          /* -1 = unset */
    int64_t cpu_shares, cpu_quota, cpu_period;   /* -1 = unset */
    const char *cpus, *mems;                     /* NULL = unset */
    int64_t pids_limit;                          /* -1 = unset, 0 or less = unlimited */
};

struct config {
    const char *bundle;
    const char *const *args;
    const char *const *env;
    const char *cwd;
    uid_t uid;
    gid_t gid;
    gid_t *gids;
    size_t ngids;
    int umask; /* -1 = unset */
    bool terminal;
    struct rlimit_cfg *rlimits;
    size_t nrlimits;
    bool no_new_privs;
    bool has_caps;
    uint64_t caps[CS_NSETS];
    int oom_score_adj;
    bool has_oom_score_adj;
    char *root_path; /* absolute host path */
    bool root_readonly;
    const char *hostname;
    struct mount_cfg *mounts;
    size_t nmounts;
    int clone_flags; /* CLONE_NEW* from linux.namespaces */
    struct idmap *uidmaps, *gidmaps;
    size_t nuidmaps, ngidmaps;
    struct resources res;
    const char *cgroups_path;
    const char *const *masked;
    const char *const *readonly;
    const char **sysctl_keys, **sysctl_values;
    size_t nsysctl;
    void *seccomp; /* json_t of linux.seccomp, or NULL */
    unsigned long rootfs_propagation;
};

void config_load(struct config *cfg, const char *bundle); /* DIR/config.json, root.path resolved */
void config_parse(struct config *cfg, const char *text, size_t len, const char *base, const char *origin);

/* ---- userns.c ---- */
struct idmapping_result {
    bool setgroups_denied; /* single mapping written by ourselves: setgroups(2) unavailable */
};
void userns_map(pid_t pid, const struct config *cfg, bool rootless, struct idmapping_result *out);
const char *userns_hint(void);                  /* the sysctl that blocks user namespaces, or NULL */
_Noreturn void die_userns(const char *step, const char *path); /* die(), plus that hint */
bool setgroups_is_denied(void);

/* ---- caps.c ---- */
int cap_from_name(const char *name); /* -1 if unknown */
void caps_drop_bounding(const struct config *cfg);
void caps_apply(const struct config *cfg); /* after the user switch */

/* ---- rootfs.c ---- */
/* Where the image's file tree comes from: a host directory (an unpacked bundle), or the squashfs
 * payload at an offset of a file (a compiled executable), mounted from a loop device or with FUSE. */
enum rootfs_kind { ROOTFS_DIR, ROOTFS_SQUASHFS };
struct rootfs_source {
    enum rootfs_kind kind;
    const char *path; /* ROOTFS_DIR: absolute host path of the image tree */
    int fd;           /* ROOTFS_SQUASHFS: the file holding the image (kept open), */
    uint64_t offset;  /* where the squashfs starts in it, */
    uint64_t size;    /* and its size */
};

struct rootfs_opts {
    struct rootfs_source source;
    const char *upper; /* host dir holding upper/ and work/ (persistent), or NULL for tmpfs */
    bool userns;       /* running inside a user namespace we created */
    bool no_overlay;   /* skip overlayfs: tmpfs root, image entries bound read-only */
};

/* Builds the container's root and pivots into it. On return the process is inside the new root. */
void rootfs_setup(const struct config *cfg, const struct rootfs_opts *opts);

/* ---- mounts.c ---- */
#define HOST "/oldroot" /* where the host's root is visible while the new root is built */
#define NEWROOT "/newroot"
void mounts_apply(const struct config *cfg, int rootfd);
void mounts_devices(const struct config *cfg, int rootfd, bool userns);
void mounts_mask(const struct config *cfg, int rootfd);
int open_in_root(int rootfd, const char *path, int flags);
void mount_set_readonly(int fd, const char *what); /* recursive, keeps locked flags */
void mkdir_in_root(int rootfd, const char *path, bool as_file);

/* ---- cgroups.c ---- */
struct cgroup_state {
    char *dirs[8];
    size_t ndirs;
    pid_t pid; /* the container's first process, ended if a limit fails */
};
void cgroups_apply(pid_t pid, const struct config *cfg, const char *id, bool rootless,
                   struct cgroup_state *st);
void cgroups_remove(struct cgroup_state *st);

/* ---- terminal.c ---- */
int terminal_open_pty(int *slave); /* inside the container: returns the master */
void terminal_start(int master);    /* caller side: raw mode, window size */
void terminal_winch(int master);
bool terminal_pump(int from, int to); /* false on EOF/EIO */
void terminal_restore(void);
void terminal_drain(int master);

/* ---- seccomp.c ---- */
void seccomp_apply(const struct config *cfg);

/* ---- init.c ---- */
/* Forks the container process, becomes its PID 1 and never returns. */
_Noreturn void init_run(const struct config *cfg, int pty_slave, bool setgroups_denied);

/* ---- payload.c: a compiled executable (runtime + squashfs + config + footer) ---- */
struct payload {
    int fd; /* /proc/self/exe */
    uint32_t version;
    uint64_t file_size, payload_off, payload_size, config_off, config_size;
    unsigned char sha256[32];
    char digest[65]; /* hex */
};
bool payload_open(struct payload *p); /* false: this file has no payload (plain ocibox-runtime) */
/* Handles the --ocibox-* options (some exit here) and fills in the config and the rootfs source. */
void payload_start(struct payload *p, int argc, char **argv, const char *version, struct config *cfg,
                   struct rootfs_source *src);

/* As real root: the squashfs at offset of fd through a read-only, auto-clearing loop device and the
 * kernel's squashfs. false (nothing left attached) when the kernel can't, e.g. no loop devices. */
bool payload_loop_mount(int fd, uint64_t offset, uint64_t size, const char *mountpoint);

/* ---- squashfuse.c ---- */
/* Mounts the squashfs at offset of fd on mountpoint, served by FUSE threads of this process. */
void squashfuse_mount(int fd, uint64_t offset, const char *mountpoint);

/* ---- container.c ---- */
/* Runs in the new namespaces; sync is the socket to the caller. Never returns. */
_Noreturn void container_main(const struct config *cfg, const struct rootfs_opts *opts, int sync);

#endif
