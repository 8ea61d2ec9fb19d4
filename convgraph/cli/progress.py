"""The library's stages (:mod:`convgraph.progress`) shown on stderr while a command runs.

On a terminal: a live display (spinner, stage, count or bar, elapsed), one row per nested stage, gone
when the stages end. Elsewhere (pipes, logs, CI): one line per stage that runs longer than
:data:`DELAY_S` (``convgraph: verifying numerics › comparing outputs 1/3 [4 s]``) and a reminder every
:data:`REMIND_S` seconds of silence, so that a quick command, or one that fails at once, writes nothing.
``--json`` does not change this: stdout stays one JSON document, stderr carries the progress.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from rich.progress import Progress

from ..progress import reporting
from . import common

#: Lines mode: a stage is told once it has run this long (seconds)...
DELAY_S = 2.0
#: ... and the current one again after this long without a line.
REMIND_S = 30.0


@dataclass
class _Entry:
    name: str
    total: int | None
    done: int = 0
    t0: float = field(default_factory=time.monotonic)
    told: bool = False


class Lines:
    """Stages as plain lines on stderr (resolved at each write, so a redirected stderr is followed)."""

    def __init__(self, delay: float | None = None, remind: float | None = None, tick: float = 0.1):
        self._stack: list[_Entry] = []
        self._lock = threading.Lock()
        self._delay = DELAY_S if delay is None else delay
        self._remind = REMIND_S if remind is None else remind
        self._tick = tick
        self._t0 = self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, name: str, total: int | None = None) -> None:
        with self._lock:
            self._stack.append(_Entry(name, total))
            if self._delay <= 0:
                self._tell()
            elif self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="convgraph-progress", daemon=True)
                self._thread.start()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            if self._stack:
                self._stack[-1].done += n

    def finish(self) -> None:
        with self._lock:
            if self._stack:
                self._stack.pop()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self._tick):
            with self._lock:
                if not self._stack:
                    continue
                now, top = time.monotonic(), self._stack[-1]
                if (not top.told and now - top.t0 >= self._delay) or now - self._last >= self._remind:
                    self._tell()

    def _tell(self) -> None:
        """Write the current stage path (the lock is held)."""
        top = self._stack[-1]
        count = f" {top.done}/{top.total}" if top.total else f" {top.done}" if top.done else ""
        now = time.monotonic()
        line = common.printable(f"convgraph: {' › '.join(e.name for e in self._stack)}{count} [{now - self._t0:.0f} s]")
        try:
            print(line, file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr closed or a broken pipe: progress is not worth an error
            self._stop.set()
        for e in self._stack:
            e.told = True
        self._last = now


class Live:
    """Stages as a rich live display on the terminal: one row per running stage, removed when it ends."""

    def __init__(self, console) -> None:
        self._console = console
        self._progress: Progress | None = None
        self._tasks: list = []

    def start(self, name: str, total: int | None = None) -> None:
        if self._progress is None:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                                      TextColumn("{task.fields[count]}"), TimeElapsedColumn(), console=self._console,
                                      transient=True, redirect_stdout=False, redirect_stderr=False)
            self._progress.start()
        self._tasks.append(self._progress.add_task("  " * len(self._tasks) + common.printable(name), total=total,
                                                   count=f"0/{total}" if total else ""))

    def advance(self, n: int = 1) -> None:
        if self._tasks and self._progress is not None:
            task = self._tasks[-1]
            self._progress.advance(task, n)
            t = next(t for t in self._progress.tasks if t.id == task)
            self._progress.update(task, count=f"{int(t.completed)}/{t.total}" if t.total else f"{int(t.completed)}")

    def finish(self) -> None:
        if self._tasks and self._progress is not None:
            self._progress.remove_task(self._tasks.pop())
            if not self._tasks:  # nothing running: clear the display, so that the command's output stands alone
                self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@contextmanager
def shown() -> Iterator[None]:
    """Show the stages of the library calls made inside this block on stderr."""
    terminal = sys.stderr.isatty() and os.environ.get("TERM", "") != "dumb"  # rich not imported unless needed
    reporter = Live(common.console("err")) if terminal else Lines()
    try:
        with reporting(reporter):
            yield
    finally:
        reporter.close()


def shows_progress(command):
    """Decorate a command's function (under its click decorators) so that its stages are shown."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        with shown():
            return command(*args, **kwargs)
    return run
