"""Bundles for the runtime tests: a busybox rootfs, a config.json like Docker's, runs as root or user.

Self-contained (no ocibox module is used): the tests drive runtime/ocibox-runtime directly, and
runc with the same config.
"""

from __future__ import annotations

import json
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNTIME = REPO / "runtime" / "ocibox-runtime"
TEST_USER = "ocibox-test"
BUSYBOX = Path("/bin/busybox")

# Docker's default capability set (moby/oci/caps/defaults.go) and its CapEff mask.
DOCKER_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]  # fmt: skip
DOCKER_CAPEFF = "00000000a80425fb"

MASKED_PATHS = [
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
]  # fmt: skip
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def user_ids() -> tuple[int, int]:
    pw = pwd.getpwnam(TEST_USER)
    return pw.pw_uid, pw.pw_gid


def subid_start(path: str = "/etc/subuid", user: str = TEST_USER) -> int | None:
    """First subordinate id of the user, or None."""
    for line in Path(path).read_text().splitlines():
        parts = line.split(":")
        if len(parts) == 3 and parts[0] == user:
            return int(parts[1])
    return None


def make_rootfs(root: Path) -> Path:
    """A busybox root filesystem: /bin/busybox plus one symlink per applet, /etc/passwd, /etc/group."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    for name in applets.stdout.split():
        if name != "busybox":
            (root / "bin" / name).symlink_to("busybox")
    for d in ("etc", "proc", "sys", "dev", "tmp", "root", "home/app"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (root / "etc" / "group").write_text(
        "root:x:0:\ntty:x:5:\napp:x:1000:\nextra:x:2000:app\nnogroup:x:65534:\n"
    )
    return root


def base_config(args: list[str], **process: object) -> dict:
    """A config.json like the one Docker (and `runc spec`) writes, with Docker's defaults."""
    proc = {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
        "cwd": "/",
        "capabilities": {k: list(DOCKER_CAPS) for k in ("bounding", "effective", "permitted")},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    }
    proc.update(process)
    return {
        "ociVersion": "1.0.2",
        "process": proc,
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


@dataclass
class Bundle:
    dir: Path
    config: dict

    def write(self, config: dict | None = None) -> Bundle:
        if config is not None:
            self.config = config
        (self.dir / "config.json").write_text(json.dumps(self.config, indent=1))
        (self.dir / "config.json").chmod(0o644)
        return self


def as_user_argv(argv: list[str], user: str) -> list[str]:
    if user == "root":
        return argv
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--reset-env", *argv]


def run_runtime(
    bundle: Bundle,
    user: str = "root",
    *extra: str,
    input: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess:
    """`ocibox-runtime run --bundle DIR [extra…]` as root or as the test user."""
    argv = as_user_argv([str(RUNTIME), "run", "--bundle", str(bundle.dir), *extra], user)
    return subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout, cwd="/")


def world_readable(path: Path) -> None:
    for p in [path, *path.parents]:
        if p == Path("/"):
            break
        mode = p.stat().st_mode & 0o777
        if mode & 0o005 != 0o005:
            p.chmod(mode | 0o005)


def compile_static(source: str, out: Path) -> Path:
    """Builds a C program statically (the rootfs has no libc)."""
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(src)], check=True, capture_output=True)
    src.unlink()
    return out


def resolve_seccomp(profile: dict, caps: list[str], arch: str = "amd64") -> dict:
    """A seccomp profile file (Docker/containers format, with includes/excludes) as the
    runtime-spec `linux.seccomp` an engine writes for a container with these capabilities."""
    scmp_arch = {"amd64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64"}[arch]
    arches = [scmp_arch]
    for entry in profile.get("archMap", []):
        if entry["architecture"] == scmp_arch:
            arches += entry.get("subArchitectures", [])
    rules = []
    for rule in profile["syscalls"]:
        inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
        if inc.get("arches") and arch not in inc["arches"]:
            continue
        if exc.get("arches") and arch in exc["arches"]:
            continue
        if inc.get("caps") and not all(c in caps for c in inc["caps"]):
            continue
        if exc.get("caps") and any(c in caps for c in exc["caps"]):
            continue
        out = {"names": rule["names"], "action": rule["action"], "args": rule.get("args") or []}
        if "errnoRet" in rule:
            out["errnoRet"] = rule["errnoRet"]
        rules.append(out)
    spec = {"defaultAction": profile["defaultAction"], "architectures": arches, "syscalls": rules}
    if "defaultErrnoRet" in profile:
        spec["defaultErrnoRet"] = profile["defaultErrnoRet"]
    return spec
