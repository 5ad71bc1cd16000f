"""ocibox on arm64, from this amd64 machine: the runtime cross-built for aarch64, run under
qemu-user, and started for real in an arm64 VM (Debian's arm64 kernel under qemu-system-aarch64).

A user builds the runtime with `make -C runtime ARCH=arm64` and gets a static aarch64 binary that
answers `--version` under qemu-aarch64-static. In an arm64 VM it runs a busybox bundle as root and
as an unprivileged user (user namespace, overlayfs, pivot_root, Docker's seccomp profile for
aarch64). `ocibox compile --arch arm64` of the multi-arch busybox image gives an executable whose
`--ocibox-info` and `--ocibox-extract` work under qemu-user (they need no namespaces: qemu-user
can't create them), and which, in the VM, runs `echo hello`, returns exit codes and reports
`uname -m` = aarch64, as root and as the unprivileged user.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ocibox.elf import read_elf
from ocibox.runtimes import host_arch, runtime_for
from runtime_support import DOCKER_CAPS, base_config, resolve_seccomp
from support.users import TEST_USER, as_user, base_env, user_exists, user_ids
from support.vm import USER, Arm64Vm, Step

REPO = Path(__file__).resolve().parent.parent
ARM64_RUNTIME = REPO / "runtime" / "build" / "arm64" / "ocibox-runtime"
QEMU_USER = "qemu-aarch64-static"
CONTAINERS_SECCOMP = Path("/usr/share/containers/seccomp.json")
FOOTER = struct.Struct("<8sIIQQQQ32s")  # runtime/payload.c: magic, version, size, offsets/sizes, sha256

missing_tools = [
    t for t in ("aarch64-linux-gnu-gcc", QEMU_USER, "qemu-system-aarch64") if not shutil.which(t)
]
pytestmark = pytest.mark.skipif(
    bool(missing_tools), reason=f"{', '.join(missing_tools)} missing: run scripts/setup.sh"
)


@pytest.fixture(scope="module")
def arm64_runtime() -> Path:
    """`make -C runtime ARCH=arm64`, as a user would run it."""
    done = subprocess.run(
        ["make", "-s", "-C", "runtime", "ARCH=arm64"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return ARM64_RUNTIME


@pytest.fixture(scope="module")
def vm(tmp_path_factory) -> Arm64Vm:
    return Arm64Vm(tmp_path_factory.mktemp("arm64-vm"))


def ocibox_env() -> dict[str, str]:
    """This environment scrubbed of OCIBOX_*/XDG_*/proxies, running the repository's src/."""
    return {**base_env(), "PYTHONPATH": str(REPO / "src")}


def compile_arch_missing() -> str | None:
    """Why `ocibox compile --arch` can't be used yet, or None when it can."""
    done = subprocess.run(
        [sys.executable, "-m", "ocibox", "compile", "--help"],
        capture_output=True,
        text=True,
        env=ocibox_env(),
    )
    if done.returncode != 0:
        return "the `ocibox compile` command is missing (`python -m ocibox compile --help` fails)"
    if "--arch" not in done.stdout:
        return "`ocibox compile` has no --arch option yet"
    return None


@pytest.fixture(scope="module")
def compiled_arm64(images, arm64_runtime, tmp_path_factory) -> Path:
    """The multi-arch busybox image compiled for arm64: `ocibox compile REF -o FILE --arch arm64`."""
    if reason := compile_arch_missing():
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("compile-arm64")
    out = work / "busybox-arm64"
    env = ocibox_env()
    env.update(
        HOME=str(work),
        XDG_CACHE_HOME=str(work / "cache"),
        OCIBOX_ROOT=str(work / "store"),
        OCIBOX_RUNTIME_ARM64=str(arm64_runtime),
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ocibox",
            "compile",
            images["multiarch"].ref,
            "-o",
            str(out),
            "--arch",
            "arm64",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return out


# ---- the runtime on its own ----------------------------------------------------------------------


def test_make_arch_arm64_builds_a_static_aarch64_runtime(arm64_runtime):
    info = read_elf(arm64_runtime)
    assert info is not None and info.architecture == "arm64"
    assert not info.dynamic
    described = subprocess.run(["file", "-b", str(arm64_runtime)], capture_output=True, text=True).stdout
    assert "ARM aarch64" in described and "statically linked" in described


def test_the_arm64_runtime_says_its_version_under_qemu_user(arm64_runtime):
    done = subprocess.run([QEMU_USER, str(arm64_runtime), "--version"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ocibox-runtime ")


def test_ocibox_finds_the_cross_built_runtime_for_arm64(arm64_runtime, monkeypatch):
    monkeypatch.delenv("OCIBOX_RUNTIME_ARM64", raising=False)
    if host_arch() == "arm64":
        pytest.skip("on an arm64 host the arm64 runtime is the native one")
    assert runtime_for("arm64") == arm64_runtime
    native = REPO / "runtime" / "ocibox-runtime"
    if native.exists():
        assert read_elf(native).architecture == host_arch(), "the native build stays runtime/ocibox-runtime"


# ---- the runtime in an arm64 VM ------------------------------------------------------------------

BUNDLE_SETUP = """set -e
mkdir -p /bundle/rootfs/bin /bundle/rootfs/etc /bundle/rootfs/tmp /bundle/rootfs/root
cp /bin/busybox /bundle/rootfs/bin/busybox
for applet in $(busybox --list); do [ "$applet" = busybox ] || ln -s busybox "/bundle/rootfs/bin/$applet"; done
cp /etc/passwd /etc/group /bundle/rootfs/etc/
chmod 1777 /bundle/rootfs/tmp
mkdir -p /seccomp/rootfs && mount --bind /bundle/rootfs /seccomp/rootfs
cp -a /bundle /home/ocibox-test/bundle && chown -R 1000:1000 /home/ocibox-test/bundle
"""

CONTAINER_SCRIPT = (
    "echo hello; uname -m; hostname; id -u; cat /proc/self/uid_map; "
    "grep ' / / ' /proc/self/mountinfo; echo changed > /etc/motd; cat /etc/motd; exit 7"
)


@pytest.mark.slow
def test_the_runtime_runs_a_bundle_in_an_arm64_vm_as_root_and_as_a_user(arm64_runtime, vm):
    config = base_config(["sh", "-c", CONTAINER_SCRIPT])
    seccomp_config = base_config(["sh", "-c", "grep Seccomp: /proc/self/status; uname -m"])
    if CONTAINERS_SECCOMP.exists():
        profile = json.loads(CONTAINERS_SECCOMP.read_text())
        seccomp_config["linux"]["seccomp"] = resolve_seccomp(profile, DOCKER_CAPS, arch="arm64")
    runtime = "/opt/ocibox-runtime run --bundle"
    steps = [
        Step(BUNDLE_SETUP),
        Step(f"{runtime} /bundle"),
        Step(f"cd /home/{USER} && {runtime} bundle", user=USER),  # a bundle the user owns
        Step(f"{runtime} /seccomp"),
        Step(f"{runtime} /seccomp", user=USER),
        Step("grep -c ocibox /proc/mounts; ls /tmp | wc -l"),
    ]
    files = {
        "/opt/ocibox-runtime": arm64_runtime,
        "/bundle/config.json": json.dumps(config).encode(),
        "/seccomp/config.json": json.dumps(seccomp_config).encode(),
    }
    run = vm.run(steps, files, timeout=600)
    setup, as_root, as_user, seccomp_root, seccomp_user, leftovers = run.results
    assert setup.exit_code == 0, setup.stderr

    for result in (as_root, as_user):
        assert result.exit_code == 7, f"{result.step.user}: {result.stderr}"
        lines = result.stdout.splitlines()
        assert lines[:4] == ["hello", "aarch64", "box", "0"], result.stdout
        assert " - overlay " in result.stdout, "the root is an overlay on the image"
        assert lines[-1] == "changed", (result.step.user, result.stdout, result.stderr)
    assert as_root.stdout.split()[4:7] == ["0", "0", "4294967295"], "root keeps the host's ids"
    assert as_user.stdout.split()[4:7] == ["0", "1000", "1"], "the user is root of its own user namespace"

    for result in (seccomp_root, seccomp_user):
        assert result.exit_code == 0, f"{result.step.user}: {result.stderr}"
        expected = "Seccomp:\t2" if CONTAINERS_SECCOMP.exists() else "Seccomp:\t0"
        assert result.stdout.splitlines() == [expected, "aarch64"]

    assert leftovers.stdout.split() == ["0", "0"], "no mounts or temp folders left behind"


# ---- compiled executables for arm64 ----------------------------------------------------------------


def read_footer(path: Path) -> dict:
    data = path.read_bytes()
    magic, version, size, payload_off, payload_size, config_off, config_size, digest = FOOTER.unpack(
        data[-FOOTER.size :]
    )
    return {
        "magic": magic,
        "version": version,
        "size": size,
        "payload": data[payload_off : payload_off + payload_size],
        "payload_offset": payload_off,
        "config": data[config_off : config_off + config_size],
        "config_end": config_off + config_size,
        "sha256": digest.hex(),
        "file_size": len(data),
    }


def test_compiled_arm64_file_is_the_arm64_runtime_with_a_payload(compiled_arm64, arm64_runtime):
    footer = read_footer(compiled_arm64)
    assert footer["magic"] == b"OCIBOX\0\1" and footer["version"] == 1 and footer["size"] == FOOTER.size
    assert read_elf(compiled_arm64).architecture == "arm64"
    assert footer["payload_offset"] >= arm64_runtime.stat().st_size
    assert footer["payload"][:4] == b"hsqs", "the payload is a squashfs"
    assert hashlib.sha256(footer["payload"]).hexdigest() == footer["sha256"]
    assert footer["config_end"] == footer["file_size"] - FOOTER.size
    config = json.loads(footer["config"])
    assert config["process"]["args"] == ["sh"]
    assert config["annotations"]["org.opencontainers.image.architecture"] == "arm64"


def test_compiled_arm64_info_under_qemu_user(compiled_arm64):
    done = subprocess.run([QEMU_USER, str(compiled_arm64), "--ocibox-info"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"sha256:{read_footer(compiled_arm64)['sha256']}" in done.stdout
    assert "payload check: sha256 ok" in done.stdout


@pytest.mark.parametrize("user", ["root", TEST_USER])
def test_compiled_arm64_extracts_its_image_under_qemu_user(compiled_arm64, test_workdir, user):
    """From an unrelated folder of the user's, as root and as the unprivileged test user."""
    if user != "root" and not user_exists(user):
        pytest.skip(f"user {user} is missing: run scripts/setup.sh")
    folder = Path(tempfile.mkdtemp(prefix="arm64-extract-", dir=test_workdir))
    exe = folder / "busybox-arm64"
    shutil.copy2(compiled_arm64, exe)
    cmd = [QEMU_USER, str(exe), "--ocibox-extract", "extracted"]
    if user == "root":
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=folder)
    else:
        uid, gid = user_ids(user)
        os.chown(folder, uid, gid)
        done = as_user(cmd, user=user, check=False, cwd=folder)
    assert done.returncode == 0, done.stderr
    out = folder / "extracted"
    assert read_elf(out / "bin" / "busybox").architecture == "arm64"
    assert "app:x:1000:1000" in (out / "etc" / "passwd").read_text()
    assert (out / "bin" / "sh").is_symlink()


@pytest.mark.slow
def test_compiled_arm64_runs_in_an_arm64_vm_as_root_and_as_a_user(compiled_arm64, vm):
    app = "/opt/busybox-arm64"
    steps = []
    for user in ("root", USER):
        home = "/root" if user == "root" else f"/home/{USER}"
        steps += [
            Step(f"cd {home} && {app} echo hello", user=user),
            Step(f"cd {home} && {app} sh -c 'exit 5'", user=user),
            Step(f"cd {home} && {app} uname -m", user=user),
        ]
    steps.append(Step("grep -c -e fuse -e overlay /proc/mounts; ls /tmp | wc -l"))
    run = vm.run(steps, {app: compiled_arm64}, timeout=600)
    *by_user, leftovers = run.results
    for hello, five, machine in (by_user[0:3], by_user[3:6]):
        who = hello.step.user
        assert (hello.exit_code, hello.stdout) == (0, "hello\n"), f"{who}: {hello.stderr}"
        assert five.exit_code == 5, f"{who}: {five.stderr}"
        assert (machine.exit_code, machine.stdout) == (0, "aarch64\n"), f"{who}: {machine.stderr}"
    assert leftovers.stdout.split() == ["0", "0"], "no mounts or temp folders left behind"
