/* Memory, cpu and pids limits, on cgroup v2 (unified) or v1 (one hierarchy per controller).
 * The caller's side creates a child cgroup of its own, writes the limits and moves the container's
 * first process in before it starts. A limit that can't be applied is an error that says why. */
#include "ocibox.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CGROOT "/sys/fs/cgroup"

static const char *why_rootless =
    "cannot create a cgroup (running unprivileged without a delegated, writable cgroup; "
    "run as root, or on cgroup v2 with systemd delegation)";

/* A failure after the container's first process exists: end it, remove what was made, say why. */
static _Noreturn void fail(struct cgroup_state *st, const char *path, const char *msg)
{
    int saved = errno;
    if (st->pid > 0) {
        kill(st->pid, SIGKILL);
        while (waitpid(st->pid, NULL, 0) < 0 && errno == EINTR)
            ;
    }
    cgroups_remove(st);
    errno = saved;
    if (msg)
        die_msg("cgroups", path, msg);
    die("cgroups", path);
}

/* The caller's own cgroup path in a hierarchy: "" (v2 entry "0::") or the named v1 controller. */
static char *own_cgroup(const char *controller)
{
    FILE *f = fopen("/proc/self/cgroup", "re");
    if (!f)
        die("cgroups", "/proc/self/cgroup");
    char line[4096];
    char *found = NULL;
    while (!found && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        char *c1 = strchr(line, ':');
        char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2)
            continue;
        *c2 = '\0';
        const char *ctrls = c1 + 1;
        if (!controller[0]) {
            if (!ctrls[0] && strncmp(line, "0", 1) == 0)
                found = xasprintf("%s", c2 + 1);
            continue;
        }
        char *copy = xasprintf("%s", ctrls), *save = NULL;
        for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save))
            if (strcmp(t, controller) == 0)
                found = xasprintf("%s", c2 + 1);
        free(copy);
    }
    fclose(f);
    if (!found)
        found = xasprintf("/");
    return found;
}

static char *group_dir(const char *mountpoint, const char *controller, const struct config *cfg,
                       const char *id)
{
    if (cfg->cgroups_path && cfg->cgroups_path[0] == '/')
        return xasprintf("%s%s", mountpoint, cfg->cgroups_path);
    char *own = own_cgroup(controller);
    const char *name = cfg->cgroups_path ? cfg->cgroups_path : id;
    char *dir = xasprintf("%s%s%s%s", mountpoint, own, strcmp(own, "/") == 0 ? "" : "/", name);
    free(own);
    return dir;
}

static void make_group(struct cgroup_state *st, const char *dir, bool rootless)
{
    if (mkdir(dir, 0755) < 0) {
        if (errno == EEXIST)
            fail(st, dir, "already exists (is a container with this id running?)");
        if (rootless && (errno == EACCES || errno == EPERM || errno == EROFS))
            fail(st, dir, xasprintf("%s: %s", strerror(errno), why_rootless));
        fail(st, dir, NULL);
    }
    st->dirs[st->ndirs++] = xasprintf("%s", dir);
}

static void set_value(struct cgroup_state *st, const char *dir, const char *file, const char *value,
                      const char *why_missing)
{
    char *path = xasprintf("%s/%s", dir, file);
    if (try_write_file(path, value) < 0)
        fail(st, path, errno == ENOENT ? why_missing : NULL);
    free(path);
}

static char *num(int64_t v)
{
    return xasprintf("%lld", (long long)v);
}

static bool is_v2(void)
{
    struct statfs sf;
    return statfs(CGROOT, &sf) == 0 && sf.f_type == CGROUP2_SUPER_MAGIC;
}

static void apply_v1(pid_t pid, const struct config *cfg, const char *id, bool rootless,
                     struct cgroup_state *st)
{
    const struct resources *r = &cfg->res;
    char *pidstr = num(pid);
    bool mem = r->mem_limit >= 0 || r->mem_reservation >= 0 || r->mem_swap >= 0 || r->swappiness >= 0;
    bool cpu = r->cpu_shares >= 0 || r->cpu_quota > 0 || r->cpu_period > 0;
    bool cpuset = r->cpus || r->mems;
    bool pids = r->pids_limit > 0;
    struct {
        bool wanted;
        const char *name;
        const char *const mounts[2];
    } ctrls[] = {
        {mem, "memory", {CGROOT "/memory", NULL}},
        {cpu, "cpu", {CGROOT "/cpu", CGROOT "/cpu,cpuacct"}},
        {cpuset, "cpuset", {CGROOT "/cpuset", NULL}},
        {pids, "pids", {CGROOT "/pids", NULL}},
    };
    for (size_t i = 0; i < sizeof ctrls / sizeof ctrls[0]; i++) {
        if (!ctrls[i].wanted)
            continue;
        const char *mnt = NULL;
        for (int k = 0; k < 2 && !mnt; k++) {
            char *probe = ctrls[i].mounts[k] ? xasprintf("%s/cgroup.procs", ctrls[i].mounts[k]) : NULL;
            if (probe && access(probe, F_OK) == 0)
                mnt = ctrls[i].mounts[k];
            free(probe);
        }
        if (!mnt) {
            fail(st, ctrls[i].mounts[0], xasprintf("the %s controller is not mounted", ctrls[i].name));
        }
        char *dir = group_dir(mnt, ctrls[i].name, cfg, id);
        make_group(st, dir, rootless);
        if (i == 0) {
            if (r->mem_limit >= 0)
                set_value(st, dir, "memory.limit_in_bytes", num(r->mem_limit), NULL);
            if (r->mem_reservation >= 0)
                set_value(st, dir, "memory.soft_limit_in_bytes", num(r->mem_reservation), NULL);
            if (r->mem_swap >= 0)
                set_value(st, dir, "memory.memsw.limit_in_bytes", num(r->mem_swap),
                          "swap accounting is off in this kernel (swapaccount=1), so a swap limit can't be set");
            if (r->swappiness >= 0)
                set_value(st, dir, "memory.swappiness", num(r->swappiness), NULL);
        } else if (i == 1) {
            if (r->cpu_shares >= 0)
                set_value(st, dir, "cpu.shares", num(r->cpu_shares), NULL);
            if (r->cpu_period > 0)
                set_value(st, dir, "cpu.cfs_period_us", num(r->cpu_period), NULL);
            if (r->cpu_quota > 0)
                set_value(st, dir, "cpu.cfs_quota_us", num(r->cpu_quota), "CPU quota (CFS bandwidth) is not available");
        } else if (i == 2) {
            /* a new cpuset starts empty: inherit the parent's unless given */
            char *parent = xasprintf("%s", dir);
            *strrchr(parent, '/') = '\0';
            const char *keys[2] = {"cpuset.cpus", "cpuset.mems"};
            const char *vals[2] = {r->cpus, r->mems};
            for (int k = 0; k < 2; k++) {
                char buf[4096] = "";
                if (!vals[k]) {
                    char *pp = xasprintf("%s/%s", parent, keys[k]);
                    FILE *f = fopen(pp, "re");
                    if (!f || !fgets(buf, sizeof buf, f))
                        fail(st, pp, NULL);
                    fclose(f);
                    free(pp);
                }
                set_value(st, dir, keys[k], vals[k] ? vals[k] : buf, NULL);
            }
            free(parent);
        } else {
            set_value(st, dir, "pids.max", num(r->pids_limit), NULL);
        }
        set_value(st, dir, "cgroup.procs", pidstr, NULL);
        free(dir);
    }
    free(pidstr);
}

static void apply_v2(pid_t pid, const struct config *cfg, const char *id, bool rootless,
                     struct cgroup_state *st)
{
    const struct resources *r = &cfg->res;
    /* Controllers can only be enabled for a group's children when the group itself holds no
     * process (and ours holds the caller). So the container's group goes under a parent without
     * processes: /sys/fs/cgroup/ocibox as root, the parent of the caller's own group (a delegated
     * subtree, when there is one) rootless; or the config's absolute cgroupsPath. */
    char *dir;
    if (cfg->cgroups_path && cfg->cgroups_path[0] == '/') {
        dir = xasprintf(CGROOT "%s", cfg->cgroups_path);
    } else if (!rootless) {
        if (mkdir(CGROOT "/ocibox", 0755) < 0 && errno != EEXIST)
            fail(st, CGROOT "/ocibox", NULL);
        dir = xasprintf(CGROOT "/ocibox/%s", cfg->cgroups_path ? cfg->cgroups_path : id);
    } else {
        char *own = own_cgroup("");
        *strrchr(own, '/') = '\0';
        dir = xasprintf(CGROOT "%s/%s", own, cfg->cgroups_path ? cfg->cgroups_path : id);
        free(own);
    }
    char *parent = xasprintf("%s", dir);
    *strrchr(parent, '/') = '\0';
    const char *needed[4] = {NULL};
    size_t n = 0;
    if (r->mem_limit >= 0 || r->mem_reservation >= 0 || r->mem_swap >= 0)
        needed[n++] = "memory";
    if (r->cpu_shares >= 0 || r->cpu_quota > 0)
        needed[n++] = "cpu";
    if (r->cpus || r->mems)
        needed[n++] = "cpuset";
    if (r->pids_limit > 0)
        needed[n++] = "pids";
    /* enable them in every group from the root down to the parent (rootless: where we may) */
    size_t end = strlen(CGROOT);
    for (;;) {
        bool last = end == strlen(parent);
        char *sub = xasprintf("%.*s/cgroup.subtree_control", (int)end, parent);
        for (size_t i = 0; i < n; i++) {
            char *plus = xasprintf("+%s", needed[i]);
            if (try_write_file(sub, plus) < 0 && (last || !rootless))
                fail(st, sub,
                     xasprintf("can't enable the %s controller: %s%s", needed[i], strerror(errno),
                               rootless ? " (the cgroup is not delegated to this user)" : ""));
            free(plus);
        }
        free(sub);
        if (last)
            break;
        char *next = strchr(parent + end + 1, '/');
        end = next ? (size_t)(next - parent) : strlen(parent);
    }
    make_group(st, dir, rootless);
    if (r->mem_limit >= 0)
        set_value(st, dir, "memory.max", num(r->mem_limit), NULL);
    if (r->mem_reservation >= 0)
        set_value(st, dir, "memory.low", num(r->mem_reservation), NULL);
    if (r->mem_swap >= 0)
        set_value(st, dir, "memory.swap.max",
                  num(r->mem_limit >= 0 && r->mem_swap >= r->mem_limit ? r->mem_swap - r->mem_limit : r->mem_swap),
                  "swap accounting is off in this kernel, so a swap limit can't be set");
    if (r->cpu_shares >= 0)
        set_value(st, dir, "cpu.weight", num(r->cpu_shares <= 2 ? 1 : 1 + ((r->cpu_shares - 2) * 9999) / 262142), NULL);
    if (r->cpu_quota > 0)
        set_value(st, dir, "cpu.max",
                  xasprintf("%lld %lld", (long long)r->cpu_quota, (long long)(r->cpu_period > 0 ? r->cpu_period : 100000)),
                  NULL);
    if (r->cpus)
        set_value(st, dir, "cpuset.cpus", r->cpus, NULL);
    if (r->mems)
        set_value(st, dir, "cpuset.mems", r->mems, NULL);
    if (r->pids_limit > 0)
        set_value(st, dir, "pids.max", num(r->pids_limit), NULL);
    set_value(st, dir, "cgroup.procs", num(pid), NULL);
    free(parent);
    free(dir);
}

void cgroups_apply(pid_t pid, const struct config *cfg, const char *id, bool rootless,
                   struct cgroup_state *st)
{
    st->ndirs = 0;
    st->pid = pid;
    if (!cfg->res.any)
        return;
    if (is_v2())
        apply_v2(pid, cfg, id, rootless, st);
    else
        apply_v1(pid, cfg, id, rootless, st);
}

/* Removes the groups once their processes are gone (retrying briefly while the kernel finishes). */
void cgroups_remove(struct cgroup_state *st)
{
    while (st->ndirs > 0) {
        char *dir = st->dirs[--st->ndirs];
        for (int tries = 0; rmdir(dir) < 0 && errno == EBUSY && tries < 200; tries++) {
            struct timespec ts = {0, 5 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
        free(dir);
    }
}
