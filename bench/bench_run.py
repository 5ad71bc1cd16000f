"""`ocibox run --rm IMAGE true` against `podman run --rm IMAGE true`, and time to first container,
in the same run.

    .venv/bin/python bench/bench_run.py [--runs 15] [--first-runs 3]

1. Start-up: the python test image present and unpacked in both; median of `--runs` starts of
   `true`, alternating tools: ocibox as root and as the unprivileged user ocibox-test (rootless,
   the main case), podman as root with runc/cgroupfs (the only way it runs here) on its default
   network and on `--network none`. Goal: ocibox <= 1/8 of podman.
2. Time to first container: from an empty store, `ocibox pull` + `ocibox run --rm python true`
   against `podman pull` + `podman run --rm python true` into a fresh podman root; page cache
   dropped before each. Goal: ocibox <= 0.5x podman. And the image made ready to run alone:
   `ocibox pull` + `ocibox unpack` (the unpack `run` does) against `podman pull` (which unpacks
   into its overlay storage). Goal: <= 0.5x.

Needs root (podman, drop_caches). ocibox runs from a byte-compiled copy of the package, as
`pip install` leaves it. Prints medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import PYTHON, REPO, drop_caches  # first: puts tests/ on sys.path

from support import debian  # noqa: E402
from support.images import skopeo_copy  # noqa: E402
from support.registry import start_registry  # noqa: E402
from support.users import setpriv_prefix  # noqa: E402

USER = "ocibox-test"
PODMAN_FLAGS = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"]
PODMAN_RUN = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace")
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{err}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--first-runs", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_run needs root (podman, drop_caches)")

    work = Path(tempfile.mkdtemp(prefix="ocibox-bench-run-"))
    work.chmod(0o755)
    registry = start_registry(work / "registry")
    try:
        built = debian.cached_layout()
        skopeo_copy(f"oci:{built.path}:python", registry, "python:latest", "--preserve-digests")
        ref = registry.ref("python")
        src = work / "src"
        shutil.copytree(REPO / "src" / "ocibox", src / "ocibox")
        runtime = work / "ocibox-runtime"
        shutil.copy2(REPO / "runtime" / "ocibox-runtime", runtime)
        subprocess.run([PYTHON, "-m", "compileall", "-q", str(src)], check=True)
        subprocess.run(["chmod", "-R", "a+rX", str(src), str(runtime)], check=True)

        def ocibox_env(root: Path, home: Path) -> dict[str, str]:
            return dict(
                os.environ,
                PYTHONPATH=str(src),
                OCIBOX_ROOT=str(root),
                HOME=str(home),
                OCIBOX_RUNTIME=str(runtime),
                NO_PROXY="127.0.0.1",
            )

        # --- 1. start-up with the image ready ------------------------------------------------------
        root_store, user_home = work / "store-root", work / "home-user"
        user_home.mkdir()
        shutil.chown(user_home, USER, USER)
        user_store = user_home / "store"
        env_root = ocibox_env(root_store, work)
        env_user = ocibox_env(user_store, user_home)
        ocibox = [PYTHON, "-m", "ocibox"]
        as_user = setpriv_prefix(USER)
        subprocess.run([*ocibox, "pull", "-q", ref], env=env_root, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            [*as_user, *ocibox, "pull", "-q", ref], env=env_user, check=True, stdout=subprocess.DEVNULL
        )
        podman_root = work / "podman"
        podman = [
            "podman",
            "--root",
            str(podman_root / "root"),
            "--runroot",
            str(podman_root / "run"),
            *PODMAN_FLAGS,
        ]
        subprocess.run(
            [*podman, "pull", "-q", "--tls-verify=false", ref], check=True, stdout=subprocess.DEVNULL
        )

        commands = {
            "ocibox root": [*ocibox, "run", "--rm", ref, "true"],
            "ocibox rootless": [*as_user, *ocibox, "run", "--rm", ref, "true"],
            "podman": [*podman, "run", "--rm", *PODMAN_RUN, ref, "true"],
            "podman --network none": [*podman, "run", "--rm", "--network", "none", *PODMAN_RUN, ref, "true"],
        }
        envs = {"ocibox root": env_root, "ocibox rootless": env_user}
        for name, cmd in commands.items():  # warm up: unpack, podman's first container
            timed(cmd, envs.get(name))
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, cmd in commands.items():
                times[name].append(timed(cmd, envs.get(name)))
        med = {name: statistics.median(t) * 1000 for name, t in times.items()}
        print(f"image: {ref} (python test image)")
        print(f"start `true`, image ready, median of {args.runs}:")
        for name, ms in med.items():
            print(f"  {name:24s} {ms:7.1f} ms")
        for name in ("ocibox root", "ocibox rootless"):
            none = med["podman --network none"]
            print(
                f"  ratio {name} / podman = {med[name] / med['podman']:.3f}"
                f"  (/ podman --network none = {med[name] / none:.3f}; goal <= 0.125)"
            )

        # --- 2. time to first container ------------------------------------------------------------
        first: dict[str, list[float]] = {"ocibox": [], "podman": []}
        ready: dict[str, list[float]] = {"ocibox": [], "podman": []}  # pull (+ unpack) alone
        for run in range(args.first_runs):
            store = work / f"first-{run}"
            drop_caches()
            env = ocibox_env(store, work)
            pull = timed([*ocibox, "pull", "-q", ref], env)
            unpack = timed([*ocibox, "unpack", ref, str(work / f"bundle-{run}")], env)
            ready["ocibox"].append(pull + unpack)
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(work / f"bundle-{run}", ignore_errors=True)
            drop_caches()
            first["ocibox"].append(
                timed([*ocibox, "pull", "-q", ref], env) + timed([*ocibox, "run", "--rm", ref, "true"], env)
            )
            fresh = [
                "podman",
                "--root",
                str(work / f"p-{run}/root"),
                "--runroot",
                str(work / f"p-{run}/run"),
                *PODMAN_FLAGS,
            ]
            drop_caches()
            podman_pull = timed([*fresh, "pull", "-q", "--tls-verify=false", ref])
            ready["podman"].append(podman_pull)
            first["podman"].append(podman_pull + timed([*fresh, "run", "--rm", *PODMAN_RUN, ref, "true"]))
            subprocess.run([*fresh, "system", "reset", "-f"], capture_output=True)
            shutil.rmtree(store, ignore_errors=True)
            print(
                f"run {run + 1}: first container ocibox {first['ocibox'][-1]:.2f} s, "
                f"podman {first['podman'][-1]:.2f} s; pull + unpack {ready['ocibox'][-1]:.2f} s, "
                f"podman pull {ready['podman'][-1]:.2f} s",
                flush=True,
            )
        oc, pm = statistics.median(first["ocibox"]), statistics.median(first["podman"])
        print(
            f"time to first container (pull + run, cold), median of {args.first_runs}: "
            f"ocibox {oc:.2f} s, podman {pm:.2f} s, ratio {oc / pm:.2f} (goal <= 0.5)"
        )
        oc, pm = statistics.median(ready["ocibox"]), statistics.median(ready["podman"])
        print(
            f"pull + unpack (ready to run), cold, median of {args.first_runs}: ocibox {oc:.2f} s, "
            f"podman pull {pm:.2f} s, ratio {oc / pm:.2f} (goal <= 0.5)"
        )
    finally:
        registry.stop()
        subprocess.run(
            [
                "podman",
                "--root",
                str(work / "podman/root"),
                "--runroot",
                str(work / "podman/run"),
                "system",
                "reset",
                "-f",
            ],
            capture_output=True,
        )
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
