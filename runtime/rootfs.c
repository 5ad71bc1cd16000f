/* The container's root: the image tree read-only under a writable overlay, then pivot_root.
 *
 * Steps (all inside the container's own mount namespace, so nothing shows on the host and
 * nothing is left behind, whatever way the runtime ends):
 *   1. the host's mounts become slaves of the host; a tmpfs on /tmp becomes a scratch root, and
 *      pivot_root moves the host's root to HOST (/oldroot) inside it;
 *   2. the rootfs source is attached and gives the lower directory (a host directory, or a compiled
 *      executable's squashfs payload mounted on /lower);
 *   3. overlayfs joins it with an upper and work directory: persistent ones under --upper, or
 *      on the scratch tmpfs (also the fallback when the kernel refuses the given upper); if the
 *      kernel refuses overlayfs altogether (or --no-overlay), a tmpfs root with the image's
 *      top-level entries bound read-only;
 *   4. the config's mounts, /dev, the working directory, sysctls, masked/read-only paths;
 *   5. pivot_root into the overlay, and the scratch root with the host under it is detached. */
#include "ocibox.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SCRATCH "/tmp"

/* The lower (image) directory, as a path inside the scratch root: a host directory seen under
 * HOST, or a squashfs payload mounted on /lower (loop device or FUSE). */
static char *rootfs_source_attach(const struct rootfs_source *src)
{
    switch (src->kind) {
    case ROOTFS_DIR: {
        char *lower = xasprintf(HOST "%s", src->path);
        struct stat st;
        if (stat(lower, &st) < 0)
            die("rootfs", src->path);
        if (!S_ISDIR(st.st_mode))
            die_msg("rootfs", src->path, "not a directory");
        return lower;
    }
    case ROOTFS_SQUASHFS:
        /* a compiled executable's payload: as real root the kernel's squashfs on a loop device,
         * else (or when that fails) served by this process with FUSE (squashfuse.c) */
        if (mkdir("/lower", 0755) < 0)
            die("rootfs", "/lower");
        if (geteuid() != 0 || !payload_loop_mount(src->fd, src->offset, src->size, "/lower"))
            squashfuse_mount(src->fd, src->offset, "/lower");
        return xasprintf("/lower");
    }
    die_msg("rootfs", NULL, "unknown rootfs source");
}

/* overlayfs options split on ',' and lowerdir on ':'; a backslash escapes them in paths. */
static char *overlay_escape(const char *path)
{
    char *out = xcalloc(2 * strlen(path) + 1, 1), *o = out;
    for (const char *p = path; *p; p++) {
        if (*p == ',' || *p == ':' || *p == '\\')
            *o++ = '\\';
        *o++ = *p;
    }
    return out;
}

static int mount_overlay(const char *lower, const char *upper, const char *work, bool userns)
{
    char *l = overlay_escape(lower), *u = overlay_escape(upper), *w = overlay_escape(work);
    char *data = xasprintf("lowerdir=%s,upperdir=%s,workdir=%s%s", l, u, w, userns ? ",userxattr" : "");
    int r = mount("overlay", NEWROOT, "overlay", 0, data);
    int saved = errno;
    free(data);
    free(l);
    free(u);
    free(w);
    errno = saved;
    return r;
}

static void mkdir_host(const char *path)
{
    if (mkdir(path, 0755) < 0 && errno != EEXIST)
        die("rootfs", path + strlen(HOST));
}

static void make_scratch_root(void)
{
    if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) < 0)
        die_userns("mount namespace", "/");
    if (mount("tmpfs", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") < 0)
        die_userns("rootfs", SCRATCH);
    static const char *const dirs[] = {SCRATCH "/oldroot", SCRATCH "/newroot", SCRATCH "/upper",
                                       SCRATCH "/work"};
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++)
        if (mkdir(dirs[i], 0755) < 0)
            die("rootfs", dirs[i]);
    if (chdir(SCRATCH) < 0)
        die("rootfs", SCRATCH);
    if (syscall(SYS_pivot_root, ".", "oldroot") < 0)
        die("pivot_root", SCRATCH);
    if (chdir("/") < 0)
        die("pivot_root", "/");
}

/* Without overlayfs: a tmpfs root holding the image's top-level entries, directories and files
 * bound read-only, symlinks copied. / itself is writable (new mount points, files at the top);
 * everything below the image's top-level directories is read-only. */
static void make_skeleton(const char *lower)
{
    if (mount("tmpfs", NEWROOT, "tmpfs", MS_NOSUID, "mode=0755") < 0)
        die("rootfs", "/");
    DIR *d = opendir(lower);
    if (!d)
        die("rootfs", lower + strlen(HOST));
    struct dirent *e;
    while ((errno = 0, e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        char *src = xasprintf("%s/%s", lower, e->d_name), *dst = xasprintf(NEWROOT "/%s", e->d_name);
        struct stat st;
        if (lstat(src, &st) < 0)
            die("rootfs", src + strlen(HOST));
        if (S_ISLNK(st.st_mode)) {
            char target[4096];
            ssize_t n = readlink(src, target, sizeof target - 1);
            if (n < 0)
                die("rootfs", src + strlen(HOST));
            target[n] = '\0';
            if (symlink(target, dst) < 0)
                die("rootfs", dst + strlen(NEWROOT));
        } else {
            int r = S_ISDIR(st.st_mode) ? mkdir(dst, st.st_mode & 07777) : mknod(dst, S_IFREG | 0644, 0);
            if (r < 0 || mount(src, dst, NULL, MS_BIND | MS_REC, NULL) < 0)
                die("rootfs", dst + strlen(NEWROOT));
            int fd = open(dst, O_PATH | O_CLOEXEC);
            if (fd < 0)
                die("rootfs", dst + strlen(NEWROOT));
            mount_set_readonly(fd, dst + strlen(NEWROOT));
            close(fd);
        }
        free(src);
        free(dst);
    }
    if (errno)
        die("rootfs", lower + strlen(HOST));
    closedir(d);
}

static void make_root(const char *lower, const struct rootfs_opts *opts)
{
    if (opts->no_overlay) {
        make_skeleton(lower);
        return;
    }
    if (opts->upper) {
        char *base = xasprintf(HOST "%s", opts->upper);
        char *upper = xasprintf("%s/upper", base), *work = xasprintf("%s/work", base);
        mkdir_host(base);
        mkdir_host(upper);
        mkdir_host(work);
        if (mount_overlay(lower, upper, work, opts->userns) == 0)
            return;
        notice("overlay with upper %s refused (%s); the writable layer is a tmpfs for this run",
               opts->upper, strerror(errno));
    }
    if (mount_overlay(lower, "/upper", "/work", opts->userns) == 0)
        return;
    notice("overlayfs refused (%s); the image is mounted read-only under a tmpfs root for this run",
           strerror(errno));
    make_skeleton(lower);
}

static void apply_sysctls(const struct config *cfg, int rootfd)
{
    for (size_t i = 0; i < cfg->nsysctl; i++) {
        char *path = xasprintf("/proc/sys/%s", cfg->sysctl_keys[i]);
        for (char *p = path + strlen("/proc/sys/"); *p; p++)
            if (*p == '.')
                *p = '/';
        int fd = open_in_root(rootfd, path, O_WRONLY);
        if (fd < 0)
            die("sysctl", path);
        const char *v = cfg->sysctl_values[i];
        if (write(fd, v, strlen(v)) != (ssize_t)strlen(v))
            die("sysctl", path);
        close(fd);
        free(path);
    }
}

void rootfs_setup(const struct config *cfg, const struct rootfs_opts *opts)
{
    make_scratch_root();
    char *lower = rootfs_source_attach(&opts->source);
    make_root(lower, opts);
    free(lower);

    int rootfd = open(NEWROOT, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (rootfd < 0)
        die("rootfs", NEWROOT);
    mounts_apply(cfg, rootfd);
    mounts_devices(cfg, rootfd, opts->userns);
    mkdir_in_root(rootfd, cfg->cwd, false);
    apply_sysctls(cfg, rootfd);
    mounts_mask(cfg, rootfd);
    close(rootfd);

    if (cfg->root_readonly && mount(NULL, NEWROOT, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL) < 0)
        die("rootfs: read-only", "/");
    if (mount(NULL, NEWROOT, NULL, cfg->rootfs_propagation, NULL) < 0)
        die("rootfs: propagation", "/");

    if (chdir(NEWROOT) < 0)
        die("pivot_root", NEWROOT);
    if (syscall(SYS_pivot_root, ".", ".") < 0)
        die("pivot_root", "/");
    if (umount2(".", MNT_DETACH) < 0)
        die("pivot_root", HOST);
    if (chdir("/") < 0)
        die("pivot_root", "/");
}
