/* -t: a pseudo-terminal from the container's own devpts, relayed to the caller's terminal. */
#include "ocibox.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

static struct termios saved;
static bool saved_ok;

/* Inside the container, after pivot_root: a new pty pair on the container's /dev/pts. */
int terminal_open_pty(int *slave)
{
    int master = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0)
        master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0)
        die("terminal", "/dev/pts/ptmx");
    if (unlockpt(master) < 0)
        die("terminal", "unlockpt");
    *slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY);
    if (*slave < 0) {
        char *name = ptsname(master);
        if (!name)
            die("terminal", "ptsname");
        *slave = open(name, O_RDWR | O_NOCTTY);
        if (*slave < 0)
            die("terminal", name);
    }
    return master;
}

void terminal_winch(int master)
{
    struct winsize ws;
    if (ioctl(STDIN_FILENO, TIOCGWINSZ, &ws) == 0 || ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0)
        ioctl(master, TIOCSWINSZ, &ws); /* best effort: the size is a hint to the program */
}

/* The caller's side: raw mode on our terminal (if stdin is one) and the current window size. */
void terminal_start(int master)
{
    if (isatty(STDIN_FILENO) && tcgetattr(STDIN_FILENO, &saved) == 0) {
        struct termios raw = saved;
        cfmakeraw(&raw);
        if (tcsetattr(STDIN_FILENO, TCSANOW, &raw) < 0)
            die("terminal", "raw mode");
        saved_ok = true;
    }
    terminal_winch(master);
}

void terminal_restore(void)
{
    if (saved_ok)
        tcsetattr(STDIN_FILENO, TCSANOW, &saved);
    saved_ok = false;
}

/* Copies what is readable now; false once `from` is at its end (EOF, or EIO for a closed pty). */
bool terminal_pump(int from, int to)
{
    char buf[65536];
    ssize_t n = read(from, buf, sizeof buf);
    if (n < 0)
        return errno == EINTR || errno == EAGAIN;
    if (n == 0)
        return false;
    for (ssize_t off = 0; off < n;) {
        ssize_t w = write(to, buf + off, (size_t)(n - off));
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return false;
        }
        off += w;
    }
    return true;
}

/* After the container is gone: what the pty still holds, without waiting for more. */
void terminal_drain(int master)
{
    int fl = fcntl(master, F_GETFL);
    if (fl < 0 || fcntl(master, F_SETFL, fl | O_NONBLOCK) < 0)
        return;
    char buf[65536];
    ssize_t n;
    while ((n = read(master, buf, sizeof buf)) > 0)
        for (ssize_t off = 0, w; off < n; off += w)
            if ((w = write(STDOUT_FILENO, buf + off, (size_t)(n - off))) <= 0)
                return;
}
