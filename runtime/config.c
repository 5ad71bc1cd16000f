/* Reads the subset of an OCI runtime-spec config.json that ocibox uses into a plain struct. */
#include "ocibox.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>

static const char *config_path;

static _Noreturn void bad(const char *what)
{
    die_msg("config", config_path, what);
}

static const char *get_str(json_t *obj, const char *key, bool required)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (required)
            bad(xasprintf("missing \"%s\"", key));
        return NULL;
    }
    if (!json_is_string(v))
        bad(xasprintf("\"%s\" must be a string", key));
    return json_string_value(v);
}

static bool get_bool(json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return false;
    if (!json_is_boolean(v))
        bad(xasprintf("\"%s\" must be a boolean", key));
    return json_is_true(v);
}

static int64_t get_int(json_t *obj, const char *key, int64_t dflt)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v))
        return dflt;
    if (!json_is_integer(v))
        bad(xasprintf("\"%s\" must be an integer", key));
    return json_integer_value(v);
}

static json_t *get_obj(json_t *obj, const char *key)
{
    json_t *v = obj ? json_object_get(obj, key) : NULL;
    if (v && json_is_null(v))
        return NULL;
    if (v && !json_is_object(v))
        bad(xasprintf("\"%s\" must be an object", key));
    return v;
}

static json_t *get_array(json_t *obj, const char *key)
{
    json_t *v = obj ? json_object_get(obj, key) : NULL;
    if (v && json_is_null(v))
        return NULL;
    if (v && !json_is_array(v))
        bad(xasprintf("\"%s\" must be an array", key));
    return v;
}

/* A NULL-terminated array of the strings in obj[key] (an empty one when absent). */
static const char *const *get_strv(json_t *obj, const char *key)
{
    json_t *arr = get_array(obj, key);
    size_t n = arr ? json_array_size(arr) : 0;
    const char **v = xcalloc(n + 1, sizeof *v);
    for (size_t i = 0; i < n; i++) {
        json_t *s = json_array_get(arr, i);
        if (!json_is_string(s))
            bad(xasprintf("\"%s\" must hold strings", key));
        v[i] = json_string_value(s);
    }
    return v;
}

static const struct {
    const char *name;
    bool clear;
    unsigned long flag;
} mount_flags[] = {
    {"ro", false, MS_RDONLY},         {"rw", true, MS_RDONLY},
    {"nosuid", false, MS_NOSUID},     {"suid", true, MS_NOSUID},
    {"nodev", false, MS_NODEV},       {"dev", true, MS_NODEV},
    {"noexec", false, MS_NOEXEC},     {"exec", true, MS_NOEXEC},
    {"sync", false, MS_SYNCHRONOUS},  {"async", true, MS_SYNCHRONOUS},
    {"dirsync", false, MS_DIRSYNC},   {"remount", false, MS_REMOUNT},
    {"mand", false, MS_MANDLOCK},     {"nomand", true, MS_MANDLOCK},
    {"atime", true, MS_NOATIME},      {"noatime", false, MS_NOATIME},
    {"diratime", true, MS_NODIRATIME}, {"nodiratime", false, MS_NODIRATIME},
    {"relatime", false, MS_RELATIME}, {"norelatime", true, MS_RELATIME},
    {"strictatime", false, MS_STRICTATIME}, {"nostrictatime", true, MS_STRICTATIME},
};

static const struct {
    const char *name;
    unsigned long flag;
} propagation_flags[] = {
    {"private", MS_PRIVATE},   {"rprivate", MS_PRIVATE | MS_REC},
    {"shared", MS_SHARED},     {"rshared", MS_SHARED | MS_REC},
    {"slave", MS_SLAVE},       {"rslave", MS_SLAVE | MS_REC},
    {"unbindable", MS_UNBINDABLE}, {"runbindable", MS_UNBINDABLE | MS_REC},
};

static void parse_mount_option(struct mount_cfg *m, const char *opt)
{
    if (strcmp(opt, "bind") == 0 || strcmp(opt, "rbind") == 0) {
        m->bind = true;
        m->recursive = opt[0] == 'r';
        return;
    }
    for (size_t i = 0; i < sizeof mount_flags / sizeof mount_flags[0]; i++) {
        if (strcmp(opt, mount_flags[i].name) == 0) {
            if (mount_flags[i].clear)
                m->flags &= ~mount_flags[i].flag;
            else
                m->flags |= mount_flags[i].flag;
            return;
        }
    }
    for (size_t i = 0; i < sizeof propagation_flags / sizeof propagation_flags[0]; i++) {
        if (strcmp(opt, propagation_flags[i].name) == 0) {
            m->propagation = propagation_flags[i].flag;
            return;
        }
    }
    char *old = m->data;
    m->data = old ? xasprintf("%s,%s", old, opt) : xasprintf("%s", opt);
    free(old);
}

static void parse_mounts(struct config *cfg, json_t *root)
{
    json_t *arr = get_array(root, "mounts");
    cfg->nmounts = arr ? json_array_size(arr) : 0;
    cfg->mounts = xcalloc(cfg->nmounts, sizeof *cfg->mounts);
    for (size_t i = 0; i < cfg->nmounts; i++) {
        json_t *o = json_array_get(arr, i);
        struct mount_cfg *m = &cfg->mounts[i];
        if (!json_is_object(o))
            bad("\"mounts\" must hold objects");
        m->dest = get_str(o, "destination", true);
        if (m->dest[0] != '/')
            bad(xasprintf("mount destination %s is not absolute", m->dest));
        m->type = get_str(o, "type", false);
        m->source = get_str(o, "source", false);
        const char *const *opts = get_strv(o, "options");
        for (size_t j = 0; opts[j]; j++)
            parse_mount_option(m, opts[j]);
        if (m->type && strcmp(m->type, "bind") == 0)
            m->bind = true;
        if (!m->type && !m->bind)
            bad(xasprintf("mount %s has no type", m->dest));
        if (m->bind && !m->source)
            bad(xasprintf("bind mount %s has no source", m->dest));
        if (m->bind && m->source[0] != '/')
            m->source = xasprintf("%s/%s", cfg->bundle, m->source);
    }
}

static const struct {
    const char *name;
    int resource;
} rlimit_names[] = {
    {"RLIMIT_AS", RLIMIT_AS},           {"RLIMIT_CORE", RLIMIT_CORE},
    {"RLIMIT_CPU", RLIMIT_CPU},         {"RLIMIT_DATA", RLIMIT_DATA},
    {"RLIMIT_FSIZE", RLIMIT_FSIZE},     {"RLIMIT_LOCKS", RLIMIT_LOCKS},
    {"RLIMIT_MEMLOCK", RLIMIT_MEMLOCK}, {"RLIMIT_MSGQUEUE", RLIMIT_MSGQUEUE},
    {"RLIMIT_NICE", RLIMIT_NICE},       {"RLIMIT_NOFILE", RLIMIT_NOFILE},
    {"RLIMIT_NPROC", RLIMIT_NPROC},     {"RLIMIT_RSS", RLIMIT_RSS},
    {"RLIMIT_RTPRIO", RLIMIT_RTPRIO},   {"RLIMIT_RTTIME", RLIMIT_RTTIME},
    {"RLIMIT_SIGPENDING", RLIMIT_SIGPENDING}, {"RLIMIT_STACK", RLIMIT_STACK},
};

static rlim_t get_rlim(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    if (!v || !json_is_integer(v))
        bad(xasprintf("rlimit needs an integer \"%s\"", key));
    json_int_t n = json_integer_value(v);
    /* JSON has no unsigned 64-bit: -1 (or anything negative) means unlimited */
    return n < 0 ? RLIM_INFINITY : (rlim_t)n;
}

static void parse_process(struct config *cfg, json_t *root)
{
    json_t *p = get_obj(root, "process");
    if (!p)
        bad("missing \"process\"");
    cfg->args = get_strv(p, "args");
    if (!cfg->args[0])
        bad("\"process.args\" is empty");
    cfg->env = get_strv(p, "env");
    cfg->cwd = get_str(p, "cwd", false);
    if (!cfg->cwd)
        cfg->cwd = "/";
    if (cfg->cwd[0] != '/')
        bad("\"process.cwd\" must be absolute");
    cfg->terminal = get_bool(p, "terminal");
    cfg->no_new_privs = get_bool(p, "noNewPrivileges");
    json_t *oom = json_object_get(p, "oomScoreAdj");
    if (oom && json_is_integer(oom)) {
        cfg->has_oom_score_adj = true;
        cfg->oom_score_adj = (int)json_integer_value(oom);
    }

    json_t *u = get_obj(p, "user");
    cfg->umask = -1;
    if (u) {
        cfg->uid = (uid_t)get_int(u, "uid", 0);
        cfg->gid = (gid_t)get_int(u, "gid", 0);
        cfg->umask = (int)get_int(u, "umask", -1);
        json_t *g = get_array(u, "additionalGids");
        cfg->ngids = g ? json_array_size(g) : 0;
        cfg->gids = xcalloc(cfg->ngids, sizeof *cfg->gids);
        for (size_t i = 0; i < cfg->ngids; i++) {
            json_t *v = json_array_get(g, i);
            if (!json_is_integer(v))
                bad("\"additionalGids\" must hold integers");
            cfg->gids[i] = (gid_t)json_integer_value(v);
        }
    }

    json_t *rl = get_array(p, "rlimits");
    cfg->nrlimits = rl ? json_array_size(rl) : 0;
    cfg->rlimits = xcalloc(cfg->nrlimits, sizeof *cfg->rlimits);
    for (size_t i = 0; i < cfg->nrlimits; i++) {
        json_t *o = json_array_get(rl, i);
        const char *type = get_str(o, "type", true);
        size_t k;
        for (k = 0; k < sizeof rlimit_names / sizeof rlimit_names[0]; k++)
            if (strcmp(type, rlimit_names[k].name) == 0)
                break;
        if (k == sizeof rlimit_names / sizeof rlimit_names[0])
            bad(xasprintf("unknown rlimit %s", type));
        cfg->rlimits[i].resource = rlimit_names[k].resource;
        cfg->rlimits[i].soft = get_rlim(o, "soft");
        cfg->rlimits[i].hard = get_rlim(o, "hard");
    }

    json_t *caps = get_obj(p, "capabilities");
    if (caps) {
        static const char *const sets[CS_NSETS] = {"bounding", "effective", "inheritable",
                                                    "permitted", "ambient"};
        cfg->has_caps = true;
        for (int s = 0; s < CS_NSETS; s++) {
            const char *const *names = get_strv(caps, sets[s]);
            for (size_t i = 0; names[i]; i++) {
                int c = cap_from_name(names[i]);
                if (c < 0)
                    bad(xasprintf("unknown capability %s", names[i]));
                cfg->caps[s] |= 1ULL << c;
            }
        }
    }
}

static const struct {
    const char *name;
    int flag;
} namespace_names[] = {
    {"pid", CLONE_NEWPID}, {"network", CLONE_NEWNET}, {"mount", CLONE_NEWNS},
    {"ipc", CLONE_NEWIPC}, {"uts", CLONE_NEWUTS},     {"user", CLONE_NEWUSER},
    {"cgroup", CLONE_NEWCGROUP},
};

static void parse_idmaps(json_t *lx, const char *key, struct idmap **out, size_t *n)
{
    json_t *arr = get_array(lx, key);
    *n = arr ? json_array_size(arr) : 0;
    *out = xcalloc(*n, sizeof **out);
    for (size_t i = 0; i < *n; i++) {
        json_t *o = json_array_get(arr, i);
        (*out)[i].inside = (unsigned long)get_int(o, "containerID", 0);
        (*out)[i].outside = (unsigned long)get_int(o, "hostID", 0);
        (*out)[i].count = (unsigned long)get_int(o, "size", 0);
        if ((*out)[i].count == 0)
            bad(xasprintf("\"%s\" entry has no size", key));
    }
}

static void parse_resources(struct config *cfg, json_t *lx)
{
    struct resources *r = &cfg->res;
    r->mem_limit = r->mem_reservation = r->mem_swap = r->swappiness = -1;
    r->cpu_shares = r->cpu_quota = r->cpu_period = r->pids_limit = -1;
    json_t *res = get_obj(lx, "resources");
    if (!res)
        return;
    /* limits this runtime can't apply are refused rather than ignored */
    static const char *const unsupported[] = {"blockIO", "hugepageLimits", "rdma", "network", "unified"};
    for (size_t i = 0; i < sizeof unsupported / sizeof unsupported[0]; i++) {
        json_t *v = json_object_get(res, unsupported[i]);
        if (v && !json_is_null(v) && !(json_is_object(v) && json_object_size(v) == 0) &&
            !(json_is_array(v) && json_array_size(v) == 0))
            bad(xasprintf("linux.resources.%s is not supported by this runtime", unsupported[i]));
    }
    json_t *mem = get_obj(res, "memory");
    if (mem) {
        r->mem_limit = get_int(mem, "limit", -1);
        r->mem_reservation = get_int(mem, "reservation", -1);
        r->mem_swap = get_int(mem, "swap", -1);
        r->swappiness = get_int(mem, "swappiness", -1);
        if (get_int(mem, "kernel", -1) >= 0 || get_int(mem, "kernelTCP", -1) >= 0)
            bad("linux.resources.memory.kernel and kernelTCP are not supported by this runtime");
        /* docker writes swappiness as uint64 max to mean "unset" */
        if (r->swappiness > 100)
            r->swappiness = -1;
    }
    json_t *cpu = get_obj(res, "cpu");
    if (cpu) {
        r->cpu_shares = get_int(cpu, "shares", -1);
        r->cpu_quota = get_int(cpu, "quota", -1);
        r->cpu_period = get_int(cpu, "period", -1);
        r->cpus = get_str(cpu, "cpus", false);
        r->mems = get_str(cpu, "mems", false);
        if (r->cpus && !r->cpus[0])
            r->cpus = NULL;
        if (r->mems && !r->mems[0])
            r->mems = NULL;
    }
    json_t *pids = get_obj(res, "pids");
    if (pids)
        r->pids_limit = get_int(pids, "limit", -1);
    r->any = r->mem_limit >= 0 || r->mem_reservation >= 0 || r->mem_swap >= 0 || r->swappiness >= 0 ||
             r->cpu_shares >= 0 || r->cpu_quota > 0 || r->cpu_period > 0 || r->cpus || r->mems ||
             r->pids_limit > 0;
}

static void parse_linux(struct config *cfg, json_t *root)
{
    json_t *lx = get_obj(root, "linux");
    json_t *ns = get_array(lx, "namespaces");
    for (size_t i = 0; ns && i < json_array_size(ns); i++) {
        json_t *o = json_array_get(ns, i);
        const char *type = get_str(o, "type", true);
        size_t k;
        for (k = 0; k < sizeof namespace_names / sizeof namespace_names[0]; k++)
            if (strcmp(type, namespace_names[k].name) == 0)
                break;
        if (k == sizeof namespace_names / sizeof namespace_names[0])
            bad(xasprintf("unknown namespace %s", type));
        if (get_str(o, "path", false))
            bad(xasprintf("joining an existing %s namespace (\"path\") is not supported", type));
        cfg->clone_flags |= namespace_names[k].flag;
    }
    parse_idmaps(lx, "uidMappings", &cfg->uidmaps, &cfg->nuidmaps);
    parse_idmaps(lx, "gidMappings", &cfg->gidmaps, &cfg->ngidmaps);
    parse_resources(cfg, lx);
    cfg->cgroups_path = lx ? get_str(lx, "cgroupsPath", false) : NULL;
    cfg->masked = get_strv(lx, "maskedPaths");
    cfg->readonly = get_strv(lx, "readonlyPaths");
    json_t *sc = get_obj(lx, "seccomp");
    cfg->seccomp = sc;
    const char *prop = lx ? get_str(lx, "rootfsPropagation", false) : NULL;
    cfg->rootfs_propagation = MS_SLAVE | MS_REC;
    if (prop) {
        size_t k;
        for (k = 0; k < sizeof propagation_flags / sizeof propagation_flags[0]; k++)
            if (strcmp(prop, propagation_flags[k].name) == 0)
                break;
        if (k == sizeof propagation_flags / sizeof propagation_flags[0])
            bad(xasprintf("unknown rootfsPropagation %s", prop));
        cfg->rootfs_propagation = propagation_flags[k].flag;
    }
    json_t *sysctl = get_obj(lx, "sysctl");
    cfg->nsysctl = sysctl ? json_object_size(sysctl) : 0;
    cfg->sysctl_keys = xcalloc(cfg->nsysctl, sizeof(char *));
    cfg->sysctl_values = xcalloc(cfg->nsysctl, sizeof(char *));
    if (sysctl) {
        const char *key;
        json_t *val;
        size_t i = 0;
        json_object_foreach(sysctl, key, val) {
            if (!json_is_string(val))
                bad(xasprintf("sysctl %s must be a string", key));
            cfg->sysctl_keys[i] = key;
            cfg->sysctl_values[i++] = json_string_value(val);
        }
    }
}

/* Parses config.json text; `base` makes relative paths absolute (the bundle folder), `origin`
 * names the text in messages. Also the entry point for a config embedded in a compiled file. */
void config_parse(struct config *cfg, const char *text, size_t len, const char *base, const char *origin)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->bundle = xasprintf("%s", base);
    config_path = origin;
    json_error_t err;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &err);
    if (!root)
        bad(xasprintf("line %d: %s", err.line, err.text));
    if (!json_is_object(root))
        bad("not a JSON object");
    /* the struct points into this tree; it lives as long as the process */
    parse_process(cfg, root);
    json_t *r = get_obj(root, "root");
    if (!r)
        bad("missing \"root\"");
    const char *path = get_str(r, "path", true);
    cfg->root_path = path[0] == '/' ? xasprintf("%s", path) : xasprintf("%s/%s", base, path);
    cfg->root_readonly = get_bool(r, "readonly");
    cfg->hostname = get_str(root, "hostname", false);
    parse_mounts(cfg, root);
    parse_linux(cfg, root);
}

void config_load(struct config *cfg, const char *bundle)
{
    char abs[PATH_MAX];
    if (!realpath(bundle, abs))
        die("bundle", bundle);
    char *path = xasprintf("%s/config.json", abs);
    FILE *f = fopen(path, "re");
    if (!f)
        die("config", path);
    char *text = NULL;
    size_t cap = 0, len = 0;
    for (;;) {
        if (len == cap) {
            cap = cap ? 2 * cap : 65536;
            text = realloc(text, cap);
            if (!text)
                die("memory", NULL);
        }
        size_t n = fread(text + len, 1, cap - len, f);
        len += n;
        if (n == 0)
            break;
    }
    if (ferror(f))
        die("config", path);
    fclose(f);
    config_parse(cfg, text, len, abs, path);
    char *real = realpath(cfg->root_path, NULL);
    if (!real)
        die("rootfs", cfg->root_path);
    free(cfg->root_path);
    cfg->root_path = real;
}
