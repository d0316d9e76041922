"""One progress display for every long phase: a rich bar on a terminal, plain lines everywhere else.

Every phase that can take more than a few seconds (training the reference model, calibration and
decomposition, evaluation) reports ``(stage, done, total)`` to a `ProgressDisplay`. On a terminal the
stages are rich bars with elapsed time and ETA. When stderr is not a terminal (a log file, ``tee``,
CI), a bar would print nothing useful, so each stage prints plain, flushed lines instead —

    [adasvd] train reference model: 120/2400 steps (5%), 0:00:35 elapsed, ETA 0:11:02

— at its start, at its end, and at most once per ``interval`` seconds in between (default 10 s,
``$ADASVD_PROGRESS_INTERVAL``), so a log shows that work goes on without growing by a line per step.

Only the standard library is imported at module level: the CLI imports this before it knows whether
any work will be done.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

__all__ = ["ProgressDisplay", "progress_display", "format_duration"]

DEFAULT_INTERVAL = 10.0


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (what rich shows too, so both outputs read alike)."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("ADASVD_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


class _Stage:
    """Timing of one stage, for the ETA of the plain lines."""

    def __init__(self, total: int, unit: str) -> None:
        self.total, self.unit = total, unit
        self.start = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, done) of the first update that did work
        self.last_print = float("-inf")
        self.done = 0

    def eta(self, now: float) -> str:
        """Remaining time from the rate since the first update (start-up costs stay out of the rate)."""
        if self.first is None or self.done <= self.first[1] or self.total <= 0:
            return "?"
        rate = (self.done - self.first[1]) / max(1e-9, now - self.first[0])
        return format_duration((self.total - self.done) / rate)


class ProgressDisplay:
    """Stages of work drawn as rich bars (``rich_progress`` given) or as rate-limited plain lines."""

    def __init__(self, *, rich_progress: Any = None, stream: IO[str] | None = None, interval: float | None = None,
                 prefix: str = "[adasvd]") -> None:
        self._rich = rich_progress
        self._stream = stream
        self._interval = _interval() if interval is None else interval
        self._prefix = prefix
        self._stages: dict[str, _Stage] = {}
        self._tasks: dict[str, Any] = {}

    def update(self, stage: str, done: int, total: int, detail: str = "", *, unit: str = "") -> None:
        """``done`` of ``total`` units of ``stage`` are finished (``detail``: what is being worked on)."""
        now = time.monotonic()
        state = self._stages.get(stage)
        if state is None or done < state.done:  # a new stage, or the same name started over
            state = self._stages[stage] = _Stage(total, unit)
        if state.first is None and done > 0:
            state.first = (now, done) if done < total else (state.start, 0)
        state.done, state.total = done, total
        if self._rich is not None:
            self._draw(stage, done, total, detail)
            return
        finished = done >= total
        if finished or now - state.last_print >= self._interval:
            state.last_print = now
            self._line(stage, state, detail, now, finished)

    def note(self, message: str) -> None:
        """A one-off line (e.g. what is about to happen and how long it usually takes)."""
        if self._rich is not None:
            self._rich.console.print(message)
        else:
            print(f"{self._prefix} {message}", file=self._stream or sys.stderr, flush=True)

    def _draw(self, stage: str, done: int, total: int, detail: str) -> None:
        label = f"{stage} {detail}".strip()
        if stage not in self._tasks:
            self._tasks[stage] = self._rich.add_task(label, total=total)
        self._rich.update(self._tasks[stage], completed=done, total=total, description=label)

    def _line(self, stage: str, state: _Stage, detail: str, now: float, finished: bool) -> None:
        unit = f" {state.unit}" if state.unit else ""
        percent = f" ({state.done / state.total:.0%})" if state.total else ""
        timing = f"{format_duration(now - state.start)} elapsed"
        timing += ", done" if finished else f", ETA {state.eta(now)}"
        where = f" [{detail}]" if detail else ""
        print(f"{self._prefix} {stage}: {state.done}/{state.total}{unit}{percent}, {timing}{where}",
              file=self._stream or sys.stderr, flush=True)


_active: list[ProgressDisplay] = []  # the display open now, if any


@contextmanager
def _opened(display: ProgressDisplay) -> Iterator[ProgressDisplay]:
    _active.append(display)
    try:
        yield display
    finally:
        _active.pop()


@contextmanager
def progress_display(enabled: bool = True, *, transient: bool = False) -> Iterator[ProgressDisplay | None]:
    """A `ProgressDisplay` for a block of work: rich bars on a terminal, plain lines otherwise.

    Yields None when ``enabled`` is false, so callers pass it on as "no progress" unchanged. Inside
    an open display (compressing the reference model that first has to be trained) it yields that
    same display: the inner phase becomes one more bar, as a terminal holds one live display at a time.
    """
    if not enabled:
        yield None
        return
    if _active:
        yield _active[-1]
        return
    from .terminal import console

    if not console.is_terminal:
        with _opened(ProgressDisplay()) as display:
            yield display
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=transient) as rich_progress, \
            _opened(ProgressDisplay(rich_progress=rich_progress)) as display:
        yield display
