/* uid/gid maps of the new user namespace, written from the caller's side.
 * Root writes /proc/PID/{uid,gid}_map itself. An unprivileged caller uses the setuid helpers
 * newuidmap/newgidmap with its /etc/subuid and /etc/subgid ranges; without them it maps only
 * itself (container 0 -> caller) and denies setgroups(2), as the kernel requires. */
#include "ocibox.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* The caller's login name, read from /etc/passwd (getpwuid needs NSS, unusable when static). */
static char *user_name(uid_t uid)
{
    FILE *f = fopen("/etc/passwd", "re");
    if (!f)
        return NULL;
    char line[1024];
    char *found = NULL;
    while (!found && fgets(line, sizeof line, f)) {
        char *name = strtok(line, ":");
        strtok(NULL, ":");
        char *id = strtok(NULL, ":");
        if (name && id && strtoul(id, NULL, 10) == uid)
            found = strdup(name);
    }
    fclose(f);
    return found;
}

/* First range of /etc/subuid or /etc/subgid for the user, by name or number. */
static bool sub_range(const char *file, const char *name, unsigned long id, unsigned long *start,
                      unsigned long *count)
{
    FILE *f = fopen(file, "re");
    if (!f)
        return false;
    char line[512];
    bool found = false;
    char idstr[32];
    snprintf(idstr, sizeof idstr, "%lu", id);
    while (!found && fgets(line, sizeof line, f)) {
        char *who = strtok(line, ":");
        char *s = strtok(NULL, ":");
        char *c = strtok(NULL, ":\n");
        if (!who || !s || !c)
            continue;
        if ((name && strcmp(who, name) == 0) || strcmp(who, idstr) == 0) {
            *start = strtoul(s, NULL, 10);
            *count = strtoul(c, NULL, 10);
            found = *count > 0;
        }
    }
    fclose(f);
    return found;
}

static const char *find_helper(const char *name)
{
    static const char *const dirs[] = {"/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"};
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
        char *p = xasprintf("%s/%s", dirs[i], name);
        struct stat st;
        if (stat(p, &st) == 0 && (st.st_mode & S_ISUID))
            return p;
        free(p);
    }
    return NULL;
}

static pid_t spawn_helper(const char *helper, pid_t pid, const struct idmap *maps, size_t n)
{
    char **argv = xcalloc(3 * n + 3, sizeof *argv);
    size_t k = 0;
    argv[k++] = (char *)helper;
    argv[k++] = xasprintf("%d", pid);
    for (size_t i = 0; i < n; i++) {
        argv[k++] = xasprintf("%lu", maps[i].inside);
        argv[k++] = xasprintf("%lu", maps[i].outside);
        argv[k++] = xasprintf("%lu", maps[i].count);
    }
    pid_t child = fork();
    if (child < 0)
        die("userns", helper);
    if (child == 0) {
        execv(helper, argv);
        fprintf(stderr, PROG ": userns: %s: %s\n", helper, strerror(errno));
        _exit(EXIT_RUNTIME);
    }
    for (size_t i = 1; i < k; i++)
        free(argv[i]);
    free(argv);
    return child;
}

static void wait_helper(pid_t child, const char *helper)
{
    int status;
    while (waitpid(child, &status, 0) < 0)
        if (errno != EINTR)
            die("userns", helper);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        die_msg("userns", helper, "failed to write the id map (see its message above)");
}

static void write_map(pid_t pid, const char *which, const struct idmap *maps, size_t n)
{
    char buf[4096];
    size_t len = 0;
    for (size_t i = 0; i < n && len < sizeof buf; i++)
        len += (size_t)snprintf(buf + len, sizeof buf - len, "%lu %lu %lu\n", maps[i].inside,
                                maps[i].outside, maps[i].count);
    char *path = xasprintf("/proc/%d/%s", pid, which);
    if (try_write_file(path, buf) < 0)
        die_userns("userns", path);
    free(path);
}

static long read_sysctl(const char *path)
{
    long v = -1;
    FILE *f = fopen(path, "re");
    if (f) {
        if (fscanf(f, "%ld", &v) != 1)
            v = -1;
        fclose(f);
    }
    return v;
}

/* When the kernel refuses user namespaces, the setting that does it and how to change it. */
const char *userns_hint(void)
{
    if (read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == 0)
        return "unprivileged user namespaces are disabled; enable them with "
               "`sudo sysctl -w kernel.unprivileged_userns_clone=1`";
    if (read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == 1)
        return "AppArmor restricts unprivileged user namespaces; allow them with "
               "`sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`";
    if (read_sysctl("/proc/sys/user/max_user_namespaces") == 0)
        return "user namespaces are disabled (user.max_user_namespaces is 0); enable them with "
               "`sudo sysctl -w user.max_user_namespaces=15000`";
    return NULL;
}

void die_userns(const char *step, const char *path)
{
    int saved = errno;
    const char *hint = userns_hint();
    errno = saved;
    if (!hint)
        die(step, path);
    die_msg(step, path, xasprintf("%s: %s", strerror(saved), hint));
}

/* setgroups(2) is denied in this user namespace (by us, or by whoever made an outer one). */
bool setgroups_is_denied(void)
{
    char buf[16] = "";
    FILE *f = fopen("/proc/self/setgroups", "re");
    if (!f)
        return false;
    bool denied = fgets(buf, sizeof buf, f) && strncmp(buf, "deny", 4) == 0;
    fclose(f);
    return denied;
}

static bool is_self_only(const struct idmap *maps, size_t n, unsigned long self)
{
    return n == 1 && maps[0].count == 1 && maps[0].outside == self;
}

void userns_map(pid_t pid, const struct config *cfg, bool rootless, struct idmapping_result *out)
{
    out->setgroups_denied = false;
    if (!rootless) {
        static const struct idmap identity = {0, 0, 4294967295UL};
        write_map(pid, "uid_map", cfg->nuidmaps ? cfg->uidmaps : &identity, cfg->nuidmaps ? cfg->nuidmaps : 1);
        if (cfg->ngidmaps == 1 && cfg->gidmaps[0].count == 1) {
            /* one group only: there is nothing setgroups(2) could do but drop host groups */
            char *path = xasprintf("/proc/%d/setgroups", pid);
            write_file("userns", path, "deny");
            free(path);
            out->setgroups_denied = true;
        }
        write_map(pid, "gid_map", cfg->ngidmaps ? cfg->gidmaps : &identity, cfg->ngidmaps ? cfg->ngidmaps : 1);
        return;
    }

    uid_t uid = getuid();
    gid_t gid = getgid();
    struct idmap uids[2] = {{0, uid, 1}, {1, 0, 0}}, gids[2] = {{0, gid, 1}, {1, 0, 0}};
    const struct idmap *umap = uids, *gmap = gids;
    size_t nu = 1, ng = 1;
    if (cfg->nuidmaps || cfg->ngidmaps) {
        if (cfg->nuidmaps)
            umap = cfg->uidmaps, nu = cfg->nuidmaps;
        if (cfg->ngidmaps)
            gmap = cfg->gidmaps, ng = cfg->ngidmaps;
    } else {
        char *name = user_name(uid);
        const char *newuidmap = find_helper("newuidmap"), *newgidmap = find_helper("newgidmap");
        bool have_u = sub_range("/etc/subuid", name, uid, &uids[1].outside, &uids[1].count);
        bool have_g = sub_range("/etc/subgid", name, gid, &gids[1].outside, &gids[1].count);
        if (have_u && have_g && newuidmap && newgidmap) {
            nu = ng = 2;
        } else {
            notice("%s; single id mapping (container 0 = uid %u), files of other owners show as nobody",
                   !newuidmap || !newgidmap ? "newuidmap/newgidmap not found"
                                            : "no /etc/subuid and /etc/subgid range for this user",
                   (unsigned)uid);
        }
        free(name);
    }

    /* the two helpers run side by side: each is a setuid exec, the slowest part of a start */
    const char *uhelper = NULL, *ghelper = NULL;
    pid_t uchild = -1, gchild = -1;
    if (!is_self_only(umap, nu, uid)) {
        uhelper = find_helper("newuidmap");
        if (!uhelper)
            die_msg("userns", "newuidmap", "not found, and an unprivileged caller needs it for this uid map");
        uchild = spawn_helper(uhelper, pid, umap, nu);
    }
    if (!is_self_only(gmap, ng, gid)) {
        ghelper = find_helper("newgidmap");
        if (!ghelper)
            die_msg("userns", "newgidmap", "not found, and an unprivileged caller needs it for this gid map");
        gchild = spawn_helper(ghelper, pid, gmap, ng);
    } else {
        char *path = xasprintf("/proc/%d/setgroups", pid);
        write_file("userns", path, "deny");
        free(path);
        out->setgroups_denied = true;
        write_map(pid, "gid_map", gmap, ng);
    }
    if (uchild < 0)
        write_map(pid, "uid_map", umap, nu);
    else
        wait_helper(uchild, uhelper);
    if (gchild >= 0)
        wait_helper(gchild, ghelper);
}
