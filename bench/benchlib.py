"""What several benchmarks share: the repo's paths, a dropped page cache, ocibox as installed, a timed run.

Imported by the bench_*.py scripts (run as `python bench/bench_X.py`, so bench/ is on sys.path).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"  # Debian's interpreter, as users run ocibox

if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # the benchmarks use the tests' support package


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def installed_copy(src: Path) -> Path:
    """ocibox as `pip install` leaves it: a copy of the package under `src` with its bytecode compiled
    (this environment sets PYTHONDONTWRITEBYTECODE, so the tree in the repo has none). Returns `src`."""
    shutil.copytree(REPO / "src" / "ocibox", src / "ocibox")
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(src)], check=True)
    return src


def timed_rss(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """(seconds, peak RSS in KiB of the process and the children it waited for)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return elapsed, usage.ru_maxrss
