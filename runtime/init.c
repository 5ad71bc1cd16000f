/* PID 1 of the container: starts the process, forwards signals to it, reaps every zombie, and
 * exits with the process's status (128+n when it died of signal n) once it is gone. */
#include "ocibox.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/close_range.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

/* HOME from the container's /etc/passwd when the config's env has none, as runc and Docker do. */
static const char *const *env_with_home(const struct config *cfg)
{
    size_t n = 0;
    for (; cfg->env[n]; n++)
        if (strncmp(cfg->env[n], "HOME=", 5) == 0)
            return cfg->env;
    const char *home = "/";
    char line[1024];
    FILE *f = fopen("/etc/passwd", "re");
    while (f && fgets(line, sizeof line, f)) {
        char *fields[7] = {0}, *rest = line;
        line[strcspn(line, "\n")] = '\0';
        for (int i = 0; i < 7 && rest; i++)
            fields[i] = strsep(&rest, ":");
        if (fields[2] && fields[5] && strtoul(fields[2], NULL, 10) == cfg->uid && fields[5][0] == '/') {
            home = xasprintf("%s", fields[5]);
            break;
        }
    }
    if (f)
        fclose(f);
    const char **env = xcalloc(n + 2, sizeof *env);
    memcpy(env, cfg->env, n * sizeof *env);
    env[n] = xasprintf("HOME=%s", home);
    return env;
}

/* The container process: user, capabilities, no_new_privs, seccomp, working directory, exec. */
static _Noreturn void process_exec(const struct config *cfg, bool setgroups_denied, int errfd)
{
    const char *const *env = env_with_home(cfg);
    if (cfg->has_oom_score_adj) {
        char *v = xasprintf("%d", cfg->oom_score_adj);
        write_file("oom_score_adj", "/proc/self/oom_score_adj", v);
        free(v);
    }
    /* without no_new_privs, loading a filter needs CAP_SYS_ADMIN: load it while we still have it */
    bool seccomp_early = !cfg->no_new_privs;
    if (seccomp_early)
        seccomp_apply(cfg);
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0)
        die("user", "keepcaps");
    if (!setgroups_denied) {
        if (setgroups(cfg->ngids, cfg->gids) < 0)
            die("user", "setgroups");
    } else if (cfg->ngids > 0) {
        notice("additional groups not set: setgroups(2) is denied with a single id mapping");
    }
    if (setresgid(cfg->gid, cfg->gid, cfg->gid) < 0)
        die("user", xasprintf("gid %u", (unsigned)cfg->gid));
    if (setresuid(cfg->uid, cfg->uid, cfg->uid) < 0)
        die("user", xasprintf("uid %u", (unsigned)cfg->uid));
    if (prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0) < 0)
        die("user", "keepcaps");
    caps_apply(cfg);
    if (cfg->umask >= 0)
        umask((mode_t)cfg->umask);
    if (chdir(cfg->cwd) < 0)
        die("cwd", cfg->cwd);
    if (cfg->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        die("no_new_privs", NULL);
    /* nothing the caller left open reaches the container's program */
    if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        if (errno != ENOSYS && errno != EINVAL)
            die("exec", "close_range");
        for (int fd = 3; fd < 4096; fd++)
            fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    if (!seccomp_early)
        seccomp_apply(cfg);
    environ = (char **)env;
    execvp(cfg->args[0], (char *const *)cfg->args);
    int e = errno;
    if (write(errfd, &e, sizeof e) != sizeof e)
        _exit(EXIT_RUNTIME);
    _exit(EXIT_NOT_FOUND);
}

void init_run(const struct config *cfg, int pty_slave, bool setgroups_denied)
{
    sigset_t all, none;
    sigfillset(&all);
    sigemptyset(&none);
    if (sigprocmask(SIG_BLOCK, &all, NULL) < 0)
        die("init", "sigprocmask");
    int errpipe[2];
    if (pipe2(errpipe, O_CLOEXEC) < 0)
        die("init", "pipe");

    pid_t child = fork();
    if (child < 0)
        die("init", "fork");
    if (child == 0) {
        close(errpipe[0]);
        if (sigprocmask(SIG_SETMASK, &none, NULL) < 0)
            die("init", "sigprocmask");
        if (setsid() < 0)
            die("init", "setsid");
        if (pty_slave >= 0) {
            if (ioctl(pty_slave, TIOCSCTTY, 0) < 0)
                die("terminal", "TIOCSCTTY");
            for (int fd = 0; fd < 3; fd++)
                if (dup2(pty_slave, fd) < 0)
                    die("terminal", "dup2");
            if (pty_slave > 2)
                close(pty_slave);
        }
        process_exec(cfg, setgroups_denied, errpipe[1]);
    }

    close(errpipe[1]);
    /* without a pid namespace, orphans of the container still come to us to be reaped */
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
        die("init", "subreaper");
    if (pty_slave >= 0)
        close(pty_slave);
    /* the container's processes may not ptrace or read the memory of their init */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        die("init", "dumpable");

    int exec_errno = 0;
    ssize_t n;
    while ((n = read(errpipe[0], &exec_errno, sizeof exec_errno)) < 0 && errno == EINTR)
        ;
    close(errpipe[0]);
    int exec_failed = n == sizeof exec_errno;
    if (exec_failed)
        fprintf(stderr, PROG ": exec: %s: %s\n", cfg->args[0], strerror(exec_errno));

    int sfd = signalfd(-1, &all, SFD_CLOEXEC);
    if (sfd < 0)
        die("init", "signalfd");
    for (;;) {
        struct signalfd_siginfo si;
        n = read(sfd, &si, sizeof si);
        if (n < 0 && errno == EINTR)
            continue;
        if (n != sizeof si)
            die("init", "signalfd");
        if (si.ssi_signo != SIGCHLD) {
            kill(child, (int)si.ssi_signo);
            continue;
        }
        int status;
        pid_t p;
        while ((p = waitpid(-1, &status, WNOHANG)) > 0) {
            if (p != child)
                continue;
            if (exec_failed)
                _exit(exec_errno == ENOENT || exec_errno == ENOTDIR ? EXIT_NOT_FOUND : EXIT_CANNOT_EXEC);
            _exit(exit_code_of(status));
        }
    }
}
