"""A user compiles an image into one executable and runs it like a native program.

`ocibox compile IMAGE -o FILE` writes [runtime][squashfs payload][config.json][footer]. The
payload is the image's layers merged top-down while they stream: it must hold exactly the tree
that applying the layers bottom-up gives (whiteouts, opaque folders, hard links, modes, owners).
The file then runs as root and as an unprivileged user from an unrelated folder: its arguments
replace the image's Cmd, stdin/stdout and the exit code pass through, `--ocibox-*` options are
the runtime's, and nothing is left behind, even after `kill -9`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from layer_builder import CHR, FIFO, OPQ, WH, D, F, H, S, tar_bytes, tree, write_layout
from support.users import OciboxRunner, setpriv_prefix

USER = "ocibox-test"
FOOTER = struct.Struct("<8sII4Q32s")


def footer(path: Path) -> dict:
    data = path.read_bytes()[-FOOTER.size :]
    magic, version, size, poff, psize, coff, csize, digest = FOOTER.unpack(data)
    return {
        "magic": magic,
        "version": version,
        "size": size,
        "payload_offset": poff,
        "payload_size": psize,
        "config_offset": coff,
        "config_size": csize,
        "sha256": digest.hex(),
    }


def run(
    cmd: list,
    *,
    user: str | None = None,
    input: str | None = None,
    cwd: str | Path = "/",  # noqa: A002
    env: dict | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess:
    """Run a command as root or as `user`, from an unrelated folder, stdin a pipe (or empty)."""
    full = (setpriv_prefix(user) if user else []) + [str(c) for c in cmd]
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root" if not user else f"/home/{user}"}
    if user:
        import pwd

        base["HOME"] = pwd.getpwnam(user).pw_dir
    base.update(env or {})
    return subprocess.run(
        full,
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        cwd=cwd,
        env=base,
        timeout=timeout,
    )


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner(test_workdir, shared_code) -> OciboxRunner:
    base = Path(tempfile.mkdtemp(prefix="compile-", dir=test_workdir))
    os.chmod(base, 0o755)
    return OciboxRunner(base, shared_code)


@pytest.fixture(scope="module")
def busybox_exe(runner, images) -> Path:
    """busybox compiled once from the registry (pulled into a fresh store), readable by anyone."""
    out = runner.home.parent / "busybox.exe"
    result = runner("compile", images["busybox"].ref, "-o", str(out))
    assert str(out) in result.stdout
    os.chmod(out.parent, 0o755)
    return out


@pytest.fixture
def user_dir(test_workdir) -> Path:
    """An empty folder owned by the test user (a caller's working folder)."""
    import pwd

    path = Path(tempfile.mkdtemp(prefix="user-", dir=test_workdir))
    pw = pwd.getpwnam(USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    return path


# --- the file ----------------------------------------------------------------------------------------


def test_the_file_is_runtime_payload_config_and_footer(busybox_exe: Path, runner, images) -> None:
    f = footer(busybox_exe)
    assert f["magic"] == b"OCIBOX\x00\x01" and f["version"] == 1 and f["size"] == 80
    data = busybox_exe.read_bytes()
    assert data[:4] == b"\x7fELF"
    runtime = (Path(__file__).parent.parent / "runtime" / "ocibox-runtime").read_bytes()
    assert data[: f["payload_offset"]] == runtime
    payload = data[f["payload_offset"] : f["payload_offset"] + f["payload_size"]]
    assert payload[:4] == b"hsqs"
    assert hashlib.sha256(payload).hexdigest() == f["sha256"]
    assert f["config_offset"] == f["payload_offset"] + f["payload_size"]
    assert f["config_offset"] + f["config_size"] + 80 == len(data)
    config = json.loads(data[f["config_offset"] : f["config_offset"] + f["config_size"]])
    assert config["process"]["args"] == ["sh"]
    assert json.loads(config["annotations"]["org.ocibox.cmd"]) == ["sh"]
    assert "uidMappings" not in config["linux"]  # filled in for whoever runs it
    assert os.access(busybox_exe, os.X_OK)


def test_the_payload_is_the_images_tree(busybox_exe: Path, tmp_path: Path) -> None:
    """unsquashfs and sqfscat read the payload at its offset; it holds what the layers hold."""
    f = footer(busybox_exe)
    listing = subprocess.run(
        ["unsquashfs", "-o", str(f["payload_offset"]), "-lls", str(busybox_exe)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"^-rwxr-xr-x root/root\s+\d+ \S+ \S+ squashfs-root/bin/busybox$", listing, re.M)
    assert re.search(r"^lrwxrwxrwx root/root .* squashfs-root/bin/sh -> /bin/busybox$", listing, re.M)
    payload = tmp_path / "payload.sqfs"
    with open(busybox_exe, "rb") as src:
        src.seek(f["payload_offset"])
        payload.write_bytes(src.read(f["payload_size"]))
    cat = subprocess.run(["sqfscat", str(payload), "bin/busybox"], capture_output=True, check=True).stdout
    assert cat[:4] == b"\x7fELF"
    extracted = tmp_path / "x"
    subprocess.run(["unsquashfs", "-q", "-d", str(extracted), str(payload)], check=True, capture_output=True)
    out = tmp_path / "via-extract"
    result = run([busybox_exe, "--ocibox-extract", out])
    assert result.returncode == 0, result.stderr
    assert tree(out) == tree(extracted)


def _layers() -> list[bytes]:
    """Three layers exercising every changeset rule."""
    base = tar_bytes(
        [
            D("etc"),
            F("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"),
            F("etc/group", "root:x:0:\napp:x:1000:\n"),
            D("bin"),
            F("bin/tool", "#!/bin/sh\n", mode=0o4755),
            D("data", mode=0o700, uid=1000, gid=1000),
            F("data/a", "lower a", uid=1000, gid=1000),
            F("data/b", "lower b"),
            D("data/sub"),
            F("data/sub/c", "lower c"),
            D("opaque"),
            F("opaque/old", "hidden by opaque"),
            D("opaque/olddir"),
            F("opaque/olddir/x", "x"),
            D("gone"),
            F("gone/f", "whited out dir"),
            F("file-then-dir", "was a file"),
            D("dir-then-file"),
            F("dir-then-file/inner", "hidden"),
            F("link-src", "shared content"),
            H("hard-lower", "link-src"),
            D("tmp", mode=0o1777),
            FIFO("fifo"),
            CHR("null", 1, 3),
            F("xattr-file", "x", pax={"SCHILY.xattr.user.comment": "hello"}),
            S("abs-link", "/etc/passwd"),
            F("replaced", "old content"),
            F("pair-a", "old pair"),
            H("pair-b", "pair-a"),
            D("usr"),
            D("usr/lib"),
            F("usr/lib/libbase.so", "base"),
            S("lib", "usr/lib"),
        ]
    )
    middle = tar_bytes(
        [
            F("data/a", "middle a", mode=0o600, uid=1000, gid=1000),
            WH("data/b"),
            D("opaque"),
            OPQ("opaque"),
            F("opaque/new", "same layer stays"),
            WH("gone"),
            D("file-then-dir"),
            F("file-then-dir/now", "a folder now"),
            F("dir-then-file", "a file now"),
            F("replaced", "first in layer"),
            F("replaced", "second in layer"),
            H("hard-upper", "link-src"),
        ]
    )
    top = tar_bytes(
        [
            D("data/sub", mode=0o750),
            F("data/sub/d", "top d"),
            WH("data/sub/c"),
            F("new/deep/file", "parents implied"),
            F("etc/motd", "hi\n", uid=0, gid=1000),
            F("both1", "pair"),
            H("both2", "both1"),
            F("pair-a", "new a"),
            D("lib/extra"),
            F("lib/extra/libtop.so", "through the symlink"),
        ]
    )
    return [base, middle, top]


def test_flatten_matches_applying_the_layers(tmp_path: Path) -> None:
    """The top-down merge gives the tree layers.py makes bottom-up: content, modes, owners, links."""
    from ocibox.flatten import flatten
    from ocibox.layers import apply_layers
    from ocibox.squashfs import SquashfsWriter

    layers = _layers()
    layout = tmp_path / "layout"
    write_layout(layout, "t", layers)
    blobs = sorted((layout / "blobs" / "sha256").iterdir())
    files = []
    for raw in layers:
        digest = hashlib.sha256(__import__("gzip").compress(raw, compresslevel=1, mtime=0)).hexdigest()
        files.append((layout / "blobs" / "sha256" / digest, "sha256:" + hashlib.sha256(raw).hexdigest()))
    assert all(p in blobs for p, _ in files)

    applied = tmp_path / "applied"
    applied.mkdir()
    apply_layers(applied, files, rootless=False)
    image = tmp_path / "image.sqfs"
    captured: dict[str, bytes] = {}
    with open(image, "w+b") as out, SquashfsWriter(out) as writer:
        writer.finish(flatten(writer, files, capture=("etc/passwd",), captured=captured))
    assert captured["etc/passwd"].startswith(b"root:x:0:0")
    extracted = tmp_path / "extracted"
    subprocess.run(["unsquashfs", "-q", "-d", str(extracted), str(image)], check=True, capture_output=True)

    assert tree(extracted) == tree(applied)
    owners = {p: (os.lstat(extracted / p).st_uid, os.lstat(extracted / p).st_gid) for p in tree(extracted)}
    assert owners == {p: (os.lstat(applied / p).st_uid, os.lstat(applied / p).st_gid) for p in tree(applied)}
    t = tree(extracted)
    assert "data/b" not in t and "gone" not in t and "opaque/old" not in t and "data/sub/c" not in t
    assert t["opaque/new"][0] == "file" and t["file-then-dir/now"][0] == "file"
    assert t["dir-then-file"][0] == "file" and "dir-then-file/inner" not in t
    assert (extracted / "replaced").read_text() == "second in layer"
    assert (extracted / "data/a").read_text() == "middle a" and t["data/a"][1] == 0o600
    assert owners["data/a"] == (1000, 1000) and owners["etc/motd"] == (0, 1000)
    assert t["bin/tool"][1] == 0o4755 and t["tmp"][1] == 0o1777 and t["data/sub"][1] == 0o750
    assert t["hard-upper"][4] == t["link-src"][4] == t["hard-lower"][4] is not None
    assert t["both1"][4] == t["both2"][4] is not None
    assert (extracted / "pair-a").read_text() == "new a" and (extracted / "pair-b").read_text() == "old pair"
    assert t["lib"][0] == "symlink" and t["usr/lib/extra/libtop.so"][0] == "file"  # merged-usr
    assert t["null"] == ("dev", 0o666, 0, "1:3", None) and t["fifo"][0] == "fifo"
    assert os.getxattr(extracted / "xattr-file", "user.comment") == b"hello"
    listing = subprocess.run(
        ["unsquashfs", "-lln", str(image)], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"^-rw------- 1000/1000 .* squashfs-root/data/a$", listing, re.M)


def test_compile_takes_a_stored_image_or_an_archive_and_says_what_is_wrong(
    runner,
    busybox_exe,
    busybox_layouts,
    tmp_path: Path,
) -> None:
    archive = tmp_path / "busybox-oci.tar"
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{busybox_layouts['busybox']}", f"oci-archive:{archive}"],
        check=True,
        capture_output=True,
    )
    docker_archive = tmp_path / "busybox-docker.tar"
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            f"oci:{busybox_layouts['busybox']}",
            f"docker-archive:{docker_archive}:busybox:latest",
        ],
        check=True,
        capture_output=True,
    )
    payload = footer(busybox_exe)["sha256"]
    for source in (str(archive), str(docker_archive)):
        out = tmp_path / "from-archive"
        runner("compile", source, "-o", str(out))
        assert footer(out)["sha256"] == payload  # same layers, same squashfs
        assert run([out, "echo", "ok"]).stdout == "ok\n"
    stored = runner("images").stdout.splitlines()[1].split()[0]
    runner("compile", stored, "-o", str(tmp_path / "from-store"))
    bad = runner("compile", "no-such-image-here", "-o", str(tmp_path / "x"), check=False)
    assert bad.returncode == 125 and bad.stderr.strip().splitlines()[-1].startswith(
        "ocibox: "
    )  # after "Pulling"
    assert "Traceback" not in bad.stderr and not (tmp_path / "x").exists()
    bad = runner("compile", stored, "-o", str(tmp_path / "x"), "--volume", "relative", check=False)
    assert bad.returncode == 125 and "--volume" in bad.stderr
    fifo = tmp_path / "a-pipe"
    os.mkfifo(fifo)
    for target in (str(tmp_path), "", str(fifo)):  # a folder, nothing, a pipe: never replaced
        bad = runner("compile", stored, "-o", target, check=False)
        assert bad.returncode == 125 and "give the path of a file" in bad.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    bad = runner("compile", stored, "-o", str(tmp_path / "no-such-dir" / "x"), check=False)
    assert bad.returncode == 125 and "no-such-dir/x" in bad.stderr


# --- running it ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("user", [None, USER], ids=["root", "user"])
def test_arguments_replace_cmd_and_the_exit_code_returns(busybox_exe: Path, user, user_dir) -> None:
    cwd = user_dir if user else "/"
    r = run([busybox_exe, "echo", "hello", "--flag", "with space"], user=user, cwd=cwd)
    assert (r.returncode, r.stdout) == (0, "hello --flag with space\n"), r.stderr
    r = run([busybox_exe], user=user, cwd=cwd, input="echo from the default Cmd; exit 4\n")  # Cmd: sh
    assert (r.returncode, r.stdout) == (4, "from the default Cmd\n"), r.stderr
    r = run([busybox_exe, "sh", "-c", "exit 7"], user=user, cwd=cwd)
    assert r.returncode == 7
    r = run([busybox_exe, "/no/such/program"], user=user, cwd=cwd)
    assert r.returncode == 127 and "/no/such/program" in r.stderr
    r = run([busybox_exe, "cat"], user=user, cwd=cwd, input="piped in\n")
    assert r.stdout == "piped in\n"
    r = run([busybox_exe, "id", "-u"], user=user, cwd=cwd)
    assert r.stdout == "0\n"  # root of its own user namespace when run by a user
    r = run([busybox_exe, "sh", "-c", "echo scratch > /etc/new && cat /etc/new"], user=user, cwd=cwd)
    assert r.stdout == "scratch\n"
    r = run([busybox_exe, "cat", "/etc/new"], user=user, cwd=cwd)
    assert r.returncode == 1  # the writable layer was thrown away


@pytest.mark.parametrize("user", [None, USER], ids=["root", "user"])
def test_runtime_options_use_the_reserved_prefix(busybox_exe: Path, user, user_dir: Path) -> None:
    shared = user_dir / "shared"
    shared.mkdir()
    (shared / "in.txt").write_text("from the host\n")
    os.chown(shared, user_dir.stat().st_uid, user_dir.stat().st_gid)
    r = run(
        [
            busybox_exe,
            "--ocibox-env",
            "GREETING=hi there",
            "--ocibox-env=SECOND=2",
            "sh",
            "-c",
            "echo $GREETING $SECOND",
        ],
        user=user,
        cwd=user_dir,
    )
    assert r.stdout == "hi there 2\n", r.stderr
    r = run(
        [
            busybox_exe,
            "--ocibox-volume",
            f"{shared}:/data",
            "sh",
            "-c",
            "cat /data/in.txt; echo back > /data/out.txt",
        ],
        user=user,
        cwd=user_dir,
    )
    assert r.stdout == "from the host\n", r.stderr
    assert (shared / "out.txt").read_text() == "back\n"
    r = run(
        [busybox_exe, "--ocibox-volume", f"{shared}:/data:ro", "sh", "-c", "echo no > /data/x"],
        user=user,
        cwd=user_dir,
    )
    assert r.returncode != 0 and not (shared / "x").exists()
    r = run([busybox_exe, "--ocibox-workdir", "/tmp/work", "pwd"], user=user, cwd=user_dir)
    assert r.stdout == "/tmp/work\n"
    r = run([busybox_exe, "echo", "--ocibox-version-is-not-ours", "--version"], user=user, cwd=user_dir)
    assert r.returncode == 125 and "unknown runtime option" in r.stderr
    r = run([busybox_exe, "--ocibox-version"], user=user)
    assert r.returncode == 0 and "ocibox-runtime" in r.stdout
    r = run([busybox_exe, "--ocibox-help"], user=user)
    assert "--ocibox-volume" in r.stdout and r.returncode == 0
    r = run([busybox_exe, "--ocibox-info"], user=user)
    assert r.returncode == 0
    assert "image: " in r.stdout and 'cmd: ["sh"]' in r.stdout
    assert f"sha256:{footer(busybox_exe)['sha256']}" in r.stdout and "sha256 ok" in r.stdout


def test_host_files_and_network(busybox_exe: Path) -> None:
    r = run([busybox_exe, "cat", "/etc/resolv.conf"])
    assert r.stdout == Path("/etc/resolv.conf").read_text()
    r = run([busybox_exe, "readlink", "/proc/self/ns/net"])
    assert r.stdout.strip() == os.readlink("/proc/self/ns/net")  # the host's network


def test_a_terminal_passes_through(busybox_exe: Path) -> None:
    r = subprocess.run(
        ["script", "-qec", f"{busybox_exe} tty", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0 and "/dev/pts/" in r.stdout
    r = run([busybox_exe, "tty"])  # stdin a pipe: no terminal
    assert r.stdout.strip() == "not a tty"


@pytest.mark.parametrize("user", [None, USER], ids=["root", "user"])
def test_bind_cwd_works_on_the_callers_files(runner, busybox_exe: Path, user, user_dir: Path) -> None:
    exe = busybox_exe.parent / "cat-here.exe"
    if not exe.exists():
        runner(
            "compile",
            str(footer_image_name(busybox_exe)),
            "-o",
            str(exe),
            "--bind-cwd",
            "--entrypoint",
            "cat",
            "--cmd",
            "notes.txt",
            "--env",
            "BAKED=yes",
        )
    (user_dir / "notes.txt").write_text("my notes\n")
    r = run([exe], user=user, cwd=user_dir)
    assert (r.returncode, r.stdout) == (0, "my notes\n"), r.stderr
    r = run([exe, "-n", "notes.txt"], user=user, cwd=user_dir)  # args replace --cmd, not the entrypoint
    assert r.stdout.split() == ["1", "my", "notes"]
    r = run([exe, "--ocibox-info"], user=user)
    assert 'entrypoint: ["cat"]' in r.stdout and "bind-cwd: yes" in r.stdout


def footer_image_name(exe: Path) -> str:
    r = run([exe, "--ocibox-info"])
    return next(line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("image: "))


def test_signals_are_forwarded(busybox_exe: Path) -> None:
    proc = subprocess.Popen(
        [
            busybox_exe,
            "sh",
            "-c",
            "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.1; done",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out) == (3, "got TERM\n")


@pytest.mark.parametrize("user", [None, USER], ids=["root", "user"])
def test_without_dev_fuse_it_extracts_once(busybox_exe: Path, user, user_dir: Path) -> None:
    cache = user_dir / "cache"
    inner = setpriv_prefix(user) if user else []
    script = (
        "mount --bind /dev/null /dev/fuse && "
        + " ".join(inner + [str(busybox_exe), "echo", "first"])
        + " && "
        + " ".join(inner + [str(busybox_exe), "echo", "second"])
    )
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "XDG_CACHE_HOME": str(cache), "HOME": str(user_dir)}
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "first\nsecond\n"
    assert r.stderr.count("/dev/fuse can't be used here") == 1
    digest = footer(busybox_exe)["sha256"]
    assert [p.name for p in (cache / "ocibox").iterdir()] == [digest]
    assert (cache / "ocibox" / digest / "bin" / "busybox").is_file()


def _processes_of(exe: Path) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(exe) in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.mark.parametrize("user", [None, USER], ids=["root", "user"])
def test_kill_9_leaves_nothing_behind(busybox_exe: Path, user, user_dir: Path) -> None:
    mounts_before = Path("/proc/self/mounts").read_text()
    tmp_before = set(os.listdir("/tmp"))
    marker = f"sleep {4000 + os.getpid() % 1000}"
    proc = subprocess.Popen(
        (setpriv_prefix(user) if user else []) + [str(busybox_exe), "sh", "-c", f"echo ready; exec {marker}"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=user_dir,
    )
    try:
        _kill_and_check(proc, busybox_exe, marker, mounts_before, tmp_before)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _kill_and_check(
    proc: subprocess.Popen, busybox_exe: Path, marker: str, mounts_before: str, tmp_before: set[str]
) -> None:
    assert proc.stdout.readline() == "ready\n"

    def sleepers() -> list[int]:
        found = []
        for d in Path("/proc").iterdir():
            try:
                if (
                    d.name.isdigit()
                    and (d / "cmdline").read_bytes().replace(b"\0", b" ").strip() == marker.encode()
                ):
                    found.append(int(d.name))
            except OSError:
                continue
        return found

    deadline = time.monotonic() + 10
    while not sleepers() and time.monotonic() < deadline:  # "ready" comes just before the exec
        time.sleep(0.02)
    assert sleepers()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while (sleepers() or _processes_of(busybox_exe)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sleepers() == [] and _processes_of(busybox_exe) == []
    new_mounts = set(Path("/proc/self/mounts").read_text().splitlines()) - set(mounts_before.splitlines())
    assert not [m for m in new_mounts if "fuse" in m or "ocibox" in m]  # others' tests may mount too
    assert not [n for n in set(os.listdir("/tmp")) - tmp_before if "ocibox" in n or "squash" in n]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(busybox_exe) not in loops  # as root the payload is on an auto-clearing loop device


def test_two_copies_run_at_once(busybox_exe: Path) -> None:
    procs = [
        subprocess.Popen(
            [busybox_exe, "sh", "-c", f"echo {n} > /tmp/who; sleep 0.5; cat /tmp/who"],
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        for n in ("one", "two")
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert outs == ["one\n", "two\n"] and [p.returncode for p in procs] == [0, 0]


@pytest.mark.slow
def test_python_image_compiles_and_runs(runner, images, user_dir: Path, tmp_path: Path) -> None:
    exe = user_dir / "python.exe"
    runner("compile", images["python"].ref, "-o", str(exe), timeout=900)
    # the payload, read by unsquashfs, the kernel's squashfs and squashfuse, is `ocibox unpack`'s tree
    runner("unpack", images["python"].ref, str(tmp_path / "bundle"), timeout=900)
    unpacked = tmp_path / "bundle" / "rootfs"
    expected = tree(unpacked)
    f = footer(exe)
    extracted = tmp_path / "extracted"
    subprocess.run(
        ["unsquashfs", "-q", "-o", str(f["payload_offset"]), "-d", str(extracted), str(exe)],
        check=True,
        capture_output=True,
    )
    assert tree(extracted) == expected
    owners = {p: os.lstat(unpacked / p)[4:6] for p in expected}
    assert {p: os.lstat(extracted / p)[4:6] for p in expected} == owners
    kernel, fuse = tmp_path / "kernel", tmp_path / "fuse"
    kernel.mkdir()
    fuse.mkdir()
    subprocess.run(
        ["mount", "-t", "squashfs", "-o", f"loop,ro,offset={f['payload_offset']}", str(exe), str(kernel)],
        check=True,
    )
    try:
        assert tree(kernel) == expected
    finally:
        subprocess.run(["umount", str(kernel)], check=True)
    subprocess.run(["squashfuse_ll", "-o", f"offset={f['payload_offset']}", str(exe), str(fuse)], check=True)
    try:
        assert tree(fuse) == expected
    finally:
        subprocess.run(["fusermount3", "-u", str(fuse)], check=True)
    code = "import asyncio, email, json, sqlite3; print(sqlite3.sqlite_version_info >= (3,))"
    for user in (None, USER):
        r = run([exe, "python3", "-c", code], user=user, cwd=user_dir if user else "/", timeout=120)
        assert (r.returncode, r.stdout) == (0, "True\n"), r.stderr


def test_a_damaged_file_is_refused_when_checked(busybox_exe: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.exe"
    data = bytearray(busybox_exe.read_bytes())
    f = footer(busybox_exe)
    data[f["payload_offset"] + f["payload_size"] // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    damaged.chmod(0o755)
    r = run([damaged, "--ocibox-verify", "true"])
    assert r.returncode == 125 and "sha256 mismatch" in r.stderr
    assert run([busybox_exe, "--ocibox-verify", "true"]).returncode == 0
    truncated = tmp_path / "truncated.exe"
    truncated.write_bytes(bytes(data[:-1]))  # no footer: a plain runtime, which wants `run`
    truncated.chmod(0o755)
    r = run([truncated, "echo"])
    assert r.returncode == 125 and "usage" in r.stderr


def test_where_user_namespaces_are_disabled_it_names_the_sysctl(busybox_exe: Path) -> None:
    """As a user on a machine with user.max_user_namespaces=0 (simulated in a namespace of the
    test's own, the machine's setting untouched): one line naming the sysctl to change."""
    import pwd

    pw = pwd.getpwnam(USER)
    tests = Path(__file__).resolve().parent
    done = subprocess.run(
        [
            sys.executable,
            str(tests / "support" / "nouserns.py"),
            str(pw.pw_uid),
            str(pw.pw_gid),
            str(busybox_exe),
            "echo",
            "hi",
        ],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
    )
    assert done.returncode == 125 and done.stdout == ""
    assert "user.max_user_namespaces" in done.stderr and "sysctl" in done.stderr
    assert done.stderr.count("\n") == 1
