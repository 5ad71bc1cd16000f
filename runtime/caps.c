/* Capabilities: bounding set before the user switch, the other sets after it. */
#include "ocibox.h"

#include <errno.h>
#include <linux/capability.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *const cap_names[] = {
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK",
    "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
};
#define NCAPS (int)(sizeof cap_names / sizeof cap_names[0])

int cap_from_name(const char *name)
{
    for (int i = 0; i < NCAPS; i++)
        if (strcasecmp(name, cap_names[i]) == 0)
            return i;
    return -1;
}

static int last_cap(void)
{
    static int last = -1;
    if (last >= 0)
        return last;
    last = CAP_LAST_CAP;
    FILE *f = fopen("/proc/sys/kernel/cap_last_cap", "re");
    if (f) {
        if (fscanf(f, "%d", &last) != 1)
            last = CAP_LAST_CAP;
        fclose(f);
    }
    if (last >= 63)
        last = 63;
    return last;
}

void caps_drop_bounding(const struct config *cfg)
{
    if (!cfg->has_caps)
        return;
    for (int c = 0; c <= last_cap(); c++) {
        if (cfg->caps[CS_BOUNDING] & (1ULL << c))
            continue;
        if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0 && errno != EINVAL)
            die("capabilities", c < NCAPS ? cap_names[c] : "bounding set");
    }
}

void caps_apply(const struct config *cfg)
{
    if (!cfg->has_caps)
        return;
    uint64_t known = last_cap() >= 63 ? ~0ULL : (1ULL << (last_cap() + 1)) - 1;
    struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct data[2];
    uint64_t eff = cfg->caps[CS_EFFECTIVE] & known;
    uint64_t prm = cfg->caps[CS_PERMITTED] & known;
    uint64_t inh = cfg->caps[CS_INHERITABLE] & known;
    for (int i = 0; i < 2; i++) {
        data[i].effective = (uint32_t)(eff >> (32 * i));
        data[i].permitted = (uint32_t)(prm >> (32 * i));
        data[i].inheritable = (uint32_t)(inh >> (32 * i));
    }
    if (syscall(SYS_capset, &hdr, data) < 0)
        die("capabilities", "capset");
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        die("capabilities", "ambient");
    for (int c = 0; c <= last_cap(); c++) {
        if (!(cfg->caps[CS_AMBIENT] & (1ULL << c)))
            continue;
        if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, c, 0, 0) < 0)
            die("capabilities", c < NCAPS ? cap_names[c] : "ambient");
    }
}
