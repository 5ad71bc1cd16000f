"""`ocibox pull` against `skopeo copy docker://… oci:…` on the python test image, in the same run.

    .venv/bin/python bench/bench_pull.py [--runs 5] [--image python]

Starts a docker-registry on 127.0.0.1 (tests/support), pushes the cached Debian+python3 image
(4 gzip layers, ≈84 MB; built by the tests on first use) and then, `--runs` times, alternating:
sync, drop the page cache, `skopeo copy` into a new OCI layout; sync, drop the page cache,
`ocibox pull` into a new store. Then `ocibox pull` again with every blob present (warm).
Prints medians, the ratio (goal: cold ≤ 0.8× skopeo; warm < 0.3 s) and peak RSS (goal < 150 MB).
Needs root (drop_caches). The benchmark, its registry and both tools run at nice -10 so that other
work on a shared machine disturbs them less; they all get the same priority.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from benchlib import PYTHON, drop_caches, installed_copy, timed_rss  # first: puts tests/ on sys.path

from support import debian  # noqa: E402
from support.images import skopeo_copy  # noqa: E402
from support.registry import start_registry  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", default="python", choices=["python", "debian"])
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_pull needs root to drop the page cache between runs")
    os.setpriority(os.PRIO_PROCESS, 0, -10)  # inherited by the registry, skopeo and ocibox

    work = Path(tempfile.mkdtemp(prefix="ocibox-bench-pull-"))
    registry = start_registry(work / "registry")
    try:
        built = debian.cached_layout()
        skopeo_copy(f"oci:{built.path}:{args.image}", registry, f"{args.image}:latest", "--preserve-digests")
        ref = registry.ref(args.image)
        facts = built.facts[args.image]
        src = installed_copy(work / "src")
        env = dict(os.environ, PYTHONPATH=str(src))
        ocibox = [PYTHON, "-m", "ocibox", "pull", "-q", ref]
        skopeo = ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}"]

        cold: dict[str, list[float]] = {"skopeo": [], "ocibox": []}
        rss: dict[str, list[int]] = {"skopeo": [], "ocibox": []}
        for run in range(args.runs):
            order = ["skopeo", "ocibox"] if run % 2 == 0 else ["ocibox", "skopeo"]
            for tool in order:
                target = work / f"{tool}-{run}"
                shutil.rmtree(work / f"{tool}-{run - 1}", ignore_errors=True)
                drop_caches()
                if tool == "skopeo":
                    seconds, peak = timed_rss(skopeo + [f"oci:{target}:latest"], env)
                else:
                    seconds, peak = timed_rss(ocibox, dict(env, OCIBOX_ROOT=str(target)))
                cold[tool].append(seconds)
                rss[tool].append(peak)
                line = f"run {run + 1}: {tool:7s} cold {seconds:6.3f} s  peak RSS {peak / 1024:6.1f} MB"
                print(line, flush=True)

        store = work / f"ocibox-{args.runs - 1}"
        warm = [timed_rss(ocibox, dict(env, OCIBOX_ROOT=str(store)))[0] for _ in range(args.runs)]

        sk, oc = statistics.median(cold["skopeo"]), statistics.median(cold["ocibox"])
        wm = statistics.median(warm)
        print()
        print(f"image: {ref} ({facts['layers']} layers, {facts['compressed_size'] / 1e6:.1f} MB compressed)")
        print(f"cold pull, median of {args.runs}: skopeo copy {sk:.3f} s, ocibox pull {oc:.3f} s")
        print(f"  ratio ocibox / skopeo = {oc / sk:.2f}  (goal <= 0.80)")
        print(f"warm pull (all blobs present), median of {args.runs}: {wm:.3f} s  (goal < 0.30 s)")
        print(
            f"peak RSS: ocibox {max(rss['ocibox']) / 1024:.1f} MB, skopeo {max(rss['skopeo']) / 1024:.1f} MB"
            "  (goal < 150 MB)"
        )
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
