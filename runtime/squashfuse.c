/* The image of a compiled executable, served by FUSE from inside the runtime itself.
 *
 * The squashfs payload sits at an offset of the executable's own file. libsquashfuse reads it
 * there with pread on one descriptor (opened once, before any pivot), and its low-level FUSE
 * operations answer the kernel through libfuse3's session loop, in threads of this process:
 * no fusermount, no helper program, no copy. The mount is made with mount(2) inside the
 * container's user and mount namespaces (root there may mount FUSE since Linux 4.18), so it
 * exists only in that mount namespace; when the process that serves it ends, even by SIGKILL,
 * the namespace and its mounts go with it.
 *
 * Debian's libsquashfuse is built without its thread-safe caches, so the operations run one at a
 * time under a lock; libfuse's worker threads still take requests in parallel (the kernel's page
 * cache answers most reads after the first). */
#include "ocibox.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <unistd.h>

/* libsquashfuse's config.h sets _POSIX_C_SOURCE to an older level than _GNU_SOURCE gave us */
#undef _POSIX_C_SOURCE
#include <squashfuse/ll.h>

static pthread_mutex_t sqfs_lock = PTHREAD_MUTEX_INITIALIZER;

#define LOCKED(call)                                                                                          \
    do {                                                                                                      \
        pthread_mutex_lock(&sqfs_lock);                                                                       \
        call;                                                                                                 \
        pthread_mutex_unlock(&sqfs_lock);                                                                     \
    } while (0)

static void op_getattr(fuse_req_t r, fuse_ino_t i, struct fuse_file_info *fi)
{
    LOCKED(sqfs_ll_op_getattr(r, i, fi));
}
static void op_opendir(fuse_req_t r, fuse_ino_t i, struct fuse_file_info *fi)
{
    LOCKED(sqfs_ll_op_opendir(r, i, fi));
}
static void op_releasedir(fuse_req_t r, fuse_ino_t i, struct fuse_file_info *fi)
{
    LOCKED(sqfs_ll_op_releasedir(r, i, fi));
}
static void op_readdir(fuse_req_t r, fuse_ino_t i, size_t size, off_t off, struct fuse_file_info *fi)
{
    LOCKED(sqfs_ll_op_readdir(r, i, size, off, fi));
}
static void op_lookup(fuse_req_t r, fuse_ino_t parent, const char *name)
{
    LOCKED(sqfs_ll_op_lookup(r, parent, name));
}
static void op_open(fuse_req_t r, fuse_ino_t i, struct fuse_file_info *fi)
{
    LOCKED(sqfs_ll_op_open(r, i, fi));
}
static void op_create(fuse_req_t r, fuse_ino_t parent, const char *name, mode_t mode, struct fuse_file_info *fi)
{
    LOCKED(sqfs_ll_op_create(r, parent, name, mode, fi));
}
static void op_release(fuse_req_t r, fuse_ino_t i, struct fuse_file_info *fi)
{
    LOCKED(sqfs_ll_op_release(r, i, fi));
}
static void op_read(fuse_req_t r, fuse_ino_t i, size_t size, off_t off, struct fuse_file_info *fi)
{
    LOCKED(sqfs_ll_op_read(r, i, size, off, fi));
}
static void op_readlink(fuse_req_t r, fuse_ino_t i)
{
    LOCKED(sqfs_ll_op_readlink(r, i));
}
/* An image without xattrs says so once: after ENOSYS the kernel stops asking (overlayfs asks for
 * its own xattrs at every lookup, a quarter of all requests of a python start). */
static bool has_xattrs(fuse_req_t r)
{
    sqfs_ll *ll = fuse_req_userdata(r);
    return ll->fs.sb.xattr_id_table_start != (uint64_t)SQUASHFS_INVALID_BLK;
}
static void op_listxattr(fuse_req_t r, fuse_ino_t i, size_t size)
{
    if (!has_xattrs(r)) {
        fuse_reply_err(r, ENOSYS);
        return;
    }
    LOCKED(sqfs_ll_op_listxattr(r, i, size));
}
static void op_getxattr(fuse_req_t r, fuse_ino_t i, const char *name, size_t size)
{
    if (!has_xattrs(r)) {
        fuse_reply_err(r, ENOSYS);
        return;
    }
    LOCKED(sqfs_ll_op_getxattr(r, i, name, size));
}
static void op_forget(fuse_req_t r, fuse_ino_t i, unsigned long nlookup)
{
    LOCKED(sqfs_ll_op_forget(r, i, nlookup));
}
static void op_statfs(fuse_req_t r, fuse_ino_t i)
{
    LOCKED(stfs_ll_op_statfs(r, i));
}

static const struct fuse_lowlevel_ops ops = {
    .getattr = op_getattr,
    .opendir = op_opendir,
    .releasedir = op_releasedir,
    .readdir = op_readdir,
    .lookup = op_lookup,
    .open = op_open,
    .create = op_create,
    .release = op_release,
    .read = op_read,
    .readlink = op_readlink,
    .listxattr = op_listxattr,
    .getxattr = op_getxattr,
    .forget = op_forget,
    .statfs = op_statfs,
};

static void *serve(void *arg)
{
    struct fuse_session *se = arg;
    /* enough idle workers that a burst of requests doesn't start and end threads each time */
    struct fuse_loop_config lc = {.clone_fd = 0, .max_idle_threads = 16};
    int r = fuse_session_loop_mt(se, &lc);
    if (r != 0 && !fuse_session_exited(se))
        notice("squashfs server stopped: %s", strerror(r < 0 ? -r : r));
    return NULL;
}

void squashfuse_mount(int fd, uint64_t offset, const char *mountpoint)
{
    sqfs_ll *ll = xcalloc(1, sizeof *ll);
    if (sqfs_init(&ll->fs, fd, (size_t)offset) != SQFS_OK)
        die_msg("payload", "/proc/self/exe", "the squashfs payload can't be read (damaged file?)");
    /* libsquashfuse keeps 1 data and 3 fragment blocks decompressed: a program opening many small
     * files (python's imports) decompresses the same fragment blocks again and again */
    sqfs_cache_destroy(&ll->fs.data_cache);
    sqfs_cache_destroy(&ll->fs.frag_cache);
    if (sqfs_block_cache_init(&ll->fs.data_cache, 8) != SQFS_OK ||
        sqfs_block_cache_init(&ll->fs.frag_cache, 32) != SQFS_OK)
        die_msg("payload", "/proc/self/exe", "squashfs block caches");
    if (sqfs_ll_init(ll) != SQFS_OK)
        die_msg("payload", "/proc/self/exe", "squashfs inode table");

    /* opened here, inside the user namespace that will own the mount (the kernel insists), from
     * the host's /dev, which make_scratch_root moved to HOST */
    int dev = open(HOST "/dev/fuse", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        die("fuse", "/dev/fuse");
    char *data = xasprintf("fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions", dev);
    if (mount("ocibox", mountpoint, "fuse.ocibox", MS_NOSUID | MS_NODEV | MS_RDONLY, data) < 0)
        die("fuse: mount", mountpoint);
    free(data);

    char *argv0[] = {PROG, NULL};
    struct fuse_args args = FUSE_ARGS_INIT(1, argv0);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, ll);
    if (!se)
        die_msg("fuse", mountpoint, "can't create the FUSE session");
    char *devpath = xasprintf("/dev/fd/%d", dev); /* libfuse takes over an fd we mounted ourselves */
    if (fuse_session_mount(se, devpath) != 0)
        die_msg("fuse", devpath, "libfuse refused the mounted descriptor");

    /* the server threads take no signals: they all go to the runtime's own thread */
    sigset_t all, old;
    sigfillset(&all);
    if (pthread_sigmask(SIG_SETMASK, &all, &old) != 0)
        die("fuse", "sigmask");
    pthread_t t;
    int e = pthread_create(&t, NULL, serve, se);
    if (e != 0) {
        errno = e;
        die("fuse", "server thread");
    }
    if (pthread_detach(t) != 0 || pthread_sigmask(SIG_SETMASK, &old, NULL) != 0)
        die("fuse", "server thread");
}
