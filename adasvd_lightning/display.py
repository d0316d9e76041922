"""Terminal display: rich progress and summary tables, plain lines when not on a terminal.

Kept out of the core (which reports progress through plain callbacks) so the algorithms never depend on
how, or whether, anything is drawn.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .core.pipeline import ProgressEvent
from .core.report import CompressionReport

__all__ = ["console", "quiet_libraries", "compression_progress", "report_table", "format_params"]

console = Console(stderr=True)
logger = logging.getLogger("adasvd_lightning")


def quiet_libraries() -> None:
    """Silence the progress bars and info chatter of transformers / datasets / Lightning."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover
        pass
    try:  # Lightning sets its loggers to INFO when imported: import first, then lower them.
        import lightning.pytorch  # noqa: F401
    except Exception:  # pragma: no cover
        pass
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def format_params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


@contextmanager
def compression_progress(enabled: bool = True) -> Iterator:
    """A progress callback for `compress_model`: a transient rich bar on a terminal, log lines otherwise."""
    if not enabled:
        yield None
        return
    if not console.is_terminal:

        def log_event(event: ProgressEvent) -> None:
            print(f"[adasvd] {event.stage} {event.completed}/{event.total} {event.detail}", file=sys.stderr)

        yield log_event
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as progress:
        tasks: dict[str, int] = {}

        def on_event(event: ProgressEvent) -> None:
            if event.stage not in tasks:
                tasks[event.stage] = progress.add_task(f"{event.stage}", total=event.total)
            progress.update(tasks[event.stage], completed=event.completed, description=f"{event.stage} {event.detail}")

        yield on_event


def report_table(report: CompressionReport, *, max_rows: int | None = 40) -> Table:
    """Per-module table plus totals for a compression report."""
    table = Table(title=f"{report.method} @ {report.ratio:.0%}", show_lines=False)
    for column in ("module", "shape", "rank", "kept cols", "params", "rel. error", "whitening"):
        table.add_column(column, justify="left" if column in ("module", "whitening") else "right")
    rows = report.modules if max_rows is None else report.modules[:max_rows]
    for m in rows:
        table.add_row(
            m.name,
            f"{m.out_features}×{m.in_features}",
            str(m.rank) if m.rank is not None else "dense",
            str(m.kept_columns) if m.kept_columns else "-",
            f"{format_params(m.params_before)} → {format_params(m.params_after)}",
            f"{m.relative_error:.4f}" if m.relative_error is not None else "-",
            m.whitening or (m.skipped and "skipped") or "-",
        )
    if max_rows is not None and len(report.modules) > max_rows:
        table.add_row(f"… {len(report.modules) - max_rows} more", "", "", "", "", "", "")
    table.caption = (
        f"linears {format_params(report.linear_parameters_before)} → {format_params(report.linear_parameters_after)} "
        f"(achieved {report.achieved_ratio:.2%}, budget {report.budget_deviation:+.2%}); model {format_params(report.parameters_before)} → "
        f"{format_params(report.parameters_after)} ({report.model_ratio:.2%}); {report.seconds:.1f}s"
    )
    return table
