"""`ocibox push` against `skopeo copy oci:… docker://…` on the python test image, in the same run.

    .venv/bin/python bench/bench_push.py [--runs 5] [--image python]

Starts a docker-registry on 127.0.0.1 (tests/support) holding the cached Debian+python3 image
(4 gzip layers, ≈84 MB; built by the tests on first use); `ocibox pull` puts it in a store once.
Then `--runs` times, alternating the order: sync, drop the page cache, `skopeo copy` from the
store's OCI layout to a new empty registry; the same with `ocibox push` (a new registry each time:
every blob is uploaded, and skopeo's blob-info cache can't turn uploads into mounts). Then
`ocibox push` again to the last target (every blob present: HEAD only). Both pushes must give
the manifest digest the image has. Prints medians, the ratio and peak RSS. Needs root (drop_caches).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchlib import PYTHON, drop_caches, installed_copy, timed_rss  # first: puts tests/ on sys.path

from support import debian  # noqa: E402
from support.images import skopeo_copy  # noqa: E402
from support.registry import start_registry  # noqa: E402


def remote_digest(ref: str) -> str:
    raw = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
        check=True,
        capture_output=True,
    ).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", default="python", choices=["python", "debian"])
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_push needs root to drop the page cache between runs")
    os.setpriority(os.PRIO_PROCESS, 0, -10)  # inherited by the registries, skopeo and ocibox

    work = Path(tempfile.mkdtemp(prefix="ocibox-bench-push-"))
    source = start_registry(work / "source")
    targets = []
    try:
        built = debian.cached_layout()
        skopeo_copy(f"oci:{built.path}:{args.image}", source, f"{args.image}:latest", "--preserve-digests")
        ref = source.ref(args.image)
        facts = built.facts[args.image]
        src = installed_copy(work / "src")
        store = work / "store"
        env = dict(os.environ, PYTHONPATH=str(src), OCIBOX_ROOT=str(store))
        subprocess.run(
            [PYTHON, "-m", "ocibox", "pull", "-q", ref], env=env, check=True, stdout=subprocess.DEVNULL
        )
        expected = remote_digest(ref)

        cold: dict[str, list[float]] = {"skopeo": [], "ocibox": []}
        rss: dict[str, list[int]] = {"skopeo": [], "ocibox": []}
        last = ""
        for run in range(args.runs):
            order = ["skopeo", "ocibox"] if run % 2 == 0 else ["ocibox", "skopeo"]
            for tool in order:
                target = start_registry(work / f"target-{tool}-{run}")
                targets.append(target)
                dest = target.ref(args.image, "1")
                drop_caches()
                if tool == "skopeo":
                    cmd = [
                        "skopeo",
                        "copy",
                        "-q",
                        "--dest-tls-verify=false",
                        f"oci:{store}:{ref}",
                        f"docker://{dest}",
                    ]
                else:
                    cmd = [PYTHON, "-m", "ocibox", "push", "-q", ref, dest]
                    last = dest
                seconds, peak = timed_rss(cmd, env)
                digest = remote_digest(dest)
                if digest != expected:
                    raise SystemExit(f"{tool} pushed {digest}, the image is {expected}")
                cold[tool].append(seconds)
                rss[tool].append(peak)
                print(
                    f"run {run + 1}: {tool:7s} push {seconds:6.3f} s  peak RSS {peak / 1024:6.1f} MB",
                    flush=True,
                )

        push_again = [PYTHON, "-m", "ocibox", "push", "-q", ref, last]
        again = [timed_rss(push_again, env)[0] for _ in range(args.runs)]

        sk, oc = statistics.median(cold["skopeo"]), statistics.median(cold["ocibox"])
        print()
        print(f"image: {ref} ({facts['layers']} layers, {facts['compressed_size'] / 1e6:.1f} MB compressed)")
        print(
            f"push to a new repository, median of {args.runs}: skopeo copy {sk:.3f} s, ocibox push {oc:.3f} s"
        )
        print(f"  ratio ocibox / skopeo = {oc / sk:.2f}")
        print(f"push again (every blob present), median of {args.runs}: {statistics.median(again):.3f} s")
        print(
            f"peak RSS: ocibox {max(rss['ocibox']) / 1024:.1f} MB, skopeo {max(rss['skopeo']) / 1024:.1f} MB"
        )
    finally:
        for registry in [source, *targets]:
            registry.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
