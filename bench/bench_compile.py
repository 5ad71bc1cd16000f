"""`ocibox compile` and the executables it makes, beside the dockerc-style path, in one run.

    .venv/bin/python bench/bench_compile.py [--runs 20] [--compile-runs 3]

Uses the cached Debian and Debian+python3 test images (tests/support/debian.py, built on first use).
All medians, interleaved runs, as root (drop_caches before each compile):

1. start-to-exit of `true`, rootless as the test user (as root without it), from the Debian image:
   - the compiled executable (`ocibox compile`: in-process FUSE + kernel overlayfs + runtime);
   - the dockerc-style path scripted from Debian's packages, as dockerc's runtime does it:
     temp folder, `squashfuse` of the image's .sqfs, `fuse-overlayfs` on it, `runc run` of a
     rootless config (crun refuses this machine's hybrid cgroups), both unmounted, folder removed;
   - `bwrap --unshare-all --share-net --bind ROOTFS / --proc /proc --dev /dev /bin/true` on the
     unpacked rootfs: the floor.
2. building, python image: `ocibox compile ARCHIVE -o FILE` (the image in an oci-archive: load into
   a fresh store + flatten + squashfs) vs `skopeo copy oci:LAYOUT oci:DIR` + `umoci unpack` +
   `mksquashfs -comp zstd` (what dockerc does);
3. file size: the compiled file vs that mksquashfs output + the runtime binary;
4. `python3 -c 'import asyncio, email, json, sqlite3'`: the compiled python image (as root: kernel
   squashfs on a loop device; also run as the test user: FUSE) vs `ocibox run --rm` of the stored
   image (its unpacked rootfs cached, CLI start included), vs `ocibox-runtime run` on an unpacked
   bundle, vs bwrap on the unpacked rootfs.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import PYTHON, REPO, drop_caches  # first: puts tests/ on sys.path

from support import debian  # noqa: E402

USER = "ocibox-test"
IMPORTS = "import asyncio, email, json, sqlite3"
RUNTIME = REPO / "runtime" / "ocibox-runtime"

DOCKERC_STYLE = """#!/bin/sh
# dockerc's start, scripted from Debian's packages: squashfuse + fuse-overlayfs + an OCI runtime
set -e
T=$(mktemp -d /tmp/dockerc-style-XXXXXX)
mkdir "$T/lower" "$T/upper" "$T/work" "$T/merged" "$T/state"
squashfuse "$1" "$T/lower"
fuse-overlayfs -o "lowerdir=$T/lower,upperdir=$T/upper,workdir=$T/work" "$T/merged"
cp "$2" "$T/config.json"
status=0
runc --root "$T/state" run --bundle "$T" "dockerc-$$" </dev/null >/dev/null || status=$?
fusermount3 -u "$T/merged"
fusermount3 -u -z "$T/lower"  # fuse-overlayfs may still be closing it
rm -rf "$T"
exit $status
"""


def run_timed(argv: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, cwd="/", env=env)
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(
            f"bench_compile: {' '.join(map(str, argv))}: exit {r.returncode}: "
            f"{r.stderr.decode(errors='replace').strip()[-2000:]}"
        )
    return elapsed


def as_user(argv: list, user: str | None) -> list[str]:
    if user is None:
        return [str(a) for a in argv]
    pw = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", *map(str, argv)]


def ocibox_env(store: Path, home: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": str(REPO / "src"),
        "OCIBOX_ROOT": str(store),
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / "cache"),
        "OCIBOX_RUNTIME": str(RUNTIME),
    }


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def rootless_runc_config(uid: int, gid: int, args: list[str], env: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["runc", "spec", "--rootless"], cwd=tmp, check=True)
        config = json.loads((Path(tmp) / "config.json").read_text())
    config["process"].update(args=args, terminal=False, env=env)
    config["root"] = {"path": "merged", "readonly": False}
    config["linux"]["uidMappings"] = [{"containerID": 0, "hostID": uid, "size": 1}]
    config["linux"]["gidMappings"] = [{"containerID": 0, "hostID": gid, "size": 1}]
    return config


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--compile-runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_compile: run as root (drop_caches; the rootless runs use setpriv)")
    try:
        pw = pwd.getpwnam(USER)
        user: str | None = USER
        uid, gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        user, uid, gid = None, 0, 0
    layout = debian.cached_layout().path
    work = Path(tempfile.mkdtemp(prefix="bench-compile-"))
    os.chmod(work, 0o755)
    try:
        return _bench(args, layout, work, user, uid, gid)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(args, layout: Path, work: Path, user: str | None, uid: int, gid: int) -> int:
    home = work / "home"
    home.mkdir()
    store = work / "store"
    env = ocibox_env(store, home)
    ocibox = [PYTHON, "-m", "ocibox"]
    archives = {}
    for tag in ("debian", "python"):
        archives[tag] = work / f"{tag}.tar"
        subprocess.run(
            ["skopeo", "copy", "-q", f"oci:{layout}:{tag}", f"oci-archive:{archives[tag]}:{tag}"], check=True
        )

    # --- 2. building (python) ------------------------------------------------------------------
    ours, theirs, sizes = [], [], {}
    for i in range(args.compile_runs):
        for order in (0, 1) if i % 2 == 0 else (1, 0):
            if order == 0:
                shutil.rmtree(store, ignore_errors=True)
                out = work / "python.exe"
                drop_caches()
                ours.append(run_timed([*ocibox, "compile", str(archives["python"]), "-o", str(out)], env))
                sizes["ours"] = out.stat().st_size
            else:
                dock = work / "dockerc"
                shutil.rmtree(dock, ignore_errors=True)
                dock.mkdir()
                drop_caches()
                start = time.perf_counter()
                subprocess.run(
                    ["skopeo", "copy", "-q", f"oci:{layout}:python", f"oci:{dock}/layout:python"], check=True
                )
                subprocess.run(
                    ["umoci", "unpack", "--image", f"{dock}/layout:python", str(dock / "bundle")],
                    check=True,
                    capture_output=True,
                )
                subprocess.run(
                    [
                        "mksquashfs",
                        str(dock / "bundle" / "rootfs"),
                        str(dock / "python.sqfs"),
                        "-comp",
                        "zstd",
                        "-quiet",
                        "-no-progress",
                        "-noappend",
                    ],
                    check=True,
                )
                theirs.append(time.perf_counter() - start)
                sizes["mksquashfs"] = (dock / "python.sqfs").stat().st_size
    runtime_size = RUNTIME.stat().st_size
    print(
        f"compile python image: ocibox compile {statistics.median(ours):.2f} s; skopeo copy + umoci unpack "
        f"+ mksquashfs -comp zstd {statistics.median(theirs):.2f} s; ratio "
        f"{statistics.median(ours) / statistics.median(theirs):.2f} (goal <= 0.5)"
    )
    print(
        f"file size: compiled {sizes['ours'] / 1e6:.1f} MB; mksquashfs "
        f"{sizes['mksquashfs'] / 1e6:.1f} MB + runtime {runtime_size / 1e6:.1f} MB = "
        f"{(sizes['mksquashfs'] + runtime_size) / 1e6:.1f} MB; ratio "
        f"{sizes['ours'] / (sizes['mksquashfs'] + runtime_size):.3f} (goal <= 1.05)"
    )
    python_rootfs = work / "dockerc" / "bundle" / "rootfs"

    # --- 1. start-to-exit of `true` (debian) -----------------------------------------------------
    deb_exe = work / "debian.exe"
    subprocess.run(
        [*ocibox, "compile", str(archives["debian"]), "-o", str(deb_exe)],
        env=env,
        check=True,
        capture_output=True,
    )
    deb = work / "deb"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:debian", str(deb)], check=True, capture_output=True
    )
    os.chmod(deb, 0o755)  # umoci makes the bundle folder 0700
    deb_sqfs = work / "debian.sqfs"
    subprocess.run(
        [
            "mksquashfs",
            str(deb / "rootfs"),
            str(deb_sqfs),
            "-comp",
            "zstd",
            "-quiet",
            "-no-progress",
            "-noappend",
        ],
        check=True,
    )
    script = work / "dockerc-style.sh"
    script.write_text(DOCKERC_STYLE)
    script.chmod(0o755)
    deb_env = json.loads((deb / "config.json").read_text())["process"]["env"]
    config = work / "runc-config.json"
    config.write_text(json.dumps(rootless_runc_config(uid, gid, ["/bin/true"], deb_env)))
    for p in (deb_exe, deb_sqfs, config):
        p.chmod(0o755 if p == deb_exe else 0o644)
    user_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp"}
    cases = {
        "compiled": as_user([deb_exe, "true"], user),
        "dockerc-style": as_user([script, deb_sqfs, config], user),
        "bwrap": as_user(
            [
                "bwrap",
                "--unshare-all",
                "--share-net",
                "--bind",
                deb / "rootfs",
                "/",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "/bin/true",
            ],
            user,
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    for argv in cases.values():  # warm up
        run_timed(argv, user_env)
    for i in range(args.runs):
        for k in list(cases) if i % 2 == 0 else list(reversed(cases)):
            times[k].append(run_timed(cases[k], user_env))
    who = f"as {user}" if user else "as root"
    m = {k: median_ms(v) for k, v in times.items()}
    print(
        f"start-to-exit of true (debian, {who}, {args.runs} runs): compiled {m['compiled']:.1f} ms; "
        f"dockerc-style {m['dockerc-style']:.1f} ms; bwrap {m['bwrap']:.1f} ms; compiled/dockerc-style "
        f"{m['compiled'] / m['dockerc-style']:.2f} (goal <= 0.25); "
        f"compiled/bwrap {m['compiled'] / m['bwrap']:.1f}"
    )

    # --- 4. reading through the mount (python imports) ---------------------------------------------
    py_exe = work / "python.exe"
    loaded = subprocess.run(
        [*ocibox, "load", "-i", str(archives["python"])], env=env, check=True, capture_output=True, text=True
    ).stdout
    name = loaded.strip().splitlines()[-1].split(": ", 1)[1]
    bundle = work / "pybundle"
    subprocess.run([*ocibox, "unpack", name, str(bundle)], env=env, check=True, capture_output=True)
    code = ["python3", "-c", IMPORTS]
    pcases = {
        "compiled": [py_exe, *code],
        "compiled, rootless (FUSE)": as_user([py_exe, *code], user),
        "ocibox run": [*ocibox, "run", "--rm", "-q", name, *code],
        "ocibox-runtime": [RUNTIME, "run", "--bundle", bundle],
        "bwrap": [
            "bwrap",
            "--unshare-all",
            "--share-net",
            "--bind",
            python_rootfs,
            "/",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "/usr/bin/python3",
            "-c",
            IMPORTS,
        ],
    }
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"]["args"] = code
    (bundle / "config.json").write_text(json.dumps(cfg))
    ptimes: dict[str, list[float]] = {k: [] for k in pcases}
    for argv in pcases.values():
        run_timed([str(a) for a in argv], env)
    for i in range(args.runs):
        for k in list(pcases) if i % 2 == 0 else list(reversed(pcases)):
            ptimes[k].append(run_timed([str(a) for a in pcases[k]], env))
    pm = {k: median_ms(v) for k, v in ptimes.items()}
    print(
        f"python3 -c '{IMPORTS}' (root, {args.runs} runs): compiled {pm['compiled']:.0f} ms; ocibox run "
        f"{pm['ocibox run']:.0f} ms; ocibox-runtime on the unpacked bundle {pm['ocibox-runtime']:.0f} ms; "
        f"bwrap {pm['bwrap']:.0f} ms; compiled/ocibox run {pm['compiled'] / pm['ocibox run']:.2f} "
        f"(goal <= 1.5); "
        f"compiled/ocibox-runtime {pm['compiled'] / pm['ocibox-runtime']:.2f}; the same compiled file run "
        f"as {user or 'root'} (FUSE instead of the loop device) {pm['compiled, rootless (FUSE)']:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
