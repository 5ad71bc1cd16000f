"""ocibox's squashfs writer against mksquashfs on the same tree, in the same run.

    .venv/bin/python bench/bench_squashfs.py [--src DIR] [--runs 3] [--level 15] [--workers 2]

Both write zstd level 15, 128 KiB blocks, 2 threads. The tree (warm in the page cache for both)
is --src, else the debootstrap python rootfs the tests build when it is there, else a copy of
/usr/lib/python3.11, /usr/lib/python3/dist-packages, /usr/share/doc and /usr/share/zoneinfo
(about 210 MB, 12k files) kept under /var/tmp. Prints the medians, the image sizes and the ratios.
"""

from __future__ import annotations

import argparse
import glob
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ocibox.squashfs import write_directory

COMPOSITE = Path("/var/tmp/ocibox-bench/squashfs-tree")
COMPOSITE_PARTS = [
    "/usr/lib/python3.11",
    "/usr/lib/python3/dist-packages",
    "/usr/share/doc",
    "/usr/share/zoneinfo",
]


def pick_source(given: str | None) -> Path:
    if given:
        return Path(given)
    built = sorted(
        p for p in glob.glob("/var/cache/ocibox-tests/bookworm-minbase-python*/rootfs") if ".build" not in p
    )
    if built:
        return Path(built[-1])
    if not COMPOSITE.is_dir():
        staging = COMPOSITE.with_name(COMPOSITE.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for part in COMPOSITE_PARTS:
            dest = staging / part.strip("/").replace("/", "_")
            subprocess.run(["cp", "-a", part, str(dest)], check=True)
        staging.rename(COMPOSITE)
    return COMPOSITE


def tree_size(top: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            files += 1
            size += st.st_size if not os.path.islink(os.path.join(dirpath, name)) else 0
    return files, size


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children: a fair figure on a busy machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn) -> tuple[float, float]:
    """Wall and CPU seconds of fn()."""
    start, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - start, cpu_seconds() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--src")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--level", type=int, default=15)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("mksquashfs") is None:
        print("bench_squashfs: mksquashfs is not installed", file=sys.stderr)
        return 1
    src = pick_source(args.src)
    files, size = tree_size(src)
    for dirpath, _, filenames in os.walk(src):  # warm the page cache: read every file once
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    while f.read(1 << 20):
                        pass
    print(f"tree: {src} ({files} entries, {size / 1e6:.0f} MB)")
    print(f"zstd level {args.level}, 128 KiB blocks, {args.workers} threads, median of {args.runs}")

    work = Path(tempfile.mkdtemp(prefix="bench-squashfs-", dir="/var/tmp"))
    ours, peers = [], []
    ours_out, peer_out = work / "ocibox.sqfs", work / "mksquashfs.sqfs"
    mksquashfs = [
        "mksquashfs",
        str(src),
        str(peer_out),
        "-noappend",
        "-quiet",
        "-no-progress",
        "-comp",
        "zstd",
        "-Xcompression-level",
        str(args.level),
        "-processors",
        str(args.workers),
    ]
    try:
        for _ in range(args.runs):
            ours_out.unlink(missing_ok=True)
            ours.append(timed(lambda: write_directory(src, ours_out, level=args.level, workers=args.workers)))
            peer_out.unlink(missing_ok=True)
            peers.append(timed(lambda: subprocess.run(mksquashfs, check=True, stdout=subprocess.DEVNULL)))
        s_ours, s_peer = ours_out.stat().st_size, peer_out.stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, runs, size_ in (("ocibox write_directory", ours, s_ours), ("mksquashfs", peers, s_peer)):
        wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        rows.append((wall, cpu))
        walls = [round(r[0], 2) for r in runs]
        print(f"{name:24s}{wall:6.2f} s wall  {cpu:6.2f} s CPU  {size_ / 1e6:7.2f} MB   wall runs {walls}")
    (w_ours, c_ours), (w_peer, c_peer) = rows
    ratios = f"wall {w_ours / w_peer:.2f}  CPU {c_ours / c_peer:.2f}  size {s_ours / s_peer:.3f}"
    print(f"ocibox/mksquashfs: {ratios}")
    print(f"load average during the runs: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
