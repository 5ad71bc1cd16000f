/* linux.seccomp of the config (e.g. Docker's default profile) as a libseccomp filter. */
#include "ocibox.h"

#include <errno.h>
#include <jansson.h>
#include <seccomp.h>
#include <stdlib.h>
#include <string.h>

static _Noreturn void bad(const char *what)
{
    die_msg("seccomp", NULL, what);
}

static uint32_t action(const char *name, json_t *errno_ret, uint32_t default_errno)
{
    uint32_t e = errno_ret && json_is_integer(errno_ret) ? (uint32_t)json_integer_value(errno_ret) : default_errno;
    if (strcmp(name, "SCMP_ACT_ALLOW") == 0)
        return SCMP_ACT_ALLOW;
    if (strcmp(name, "SCMP_ACT_ERRNO") == 0)
        return SCMP_ACT_ERRNO(e);
    if (strcmp(name, "SCMP_ACT_KILL") == 0 || strcmp(name, "SCMP_ACT_KILL_THREAD") == 0)
        return SCMP_ACT_KILL;
    if (strcmp(name, "SCMP_ACT_KILL_PROCESS") == 0)
        return SCMP_ACT_KILL_PROCESS;
    if (strcmp(name, "SCMP_ACT_TRAP") == 0)
        return SCMP_ACT_TRAP;
    if (strcmp(name, "SCMP_ACT_LOG") == 0)
        return SCMP_ACT_LOG;
    if (strcmp(name, "SCMP_ACT_TRACE") == 0)
        return SCMP_ACT_TRACE(e);
    bad(xasprintf("unknown action %s", name));
}

static enum scmp_compare op(const char *name)
{
    static const struct {
        const char *name;
        enum scmp_compare op;
    } ops[] = {
        {"SCMP_CMP_NE", SCMP_CMP_NE}, {"SCMP_CMP_LT", SCMP_CMP_LT}, {"SCMP_CMP_LE", SCMP_CMP_LE},
        {"SCMP_CMP_EQ", SCMP_CMP_EQ}, {"SCMP_CMP_GE", SCMP_CMP_GE}, {"SCMP_CMP_GT", SCMP_CMP_GT},
        {"SCMP_CMP_MASKED_EQ", SCMP_CMP_MASKED_EQ},
    };
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
        if (strcmp(name, ops[i].name) == 0)
            return ops[i].op;
    bad(xasprintf("unknown operator %s", name));
}

static uint32_t arch(const char *name)
{
    static const struct {
        const char *name;
        uint32_t arch;
    } archs[] = {
        {"SCMP_ARCH_X86", SCMP_ARCH_X86},         {"SCMP_ARCH_X86_64", SCMP_ARCH_X86_64},
        {"SCMP_ARCH_X32", SCMP_ARCH_X32},         {"SCMP_ARCH_ARM", SCMP_ARCH_ARM},
        {"SCMP_ARCH_AARCH64", SCMP_ARCH_AARCH64},
    };
    for (size_t i = 0; i < sizeof archs / sizeof archs[0]; i++)
        if (strcmp(name, archs[i].name) == 0)
            return archs[i].arch;
    return 0; /* an architecture this build doesn't know is skipped */
}

void seccomp_apply(const struct config *cfg)
{
    json_t *sc = cfg->seccomp;
    if (!sc)
        return;
    json_t *dflt = json_object_get(sc, "defaultAction");
    if (!json_is_string(dflt))
        bad("missing defaultAction");
    uint32_t default_errno = EPERM;
    json_t *der = json_object_get(sc, "defaultErrnoRet");
    uint32_t def = action(json_string_value(dflt), der, default_errno);
    scmp_filter_ctx ctx = seccomp_init(def);
    if (!ctx)
        bad("seccomp_init failed");
    json_t *archs = json_object_get(sc, "architectures");
    for (size_t i = 0; json_is_array(archs) && i < json_array_size(archs); i++) {
        uint32_t a = arch(json_string_value(json_array_get(archs, i)) ?: "");
        if (a && a != seccomp_arch_native()) {
            int r = seccomp_arch_add(ctx, a);
            if (r < 0 && r != -EEXIST)
                bad(xasprintf("can't add architecture %s", json_string_value(json_array_get(archs, i))));
        }
    }
    json_t *rules = json_object_get(sc, "syscalls");
    for (size_t i = 0; json_is_array(rules) && i < json_array_size(rules); i++) {
        json_t *rule = json_array_get(rules, i);
        json_t *act = json_object_get(rule, "action");
        if (!json_is_string(act))
            bad("a syscall rule has no action");
        uint32_t a = action(json_string_value(act), json_object_get(rule, "errnoRet"), default_errno);
        if (a == def)
            continue;
        json_t *args = json_object_get(rule, "args");
        size_t nargs = json_is_array(args) ? json_array_size(args) : 0;
        struct scmp_arg_cmp *cmp = xcalloc(nargs, sizeof *cmp);
        for (size_t k = 0; k < nargs; k++) {
            json_t *arg = json_array_get(args, k);
            const char *o = json_string_value(json_object_get(arg, "op"));
            cmp[k].arg = (unsigned)json_integer_value(json_object_get(arg, "index"));
            cmp[k].op = op(o ? o : "");
            cmp[k].datum_a = (scmp_datum_t)json_integer_value(json_object_get(arg, "value"));
            cmp[k].datum_b = (scmp_datum_t)json_integer_value(json_object_get(arg, "valueTwo"));
        }
        json_t *names = json_object_get(rule, "names");
        for (size_t k = 0; json_is_array(names) && k < json_array_size(names); k++) {
            const char *name = json_string_value(json_array_get(names, k));
            int nr = name ? seccomp_syscall_resolve_name(name) : __NR_SCMP_ERROR;
            if (nr == __NR_SCMP_ERROR)
                continue; /* a syscall this architecture doesn't have */
            int r = seccomp_rule_add_array(ctx, a, nr, (unsigned)nargs, cmp);
            if (r < 0 && r != -EEXIST)
                bad(xasprintf("can't add a rule for %s: %s", name, strerror(-r)));
        }
        free(cmp);
    }
    int r = seccomp_load(ctx);
    if (r < 0) {
        errno = -r;
        die("seccomp", "load");
    }
    seccomp_release(ctx);
}
