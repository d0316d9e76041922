"""Optional per-phase wall-clock accounting of a compression run.

The pipeline marks its phases with ``with phase("svd"): ...``. Nothing is measured unless a
:class:`PhaseTimer` is active (``with PhaseTimer() as timer: compress_model(...)``); without one,
``phase`` costs a global lookup and a generator, so the core can stay instrumented permanently.

Times are *exclusive*: entering a nested phase pauses the enclosing one, so the phases add up to the
instrumented wall time without double counting (statistics hooks run inside block forwards, and are
charged to ``statistics``, not to ``calibration``). A phase opened with ``absorb=True`` charges
everything inside it to itself — e.g. every forward, Gram and SVD done only to *plan* ranks is
``allocation`` time, not calibration or SVD time — which keeps "one decomposition per matrix" and
"extra work a strategy adds" apart in the benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["PHASES", "PhaseTimer", "phase", "active_timer"]

#: Phase names used by the pipeline, in reporting order.
PHASES = ("calibration", "statistics", "whitening", "svd", "columns", "refinement", "allocation", "surgery", "report")

_active: "PhaseTimer | None" = None


class PhaseTimer:
    """Collects exclusive seconds per phase while active (one at a time, not thread-aware)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[tuple[str, bool]] = []
        self._mark = 0.0
        self._previous: PhaseTimer | None = None

    def __enter__(self) -> "PhaseTimer":
        global _active
        self._previous, _active = _active, self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = self._previous

    def _charge(self, now: float) -> None:
        if self._stack:
            name = self._stack[-1][0]
            self.seconds[name] = self.seconds.get(name, 0.0) + (now - self._mark)
        self._mark = now

    def enter(self, name: str, absorb: bool) -> bool:
        """Start ``name``; False when an absorbing phase is open (the time stays with it)."""
        if self._stack and self._stack[-1][1]:
            return False
        self._charge(time.perf_counter())
        self._stack.append((name, absorb))
        self.calls[name] = self.calls.get(name, 0) + 1
        return True

    def exit(self) -> None:
        self._charge(time.perf_counter())
        self._stack.pop()

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def active_timer() -> PhaseTimer | None:
    return _active


@contextmanager
def phase(name: str, *, absorb: bool = False) -> Iterator[None]:
    """Charge the enclosed wall time to ``name`` on the active timer (no-op without one)."""
    timer = _active
    if timer is None or not timer.enter(name, absorb):
        yield
        return
    try:
        yield
    finally:
        timer.exit()
