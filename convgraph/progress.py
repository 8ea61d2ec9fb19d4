"""Progress of long library calls: named stages, optionally counted, told to whoever listens.

Library code marks its slow parts and prints nothing itself::

    @staged("verifying numerics")              # each call of a function is a stage...
    def _numerics(...):
        with stage("creating sessions"):       # ...so is a block...
            ...
        for feed in track(feeds, "running"):   # ...and a loop, counted per item
            ...

Nobody listens unless a caller installs a :class:`Reporter` for the current context with
:func:`reporting` (the CLI does: a live display on a terminal, lines on stderr otherwise); ``reporting(None)``
hides the stages of a block. Stages nest (verify's inside rewrite's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, TypeVar

T = TypeVar("T")


class Reporter(Protocol):
    """What listens to the stages: started (innermost last), advanced, finished (innermost first)."""

    def start(self, name: str, total: int | None = None) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def finish(self) -> None: ...


_REPORTER: ContextVar[Reporter | None] = ContextVar("convgraph_progress", default=None)


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Send the stages run inside this block to ``reporter`` (None: to nobody)."""
    token = _REPORTER.set(reporter)
    try:
        yield
    finally:
        _REPORTER.reset(token)


class Stage:
    """A running stage: :meth:`advance` its count, or :meth:`step` through named sub-stages."""

    def __init__(self, reporter: Reporter | None):
        self._reporter, self._step = reporter, False

    def advance(self, n: int = 1) -> None:
        if self._reporter is not None:
            self._reporter.advance(n)

    def step(self, name: str) -> None:
        """Finish the previous sub-stage started by ``step`` (if any) and start ``name``."""
        if self._reporter is not None:
            if self._step:
                self._reporter.finish()
            self._reporter.start(name)
            self._step = True

    def _close(self) -> None:
        if self._reporter is not None:
            if self._step:
                self._reporter.finish()
            self._reporter.finish()


@contextmanager
def stage(name: str, total: int | None = None) -> Iterator[Stage]:
    """Report the enclosed work as stage ``name`` (of ``total`` units, when counted)."""
    reporter = _REPORTER.get()
    if reporter is not None:
        reporter.start(name, total)
    s = Stage(reporter)
    try:
        yield s
    finally:
        s._close()


def track(items: Iterable[T], name: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items`` as stage ``name``, advanced per item (``total``: default ``len(items)`` if it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with stage(name, total) as s:
        for item in items:
            yield item
            s.advance()


def staged(name: str | Callable[..., str]):
    """Decorate a function so that each call is a stage; ``name``: a string, or made from the call's arguments."""
    def wrap(f):
        @functools.wraps(f)
        def run(*args, **kwargs):
            with stage(name(*args, **kwargs) if callable(name) else name):
                return f(*args, **kwargs)
        return run
    return wrap
