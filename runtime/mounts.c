/* The config's mounts, /dev, and the masked and read-only paths, all under the new root.
 * Targets are resolved with openat2(RESOLVE_IN_ROOT), so a symlink in the image can never point a
 * mount outside the container, and mounted through /proc/self/fd of that resolved file. Sources
 * come from the host's root, which is visible under HOST while the new root is built. */
#include "ocibox.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/mount.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

int open_in_root(int rootfd, const char *path, int flags)
{
    struct open_how how = {
        .flags = (uint64_t)(flags | O_CLOEXEC),
        .resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    return (int)syscall(SYS_openat2, rootfd, path, &how, sizeof how);
}

/* The path (through the host's /proc) that names what fd names, for mount(2). */
static char *fd_path(int fd)
{
    return xasprintf(HOST "/proc/self/fd/%d", fd);
}

/* Creates every missing component of path inside the root; the last one as an empty file when
 * as_file (the mount point of a file bind mount), else as a directory. A dangling symlink on the
 * way (e.g. /etc/resolv.conf -> ../run/...) is followed inside the root and its target created. */
static void mkdir_in_root_depth(int rootfd, const char *path, bool as_file, int depth)
{
    if (depth > 40) {
        errno = ELOOP;
        die("mkdir", path);
    }
    char *copy = xasprintf("%s", path);
    size_t len = strlen(copy);
    while (len > 1 && copy[len - 1] == '/')
        copy[--len] = '\0';
    int fd = open_in_root(rootfd, copy, O_PATH);
    if (fd >= 0) {
        close(fd);
        free(copy);
        return;
    }
    for (char *p = copy + 1;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char saved = *p;
        *p = '\0';
        fd = open_in_root(rootfd, copy, O_PATH);
        if (fd < 0 && errno == ENOENT) {
            char *slash = strrchr(copy, '/');
            *slash = '\0';
            int parent = open_in_root(rootfd, copy[0] ? copy : "/", O_PATH | O_DIRECTORY);
            *slash = '/';
            if (parent < 0)
                die("mkdir", copy);
            int r = saved == '\0' && as_file ? mknodat(parent, slash + 1, S_IFREG | 0644, 0)
                                             : mkdirat(parent, slash + 1, 0755);
            if (r < 0 && errno != EEXIST)
                die("mkdir", copy);
            char target[4096];
            ssize_t n = r < 0 ? readlinkat(parent, slash + 1, target, sizeof target - 1) : -1;
            close(parent);
            if (n > 0) { /* a dangling symlink: create what it points to, then go on */
                target[n] = '\0';
                *slash = '\0';
                char *rest = saved ? p + 1 : "";
                char *next = target[0] == '/' ? xasprintf("%s%s%s", target, saved ? "/" : "", rest)
                                              : xasprintf("%s/%s%s%s", copy, target, saved ? "/" : "", rest);
                mkdir_in_root_depth(rootfd, next, as_file, depth + 1);
                free(next);
                free(copy);
                return;
            }
            fd = open_in_root(rootfd, copy, O_PATH);
        }
        if (fd < 0)
            die("mkdir", copy);
        close(fd);
        if (saved == '\0')
            break;
        *p = saved;
    }
    free(copy);
}

void mkdir_in_root(int rootfd, const char *path, bool as_file)
{
    mkdir_in_root_depth(rootfd, path, as_file, 0);
}

/* Adds attributes (read-only, nosuid, ...) to the mount at fd, keeping the ones the kernel locked. */
static void set_attrs(int fd, const char *what, unsigned long flags, bool recursive)
{
    struct mount_attr attr = {0};
    if (flags & MS_RDONLY)
        attr.attr_set |= MOUNT_ATTR_RDONLY;
    if (flags & MS_NOSUID)
        attr.attr_set |= MOUNT_ATTR_NOSUID;
    if (flags & MS_NODEV)
        attr.attr_set |= MOUNT_ATTR_NODEV;
    if (flags & MS_NOEXEC)
        attr.attr_set |= MOUNT_ATTR_NOEXEC;
    if (flags & MS_NODIRATIME)
        attr.attr_set |= MOUNT_ATTR_NODIRATIME;
    if (flags & (MS_NOATIME | MS_STRICTATIME | MS_RELATIME)) {
        attr.attr_clr |= MOUNT_ATTR__ATIME;
        attr.attr_set |= flags & MS_NOATIME ? MOUNT_ATTR_NOATIME
                         : flags & MS_STRICTATIME ? MOUNT_ATTR_STRICTATIME
                                                  : MOUNT_ATTR_RELATIME;
    }
    if (!attr.attr_set && !attr.attr_clr)
        return;
    unsigned int at = AT_EMPTY_PATH | (recursive ? AT_RECURSIVE : 0);
    if (syscall(SYS_mount_setattr, fd, "", at, &attr, sizeof attr) == 0)
        return;
    if (errno != ENOSYS)
        die("mount", what);
    /* kernels before 5.12: remount, repeating the flags the kernel locked on this mount */
    struct statvfs sv;
    char *p = fd_path(fd);
    if (statvfs(p, &sv) < 0)
        die("mount", what);
    unsigned long locked = 0;
    if (sv.f_flag & ST_NOSUID)
        locked |= MS_NOSUID;
    if (sv.f_flag & ST_NODEV)
        locked |= MS_NODEV;
    if (sv.f_flag & ST_NOEXEC)
        locked |= MS_NOEXEC;
    if (sv.f_flag & ST_RDONLY)
        locked |= MS_RDONLY;
    if (!(flags & (MS_NOATIME | MS_STRICTATIME | MS_RELATIME)))
        locked |= sv.f_flag & (ST_NOATIME | ST_NODIRATIME | ST_RELATIME);
    if (mount(NULL, p, NULL, MS_BIND | MS_REMOUNT | flags | locked, NULL) < 0)
        die("mount", what);
    free(p);
}

void mount_set_readonly(int fd, const char *what)
{
    set_attrs(fd, what, MS_RDONLY, true);
}

/* Binds the host path src onto dest in the root and applies flags. */
static void bind_into(int rootfd, const char *src, const char *dest, bool recursive, unsigned long flags,
                      unsigned long propagation)
{
    struct stat st;
    if (stat(src, &st) < 0)
        die("mount", src + strlen(HOST));
    mkdir_in_root(rootfd, dest, !S_ISDIR(st.st_mode));
    int fd = open_in_root(rootfd, dest, O_PATH);
    if (fd < 0)
        die("mount", dest);
    char *target = fd_path(fd);
    if (mount(src, target, NULL, MS_BIND | (recursive ? MS_REC : 0), NULL) < 0)
        die("mount", dest);
    free(target);
    close(fd);
    fd = open_in_root(rootfd, dest, O_PATH); /* now the new mount, not what it covers */
    if (fd < 0)
        die("mount", dest);
    set_attrs(fd, dest, flags, recursive);
    if (propagation) {
        target = fd_path(fd);
        if (mount(NULL, target, NULL, propagation, NULL) < 0)
            die("mount", dest);
        free(target);
    }
    close(fd);
}

static char *without_option(const char *data, const char *prefix)
{
    char *out = xcalloc(strlen(data) + 1, 1);
    char *copy = xasprintf("%s", data), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (strncmp(tok, prefix, strlen(prefix)) == 0)
            continue;
        if (out[0])
            strcat(out, ",");
        strcat(out, tok);
    }
    free(copy);
    return out;
}

static void typed_mount(int rootfd, const struct mount_cfg *m)
{
    mkdir_in_root(rootfd, m->dest, false);
    int fd = open_in_root(rootfd, m->dest, O_PATH);
    if (fd < 0)
        die("mount", m->dest);
    char *target = fd_path(fd);
    const char *source = m->source ? m->source : m->type;
    int r = mount(source, target, m->type, m->flags & ~MS_REMOUNT, m->data);
    if (r < 0) {
        /* What a user namespace may not mount fresh comes from the host instead. */
        int saved = errno;
        if (strcmp(m->type, "devpts") == 0 && m->data && strstr(m->data, "gid=")) {
            char *data = without_option(m->data, "gid=");
            r = mount(source, target, m->type, m->flags, data);
            free(data);
        } else if (saved == EPERM && strcmp(m->type, "sysfs") == 0) {
            close(fd);
            free(target);
            bind_into(rootfd, HOST "/sys", m->dest, true, m->flags | MS_RDONLY, m->propagation);
            return;
        } else if (saved == EPERM && strcmp(m->type, "mqueue") == 0) {
            close(fd);
            free(target);
            bind_into(rootfd, HOST "/dev/mqueue", m->dest, false, m->flags, m->propagation);
            return;
        } else if (saved == EPERM && (strcmp(m->type, "cgroup") == 0 || strcmp(m->type, "cgroup2") == 0)) {
            close(fd);
            free(target);
            bind_into(rootfd, HOST "/sys/fs/cgroup", m->dest, true, m->flags | MS_RDONLY, m->propagation);
            return;
        }
        if (r < 0)
            errno = saved;
    }
    if (r < 0)
        die("mount", m->dest);
    close(fd);
    if (m->propagation) {
        free(target);
        fd = open_in_root(rootfd, m->dest, O_PATH);
        if (fd < 0)
            die("mount", m->dest);
        target = fd_path(fd);
        if (mount(NULL, target, NULL, m->propagation, NULL) < 0)
            die("mount", m->dest);
        close(fd);
    }
    free(target);
}

void mounts_apply(const struct config *cfg, int rootfd)
{
    for (size_t i = 0; i < cfg->nmounts; i++) {
        const struct mount_cfg *m = &cfg->mounts[i];
        if (m->bind) {
            char *src = xasprintf(HOST "%s", m->source);
            bind_into(rootfd, src, m->dest, m->recursive, m->flags, m->propagation);
            free(src);
        } else {
            typed_mount(rootfd, m);
        }
    }
}

static bool has_mount_at(const struct config *cfg, const char *dest)
{
    for (size_t i = 0; i < cfg->nmounts; i++)
        if (strcmp(cfg->mounts[i].dest, dest) == 0)
            return true;
    return false;
}

/* A minimal /dev on the config's /dev mount: the usual character devices and symlinks. As real
 * root they are made with mknod; in a user namespace they are bind mounts of the host's nodes. */
void mounts_devices(const struct config *cfg, int rootfd, bool userns)
{
    static const char *const nodes[] = {"null", "zero", "full", "random", "urandom", "tty"};
    if (!has_mount_at(cfg, "/dev"))
        return;
    int devfd = open_in_root(rootfd, "/dev", O_PATH | O_DIRECTORY);
    if (devfd < 0)
        die("devices", "/dev");
    for (size_t i = 0; i < sizeof nodes / sizeof nodes[0]; i++) {
        char *host = xasprintf(HOST "/dev/%s", nodes[i]);
        char *dest = xasprintf("/dev/%s", nodes[i]);
        struct stat st;
        if (stat(host, &st) < 0)
            die("devices", host + strlen(HOST));
        bool made = false;
        if (!userns) {
            if (mknodat(devfd, nodes[i], S_IFCHR | 0666, st.st_rdev) == 0) {
                if (fchmodat(devfd, nodes[i], 0666, 0) < 0)
                    die("devices", dest);
                made = true;
            } else if (errno == EEXIST) {
                made = true;
            } else if (errno != EPERM) {
                die("devices", dest);
            }
        }
        if (!made)
            bind_into(rootfd, host, dest, false, 0, 0);
        free(host);
        free(dest);
    }
    static const char *const links[][2] = {
        {"fd", "/proc/self/fd"},       {"stdin", "/proc/self/fd/0"}, {"stdout", "/proc/self/fd/1"},
        {"stderr", "/proc/self/fd/2"}, {"ptmx", "pts/ptmx"},
    };
    for (size_t i = 0; i < sizeof links / sizeof links[0]; i++)
        if (symlinkat(links[i][1], devfd, links[i][0]) < 0 && errno != EEXIST)
            die("devices", links[i][0]);
    close(devfd);
}

/* Docker's masked paths (covered by an empty read-only tmpfs or /dev/null) and read-only paths. */
void mounts_mask(const struct config *cfg, int rootfd)
{
    for (size_t i = 0; cfg->masked[i]; i++) {
        const char *p = cfg->masked[i];
        int fd = open_in_root(rootfd, p, O_PATH);
        if (fd < 0 && errno == ENOENT)
            continue;
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0)
            die("masked path", p);
        char *target = fd_path(fd);
        int r = S_ISDIR(st.st_mode) ? mount("tmpfs", target, "tmpfs", MS_RDONLY, NULL)
                                    : mount(HOST "/dev/null", target, NULL, MS_BIND, NULL);
        if (r < 0)
            die("masked path", p);
        free(target);
        close(fd);
    }
    for (size_t i = 0; cfg->readonly[i]; i++) {
        const char *p = cfg->readonly[i];
        int fd = open_in_root(rootfd, p, O_PATH);
        if (fd < 0 && errno == ENOENT)
            continue;
        if (fd < 0)
            die("read-only path", p);
        char *target = fd_path(fd);
        if (mount(target, target, NULL, MS_BIND | MS_REC, NULL) < 0)
            die("read-only path", p);
        free(target);
        close(fd);
        fd = open_in_root(rootfd, p, O_PATH);
        if (fd < 0)
            die("read-only path", p);
        set_attrs(fd, p, MS_RDONLY, true);
        close(fd);
    }
}
