"""`ocibox unpack` against `umoci unpack --rootless` and `gzip -dc | tar -x` on the python test image.

    .venv/bin/python bench/bench_unpack.py [--runs 3] [--image python]

Pulls the cached Debian+python3 image (4 gzip layers, ≈84 MB → ≈209 MB, 11.7k entries; built by the
tests on first use) through a local docker-registry into an ocibox store, then `--runs` times, in
rotating order, each into a fresh folder after `sync` and dropping the page cache:
`ocibox unpack REF DIR` (from the store, CLI start included), `umoci unpack --rootless --image
LAYOUT:TAG DIR` on the same image in an OCI layout, and `gzip -dc LAYER | tar -x` of every layer
in turn (no whiteouts: a floor, not an unpacker). Prints medians, the ratios (goals: ≤ 0.5× umoci,
≤ 1.5× gzip|tar) and ocibox's peak RSS. Needs root (drop_caches).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchlib import PYTHON, drop_caches, installed_copy  # first: puts tests/ on sys.path

from support import debian  # noqa: E402
from support.images import skopeo_copy  # noqa: E402
from support.registry import start_registry  # noqa: E402


def timed(cmd: list[str] | str, env: dict[str, str], shell: bool = False) -> tuple[float, int, float]:
    """(seconds, peak RSS in KiB, CPU seconds user+sys of the command and its children)."""
    before = os.times()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, shell=shell, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    after = os.times()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed:\n{err}")
    if shell:  # the shell waited for gzip and tar: they count among its children's times
        cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    else:
        cpu = usage.ru_utime + usage.ru_stime
    return elapsed, usage.ru_maxrss, cpu


def layer_files(layout: Path, tag: str) -> list[Path]:
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / desc["digest"][7:]).read_text())
    return [blobs / layer["digest"][7:] for layer in manifest["layers"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image", default="python", choices=["python", "debian"])
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_unpack needs root to drop the page cache between runs")
    os.setpriority(os.PRIO_PROCESS, 0, -10)

    work = Path(tempfile.mkdtemp(prefix="ocibox-bench-unpack-", dir="/var/tmp"))
    registry = start_registry(work / "registry")
    try:
        built = debian.cached_layout()
        facts = built.facts[args.image]
        skopeo_copy(f"oci:{built.path}:{args.image}", registry, f"{args.image}:latest", "--preserve-digests")
        ref = registry.ref(args.image)
        src = installed_copy(work / "src")
        env = dict(os.environ, PYTHONPATH=str(src), OCIBOX_ROOT=str(work / "store"))
        subprocess.run([PYTHON, "-m", "ocibox", "pull", "-q", ref], env=env, check=True, capture_output=True)
        layout = work / "layout"
        shutil.copytree(built.path, layout)
        layers = layer_files(layout, args.image)

        def run(tool: str, target: Path) -> tuple[float, int, float]:
            if tool == "ocibox":
                return timed([PYTHON, "-m", "ocibox", "unpack", ref, str(target)], env)
            if tool == "umoci":
                umoci = ["umoci", "unpack", "--rootless", "--image", f"{layout}:{args.image}", str(target)]
                return timed(umoci, env)
            target.mkdir()
            script = " && ".join(f"gzip -dc {layer} | tar -x -C {target}" for layer in layers)
            return timed(script, env, shell=True)

        tools = ["ocibox", "umoci", "gzip|tar"]
        times: dict[str, list[float]] = {t: [] for t in tools}
        rss: dict[str, list[int]] = {t: [] for t in tools}
        cpus: dict[str, list[float]] = {t: [] for t in tools}
        for n in range(args.runs):
            order = tools[n % 3 :] + tools[: n % 3]
            for tool in order:
                target = work / f"out-{tool.replace('|', '-')}-{n}"
                drop_caches()
                seconds, peak, cpu = run(tool, target)
                times[tool].append(seconds)
                rss[tool].append(peak)
                cpus[tool].append(cpu)
                print(
                    f"run {n + 1}: {tool:8s} {seconds:6.3f} s  cpu {cpu:6.3f} s  "
                    f"peak RSS {peak / 1024:6.1f} MB",
                    flush=True,
                )
                subprocess.run(["rm", "-rf", str(target)], check=True)

        med = {t: statistics.median(v) for t, v in times.items()}
        print()
        print(
            f"image: {ref} ({facts['layers']} layers, {facts['compressed_size'] / 1e6:.1f} MB compressed, "
            f"{facts['entries']} entries)"
        )
        print(
            f"cold unpack, median of {args.runs}: ocibox {med['ocibox']:.3f} s, umoci --rootless "
            f"{med['umoci']:.3f} s, gzip -dc | tar -x {med['gzip|tar']:.3f} s"
        )
        print(f"  ocibox / umoci    = {med['ocibox'] / med['umoci']:.2f}  (goal <= 0.50)")
        print(f"  ocibox / gzip|tar = {med['ocibox'] / med['gzip|tar']:.2f}  (goal <= 1.50)")
        cpu = {t: statistics.median(v) for t, v in cpus.items()}
        print(
            f"CPU (user+sys), median: ocibox {cpu['ocibox']:.2f} s, umoci {cpu['umoci']:.2f} s, "
            f"gzip|tar {cpu['gzip|tar']:.2f} s  (wall ratios drift when other work shares the CPUs)"
        )
        print(f"peak RSS: ocibox {max(rss['ocibox']) / 1024:.1f} MB, umoci {max(rss['umoci']) / 1024:.1f} MB")
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
