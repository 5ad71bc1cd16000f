/* Errors and small helpers shared by every step. */
#include "ocibox.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* One line, `ocibox-runtime: <step>: <path>: <reason>`, then exit 125. */
void die_msg(const char *step, const char *path, const char *msg)
{
    if (path)
        fprintf(stderr, PROG ": %s: %s: %s\n", step, path, msg);
    else
        fprintf(stderr, PROG ": %s: %s\n", step, msg);
    fflush(stderr);
    _exit(EXIT_RUNTIME);
}

void die(const char *step, const char *path)
{
    die_msg(step, path, strerror(errno));
}

void notice(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(PROG ": notice: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

int try_write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = strlen(text);
    ssize_t n = write(fd, text, len);
    int saved = errno;
    close(fd);
    if (n < 0) {
        errno = saved;
        return -1;
    }
    if ((size_t)n != len) {
        errno = EIO;
        return -1;
    }
    return 0;
}

void write_file(const char *step, const char *path, const char *text)
{
    if (try_write_file(path, text) < 0)
        die(step, path);
}

char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    char *s;
    va_start(ap, fmt);
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    if (n < 0)
        die("memory", NULL);
    return s;
}

void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        die("memory", NULL);
    return p;
}

int exit_code_of(int status)
{
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return EXIT_RUNTIME;
}
