"""Run a program as an unprivileged user on a system where user namespaces are disabled.

    python3 -m support.nouserns UID GID PROGRAM [ARG...]     (as root)

The machine's own setting is left alone: the program runs inside a user namespace of its own
(ids 0-65535 mapped to themselves) whose `user.max_user_namespaces` is 0, which forbids it and
its children to create any further one, exactly as `sysctl user.max_user_namespaces=0` does
system-wide. The exit status is the program's.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWUSER = 0x10000000


def main(argv: list[str]) -> int:
    uid, gid, program = int(argv[0]), int(argv[1]), argv[2:]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWUSER) != 0:
            os._exit(99)
        os.write(ready_w, b"1")
        os.read(go_r, 1)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        os.execv(program[0], program)
    os.read(ready_r, 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write("0 0 65536\n")
    os.write(go_w, b"1")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
