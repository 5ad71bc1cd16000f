"""Download progress, as `docker pull` shows it.

On a terminal: one line per layer, redrawn in place (bytes, a bar, speed, ETA). Otherwise: plain
lines, one when a layer starts and one when it ends, fit for logs. Quiet: nothing at all.
Thread-safe: downloads report from their worker threads.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

REDRAW_INTERVAL = 0.1  # seconds between terminal redraws


def human_bytes(n: float) -> str:
    """Decimal units like Docker: 980B, 12.3kB, 45.6MB, 1.2GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}GB"


def human_seconds(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class Task:
    """One blob being fetched."""

    progress: Progress
    label: str
    total: int
    done: int = 0
    status: str = "Waiting"
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def update(self, done: int) -> None:
        """`done` bytes of `total` are in (it may go back to 0 when a download restarts)."""
        self.progress._update(self, done)

    def finish(self, status: str = "Pull complete") -> None:
        self.progress._finish(self, status)

    def line(self, width: int) -> str:
        if self.finished is not None and self.done:
            elapsed = max(self.finished - self.started, 1e-6)
            return f"{self.label}: {self.status}  {human_bytes(self.done)} in {elapsed:.1f}s"
        if self.finished is not None or self.status != "Downloading":
            return f"{self.label}: {self.status}"
        elapsed = max(time.monotonic() - self.started, 1e-6)
        speed = self.done / elapsed
        left = (self.total - self.done) / speed if speed > 0 else 0.0
        amounts = f"{human_bytes(self.done)}/{human_bytes(self.total)}"
        tail = f" {amounts}  {human_bytes(speed)}/s  ETA {human_seconds(left)}"
        head = f"{self.label}: Downloading "
        bar_width = max(10, min(50, width - len(head) - len(tail) - 3))
        filled = int(bar_width * self.done / self.total) if self.total else bar_width
        bar = "=" * filled + (">" if filled < bar_width else "") + " " * max(0, bar_width - filled - 1)
        return f"{head}[{bar[:bar_width]}]{tail}"


class Progress:
    """Where the pull reports. `mode` is "tty", "plain" or "quiet"; `auto()` picks from the stream."""

    def __init__(self, stream: TextIO, mode: str):
        if mode not in ("tty", "plain", "quiet"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.stream = stream
        self.mode = mode
        self._tasks: list[Task] = []
        self._lock = threading.Lock()
        self._drawn = 0  # lines of the live block on screen
        self._last_draw = 0.0

    @classmethod
    def auto(cls, quiet: bool = False, stream: TextIO | None = None) -> Progress:
        stream = stream or sys.stderr
        if quiet:
            return cls(stream, "quiet")
        isatty = getattr(stream, "isatty", lambda: False)()
        return cls(stream, "tty" if isatty else "plain")

    def message(self, text: str) -> None:
        """A line printed above the live block (or as is)."""
        if self.mode == "quiet":
            return
        with self._lock:
            self._clear()
            self.stream.write(text + "\n")
            self._draw(force=True)

    def task(self, label: str, total: int, status: str = "Waiting") -> Task:
        task = Task(self, label, total, status=status)
        if self.mode == "quiet":
            return task
        with self._lock:
            self._tasks.append(task)
            self._draw(force=False)
        return task

    def start(self, task: Task) -> None:
        with self._lock:
            task.status = "Downloading"
            task.started = time.monotonic()
            if self.mode == "plain":
                self.stream.write(f"{task.label}: Downloading {human_bytes(task.total)}\n")
                self.stream.flush()
            self._draw(force=False)

    def _update(self, task: Task, done: int) -> None:
        task.done = done
        if self.mode == "tty":
            with self._lock:
                self._draw(force=False)

    def _finish(self, task: Task, status: str) -> None:
        with self._lock:
            task.status = status
            task.finished = time.monotonic()
            if self.mode == "plain":
                line = f"{task.label}: {status}"
                if task.done:
                    elapsed = max(task.finished - task.started, 1e-6)
                    speed = human_bytes(task.done / elapsed)
                    line += f" {human_bytes(task.done)} in {elapsed:.1f}s ({speed}/s)"
                self.stream.write(line + "\n")
                self.stream.flush()
            self._draw(force=True)

    def close(self) -> None:
        """Leave the final state on screen; later output goes below it."""
        with self._lock:
            self._draw(force=True)
            self._drawn = 0
            self._tasks = [t for t in self._tasks if t.finished is None]

    # The live block: the tasks' lines, redrawn by moving the cursor up over them.
    def _clear(self) -> None:
        if self.mode == "tty" and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}A\x1b[J")
            self._drawn = 0

    def _draw(self, force: bool) -> None:
        if self.mode != "tty":
            return
        now = time.monotonic()
        if not force and now - self._last_draw < REDRAW_INTERVAL:
            return
        self._last_draw = now
        width = shutil.get_terminal_size((100, 24)).columns
        out = [f"\x1b[{self._drawn}A" if self._drawn else ""]
        for task in self._tasks:
            out.append("\r\x1b[2K" + task.line(width)[: width - 1] + "\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(self._tasks)
