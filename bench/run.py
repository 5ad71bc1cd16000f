"""`make bench`: every benchmark under bench/, one after the other, each beside its peer.

    .venv/bin/python bench/run.py [NAME ...]     # e.g. pull runtime (default: all)

Each bench_<name>.py prints its medians and ratios; figures go in the README by hand.
Needs root (caches are dropped between cold runs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(names: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in names]
        if not scripts:
            print(f"bench: no benchmark named {' '.join(names)}", file=sys.stderr)
            return 2
    failed = 0
    for script in scripts:
        print(f"== {script.stem}", flush=True)
        failed += subprocess.run([sys.executable, str(script)]).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
