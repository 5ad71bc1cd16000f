/* The first process in the new namespaces: waits for the caller to map ids and set cgroups, builds
 * the root, sets hostname, network loopback, rlimits, terminal and the bounding set, then becomes
 * the container's init. */
#include "ocibox.h"

#include <errno.h>
#include <grp.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

static void loopback_up(void)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        die("network", "socket");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
        die("network", "lo");
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
        die("network", "lo");
    close(s);
}

static void send_fd(int sock, int fd)
{
    char byte = 'T';
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    if (sendmsg(sock, &msg, 0) < 0)
        die("terminal", "sendmsg");
}

_Noreturn void container_main(const struct config *cfg, const struct rootfs_opts *opts, int sync)
{
    char go = 0;
    ssize_t n;
    while ((n = read(sync, &go, 1)) < 0 && errno == EINTR)
        ;
    if (n != 1)
        _exit(EXIT_RUNTIME); /* the caller failed and said why */
    bool setgroups_denied = go == 'D' || setgroups_is_denied();
    if (opts->userns) {
        /* become the namespace's root: as real root mapped elsewhere, our ids are still unmapped */
        if (!setgroups_denied && setgroups(0, NULL) < 0)
            die("userns", "setgroups");
        if (setresgid(0, 0, 0) < 0 || setresuid(0, 0, 0) < 0)
            die("userns", "container root (uid 0) is not mapped");
    }
    /* out of the caller's session: keys typed at the caller's terminal signal the caller only, which
     * forwards them once (otherwise init, in the same foreground group, would get them twice) */
    if (setsid() < 0)
        die("init", "setsid");
    /* if the caller dies, so does the container (set after the id change, which would clear it) */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
        die("init", "pdeathsig");
    struct pollfd pf = {.fd = sync, .events = POLLRDHUP};
    if (poll(&pf, 1, 0) > 0 && (pf.revents & (POLLRDHUP | POLLHUP)))
        _exit(EXIT_RUNTIME);

    if ((cfg->clone_flags & CLONE_NEWCGROUP) && unshare(CLONE_NEWCGROUP) < 0)
        die("cgroup namespace", NULL);
    rootfs_setup(cfg, opts);
    if (cfg->hostname) {
        if (!(cfg->clone_flags & CLONE_NEWUTS))
            die_msg("hostname", cfg->hostname, "setting a hostname needs a uts namespace");
        if (sethostname(cfg->hostname, strlen(cfg->hostname)) < 0)
            die("hostname", cfg->hostname);
    }
    if (cfg->clone_flags & CLONE_NEWNET)
        loopback_up();
    for (size_t i = 0; i < cfg->nrlimits; i++) {
        struct rlimit rl = {.rlim_cur = cfg->rlimits[i].soft, .rlim_max = cfg->rlimits[i].hard};
        if (setrlimit(cfg->rlimits[i].resource, &rl) < 0)
            die("rlimits", xasprintf("resource %d (soft %llu, hard %llu)", cfg->rlimits[i].resource,
                                     (unsigned long long)rl.rlim_cur, (unsigned long long)rl.rlim_max));
    }
    int slave = -1;
    if (cfg->terminal) {
        int master = terminal_open_pty(&slave);
        if (fchown(slave, cfg->uid, (gid_t)-1) < 0 && errno != EINVAL && errno != EPERM)
            die("terminal", "chown");
        send_fd(sync, master);
        close(master);
    }
    close(sync);
    caps_drop_bounding(cfg);
    init_run(cfg, slave, setgroups_denied);
}
