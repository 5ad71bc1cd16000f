/* ocibox-runtime: command line, and the caller's side of a container's life.
 *
 *   ocibox-runtime run --bundle DIR [--state-dir DIR] [--upper DIR] [--no-overlay] [ID]
 *
 * The caller clones the first container process into new namespaces, maps its ids, puts it in
 * its cgroups, lets it go, then relays signals (and the terminal with -t) until it exits. */
#include "ocibox.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define VERSION "0.1.0"

static const char usage[] =
    "usage: " PROG " run --bundle DIR [--state-dir DIR] [--upper DIR] [--no-overlay] [ID]\n"
    "       " PROG " --version\n";

struct options {
    const char *bundle, *state_dir, *upper, *id;
    bool no_overlay;
};

static void parse_args(int argc, char **argv, struct options *o)
{
    if (argc >= 2 && strcmp(argv[1], "--version") == 0) {
        printf(PROG " " VERSION "\n");
        exit(0);
    }
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        fputs(usage, stdout);
        exit(0);
    }
    if (argc < 2 || strcmp(argv[1], "run") != 0) {
        fputs(usage, stderr);
        exit(EXIT_RUNTIME);
    }
    for (int i = 2; i < argc; i++) {
        const char **slot = NULL;
        if (strcmp(argv[i], "--bundle") == 0 || strcmp(argv[i], "-b") == 0)
            slot = &o->bundle;
        else if (strcmp(argv[i], "--state-dir") == 0)
            slot = &o->state_dir;
        else if (strcmp(argv[i], "--upper") == 0)
            slot = &o->upper;
        if (strcmp(argv[i], "--no-overlay") == 0) {
            o->no_overlay = true;
        } else if (slot) {
            if (i + 1 >= argc)
                die_msg("arguments", argv[i], "needs a value");
            *slot = argv[++i];
        } else if (argv[i][0] == '-') {
            die_msg("arguments", argv[i], "unknown option");
        } else if (!o->id) {
            o->id = argv[i];
        } else {
            die_msg("arguments", argv[i], "unexpected argument");
        }
    }
    if (!o->bundle)
        die_msg("arguments", "--bundle", "is required");
    if (o->id && (strchr(o->id, '/') || !o->id[0] || strcmp(o->id, ".") == 0 || strcmp(o->id, "..") == 0))
        die_msg("arguments", o->id, "a container id may not contain '/'");
}

static char *absolute(const char *path)
{
    if (!path || path[0] == '/')
        return path ? xasprintf("%s", path) : NULL;
    char cwd[4096];
    if (!getcwd(cwd, sizeof cwd))
        die("arguments", path);
    return xasprintf("%s/%s", cwd, path);
}

/* state.json in --state-dir while the container runs: enough for a caller to find and signal it. */
static char *write_state(const char *dir, const char *id, pid_t pid, const char *bundle)
{
    char *path = xasprintf("%s/state.json", dir), *tmp = xasprintf("%s/.state.json.tmp", dir);
    json_t *state = json_pack("{s:s, s:s, s:s, s:i, s:i, s:s}", "ociVersion", "1.0.2", "id", id, "status",
                              "running", "pid", (int)pid, "runtimePid", (int)getpid(), "bundle", bundle);
    if (!state)
        die_msg("state", path, "can't encode the state");
    FILE *f = fopen(tmp, "we");
    if (!f)
        die("state", tmp);
    if (json_dumpf(state, f, JSON_COMPACT) < 0 || fputc('\n', f) == EOF || fflush(f) != 0 ||
        fsync(fileno(f)) < 0 || fclose(f) != 0)
        die("state", tmp);
    json_decref(state);
    if (rename(tmp, path) < 0)
        die("state", path);
    free(tmp);
    return path;
}

static int receive_fd(int sock)
{
    char byte;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n <= 0)
        return -1;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_type != SCM_RIGHTS)
        return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

/* What `ps` shows for the container's PID 1 (instead of the host path and arguments). */
static void set_title(int argc, char **argv, const char *title)
{
    char *end = argv[argc - 1] + strlen(argv[argc - 1]);
    size_t room = (size_t)(end - argv[0]);
    if (strlen(title) > room)
        return;
    memset(argv[0], 0, room);
    memcpy(argv[0], title, strlen(title));
    prctl(PR_SET_NAME, title, 0, 0, 0);
}

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, SIGCHLD,
                                SIGCONT, SIGALRM};

int main(int argc, char **argv)
{
    struct options o = {0};
    struct config cfg;
    struct rootfs_source source;
    struct payload payload;
    if (payload_open(&payload)) { /* a compiled executable: this file ends with an image */
        payload_start(&payload, argc, argv, VERSION, &cfg, &source);
    } else {
        parse_args(argc, argv, &o);
        config_load(&cfg, o.bundle);
        source = (struct rootfs_source){.kind = ROOTFS_DIR, .path = cfg.root_path};
    }
    char *id = o.id ? xasprintf("%s", o.id) : xasprintf("ocibox-%d", getpid());
    char *upper = absolute(o.upper);
    char *state_dir = absolute(o.state_dir);

    bool rootless = geteuid() != 0;
    bool userns = rootless || (cfg.clone_flags & CLONE_NEWUSER);
    int flags = CLONE_NEWNS | (cfg.clone_flags & (CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET)) |
                (userns ? CLONE_NEWUSER : 0);
    if (rootless && (cfg.nuidmaps == 0) != (cfg.ngidmaps == 0))
        die_msg("config", "linux.uidMappings", "give both uidMappings and gidMappings, or neither");

    sigset_t mask;
    sigemptyset(&mask);
    for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
        sigaddset(&mask, forwarded[i]);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
        die("signals", NULL);

    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        die("start", "socketpair");
    fflush(NULL);
    pid_t pid = (pid_t)syscall(SYS_clone, flags | SIGCHLD, NULL, NULL, NULL, NULL);
    if (pid < 0) {
        int saved = errno;
        char *what = xasprintf("clone (namespaces 0x%x)", flags);
        errno = saved;
        if (flags & CLONE_NEWUSER)
            die_userns("start", what);
        die("start", what);
    }
    if (pid == 0) {
        close(sv[0]);
        set_title(argc, argv, "ocibox-init");
        struct rootfs_opts ro = {
            .source = source,
            .upper = upper,
            .userns = userns,
            .no_overlay = o.no_overlay,
        };
        container_main(&cfg, &ro, sv[1]);
    }
    close(sv[1]);
    signal(SIGPIPE, SIG_IGN);

    struct idmapping_result ids = {0};
    if (userns)
        userns_map(pid, &cfg, rootless, &ids);
    struct cgroup_state cg = {0};
    cgroups_apply(pid, &cfg, id, rootless, &cg);
    char *state = state_dir ? write_state(state_dir, id, pid, cfg.bundle) : NULL;
    char go = ids.setgroups_denied ? 'D' : 'G';
    if (write(sv[0], &go, 1) != 1)
        die("start", "sync");

    int sfd = signalfd(-1, &mask, SFD_CLOEXEC);
    if (sfd < 0)
        die("signals", "signalfd");
    int master = -1, sync = sv[0];
    bool stdin_open = true, master_open = false;
    int status = 0;
    for (bool running = true; running;) {
        struct pollfd p[4] = {{sfd, POLLIN, 0}, {sync, POLLIN, 0}, {-1, POLLIN, 0}, {-1, POLLIN, 0}};
        if (master >= 0) {
            p[2].fd = stdin_open ? STDIN_FILENO : -1;
            p[3].fd = master_open ? master : -1;
        }
        if (poll(p, 4, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("wait", "poll");
        }
        if (p[1].revents) {
            int fd = receive_fd(sync);
            if (fd >= 0) {
                master = fd;
                master_open = true;
                terminal_start(master);
            } else {
                close(sync);
                sync = -1;
            }
        }
        if (p[2].revents && !terminal_pump(STDIN_FILENO, master))
            stdin_open = false;
        if (p[3].revents & (POLLIN | POLLHUP | POLLERR)) {
            if (!terminal_pump(master, STDOUT_FILENO))
                master_open = false;
        }
        if (p[0].revents) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof si) != sizeof si)
                continue;
            if (si.ssi_signo == SIGWINCH) {
                if (master >= 0)
                    terminal_winch(master);
            } else if (si.ssi_signo != SIGCHLD) {
                kill(pid, (int)si.ssi_signo);
            }
            pid_t w = waitpid(pid, &status, WNOHANG);
            if (w == pid)
                running = false;
        }
    }
    if (master >= 0) {
        terminal_drain(master);
        terminal_restore();
    }
    cgroups_remove(&cg);
    if (state)
        unlink(state);
    return exit_code_of(status);
}
