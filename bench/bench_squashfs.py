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


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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
        t_ours, t_peer = statistics.median(ours), statistics.median(peers)
        s_ours, s_peer = ours_out.stat().st_size, peer_out.stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, t, size_, runs in (
        ("ocibox write_directory", t_ours, s_ours, ours),
        ("mksquashfs", t_peer, s_peer, peers),
    ):
        print(f"{name:24s}{t:6.2f} s  {size_ / 1e6:7.2f} MB   runs {[round(r, 2) for r in runs]}")
    print(f"time ratio ocibox/mksquashfs {t_ours / t_peer:.2f}   size ratio {s_ours / s_peer:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
