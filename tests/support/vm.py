"""An arm64 Linux VM for the tests: Debian's arm64 kernel under qemu-system-aarch64 (TCG), booted
from a small initramfs the test builds, that runs a few commands and powers off.

    vm = Arm64Vm(workdir)                        # kernel from the linux-image-*-arm64 .deb
    run = vm.run([Step("uname -m"), Step("id -u", user="ocibox-test")],
                 files={"/opt/app": Path("app")})
    run.results[0].stdout == "aarch64\\n"; run.results[1].exit_code == 0; run.boot_seconds

The initramfs holds the arm64 busybox-static (tests/support/busybox.py), the kernel's overlay,
fuse, squashfs and loop modules (Debian builds them as modules; they are insmod'ed at boot),
/etc/passwd with root and the unprivileged `ocibox-test` (uid 1000), the given files, and an
init script. Init first moves the initramfs onto a tmpfs and switch_roots into it (pivot_root(2),
which every container runtime uses, refuses the kernel's initial rootfs), mounts proc, sys, dev
(devtmpfs), devpts, tmp and the cgroup2 hierarchy, then runs each step as root or, through busybox
su (root needs no password), as ocibox-test, and prints its exit code, stdout and stderr (base64)
between markers on the serial console; then `poweroff -f`. QEMU is killed on every path out.
"""

from __future__ import annotations

import base64
import gzip
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .busybox import DEB_CACHE, arm64_busybox

KERNEL_CACHE = Path("/var/cache/ocibox-tests/arm64-kernel")
KERNEL_META_PACKAGE = "linux-image-arm64:arm64"
# Debian's generic arm64 flavour (not cloud, rt or 16k): linux-image-6.1.0-56-arm64_6.1.192-2_arm64.deb
KERNEL_DEB = re.compile(r"linux-image-(\d[\w.+~-]*\d-arm64)_[^_]+_arm64\.deb")
MODULES = ("fs/overlayfs/overlay.ko", "fs/fuse/fuse.ko", "fs/squashfs/squashfs.ko", "drivers/block/loop.ko")
QEMU = "qemu-system-aarch64"
USER = "ocibox-test"
USER_ID = 1000

STEP = "@@OCIBOX-VM-STEP"
STDERR = "@@OCIBOX-VM-STDERR"
END = "@@OCIBOX-VM-END"
READY = "@@OCIBOX-VM-READY"
DONE = "@@OCIBOX-VM-DONE"


class VmError(Exception):
    """The VM did not boot, did not finish in time, or printed something unreadable."""


@dataclass
class Step:
    """One shell command run in the VM, as root or as the unprivileged ocibox-test user."""

    command: str
    user: str = "root"


@dataclass
class StepResult:
    step: Step
    exit_code: int
    stdout: str
    stderr: str


@dataclass
class VmRun:
    results: list[StepResult]
    boot_seconds: float  # QEMU start to the first step (kernel, modules, switch_root)
    total_seconds: float
    console: str  # everything the serial console printed, for failure messages


@dataclass
class Arm64Kernel:
    release: str  # 6.1.0-56-arm64
    vmlinuz: Path
    config: Path
    modules: list[Path]  # in load order, dependencies first


# ---------------------------------------------------------------------------------------------
# The kernel: Debian's linux-image-*-arm64 .deb, unpacked once (only what the VM needs)


def kernel_deb() -> Path:
    """The newest generic arm64 kernel .deb in the test cache (downloaded now if setup.sh did not)."""
    found = _kernel_debs()
    if not found:
        DEB_CACHE.mkdir(parents=True, exist_ok=True)
        deps = subprocess.run(
            ["apt-cache", "depends", KERNEL_META_PACKAGE], capture_output=True, text=True, check=True
        ).stdout
        match = re.search(r"Depends: (linux-image-\S+-arm64)(:arm64)?", deps)
        if not match:
            raise VmError(f"apt-cache depends {KERNEL_META_PACKAGE} names no kernel:\n{deps}")
        subprocess.run(
            ["apt-get", "download", "-q", f"{match.group(1)}:arm64"],
            cwd=DEB_CACHE,
            check=True,
            capture_output=True,
        )
        found = _kernel_debs()
    if not found:
        raise VmError(f"no linux-image-*-arm64 .deb in {DEB_CACHE}")
    return found[-1]


def _kernel_debs() -> list[Path]:
    return sorted(p for p in DEB_CACHE.glob("linux-image-*_arm64.deb") if KERNEL_DEB.fullmatch(p.name))


def arm64_kernel() -> Arm64Kernel:
    """vmlinuz, config and the needed modules of the kernel .deb, under KERNEL_CACHE/<release>."""
    deb = kernel_deb()
    release = KERNEL_DEB.fullmatch(deb.name).group(1)
    target = KERNEL_CACHE / deb.stem
    if not (target / "complete").exists():
        KERNEL_CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=KERNEL_CACHE) as tmp:
            _unpack_kernel(deb, release, Path(tmp) / "unpacked")
            shutil.rmtree(target, ignore_errors=True)
            (Path(tmp) / "unpacked").rename(target)
    order = (target / "modules.load").read_text().split()
    return Arm64Kernel(
        release=release,
        vmlinuz=target / f"boot/vmlinuz-{release}",
        config=target / f"boot/config-{release}",
        modules=[target / m for m in order],
    )


def _unpack_kernel(deb: Path, release: str, out: Path) -> None:
    """Extract vmlinuz, config and MODULES with every module they depend on (from .modinfo)."""
    out.mkdir()
    moddir = f"lib/modules/{release}/kernel"
    listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    names = _tar_names(listing)
    by_module = {Path(n).name.removesuffix(".ko"): n.removeprefix("./") for n in names if n.endswith(".ko")}
    wanted = [f"./boot/vmlinuz-{release}", f"./boot/config-{release}"]
    order: list[str] = []  # module paths, dependencies first

    def need(path: str) -> None:
        if path in order:
            return
        _extract(listing, out, [f"./{path}"])
        for dep in _modinfo_depends(out / path):
            dep_path = by_module.get(dep) or by_module.get(dep.replace("_", "-"))
            if dep_path is None:
                raise VmError(f"{path} depends on {dep}, which {deb.name} does not hold")
            need(dep_path)
        order.append(path)

    _extract(listing, out, wanted)
    for module in MODULES:
        need(f"{moddir}/{module}")
    (out / "modules.load").write_text("\n".join(order) + "\n")
    (out / "complete").write_text(deb.name + "\n")


def _tar_names(tar_bytes: bytes) -> list[str]:
    out = subprocess.run(["tar", "-t"], input=tar_bytes, capture_output=True, check=True).stdout
    return out.decode().splitlines()


def _extract(tar_bytes: bytes, out: Path, members: list[str]) -> None:
    subprocess.run(["tar", "-x", "-C", str(out), *members], input=tar_bytes, capture_output=True, check=True)


def _modinfo_depends(ko: Path) -> list[str]:
    """The `depends=` field of a module's .modinfo section (comma separated, maybe empty)."""
    for item in ko.read_bytes().split(b"\0"):
        if item.startswith(b"depends="):
            return [d for d in item[len(b"depends=") :].decode().split(",") if d]
    return []


# ---------------------------------------------------------------------------------------------
# The initramfs: a gzip'd cpio (newc) written here, so owners and modes need no root on the host


@dataclass
class Initramfs:
    # path → (mode, uid, gid, data); device nodes also have path → (major, minor)
    entries: dict[str, tuple[int, int, int, bytes]] = field(default_factory=dict)
    devices: dict[str, tuple[int, int]] = field(default_factory=dict)

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in self.entries:
                self.entries[parent] = (0o040755, 0, 0, b"")
        self.entries[path.strip("/")] = (0o040000 | mode, uid, gid, b"")

    def file(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        parent = path.strip("/").rpartition("/")[0]
        if parent and parent not in self.entries:
            self.dir(parent)
        self.entries[path.strip("/")] = (0o100000 | mode, uid, gid, data)

    def symlink(self, path: str, target: str) -> None:
        self.entries[path.strip("/")] = (0o120777, 0, 0, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.devices[path.strip("/")] = (major, minor)
        self.entries[path.strip("/")] = (0o020000 | mode, 0, 0, b"")

    def write(self, out: Path) -> Path:
        with gzip.open(out, "wb", compresslevel=1) as f:
            for ino, (name, (mode, uid, gid, data)) in enumerate(sorted(self.entries.items()), start=1):
                rdev = self.devices.get(name, (0, 0))
                f.write(_newc_header(name, ino, mode, uid, gid, len(data), rdev) + data + _pad(len(data)))
            f.write(_newc_header("TRAILER!!!", 0, 0, 0, 0, 0, (0, 0)))
        return out


def _newc_header(
    name: str, ino: int, mode: int, uid: int, gid: int, size: int, rdev: tuple[int, int]
) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, uid, gid, 1, 0, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08x" % v for v in fields) + encoded
    return header + _pad(len(header))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


# ---------------------------------------------------------------------------------------------
# The VM

INIT = r"""#!/bin/busybox sh
# stage 1: move onto a tmpfs (pivot_root refuses the initial rootfs), then switch_root into it
/bin/busybox mkdir -p /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
if [ ! -e /.stage2 ]; then
    mkdir /newroot
    mount -t tmpfs -o mode=755 root /newroot
    for e in /*; do [ "$e" = /newroot ] || cp -a "$e" /newroot/; done
    touch /newroot/.stage2
    exec switch_root /newroot /init
fi
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
ln -sf pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t mqueue mqueue /dev/mqueue
mount -t tmpfs -o mode=1777 tmp /tmp
mount -t tmpfs -o mode=700 run /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
for m in $(cat /lib/modules/load); do insmod "/lib/modules/$m" || echo "init: insmod $m failed"; done
chmod 0666 /dev/fuse
hostname arm64-vm
echo "@@OCIBOX-VM-READY"
n=0
while [ -e "/steps/$n.sh" ]; do
    cd /
    if [ "$(cat /steps/$n.user)" = root ]; then
        HOME=/root sh "/steps/$n.sh" </dev/null >/run/out 2>/run/err
    else
        env -i PATH="$PATH" su -s /bin/sh ocibox-test -c "sh /steps/$n.sh" </dev/null >/run/out 2>/run/err
    fi
    echo "@@OCIBOX-VM-STEP $n $?"
    base64 /run/out
    echo "@@OCIBOX-VM-STDERR"
    base64 /run/err
    echo "@@OCIBOX-VM-END"
    n=$((n + 1))
done
echo "@@OCIBOX-VM-DONE"
poweroff -f
"""

PASSWD = f"root:x:0:0:root:/root:/bin/sh\n{USER}:x:{USER_ID}:{USER_ID}:{USER}:/home/{USER}:/bin/sh\n"
GROUP = f"root:x:0:\ntty:x:5:\n{USER}:x:{USER_ID}:\n"


class Arm64Vm:
    """Boots Debian's arm64 kernel in qemu-system-aarch64 with an initramfs made for each run."""

    def __init__(self, workdir: Path, memory_mb: int = 1024, cpus: int = 2):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.kernel = arm64_kernel()
        self.busybox = arm64_busybox(self.workdir)

    def initramfs(self, steps: list[Step], files: dict[str, Path | bytes]) -> Path:
        fs = Initramfs()
        fs.dir("bin")
        fs.file("bin/busybox", self.busybox.read_bytes(), 0o755)
        fs.file("init", INIT.encode(), 0o755)
        fs.dir("dev")
        fs.char_device("dev/console", 5, 1)
        fs.file("etc/passwd", PASSWD.encode())
        fs.file("etc/group", GROUP.encode())
        fs.dir("root", 0o700)
        fs.dir(f"home/{USER}", 0o755, USER_ID, USER_ID)
        load = []
        for ko in self.kernel.modules:
            fs.file(f"lib/modules/{ko.name}", ko.read_bytes())
            load.append(ko.name)
        fs.file("lib/modules/load", ("\n".join(load) + "\n").encode())
        fs.dir("steps")
        for i, step in enumerate(steps):
            fs.file(f"steps/{i}.sh", step.command.encode() + b"\n", 0o644)
            fs.file(f"steps/{i}.user", step.user.encode(), 0o644)
        for path, content in files.items():
            if isinstance(content, Path):
                mode = content.stat().st_mode & 0o7777
                fs.file(path, content.read_bytes(), mode)
            else:
                fs.file(path, content, 0o755)
        return fs.write(self.workdir / "initramfs.cpio.gz")

    def command(self, initramfs: Path) -> list[str]:
        return [
            QEMU, "-M", "virt", "-cpu", "cortex-a57", "-smp", str(self.cpus), "-m", str(self.memory_mb),
            "-nographic", "-no-reboot", "-nic", "none",
            "-kernel", str(self.kernel.vmlinuz), "-initrd", str(initramfs),
            "-append", "console=ttyAMA0 quiet loglevel=1 panic=-1 rdinit=/init",
        ]  # fmt: skip

    def run(
        self, steps: list[Step], files: dict[str, Path | bytes] | None = None, timeout: float = 300
    ) -> VmRun:
        """Boot, run `steps` in order, power off. VmError if it does not finish within `timeout`."""
        for step in steps:
            if step.user not in ("root", USER):
                raise ValueError(f"step user must be root or {USER}, not {step.user!r}")
        initramfs = self.initramfs(steps, files or {})
        start = time.monotonic()
        proc = subprocess.Popen(
            self.command(initramfs),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        lines: list[str] = []
        ready_at = None
        try:
            assert proc.stdout is not None
            deadline = start + timeout
            for raw in _lines_until(proc, deadline):
                line = raw.decode(errors="replace").rstrip("\r\n")
                lines.append(line)
                if ready_at is None and READY in line:
                    ready_at = time.monotonic()
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise VmError(f"the VM did not finish in {timeout:.0f} s; console:\n" + _tail(lines)) from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        total = time.monotonic() - start
        if ready_at is None or not any(DONE in line for line in lines):
            raise VmError(f"the VM stopped before its steps were done (qemu status {proc.returncode}); console:\n"
                          + _tail(lines))  # fmt: skip
        results = _parse_results(lines, steps)
        return VmRun(results, ready_at - start, total, "\n".join(lines))


def _lines_until(proc: subprocess.Popen, deadline: float):
    """Console lines as QEMU prints them; TimeoutExpired once `deadline` passes."""
    import selectors

    buffer = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(QEMU, 0)
            if not sel.select(timeout=left):
                continue
            chunk = proc.stdout.read1(65536)
            if not chunk:
                if buffer:
                    yield buffer
                return
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            yield from complete


def _parse_results(lines: list[str], steps: list[Step]) -> list[StepResult]:
    results = []
    i = 0
    while i < len(lines):
        match = re.search(STEP + r" (\d+) (\d+)$", lines[i])
        if not match:
            i += 1
            continue
        index, code = int(match.group(1)), int(match.group(2))
        out, err, i = [], [], i + 1
        target = out
        while i < len(lines) and END not in lines[i]:
            if STDERR in lines[i]:
                target = err
            elif re.fullmatch(r"[A-Za-z0-9+/=]+", lines[i].strip()):
                target.append(lines[i].strip())
            i += 1
        results.append(StepResult(steps[index], code, _decode(out), _decode(err)))
    if len(results) != len(steps):
        raise VmError(f"{len(results)} of {len(steps)} step results on the console:\n" + _tail(lines))
    return results


def _decode(chunks: list[str]) -> str:
    return base64.b64decode("".join(chunks)).decode(errors="replace")


def _tail(lines: list[str], n: int = 60) -> str:
    return "\n".join(lines[-n:])
