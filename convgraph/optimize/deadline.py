"""One time budget for a whole optimize call, shared by every phase, and what each phase spent of it."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import UsageError


class Deadline:
    """``seconds`` from now (None: no limit). Phases run inside :meth:`phase`, which books their time;
    :meth:`over` says whether the budget (or the ``share`` of it a phase may use, counted from the start)
    is spent, and remembers the phase where that first happened, for :meth:`note`."""

    def __init__(self, seconds: float | None = None):
        if seconds is not None and not seconds > 0:
            raise UsageError(f"--time-budget must be a positive number of seconds, got {seconds}")
        self.seconds = seconds
        self.start = time.perf_counter()
        self.spent: dict[str, float] = {}
        self.current: str | None = None
        self.ran_out_in: str | None = None

    def over(self, share: float = 1.0) -> bool:
        """Whether ``share`` of the budget is spent (always False without a budget)."""
        if self.seconds is None or time.perf_counter() - self.start <= share * self.seconds:
            return False
        if self.ran_out_in is None:
            self.ran_out_in = self.current
        return True

    def left(self) -> float:
        return math.inf if self.seconds is None else self.start + self.seconds - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Book the time of the block to phase ``name``."""
        outer, self.current = self.current, name
        t = time.perf_counter()
        try:
            yield
        finally:
            self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t
            self.current = outer

    def account(self) -> str:
        """Where the time went, the largest first: ``layer timing 95 s, calibration 20 s``."""
        parts = sorted(self.spent.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{name} {s:.0f} s" for name, s in parts if s >= 0.5) or "nothing measurable"

    def note(self) -> str | None:
        """One line for the report when the budget ran out, else None."""
        if self.seconds is None or self.ran_out_in is None:
            return None
        return (f"--time-budget of {self.seconds:g} s: time ran out during {self.ran_out_in} (after "
                f"{self.elapsed():.0f} s in all: {self.account()})")
