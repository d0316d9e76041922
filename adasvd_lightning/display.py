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


def _short_names(names: list[str]) -> tuple[list[str], str]:
    """Drop the prefix every name shares up to the block index ("model.layers.")."""
    if not names:
        return names, ""
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind(".") + 1] if "." in prefix else ""
    # Keep the block index visible: cut only up to the last separator before a digit.
    while prefix and any(not n[len(prefix):] or not n[len(prefix)].isdigit() for n in names) and "." in prefix[:-1]:
        prefix = prefix[: prefix[:-1].rfind(".") + 1]
    if any(not n[len(prefix):] for n in names):
        prefix = ""
    return [n[len(prefix):] for n in names], prefix


def report_table(report: CompressionReport, *, max_rows: int | None = 40) -> Table:
    """Per-module table (shape, rank, kept columns, parameters, relative error) plus totals.

    Module names drop the prefix they all share ("model.layers.") so the table fits a terminal.
    """
    rows = report.modules if max_rows is None else report.modules[:max_rows]
    names, prefix = _short_names([m.name for m in report.modules])
    title = f"{report.method} @ {report.ratio:.0%}" + (f" — modules under {prefix}" if prefix else "")
    table = Table(title=title, show_lines=False)
    for column in ("module", "shape", "rank", "kept", "params", "rel. err"):
        table.add_column(column, justify="left" if column == "module" else "right", no_wrap=column != "module")
    for name, m in zip(names, rows):
        table.add_row(
            name,
            f"{m.out_features}×{m.in_features}",
            str(m.rank) if m.rank is not None else "dense",
            str(m.kept_columns) if m.kept_columns else "-",
            f"{format_params(m.params_before)}→{format_params(m.params_after)}",
            f"{m.relative_error:.4f}" if m.relative_error is not None else "-",
        )
    if max_rows is not None and len(report.modules) > max_rows:
        table.add_row(f"… {len(report.modules) - max_rows} more", "", "", "", "", "")
    whitening = sorted({m.whitening for m in report.modules if m.whitening})
    table.caption = (
        f"linears {format_params(report.linear_parameters_before)} → {format_params(report.linear_parameters_after)} "
        f"(achieved {report.achieved_ratio:.2%}, budget {report.budget_deviation:+.2%}); model "
        f"{format_params(report.parameters_before)} → {format_params(report.parameters_after)} "
        f"({report.model_ratio:.2%}); {report.seconds:.1f}s"
        + (f"; whitening: {', '.join(whitening)}" if whitening else "")
        + (f"; {len(report.merged)} merged back to dense (would not run faster)" if report.merged else "")
    )
    return table
