"""ocibox-runtime on its own: a bundle (busybox rootfs + config.json) started as root and rootless.

A user runs `ocibox-runtime run --bundle DIR` and sees the container's process with the config's
environment, user, hostname, capabilities and limits, isolated from the host, with its exit status.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import termios
import time
from pathlib import Path

import pytest

from runtime_support import (
    DOCKER_CAPEFF,
    DOCKER_CAPS,
    RUNTIME,
    TEST_USER,
    Bundle,
    as_user_argv,
    base_config,
    compile_static,
    make_rootfs,
    resolve_seccomp,
    run_runtime,
    subid_start,
    user_ids,
    world_readable,
)

USERS = ["root", TEST_USER]
CHTEST = Path("/usr/share/doc/charliecloud/examples/chtest")

MEMHOG = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(void) {
    for (int i = 0; i < 64; i++) {
        char *p = malloc(1 << 20);
        if (!p) { puts("malloc failed"); return 1; }
        memset(p, 1, 1 << 20);
    }
    puts("allocated 64 MB");
    return 0;
}
"""

EUID = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("euid=%u\n", (unsigned)geteuid()); return 0; }
"""


@pytest.fixture(scope="session")
def runtime_binary() -> Path:
    subprocess.run(["make", "-s", "-C", str(RUNTIME.parent)], check=True, capture_output=True)
    return RUNTIME


@pytest.fixture(scope="session")
def base_dir(runtime_binary):
    """A world-readable folder for images and bundles, so the test user can use them too."""
    d = Path(tempfile.mkdtemp(prefix="ocibox-rt-", dir="/tmp"))
    d.chmod(0o755)
    world_readable(runtime_binary)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def build_image(root: Path, owner: tuple[int, int] | None) -> Path:
    """The image's rootfs as an unpacker would leave it: files of the owner (root, or the rootless
    user), plus files of uid 1000 (host 1000 as root, host subuid+999 for the rootless user)."""
    make_rootfs(root)
    compile_static(MEMHOG, root / "bin" / "memhog")
    compile_static(EUID, root / "bin" / "euid")
    (root / "data.txt").write_text("image data\n")
    (root / "not-executable").write_text("#!/bin/sh\necho no\n")
    if CHTEST.is_dir():
        for probe in ("chroot-escape", "mknods", "setgroups", "setuid"):
            compile_static((CHTEST / f"{probe}.c").read_text(), root / "bin" / f"ch-{probe}")
    (root / "etc" / "resolv.conf").symlink_to("../run/resolve/stub-resolv.conf")  # dangling, as in Ubuntu
    if owner:
        for p in [root, *root.rglob("*")]:
            os.lchown(p, *owner)
    shutil.copy2(root / "bin" / "euid", root / "bin" / "euid-setuid")
    os.chown(root / "bin" / "euid-setuid", 0, 0)  # owned by the host's root: unmapped when rootless
    os.chmod(root / "bin" / "euid-setuid", 0o4755)
    owned = root / "home" / "app" / "owned"
    owned.write_text("mine\n")
    os.chown(owned, 1000, 1000)
    start = subid_start()
    if start is not None:
        sub_owned = root / "home" / "app" / "owned-sub"
        sub_owned.write_text("mine\n")
        os.chown(sub_owned, start + 999, start + 999)
    world_readable(root)
    return root


@pytest.fixture(scope="session")
def images(base_dir) -> dict[str, Path]:
    """user -> the image's rootfs for that user (the runtime never writes into it)."""
    return {"root": build_image(base_dir / "image-root", None),
            TEST_USER: build_image(base_dir / "image-user", user_ids())}  # fmt: skip


@pytest.fixture
def bundle(base_dir, images, request):
    """A fresh bundle folder whose config points at the shared image of the test's user."""
    d = Path(tempfile.mkdtemp(prefix="bundle-", dir=base_dir))
    d.chmod(0o755)
    user = request.node.callspec.params.get("user", "root") if hasattr(request.node, "callspec") else "root"

    def make(args: list[str], **process) -> Bundle:
        cfg = base_config(args, **process)
        cfg["root"]["path"] = str(images[user])
        return Bundle(d, cfg).write()

    yield make
    shutil.rmtree(d, ignore_errors=True)


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def owned_dir(base: Path, user: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix="vol-", dir=base))
    d.chmod(0o755)
    if user != "root":
        uid, gid = user_ids()
        os.chown(d, uid, gid)
    return d


@pytest.mark.parametrize("user", USERS)
def test_exit_status_passes_through(bundle, user):
    assert run_runtime(bundle(sh("exit 7")), user).returncode == 7
    assert run_runtime(bundle(["true"]), user).returncode == 0


@pytest.mark.parametrize("user", USERS)
def test_death_by_signal_is_128_plus_n(bundle, user):
    assert run_runtime(bundle(sh("kill -TERM $$")), user).returncode == 128 + signal.SIGTERM
    assert run_runtime(bundle(sh("kill -KILL $$")), user).returncode == 128 + signal.SIGKILL


@pytest.mark.parametrize("user", USERS)
def test_env_cwd_user_and_hostname(bundle, user):
    b = bundle(
        sh('echo "$GREETING"; pwd; id -u; id -g; id -G; hostname'),
        env=["PATH=/bin", "GREETING=hello there"],
        cwd="/work/dir",
        user={"uid": 1000, "gid": 1000, "additionalGids": [2000]},
    )
    r = run_runtime(b, user)
    assert r.returncode == 0, r.stderr
    greeting, cwd, uid, gid, groups, hostname = r.stdout.splitlines()
    assert (greeting, cwd, uid, gid, hostname) == ("hello there", "/work/dir", "1000", "1000", "box")
    assert groups.split() == ["1000", "2000"]


@pytest.mark.parametrize("user", USERS)
def test_container_root_and_image_owners(bundle, user):
    r = run_runtime(bundle(sh("id -u; stat -c %u /home/app/owned /home/app/owned-sub")), user)
    assert r.returncode == 0, r.stderr
    uid, owned, owned_sub = r.stdout.split()
    assert uid == "0"
    if user == "root":
        assert owned == "1000"
    else:  # the image's uid 1000 is subuid+999 on the host; host uid 1000 is unmapped
        assert (owned_sub, owned) == ("1000", "65534")


def test_single_mapping_shows_other_owners_as_nobody(bundle):
    uid, gid = user_ids()
    b = bundle(sh("id -u; stat -c %u /home/app/owned-sub /bin/busybox"))
    b.config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": uid, "size": 1}]
    b.config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": gid, "size": 1}]
    b.write()
    r = run_runtime(b, TEST_USER)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "65534", "65534"]


@pytest.mark.parametrize("user", USERS)
def test_writes_go_to_the_upper_dir_not_the_image(bundle, base_dir, images, user):
    image = images[user]
    upper = owned_dir(base_dir, user)
    script = "echo new > /created; echo changed > /data.txt; rm /bin/cat; /bin/cat /created"
    r = run_runtime(bundle(sh(script)), user, "--upper", str(upper))
    assert r.returncode == 127  # cat was removed (in this container only)
    assert not (image / "created").exists()
    assert (image / "data.txt").read_text() == "image data\n"
    assert (image / "bin" / "cat").is_symlink()
    assert (upper / "upper" / "created").read_text() == "new\n"
    # a second container of the same image sees it unchanged
    r = run_runtime(bundle(sh("cat /data.txt; ls /created")), user)
    assert r.stdout.startswith("image data\n") and r.returncode == 1
    # the same upper dir again: the container's own changes persist
    r = run_runtime(bundle(sh("cat /created /data.txt")), user, "--upper", str(upper))
    assert r.stdout == "new\nchanged\n", r.stderr


@pytest.mark.parametrize("user", USERS)
def test_read_only_root(bundle, user):
    b = bundle(sh("touch /x 2>&1; echo ok > /tmp/x && cat /tmp/x"))
    b.config["root"]["readonly"] = True
    b.config["mounts"].append(
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}
    )
    b.write()
    r = run_runtime(b, user)
    assert "Read-only file system" in r.stdout
    assert r.stdout.endswith("ok\n")


@pytest.mark.parametrize("user", USERS)
def test_proc_shows_only_the_containers_processes(bundle, user):
    r = run_runtime(bundle(sh("ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '")), user)
    assert r.returncode == 0, r.stderr
    pids = [int(p) for p in r.stdout.split()]  # init, sh, ls, grep, sort, tr
    assert pids == list(range(1, len(pids) + 1)) and len(pids) <= 7


@pytest.mark.parametrize("user", USERS)
def test_capabilities_and_no_new_privs_follow_the_config(bundle, user):
    r = run_runtime(bundle(sh("grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status")), user)
    assert r.returncode == 0, r.stderr
    status = dict(line.split(":\t") for line in r.stdout.splitlines())
    assert status == {"CapEff": DOCKER_CAPEFF, "CapBnd": DOCKER_CAPEFF, "NoNewPrivs": "1"}
    b = bundle(
        sh("grep -E '^(CapEff|NoNewPrivs)' /proc/self/status"),
        capabilities={"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]},
        noNewPrivileges=False,
    )
    assert run_runtime(b, user).stdout == "CapEff:\t0000000000000020\nNoNewPrivs:\t0\n"
    b = bundle(sh("grep -E '^CapEff' /proc/self/status"), user={"uid": 1000, "gid": 1000})
    assert run_runtime(b, user).stdout == "CapEff:\t0000000000000000\n"


@pytest.mark.parametrize("user", USERS)
def test_a_setuid_binary_gains_nothing(bundle, user):
    b = bundle(["/bin/euid-setuid"], user={"uid": 1000, "gid": 1000})
    r = run_runtime(b, user)
    assert r.stdout == "euid=1000\n", r.stderr


@pytest.mark.parametrize("user", USERS)
def test_rlimits(bundle, user):
    b = bundle(
        sh("ulimit -n; ulimit -Hn; ulimit -c"),
        rlimits=[
            {"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456},
            {"type": "RLIMIT_CORE", "soft": 0, "hard": 0},
        ],
    )
    assert run_runtime(b, user).stdout == "123\n456\n0\n"


@pytest.mark.parametrize("user", USERS)
def test_volumes_read_write_read_only_and_files(bundle, base_dir, user):
    rw, ro = owned_dir(base_dir, user), owned_dir(base_dir, user)
    (ro / "in.txt").write_text("from host\n")
    (ro / "in.txt").chmod(0o644)
    hosts = owned_dir(base_dir, user) / "hosts"
    hosts.write_text("127.0.0.1 localhost box\n")
    hosts.chmod(0o644)
    b = bundle(
        sh(
            "echo out > /rw/out.txt; cat /ro/in.txt; echo x > /ro/no 2>/dev/null || echo refused; cat /etc/hosts"
        )
    )
    b.config["mounts"] += [
        {"destination": "/rw", "type": "bind", "source": str(rw), "options": ["rbind", "rw"]},
        {"destination": "/ro", "type": "bind", "source": str(ro), "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": str(hosts), "options": ["rbind", "ro"]},
    ]
    b.write()
    r = run_runtime(b, user)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "from host\nrefused\n127.0.0.1 localhost box\n"
    assert (rw / "out.txt").read_text() == "out\n"
    assert not (ro / "no").exists()


@pytest.mark.parametrize("user", USERS)
def test_tmpfs_mount(bundle, user):
    b = bundle(sh("echo x > /scratch/f && grep ' /scratch ' /proc/mounts"))
    b.config["mounts"].append(
        {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=1m"]}
    )
    b.write()
    r = run_runtime(b, user)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("tmpfs /scratch tmpfs rw,nosuid")


@pytest.mark.parametrize("user", USERS)
def test_command_not_found_and_not_executable(bundle, user):
    r = run_runtime(bundle(["/no/such/program"]), user)
    assert r.returncode == 127
    assert r.stderr == "ocibox-runtime: exec: /no/such/program: No such file or directory\n"
    r = run_runtime(bundle(["/not-executable"]), user)
    assert r.returncode == 126
    assert r.stderr == "ocibox-runtime: exec: /not-executable: Permission denied\n"


@pytest.mark.parametrize("user", USERS)
def test_a_failing_step_names_the_step_and_path(bundle, user):
    b = bundle(["true"])
    b.config["mounts"].append(
        {"destination": "/v", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]}
    )
    b.write()
    r = run_runtime(b, user)
    assert r.returncode == 125
    assert r.stderr == "ocibox-runtime: mount: /no/such/dir: No such file or directory\n"


def test_bad_config_is_one_line(bundle):
    b = bundle(["true"])
    (b.dir / "config.json").write_text("{not json")
    r = run_runtime(b)
    assert r.returncode == 125
    assert re.fullmatch(r"ocibox-runtime: config: \S+/config.json: line 1: .*\n", r.stderr)


def test_memory_limit_kills_a_process_that_allocates_more(bundle):
    b = bundle(["/bin/memhog"])
    assert run_runtime(b).stdout == "allocated 64 MB\n"
    b.config["linux"]["resources"] = {"memory": {"limit": 32 * 1024 * 1024}}
    b.write()
    r = run_runtime(b)
    assert r.returncode == 128 + signal.SIGKILL, r.stdout + r.stderr
    assert "allocated" not in r.stdout


def test_rootless_memory_limit_fails_and_says_why(bundle):
    b = bundle(["/bin/memhog"])
    b.config["linux"]["resources"] = {"memory": {"limit": 32 * 1024 * 1024}}
    b.write()
    r = run_runtime(b, TEST_USER)
    assert r.returncode == 125
    assert r.stderr.startswith("ocibox-runtime: cgroups: /sys/fs/cgroup/memory/")
    assert "delegated" in r.stderr and len(r.stderr.splitlines()) == 1


def test_pids_limit(bundle):
    b = bundle(sh("for i in 1 2 3 4 5 6 7 8; do sleep 5 & done 2>&1 | head -1; kill $(jobs -p) 2>/dev/null"))
    b.config["linux"]["resources"] = {"pids": {"limit": 4}}
    b.write()
    r = run_runtime(b)
    assert "can't fork" in r.stdout or "Resource temporarily unavailable" in r.stdout + r.stderr


def host_mounts_of(base: Path) -> list[str]:
    """Host mounts that mention the test's folder (the container's mounts must never show here)."""
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(base) in line]


@pytest.mark.parametrize("user", USERS)
def test_sigterm_to_the_runtime_stops_the_container_and_leaves_nothing(bundle, base_dir, user):
    vol = owned_dir(base_dir, user)
    state = owned_dir(base_dir, user)
    marker = "31337"
    b = bundle(sh(f"touch /vol/started; sleep {marker} & sleep {marker}"))
    b.config["mounts"].append(
        {"destination": "/vol", "type": "bind", "source": str(vol), "options": ["rbind"]}
    )
    b.write()
    argv = as_user_argv([str(RUNTIME), "run", "--bundle", str(b.dir), "--state-dir", str(state)], user)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    for _ in range(500):
        if (vol / "started").exists():
            break
        time.sleep(0.01)
    assert (vol / "started").exists()
    assert json.loads((state / "state.json").read_text())["status"] == "running"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    leftovers = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert leftovers.stdout == ""
    assert host_mounts_of(base_dir) == []
    assert list(state.iterdir()) == []


@pytest.mark.parametrize("user", USERS)
def test_terminal_is_a_pty_with_the_callers_window_size(bundle, user):
    b = bundle(sh("tty; stty size; test -t 0 && echo interactive"), terminal=True)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    argv = as_user_argv([str(RUNTIME), "run", "--bundle", str(b.dir)], user)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd="/")
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=10) == 0
    assert out.decode().replace("\r\n", "\n") == "/dev/pts/0\n33 101\ninteractive\n"


@pytest.mark.parametrize("user", USERS)
def test_seccomp_profile_from_the_config(bundle, user):
    b = bundle(sh("mkdir /made 2>&1; echo done"))
    b.config["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    }
    b.write()
    r = run_runtime(b, user)
    assert r.stdout.endswith("Operation not permitted\ndone\n"), r.stdout + r.stderr
    # without no_new_privs the filter is loaded while the runtime may still do so, for any user
    b.config["process"]["noNewPrivileges"] = False
    b.config["process"]["user"] = {"uid": 1000, "gid": 1000}
    b.write()
    r = run_runtime(b, user)
    assert r.stdout.endswith("Operation not permitted\ndone\n"), r.stdout + r.stderr


@pytest.mark.parametrize("user", USERS)
def test_network_none_has_only_loopback(bundle, user):
    b = bundle(
        sh(
            "ls /sys/class/net 2>/dev/null || ip -o link | cut -d: -f2; ip -o link show lo | grep -c 'LOOPBACK,UP'"
        )
    )
    b.config["linux"]["namespaces"].append({"type": "network"})
    b.write()
    r = run_runtime(b, user)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["lo", "1"]


@pytest.mark.skipif(not CHTEST.is_dir(), reason="charliecloud-doc is not installed")
@pytest.mark.parametrize("user", USERS)
def test_charliecloud_isolation_probes_are_safe(bundle, images, user):
    """Charliecloud's chtest probes, in a container with one mapped id (as ch-run runs them)."""
    host_id = user_ids()
    b = bundle(sh("ch-chroot-escape; ch-mknods /dev /tmp; ch-setgroups; ch-setuid"))
    b.config["root"]["path"] = str(images[TEST_USER])
    b.config["linux"]["namespaces"].append({"type": "user"})
    b.config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": host_id[0], "size": 1}]
    b.config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": host_id[1], "size": 1}]
    b.write()
    r = run_runtime(b, user)
    verdicts = [line.split("\t")[0] for line in r.stdout.splitlines()]
    assert verdicts == ["SAFE"] * 4, r.stdout + r.stderr


# ---- parity with runc (root only: runc is the reference) ----

PROBE = (
    "id; env | sort; pwd; hostname; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status; "
    "ulimit -n; ulimit -Hn; cut -d' ' -f5 /proc/self/mountinfo | sort"
)


def run_runc(b: Bundle) -> subprocess.CompletedProcess:
    cid = f"ocibox-parity-{os.getpid()}-{time.monotonic_ns()}"
    try:
        return subprocess.run(["runc", "run", "--bundle", str(b.dir), cid], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    finally:
        subprocess.run(["runc", "delete", "-f", cid], capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runc"), reason="needs root and runc")
@pytest.mark.parametrize(
    "args, process",
    [
        (sh(PROBE), {}),
        (sh(PROBE), {"user": {"uid": 1000, "gid": 1000, "additionalGids": [2000]}, "cwd": "/home/app"}),
        (sh(PROBE), {"env": ["PATH=/bin", "A=1", "B=two words"], "noNewPrivileges": False,
                     "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 77, "hard": 88}]}),
        (sh("exit 42"), {}),
        # under runc the shell is PID 1 and immune to its own signals: compare a child's death
        (sh("sh -c 'kill -KILL $$'; echo $?; sh -c 'kill -TERM $$'; echo $?"), {}),
    ],
)  # fmt: skip
def test_same_as_runc(bundle, args, process):
    b = bundle(args, **process)
    b.config["root"]["readonly"] = True  # runc writes into the rootfs otherwise
    b.write()
    ours, theirs = run_runtime(b), run_runc(b)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout), ours.stderr + theirs.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runc"), reason="needs root and runc")
def test_same_mounts_as_runc_with_volumes_tmpfs_and_no_network(bundle, base_dir, images):
    vol = owned_dir(base_dir, "root")
    (vol / "f").write_text("host file\n")
    probe = "grep -E ' /(vol|scratch|data) ' /proc/mounts | cut -d' ' -f2,4 | cut -d, -f1; cat /data/f; ls /sys/class/net"
    b = bundle(sh(f"{probe}; {PROBE}"))
    # runc makes the mount points in the image itself: give it a copy
    shutil.copytree(images["root"], b.dir / "rootfs", symlinks=True)
    b.config["root"] = {"path": "rootfs", "readonly": True}
    b.config["linux"]["namespaces"].append({"type": "network"})
    b.config["mounts"] += [
        {"destination": "/vol", "type": "bind", "source": str(vol), "options": ["rbind", "rw"]},
        {"destination": "/data", "type": "bind", "source": str(vol), "options": ["rbind", "ro"]},
        {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=1m"]},
    ]
    b.write()
    ours, theirs = run_runtime(b), run_runc(b)
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    assert ours.stdout == theirs.stdout
    assert ours.stdout.startswith("/vol rw\n/data ro\n/scratch rw\nhost file\nlo\n")


def read_until(fd: int, needle: bytes, timeout: float = 10) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
    return out


@pytest.mark.parametrize("user", USERS)
def test_interactive_shell_window_changes_ctrl_c_and_ctrl_z(bundle, user):
    b = bundle(["sh", "-i"], terminal=True, env=["PATH=/bin", "PS1=$ "])
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    argv = as_user_argv([str(RUNTIME), "run", "--bundle", str(b.dir)], user)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd="/")
    try:
        assert b"$ " in read_until(master, b"$ ")
        os.write(master, b"echo $((6*7))\r")
        assert b"42" in read_until(master, b"42")
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        proc.send_signal(signal.SIGWINCH)
        time.sleep(0.2)
        os.write(master, b"stty size\r")
        assert b"40 120" in read_until(master, b"40 120")
        os.write(master, b"sleep 200\r")
        time.sleep(0.3)
        os.write(master, b"\x1a")  # Ctrl-Z: job control works (the shell owns the terminal)
        assert b"Stopped" in read_until(master, b"Stopped")
        os.write(master, b"fg\r")
        time.sleep(0.3)
        os.write(master, b"\x03")  # Ctrl-C reaches sleep through the container's terminal
        os.write(master, b"echo status=$?\r")
        assert b"status=130" in read_until(master, b"status=130")
        os.write(master, b"exit 3\r")
        assert proc.wait(timeout=10) == 3
    finally:
        proc.kill()
        os.close(slave)
        os.close(master)


@pytest.mark.parametrize("user", USERS)
def test_sigkill_of_the_runtime_leaves_nothing(bundle, base_dir, user):
    vol = owned_dir(base_dir, user)
    marker = "31338"
    b = bundle(sh(f"touch /vol/started; sleep {marker}"))
    b.config["mounts"].append(
        {"destination": "/vol", "type": "bind", "source": str(vol), "options": ["rbind"]}
    )
    b.write()
    argv = as_user_argv([str(RUNTIME), "run", "--bundle", str(b.dir)], user)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    for _ in range(500):
        if (vol / "started").exists():
            break
        time.sleep(0.01)
    runtime_pid = proc.pid
    if user != "root":  # setpriv execs the runtime: same pid
        assert Path(f"/proc/{runtime_pid}/exe").resolve() == RUNTIME
    os.kill(runtime_pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for _ in range(200):
        left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True).stdout
        if not left:
            break
        time.sleep(0.01)
    assert left == ""
    assert host_mounts_of(base_dir) == []


def test_file_descriptors_of_the_caller_do_not_reach_the_container(bundle):
    b = bundle(sh("ls /proc/self/fd"))
    fd = os.open("/", os.O_RDONLY)
    try:
        argv = [str(RUNTIME), "run", "--bundle", str(b.dir)]
        r = subprocess.run(argv, capture_output=True, text=True, pass_fds=(fd,), cwd="/")
    finally:
        os.close(fd)
    assert r.stdout.split() == ["0", "1", "2", "3"]  # 3: ls's own directory


def test_cpu_and_pids_limits_are_written_and_the_cgroup_removed(bundle, base_dir):
    vol = owned_dir(base_dir, "root")
    b = bundle(
        sh(
            "grep -E ':(cpu|pids)[,:]' /proc/self/cgroup > /vol/cgroups; while [ ! -e /vol/go ]; do sleep 0.05; done"
        )
    )
    b.config["mounts"].append(
        {"destination": "/vol", "type": "bind", "source": str(vol), "options": ["rbind"]}
    )
    b.config["linux"]["resources"] = {
        "cpu": {"quota": 50000, "period": 100000, "shares": 512},
        "pids": {"limit": 64},
    }
    b.write()
    proc = subprocess.Popen([str(RUNTIME), "run", "--bundle", str(b.dir), "limits-test"], cwd="/")
    for _ in range(500):
        if (vol / "cgroups").exists() and (vol / "cgroups").read_text():
            break
        time.sleep(0.01)
    paths = dict(line.split(":")[1:] for line in (vol / "cgroups").read_text().splitlines())
    cpu_dir = Path("/sys/fs/cgroup/cpu") / paths["cpu"].lstrip("/")
    pids_dir = Path("/sys/fs/cgroup/pids") / paths["pids"].lstrip("/")
    try:
        assert cpu_dir.name == pids_dir.name == "limits-test"
        assert (cpu_dir / "cpu.cfs_quota_us").read_text() == "50000\n"
        assert (cpu_dir / "cpu.shares").read_text() == "512\n"
        assert (pids_dir / "pids.max").read_text() == "64\n"
    finally:
        (vol / "go").touch()
        assert proc.wait(timeout=10) == 0
    assert not cpu_dir.exists() and not pids_dir.exists()


def test_without_subordinate_ids_a_single_mapping_with_a_notice(bundle):
    """`nobody` has no /etc/subuid range: the container still starts, other owners show as nobody."""
    b = bundle(sh("id -u; stat -c %u /home/app/owned"))
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--reset-env"]
    r = subprocess.run(
        [*argv, str(RUNTIME), "run", "--bundle", str(b.dir)], capture_output=True, text=True, cwd="/"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "65534"]
    assert r.stderr.startswith("ocibox-runtime: notice: no /etc/subuid and /etc/subgid range for this user")
    assert len(r.stderr.splitlines()) == 1


CONTAINERS_SECCOMP = Path("/usr/share/containers/seccomp.json")


@pytest.mark.skipif(not CONTAINERS_SECCOMP.exists(), reason="containers-common's seccomp.json is missing")
@pytest.mark.parametrize("user", USERS)
def test_default_seccomp_profile(bundle, user):
    """The default profile of Docker/podman (as its engine resolves it) filters, and busybox still works."""
    b = bundle(
        sh("grep -E '^Seccomp:' /proc/self/status; ls / >/dev/null && echo works; chroot / true; echo $?")
    )
    b.config["linux"]["seccomp"] = resolve_seccomp(json.loads(CONTAINERS_SECCOMP.read_text()), DOCKER_CAPS)
    b.write()
    r = run_runtime(b, user)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["Seccomp:\t2", "works", "0"]


@pytest.mark.parametrize("user", USERS)
def test_paths_with_colons_and_commas(bundle, base_dir, images, user):
    odd = base_dir / f"odd:dir,{user}"
    shutil.copytree(images[user], odd / "rootfs", symlinks=True)
    upper = owned_dir(base_dir, user) / "up:per,dir"
    upper.mkdir()
    if user != "root":
        os.chown(upper, *user_ids())
    b = bundle(sh("echo hi > /new; cat /data.txt"))
    b.config["root"]["path"] = str(odd / "rootfs")
    b.write()
    r = run_runtime(b, user, "--upper", str(upper))
    assert (r.returncode, r.stdout) == (0, "image data\n"), r.stderr
    assert (upper / "upper" / "new").read_text() == "hi\n"


@pytest.mark.parametrize("user", USERS)
def test_without_overlayfs_the_image_is_read_only_under_a_tmpfs_root(bundle, images, user):
    """--no-overlay is also what happens when the kernel refuses overlayfs."""
    b = bundle(sh("echo top > /top && cat /top; cat /data.txt; echo x > /bin/new; pwd"), cwd="/made/here")
    r = run_runtime(b, user, "--no-overlay")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == ["top", "image data"]
    assert r.stderr == "sh: can't create /bin/new: Read-only file system\n"
    assert r.stdout.endswith("/made/here\n")
    assert not (images[user] / "top").exists() and not (images[user] / "bin" / "new").exists()


def test_a_limit_that_cannot_be_applied_fails_and_leaves_no_cgroup(bundle):
    b = bundle(["true"])
    b.config["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "cpu": {"cpus": "63"}}
    b.write()
    r = run_runtime(b, "root", "bad-limit-test")
    assert r.returncode == 125
    assert re.fullmatch(
        r"ocibox-runtime: cgroups: /sys/fs/cgroup/cpuset/\S*bad-limit-test/cpuset.cpus: .*\n", r.stderr
    )
    leftovers = subprocess.run(
        ["find", "/sys/fs/cgroup", "-name", "bad-limit-test"], capture_output=True, text=True
    )
    assert leftovers.stdout == ""


@pytest.mark.parametrize("user", USERS)
def test_file_volume_onto_a_dangling_symlink(bundle, base_dir, images, user):
    resolv = owned_dir(base_dir, user) / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    resolv.chmod(0o644)
    b = bundle(sh("cat /etc/resolv.conf /run/resolve/stub-resolv.conf"))
    b.config["mounts"].append(
        {"destination": "/etc/resolv.conf", "type": "bind", "source": str(resolv), "options": ["rbind", "ro"]}
    )
    b.write()
    r = run_runtime(b, user)
    assert (r.returncode, r.stdout) == (0, "nameserver 192.0.2.53\n" * 2), r.stderr
    assert not (images[user] / "run").exists()


@pytest.mark.parametrize("user", USERS)
def test_host_files_are_reachable_only_through_volumes(bundle, base_dir, user):
    vol = owned_dir(base_dir, user)
    (vol / "shared").write_text("shared\n")
    (vol / "shared").chmod(0o644)
    b = bundle(
        sh(f"ls -a / | tr '\\n' ' '; echo; cat /vol/shared; ls {base_dir} {RUNTIME} /oldroot 2>&1 | wc -l")
    )
    b.config["mounts"].append(
        {"destination": "/vol", "type": "bind", "source": str(vol), "options": ["rbind"]}
    )
    b.write()
    r = run_runtime(b, user)
    assert r.returncode == 0, r.stderr
    top, shared, errors = r.stdout.splitlines()
    assert (
        top.split() == sorted(top.split(), key=lambda n: n) and "oldroot" not in top and "newroot" not in top
    )
    assert (shared, errors.strip()) == ("shared", "3")  # three "No such file or directory"


def test_a_resource_the_runtime_cannot_limit_is_refused(bundle):
    b = bundle(["true"])
    b.config["linux"]["resources"] = {"blockIO": {"weight": 300}}
    b.write()
    r = run_runtime(b)
    assert r.returncode == 125
    assert r.stderr.endswith("config.json: linux.resources.blockIO is not supported by this runtime\n")


def test_cgroup_v2_without_the_controller_says_why(bundle):
    """On a cgroup v2 host (here: a private cgroup2 mount, whose controllers this hybrid host
    keeps in v1), a memory limit that can't be enabled fails with the reason."""
    b = bundle(["true"])
    b.config["linux"]["resources"] = {"memory": {"limit": 32 << 20}}
    b.write()
    script = f"mount -t cgroup2 none /sys/fs/cgroup && exec {RUNTIME} run --bundle {b.dir} v2-test"
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd="/")
    made = Path("/sys/fs/cgroup/unified/ocibox")  # the same v2 hierarchy, seen from the host
    if made.exists():
        made.rmdir()
    assert r.returncode == 125
    assert r.stderr == (
        "ocibox-runtime: cgroups: /sys/fs/cgroup/cgroup.subtree_control: "
        "can't enable the memory controller: No such file or directory\n"
    )


def in_outer_userns(script: str) -> subprocess.CompletedProcess:
    """The test user runs `script` as root of its own user namespace (as inside another rootless tool)."""
    argv = as_user_argv(["unshare", "--user", "--map-root-user", "sh", "-c", script], TEST_USER)
    return subprocess.run(argv, capture_output=True, text=True, cwd="/")


def test_inside_another_user_namespace(bundle):
    b = bundle(sh("id -u; ls /dev/pts"))
    r = in_outer_userns(f"{RUNTIME} run --bundle {b.dir}")
    assert (r.returncode, r.stdout) == (0, "0\nptmx\n"), r.stderr


def test_user_namespaces_disabled_prints_the_sysctl(bundle):
    b = bundle(["true"])
    b.config["linux"]["namespaces"].append({"type": "user"})
    b.write()
    r = in_outer_userns(f"echo 0 > /proc/sys/user/max_user_namespaces && exec {RUNTIME} run --bundle {b.dir}")
    assert r.returncode == 125
    assert r.stderr.startswith("ocibox-runtime: start: clone (namespaces ")
    assert r.stderr.endswith("`sudo sysctl -w user.max_user_namespaces=15000`\n")


@pytest.mark.parametrize("user", USERS)
def test_ctrl_c_at_the_callers_terminal_reaches_the_process_once(bundle, user):
    """Without -t: the caller's terminal signals the runtime, which forwards once."""
    b = bundle(sh("trap 'echo INT' INT; echo ready; while :; do sleep 0.1; done"))
    master, slave = pty.openpty()

    def own_terminal():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    argv = as_user_argv([str(RUNTIME), "run", "--bundle", str(b.dir)], user)
    proc = subprocess.Popen(
        argv,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd="/",
        start_new_session=True,
        preexec_fn=own_terminal,
    )
    try:
        assert b"ready" in read_until(master, b"ready")
        os.write(master, b"\x03")
        out = read_until(master, b"never", timeout=1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert out.count(b"INT\r\n") == 1, out
    finally:
        proc.kill()
        os.close(slave)
        os.close(master)
