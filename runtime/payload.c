/* A compiled executable: this runtime with an image appended to its own file.
 *
 *   [runtime ELF][squashfs payload][config.json][footer]
 *
 * The footer is the last FOOTER_SIZE bytes, little-endian:
 *   0  magic "OCIBOX\0\1"        8  u32 format version (1)   12 u32 footer size (80)
 *   16 u64 payload offset        24 u64 payload size
 *   32 u64 config offset         40 u64 config size
 *   48 sha256 of the payload (32 bytes)
 *
 * At start: the footer of /proc/self/exe (opened once, kept for the FUSE server's preads), the
 * `--ocibox-*` options (taken out wherever they are; every other argument goes to the image's
 * entrypoint unchanged, replacing its Cmd as `docker run IMAGE ARGS` does), then the embedded
 * config completed for this run: terminal when stdin and stdout are terminals, the host's
 * /etc/hosts and /etc/resolv.conf, the caller's working directory when compiled with --bind-cwd,
 * and the options' env, volumes and workdir. Id mappings are left to the caller-side steps of
 * main.c (subuid ranges through newuidmap when present, else one mapping).
 *
 * The payload's sha256 is not checked at every start: that would read the whole image before
 * the program starts (0.35-0.45 s for the 73 MB python image here, page cache warm; a start is
 * 10-20 ms). libsquashfuse checks the superblock, and the hash is checked by --ocibox-verify,
 * --ocibox-info and before every extraction.
 *
 * The terminal: the process gets a pty when stdin and stdout are both terminals (a pty with stdout
 * a pipe would turn "\n" into "\r\n" in the pipe).
 *
 * Without /dev/fuse, the payload is extracted once with libsquashfuse's reader into
 * $XDG_CACHE_HOME/ocibox/<payload sha256> (a temporary folder renamed into place, so concurrent
 * first runs are safe) and run from there. */
#include "ocibox.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#undef _POSIX_C_SOURCE /* libsquashfuse's config.h sets an older one */
#include <squashfuse/squashfuse.h>

#define FOOTER_SIZE 80
#define FORMAT_VERSION 1
static const char MAGIC[8] = {'O', 'C', 'I', 'B', 'O', 'X', '\0', '\1'};
#define SELF "/proc/self/exe"

/* ---- sha256 (FIPS 180-4) ---- */

struct sha256 {
    uint32_t h[8];
    uint64_t len;
    unsigned char buf[64];
    size_t n;
};

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(struct sha256 *s, const unsigned char *p)
{
    uint32_t w[64], a, b, c, d, e, f, g, h;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3], e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    s->h[0] += a, s->h[1] += b, s->h[2] += c, s->h[3] += d, s->h[4] += e, s->h[5] += f, s->h[6] += g,
        s->h[7] += h;
}

static void sha256_init(struct sha256 *s)
{
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memset(s, 0, sizeof *s);
    memcpy(s->h, iv, sizeof iv);
}

static void sha256_update(struct sha256 *s, const unsigned char *p, size_t len)
{
    s->len += len;
    if (s->n) {
        size_t take = 64 - s->n < len ? 64 - s->n : len;
        memcpy(s->buf + s->n, p, take);
        s->n += take, p += take, len -= take;
        if (s->n < 64)
            return;
        sha256_block(s, s->buf);
        s->n = 0;
    }
    for (; len >= 64; p += 64, len -= 64)
        sha256_block(s, p);
    memcpy(s->buf, p, len);
    s->n = len;
}

static void sha256_final(struct sha256 *s, unsigned char out[32])
{
    uint64_t bits = s->len * 8;
    unsigned char pad[72] = {0x80};
    size_t padlen = (s->n < 56 ? 56 : 120) - s->n;
    for (int i = 0; i < 8; i++)
        pad[padlen + i] = (unsigned char)(bits >> (56 - 8 * i));
    sha256_update(s, pad, padlen + 8);
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 4; j++)
            out[4 * i + j] = (unsigned char)(s->h[i] >> (24 - 8 * j));
}

/* ---- the footer ---- */

static uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void read_at(const struct payload *p, void *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(p->fd, (char *)buf + done, len - done, (off_t)(off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("payload: read", SELF);
        if (n == 0)
            die_msg("payload: read", SELF, "the file is shorter than its footer says");
        done += (size_t)n;
    }
}

bool payload_open(struct payload *p)
{
    memset(p, 0, sizeof *p);
    p->fd = open(SELF, O_RDONLY | O_CLOEXEC);
    if (p->fd < 0)
        die("payload", SELF);
    struct stat st;
    if (fstat(p->fd, &st) < 0)
        die("payload", SELF);
    unsigned char f[FOOTER_SIZE];
    if (st.st_size < FOOTER_SIZE) {
        close(p->fd);
        return false;
    }
    read_at(p, f, sizeof f, (uint64_t)st.st_size - FOOTER_SIZE);
    if (memcmp(f, MAGIC, sizeof MAGIC) != 0) {
        close(p->fd);
        p->fd = -1;
        return false;
    }
    p->file_size = (uint64_t)st.st_size;
    p->version = le32(f + 8);
    if (p->version != FORMAT_VERSION || le32(f + 12) != FOOTER_SIZE)
        die_msg("payload", SELF,
                xasprintf("format version %u is not supported by this runtime (it reads %d)", p->version,
                          FORMAT_VERSION));
    p->payload_off = le64(f + 16);
    p->payload_size = le64(f + 24);
    p->config_off = le64(f + 32);
    p->config_size = le64(f + 40);
    memcpy(p->sha256, f + 48, 32);
    uint64_t end = p->file_size - FOOTER_SIZE;
    if (p->payload_off > end || p->payload_size > end - p->payload_off || p->config_off > end ||
        p->config_size > end - p->config_off || p->config_size > (64u << 20))
        die_msg("payload", SELF, "the footer's offsets point outside the file (damaged file?)");
    for (int i = 0; i < 32; i++)
        sprintf(p->digest + 2 * i, "%02x", p->sha256[i]);
    return true;
}

static void payload_verify(const struct payload *p)
{
    struct sha256 s;
    sha256_init(&s);
    size_t chunk = 1 << 20;
    unsigned char *buf = xcalloc(1, chunk);
    for (uint64_t off = 0; off < p->payload_size; off += chunk) {
        size_t n = p->payload_size - off < chunk ? (size_t)(p->payload_size - off) : chunk;
        read_at(p, buf, n, p->payload_off + off);
        sha256_update(&s, buf, n);
    }
    free(buf);
    unsigned char got[32];
    sha256_final(&s, got);
    if (memcmp(got, p->sha256, 32) != 0)
        die_msg("payload", SELF, "sha256 mismatch: the file is damaged or was changed after compiling");
}

/* ---- extraction (libsquashfuse's reader; no unsquashfs needed) ---- */

struct pending_dir {
    char *path;
    mode_t mode;
    uid_t uid;
    gid_t gid;
    struct timespec mtime;
};

struct link_seen {
    uint32_t inode;
    char *path;
};

static void apply_attrs(int fd, const char *path, mode_t mode, uid_t uid, gid_t gid, long mtime, bool owners,
                        bool is_link)
{
    if (owners && fchownat(AT_FDCWD, path, uid, gid, AT_SYMLINK_NOFOLLOW) < 0)
        die("extract: chown", path);
    if (!is_link && (fd >= 0 ? fchmod(fd, mode & 07777) : chmod(path, mode & 07777)) < 0)
        die("extract: chmod", path);
    struct timespec t[2] = {{mtime, 0}, {mtime, 0}};
    if (utimensat(AT_FDCWD, path, t, AT_SYMLINK_NOFOLLOW) < 0)
        die("extract: utimes", path);
}

static void extract_file(sqfs *fs, sqfs_inode *inode, const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        die("extract", path);
    size_t chunk = 1 << 20;
    char *buf = xcalloc(1, chunk);
    uint64_t size = inode->xtra.reg.file_size;
    for (uint64_t off = 0; off < size;) {
        sqfs_off_t n = (sqfs_off_t)(size - off < chunk ? size - off : chunk);
        if (sqfs_read_range(fs, inode, (sqfs_off_t)off, &n, buf) != SQFS_OK || n <= 0)
            die_msg("extract: read", path, "damaged squashfs data");
        for (sqfs_off_t w = 0; w < n;) {
            ssize_t k = write(fd, buf + w, (size_t)(n - w));
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0)
                die("extract: write", path);
            w += k;
        }
        off += (uint64_t)n;
    }
    free(buf);
    if (close(fd) < 0)
        die("extract: write", path);
}

/* Writes the payload's tree into dest (which must not exist); owners only when we may set them. */
static void extract_tree(const struct payload *p, const char *dest, bool owners)
{
    sqfs fs;
    if (sqfs_init(&fs, p->fd, (size_t)p->payload_off) != SQFS_OK)
        die_msg("extract", SELF, "the squashfs payload can't be read (damaged file?)");
    sqfs_inode inode;
    if (sqfs_inode_get(&fs, &inode, sqfs_inode_root(&fs)) != SQFS_OK)
        die_msg("extract", SELF, "the squashfs root can't be read");
    if (mkdir(dest, 0700) < 0)
        die("extract", dest);
    size_t ndirs = 0, nlinks = 0, capdirs = 64, caplinks = 64;
    struct pending_dir *dirs = xcalloc(capdirs, sizeof *dirs);
    struct link_seen *links = xcalloc(caplinks, sizeof *links);
    sqfs_id_t uid, gid;
    if (sqfs_id_get(&fs, inode.base.uid, &uid) != SQFS_OK || sqfs_id_get(&fs, inode.base.guid, &gid) != SQFS_OK)
        die_msg("extract", SELF, "squashfs id table");
    dirs[ndirs++] = (struct pending_dir){xasprintf("%s", dest), inode.base.mode, uid, gid, {inode.base.mtime, 0}};

    bool warned_dev = false;
    sqfs_traverse trv;
    if (sqfs_traverse_open(&trv, &fs, sqfs_inode_root(&fs)) != SQFS_OK)
        die_msg("extract", SELF, "squashfs directory table");
    sqfs_err err = SQFS_OK;
    while (sqfs_traverse_next(&trv, &err)) {
        if (trv.dir_end)
            continue;
        if (sqfs_inode_get(&fs, &inode, sqfs_dentry_inode(&trv.entry)) != SQFS_OK)
            die_msg("extract", trv.path, "squashfs inode");
        if (sqfs_id_get(&fs, inode.base.uid, &uid) != SQFS_OK || sqfs_id_get(&fs, inode.base.guid, &gid) != SQFS_OK)
            die_msg("extract", trv.path, "squashfs id table");
        char *path = xasprintf("%s/%s", dest, trv.path);
        mode_t mode = inode.base.mode;
        long mtime = inode.base.mtime;
        if (!S_ISDIR(mode) && inode.nlink > 1) { /* a hard link: the first path gets the file */
            size_t i;
            for (i = 0; i < nlinks && links[i].inode != inode.base.inode_number; i++)
                ;
            if (i < nlinks) {
                if (link(links[i].path, path) < 0)
                    die("extract: link", path);
                free(path);
                continue;
            }
            if (nlinks == caplinks && !(links = realloc(links, (caplinks *= 2) * sizeof *links)))
                die("memory", NULL);
            links[nlinks++] = (struct link_seen){inode.base.inode_number, xasprintf("%s", path)};
        }
        if (S_ISDIR(mode)) {
            if (mkdir(path, 0700) < 0)
                die("extract", path);
            if (ndirs == capdirs && !(dirs = realloc(dirs, (capdirs *= 2) * sizeof *dirs)))
                die("memory", NULL);
            dirs[ndirs++] = (struct pending_dir){path, mode, uid, gid, {mtime, 0}};
            continue; /* modes once the folder is filled */
        } else if (S_ISREG(mode)) {
            extract_file(&fs, &inode, path);
        } else if (S_ISLNK(mode)) {
            char target[PATH_MAX + 1];
            size_t size = sizeof target;
            if (sqfs_readlink(&fs, &inode, target, &size) != SQFS_OK)
                die_msg("extract: readlink", trv.path, "squashfs symlink");
            if (symlink(target, path) < 0)
                die("extract: symlink", path);
            apply_attrs(-1, path, mode, uid, gid, mtime, owners, true);
            free(path);
            continue;
        } else if (S_ISFIFO(mode) || S_ISSOCK(mode)) {
            if (mknod(path, (mode & S_IFMT) | 0600, 0) < 0)
                die("extract: mknod", path);
        } else { /* character and block devices: only root can make them */
            if (geteuid() != 0 ||
                mknod(path, (mode & S_IFMT) | 0600,
                      makedev((unsigned)inode.xtra.dev.major, (unsigned)inode.xtra.dev.minor)) < 0) {
                if (!warned_dev)
                    notice("device nodes can't be created here; skipped (first: /%s)", trv.path);
                warned_dev = true;
                free(path);
                continue;
            }
        }
        apply_attrs(-1, path, mode, uid, gid, mtime, owners, false);
        free(path);
    }
    if (err != SQFS_OK)
        die_msg("extract", SELF, "squashfs directory table");
    sqfs_traverse_close(&trv);
    for (size_t i = ndirs; i-- > 0;) { /* deepest last created, first finished */
        apply_attrs(-1, dirs[i].path, dirs[i].mode, dirs[i].uid, dirs[i].gid, dirs[i].mtime.tv_sec, owners, false);
        free(dirs[i].path);
    }
    for (size_t i = 0; i < nlinks; i++)
        free(links[i].path);
    free(dirs);
    free(links);
    sqfs_destroy(&fs);
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)ftw;
    if (flag == FTW_DP)
        return rmdir(path);
    return unlink(path);
}

static void make_dirs(const char *path)
{
    char *p = xasprintf("%s", path);
    for (char *s = strchr(p + 1, '/');; s = strchr(s + 1, '/')) {
        if (s)
            *s = '\0';
        if (mkdir(p, 0700) < 0 && errno != EEXIST)
            die("extract", p);
        if (!s)
            break;
        *s = '/';
    }
    free(p);
}

/* The cache folder holding the extracted image, made on first use. */
static char *cached_tree(const struct payload *p)
{
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    char *base;
    if (xdg && xdg[0] == '/')
        base = xasprintf("%s/ocibox", xdg);
    else if (home && home[0] == '/')
        base = xasprintf("%s/.cache/ocibox", home);
    else
        die_msg("extract", "$HOME", "neither XDG_CACHE_HOME nor HOME is set: no place for the image");
    char *dest = xasprintf("%s/%s", base, p->digest);
    struct stat st;
    if (stat(dest, &st) == 0 && S_ISDIR(st.st_mode))
        return dest;
    notice("/dev/fuse can't be used here: the image is extracted once to %s and runs from there", dest);
    make_dirs(base);
    payload_verify(p);
    char *tmp = xasprintf("%s/.tmp-%s-%d", base, p->digest, getpid());
    extract_tree(p, tmp, geteuid() == 0);
    if (rename(tmp, dest) < 0) {
        if (errno != EEXIST && errno != ENOTEMPTY)
            die("extract: rename", dest);
        /* another first run finished before us: use its copy */
        if (nftw(tmp, remove_entry, 16, FTW_DEPTH | FTW_PHYS) < 0)
            die("extract: cleanup", tmp);
    }
    free(tmp);
    free(base);
    return dest;
}

/* ---- as root: the kernel's squashfs on a loop device ---- */

bool payload_loop_mount(int fd, uint64_t offset, uint64_t size, const char *mountpoint)
{
    int ctl = open(HOST "/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (ctl < 0)
        return false;
    bool done = false;
    for (int attempt = 0; attempt < 8 && !done; attempt++) {
        int n = ioctl(ctl, LOOP_CTL_GET_FREE);
        if (n < 0)
            break;
        char dev[64];
        snprintf(dev, sizeof dev, HOST "/dev/loop%d", n);
        int loop = open(dev, O_RDONLY | O_CLOEXEC);
        if (loop < 0)
            break;
        /* read-only, and detached by the kernel once unmounted and closed, so a SIGKILL at any
         * point leaves no loop device behind */
        struct loop_config lc;
        memset(&lc, 0, sizeof lc);
        lc.fd = (uint32_t)fd;
        lc.info.lo_offset = offset;
        lc.info.lo_sizelimit = size;
        lc.info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
        if (ioctl(loop, LOOP_CONFIGURE, &lc) < 0) {
            int e = errno;
            close(loop);
            if (e == EBUSY) /* another process took this one first */
                continue;
            break;
        }
        done = mount(dev, mountpoint, "squashfs", MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) == 0;
        close(loop); /* without a mount, this last close detaches it */
        break;
    }
    close(ctl);
    return done;
}

/* ---- options and the config for this run ---- */

static const char help[] =
    "This program is a container image compiled by ocibox. Its arguments go to the image's\n"
    "entrypoint unchanged (they replace the image's default command). Options for the runtime:\n"
    "  --ocibox-env K=V           set an environment variable (K alone: take it from here)\n"
    "  --ocibox-volume H:C[:ro]   mount host path H at C in the container\n"
    "  --ocibox-workdir DIR       working directory inside the container\n"
    "  --ocibox-info              show what is inside (image, entrypoint, payload) and check it\n"
    "  --ocibox-extract DIR       write the image's root filesystem to DIR and exit\n"
    "  --ocibox-verify            check the payload's sha256 before starting\n"
    "  --ocibox-help              this help\n"
    "  --ocibox-version           the runtime's version\n";

struct run_opts {
    const char **env, **volumes;
    size_t nenv, nvolumes;
    const char *workdir, *extract;
    bool info, verify;
    const char **args;
    size_t nargs;
};

static const char *opt_value(int argc, char **argv, int *i, const char *name)
{
    size_t n = strlen(name);
    if (argv[*i][n] == '=')
        return argv[*i] + n + 1;
    if (*i + 1 >= argc)
        die_msg("arguments", name, "needs a value");
    return argv[++*i];
}

static void parse_run_opts(int argc, char **argv, struct run_opts *o, const char *version)
{
    o->env = xcalloc((size_t)argc, sizeof *o->env);
    o->volumes = xcalloc((size_t)argc, sizeof *o->volumes);
    o->args = xcalloc((size_t)argc + 1, sizeof *o->args);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--ocibox-", 9) != 0) {
            o->args[o->nargs++] = a;
            continue;
        }
        size_t len = strcspn(a, "=");
#define IS(name) (len == strlen(name) && strncmp(a, name, len) == 0)
        if (IS("--ocibox-env"))
            o->env[o->nenv++] = opt_value(argc, argv, &i, "--ocibox-env");
        else if (IS("--ocibox-volume"))
            o->volumes[o->nvolumes++] = opt_value(argc, argv, &i, "--ocibox-volume");
        else if (IS("--ocibox-workdir"))
            o->workdir = opt_value(argc, argv, &i, "--ocibox-workdir");
        else if (IS("--ocibox-extract"))
            o->extract = opt_value(argc, argv, &i, "--ocibox-extract");
        else if (IS("--ocibox-info"))
            o->info = true;
        else if (IS("--ocibox-verify"))
            o->verify = true;
        else if (IS("--ocibox-help")) {
            fputs(help, stdout);
            exit(0);
        } else if (IS("--ocibox-version")) {
            printf(PROG " %s (compiled executable format %d)\n", version, FORMAT_VERSION);
            exit(0);
        } else
            die_msg("arguments", a, "unknown runtime option (see --ocibox-help)");
#undef IS
    }
}

static const char *annotation(json_t *root, const char *key)
{
    json_t *a = json_object_get(root, "annotations");
    json_t *v = a ? json_object_get(a, key) : NULL;
    return v && json_is_string(v) ? json_string_value(v) : NULL;
}

static json_t *get_or_make(json_t *obj, const char *key, json_t *(*make)(void))
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        v = make();
        if (!v || json_object_set_new(obj, key, v) < 0)
            die("memory", NULL);
    }
    return v;
}

static void set_env(json_t *process, const char *kv)
{
    json_t *env = get_or_make(process, "env", json_array);
    const char *eq = strchr(kv, '=');
    char *item;
    if (eq) {
        item = xasprintf("%s", kv);
    } else {
        const char *v = getenv(kv);
        if (!v)
            return; /* like docker: a name without value that the caller hasn't set is skipped */
        item = xasprintf("%s=%s", kv, v);
    }
    size_t klen = (size_t)(strchr(item, '=') - item);
    if (klen == 0)
        die_msg("arguments", kv, "--ocibox-env needs NAME=VALUE");
    size_t i;
    json_t *v;
    json_array_foreach(env, i, v)
    {
        const char *s = json_string_value(v);
        if (s && strncmp(s, item, klen) == 0 && s[klen] == '=') {
            json_array_set_new(env, i, json_string(item));
            free(item);
            return;
        }
    }
    json_array_append_new(env, json_string(item));
    free(item);
}

static bool has_mount(json_t *mounts, const char *dest)
{
    size_t i;
    json_t *m;
    json_array_foreach(mounts, i, m)
    {
        json_t *d = json_object_get(m, "destination");
        if (d && json_is_string(d) && strcmp(json_string_value(d), dest) == 0)
            return true;
    }
    return false;
}

static void add_bind(json_t *mounts, const char *source, const char *dest, bool ro)
{
    json_t *m = json_pack("{s:s, s:s, s:s, s:[s, s]}", "destination", dest, "type", "bind", "source", source,
                          "options", "rbind", ro ? "ro" : "rw");
    if (!m || json_array_append_new(mounts, m) < 0)
        die("memory", NULL);
}

static void add_volume(json_t *mounts, const char *spec)
{
    char *s = xasprintf("%s", spec);
    char *colon = strchr(s, ':');
    if (!colon || colon == s)
        die_msg("arguments", spec, "--ocibox-volume needs HOST:CONTAINER[:ro]");
    *colon = '\0';
    char *dest = colon + 1, *mode = strchr(dest, ':');
    bool ro = false;
    if (mode) {
        *mode++ = '\0';
        if (strcmp(mode, "ro") == 0)
            ro = true;
        else if (strcmp(mode, "rw") != 0)
            die_msg("arguments", spec, "the volume mode must be ro or rw");
    }
    if (dest[0] != '/')
        die_msg("arguments", spec, "the container path of a volume must be absolute");
    char real[PATH_MAX];
    if (!realpath(s, real))
        die("volume", s);
    add_bind(mounts, real, dest, ro);
    free(s);
}

/* The embedded config, completed for this run, as JSON text. */
static char *run_config(const struct payload *p, const struct run_opts *o, json_t *root)
{
    json_t *process = get_or_make(root, "process", json_object);
    if (o->nargs) {
        json_t *args = json_array();
        const char *ep = annotation(root, "org.ocibox.entrypoint");
        json_t *entry = ep ? json_loads(ep, 0, NULL) : NULL;
        size_t i;
        json_t *v;
        if (entry && json_is_array(entry))
            json_array_foreach(entry, i, v) json_array_append(args, v);
        for (size_t k = 0; k < o->nargs; k++)
            json_array_append_new(args, json_string(o->args[k]));
        json_object_set_new(process, "args", args);
        json_decref(entry);
    }
    json_object_set_new(process, "terminal", json_boolean(isatty(STDIN_FILENO) && isatty(STDOUT_FILENO)));
    for (size_t i = 0; i < o->nenv; i++)
        set_env(process, o->env[i]);
    json_t *mounts = get_or_make(root, "mounts", json_array);
    static const char *const etc[] = {"/etc/hosts", "/etc/resolv.conf"};
    for (size_t i = 0; i < 2; i++)
        if (access(etc[i], R_OK) == 0 && !has_mount(mounts, etc[i]))
            add_bind(mounts, etc[i], etc[i], true);
    const char *bind_cwd = annotation(root, "org.ocibox.bind-cwd");
    if (bind_cwd && strcmp(bind_cwd, "true") == 0) {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd))
            die("bind-cwd", ".");
        if (strcmp(cwd, "/") != 0) {
            add_bind(mounts, cwd, cwd, false);
            json_object_set_new(process, "cwd", json_string(cwd));
        }
    }
    for (size_t i = 0; i < o->nvolumes; i++)
        add_volume(mounts, o->volumes[i]);
    if (o->workdir) {
        if (o->workdir[0] != '/')
            die_msg("arguments", o->workdir, "--ocibox-workdir must be an absolute path");
        json_object_set_new(process, "cwd", json_string(o->workdir));
    }
    (void)p;
    char *text = json_dumps(root, JSON_COMPACT);
    if (!text)
        die("memory", NULL);
    return text;
}

static void print_info(const struct payload *p, json_t *root)
{
    const char *image = annotation(root, "org.ocibox.image");
    const char *ep = annotation(root, "org.ocibox.entrypoint"), *cmd = annotation(root, "org.ocibox.cmd");
    printf("format: ocibox compiled executable, version %u\n", p->version);
    printf("image: %s\n", image ? image : "(unknown)");
    printf("payload: squashfs, offset %llu, size %llu, sha256:%s\n", (unsigned long long)p->payload_off,
           (unsigned long long)p->payload_size, p->digest);
    printf("config: offset %llu, size %llu\n", (unsigned long long)p->config_off,
           (unsigned long long)p->config_size);
    printf("entrypoint: %s\n", ep ? ep : "[]");
    printf("cmd: %s\n", cmd ? cmd : "[]");
    const char *bind_cwd = annotation(root, "org.ocibox.bind-cwd");
    printf("bind-cwd: %s\n", bind_cwd && strcmp(bind_cwd, "true") == 0 ? "yes" : "no");
    fflush(stdout);
    payload_verify(p);
    printf("payload check: sha256 ok\n");
}

void payload_start(struct payload *p, int argc, char **argv, const char *version, struct config *cfg,
                   struct rootfs_source *src)
{
    struct run_opts o = {0};
    parse_run_opts(argc, argv, &o, version);
    char *text = xcalloc(1, (size_t)p->config_size + 1);
    read_at(p, text, (size_t)p->config_size, p->config_off);
    json_error_t jerr;
    json_t *root = json_loadb(text, (size_t)p->config_size, 0, &jerr);
    if (!root || !json_is_object(root))
        die_msg("config", SELF, "the embedded config.json is not a JSON object (damaged file?)");
    free(text);
    if (o.info) {
        print_info(p, root);
        exit(0);
    }
    if (o.extract) {
        payload_verify(p);
        char real[PATH_MAX];
        const char *dest = o.extract;
        if (dest[0] != '/') {
            if (!getcwd(real, sizeof real))
                die("extract", ".");
            dest = xasprintf("%s/%s", real, o.extract);
        }
        extract_tree(p, dest, geteuid() == 0);
        exit(0);
    }
    if (o.verify)
        payload_verify(p);

    text = run_config(p, &o, root);
    config_parse(cfg, text, strlen(text), "/", SELF ":config.json");
    /* /dev/fuse usable: it opens, and it is the FUSE device (10:229), not something bound over it */
    int fuse = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    struct stat st;
    bool usable = fuse >= 0 && fstat(fuse, &st) == 0 && S_ISCHR(st.st_mode) && major(st.st_rdev) == 10 &&
                  minor(st.st_rdev) == 229;
    if (fuse >= 0)
        close(fuse);
    if (usable) {
        *src = (struct rootfs_source){.kind = ROOTFS_SQUASHFS, .fd = p->fd, .offset = p->payload_off,
                                      .size = p->payload_size};
        return;
    }
    char *tree = cached_tree(p);
    *src = (struct rootfs_source){.kind = ROOTFS_DIR, .path = tree};
}
