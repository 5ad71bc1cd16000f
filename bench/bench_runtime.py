"""The runtime alone on a ready bundle: `ocibox-runtime run` of /bin/true against bwrap and runc.

    .venv/bin/python bench/bench_runtime.py [--runs 50]

Builds a busybox bundle (tests/runtime_support.py, Docker's default config) in a temp folder, then
`--runs` times, interleaved: `ocibox-runtime run --bundle B ID` (as root, and rootless as the test
user when it exists), `bwrap --unshare-all --bind ROOTFS / --proc /proc --dev /dev /bin/true`
(same two ways), `runc run --bundle B ID` + `runc delete` and `crun run --bundle B ID` (root only;
the delete is not timed). Prints the median wall time of each and the ratios (goal: ocibox within
3x of bwrap and crun; runc is slower than both).

crun 1.8 refuses hybrid cgroup hosts like this one ("cgroups in hybrid mode not supported"): the
whole benchmark then re-runs itself in a private mount namespace with a tmpfs over
/sys/fs/cgroup/unified, so that every tool, ours included, is measured in the same place.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from runtime_support import (  # noqa: E402
    RUNTIME,
    TEST_USER,
    Bundle,
    as_user_argv,
    base_config,
    make_rootfs,
    user_ids,
    world_readable,
)


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, cwd="/")
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"bench_runtime: {' '.join(argv)}: exit {r.returncode}: {r.stderr.decode().strip()}")
    return elapsed


def has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_runtime: run as root (runc, and setpriv for the rootless runs)")
    unified = Path("/sys/fs/cgroup/unified")
    if shutil.which("crun") and unified.is_dir() and not os.environ.get("OCIBOX_BENCH_PRIVATE_CGROUP"):
        script = f'mount -t tmpfs tmpfs {unified} && exec "$@"'
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
        argv += [sys.executable, *sys.argv]
        os.execvpe("unshare", argv, dict(os.environ, OCIBOX_BENCH_PRIVATE_CGROUP="1"))
    subprocess.run(["make", "-s", "-C", str(RUNTIME.parent)], check=True)
    world_readable(RUNTIME)

    base = Path(tempfile.mkdtemp(prefix="ocibox-bench-", dir="/tmp"))
    try:
        base.chmod(0o755)
        rootless = has_user(TEST_USER)
        bundles = {}
        for who in ["root"] + ([TEST_USER] if rootless else []):
            d = base / who
            d.mkdir()
            make_rootfs(d / "rootfs")
            if who != "root":
                for p in [d, *d.rglob("*")]:
                    os.lchown(p, *user_ids())
            cfg = base_config(["/bin/true"])
            # runc needs a writable bundle for nothing here; keep the image read-only for both
            cfg["root"]["readonly"] = True
            bundles[who] = Bundle(d, cfg).write()
            world_readable(d / "rootfs")

        def bwrap(who: str) -> list[str]:
            root = str(bundles[who].dir / "rootfs")
            argv = [
                "bwrap",
                "--unshare-all",
                "--bind",
                root,
                "/",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "/bin/true",
            ]
            return as_user_argv(argv, who)

        cases: dict[str, object] = {
            "ocibox-runtime (root)": lambda i: as_user_argv(
                [str(RUNTIME), "run", "--bundle", str(bundles["root"].dir), f"b{i}"], "root"
            ),
            "bwrap (root)": lambda i: bwrap("root"),
        }
        if shutil.which("runc"):
            cases["runc run (root)"] = lambda i: [
                "runc",
                "run",
                "--bundle",
                str(bundles["root"].dir),
                f"ocibox-bench-{i}",
            ]
        if shutil.which("crun"):
            crun_bundle = str(bundles["root"].dir)
            cases["crun run (root)"] = lambda i: ["crun", "run", "--bundle", crun_bundle, f"c{i}"]
        if rootless:
            cases["ocibox-runtime (rootless)"] = lambda i: as_user_argv(
                [str(RUNTIME), "run", "--bundle", str(bundles[TEST_USER].dir), f"b{i}"], TEST_USER
            )
            cases["bwrap (rootless)"] = lambda i: bwrap(TEST_USER)

        times: dict[str, list[float]] = {name: [] for name in cases}
        for i in range(args.runs + 2):
            for name, make in cases.items():
                t = timed(make(i))
                if name.startswith("runc"):
                    subprocess.run(["runc", "delete", "-f", f"ocibox-bench-{i}"], capture_output=True)
                if i >= 2:  # two warm-up rounds
                    times[name].append(t)

        med = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
        print(f"runtime start-to-exit of /bin/true, median of {args.runs} runs:")
        for name, ms in med.items():
            print(f"  {name:28s} {ms:8.2f} ms")
        for mode in ("root", "rootless"):
            ours = med.get(f"ocibox-runtime ({mode})")
            for peer in (f"bwrap ({mode})", f"crun run ({mode})", f"runc run ({mode})"):
                if ours and peer in med:
                    print(f"  ocibox-runtime / {peer:20s} {ours / med[peer]:6.2f}x  (goal <= 3x)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
