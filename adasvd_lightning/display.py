"""Terminal display: summary tables, compression progress, and keeping library chatter off the screen.

Kept out of the core (which reports progress through plain callbacks) so the algorithms never depend on
how, or whether, anything is drawn. Imports only rich's console and table at module level: the CLI
needs `console` before it knows whether torch will be loaded at all.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.table import Table

from .cache import datasets_cache_dir
from .progress import progress_display
from .terminal import console

if TYPE_CHECKING:
    from .core.pipeline import ProgressEvent
    from .core.report import CompressionReport

__all__ = ["console", "quiet_libraries", "quiet_lightning", "compression_progress", "report_table", "format_params"]

logger = logging.getLogger("adasvd_lightning")

# Loggers that carry Lightning's start-up chatter ("GPU available: …", "TPU available: …", "💡 Tip: …").
# Lightning resets only its two package loggers to INFO when imported, so levels set here on the
# emitting children hold whether Lightning is imported before or after `quiet_libraries`.
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                      "lightning.pytorch.accelerators.cuda", "pytorch_lightning.utilities.rank_zero")

# Warnings that say nothing actionable to a user of the `adasvd` command.
_IGNORED_WARNINGS = (
    r".*LeafSpec.*",
    r".*does not have many workers.*",
    r".*tensorboardX.*",  # Lightning's default-logger notice; our Trainers pass their own logger
    r".*`isinstance\(treespec, LeafSpec\)`.*",
)


class _ExpectedCpuFallback(logging.Filter):
    """Drops DeepSpeed's "Setting accelerator to CPU" warning when torch sees no GPU either.

    accelerate imports DeepSpeed on every ``save_pretrained``, and DeepSpeed then warns that it found
    no accelerator. On a machine without one that is expected; where torch does see a GPU the
    warning means something and stays.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "Setting accelerator to CPU" not in record.getMessage():
            return True
        torch = sys.modules.get("torch")
        return bool(torch is not None and torch.cuda.is_available())


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """This package's own warnings (budget, merges, stale temporaries) as ``adasvd: warning: …`` — they
    speak to the user, and the source line Python would print (often contextlib's) means nothing."""
    if category.__module__.startswith("adasvd_lightning"):
        return f"adasvd: warning: {message}\n"
    return _one_line_warning.default(message, category, filename, lineno, line)  # type: ignore[attr-defined]


def quiet_libraries() -> None:
    """Silence the progress bars, tips and info chatter of transformers, datasets and Lightning.

    Works through environment variables and logger levels the libraries read when (or after) they are
    imported, so it imports none of them: ``adasvd --help`` must not pay for torch. A user's own
    setting of any of these variables wins.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # `Map:`, `Generating split` bars
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(datasets_cache_dir()))
    for pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|datasets|lightning|torch)\.")
    if warnings.formatwarning is not _one_line_warning:
        _one_line_warning.default = warnings.formatwarning  # type: ignore[attr-defined]
        warnings.formatwarning = _one_line_warning
    deepspeed = logging.getLogger("DeepSpeed")  # DeepSpeed resets its level on import, not its filters
    if not any(isinstance(f, _ExpectedCpuFallback) for f in deepspeed.filters):
        deepspeed.addFilter(_ExpectedCpuFallback())
    for name in _LIGHTNING_LOGGERS:
        if logging.getLogger(name).level == logging.NOTSET:  # a level the user chose stays
            logging.getLogger(name).setLevel(logging.WARNING)
    if "lightning" in sys.modules:  # imported already: it has set its package loggers to INFO
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's start-up notices and known-harmless warnings off, for a Trainer the library owns.

    For the duration of the block only (the reference build runs inside users' own programs too, whose
    logging stays theirs): GPU/TPU availability, advertising tips, the deprecation notices.
    """
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(max(log.level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            for pattern in _IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def format_params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


@contextmanager
def compression_progress(enabled: bool = True) -> Iterator:
    """A progress callback for `compress_model`: a transient rich bar on a terminal, plain lines otherwise."""
    with progress_display(enabled, transient=True) as display:
        if display is None:
            yield None
            return

        def on_event(event: ProgressEvent) -> None:
            display.update(event.stage, event.completed, event.total, event.detail)

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


#: What each block was calibrated on (and its errors measured on), per `CompressionReport.propagation`.
_CALIBRATED_ON = {"original": "the dense model's activations", "compressed": "the compressed blocks' outputs"}


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
    refused = sum(1 for m in report.modules if m.refused_columns)
    reused = report.allocation.get("sensitivity_rows_reused", 0)
    table.caption = (
        f"linears {format_params(report.linear_parameters_before)} → {format_params(report.linear_parameters_after)} "
        f"(achieved {report.achieved_ratio:.2%}, budget {report.budget_deviation:+.2%}); model "
        f"{format_params(report.parameters_before)} → {format_params(report.parameters_after)} "
        f"({report.model_ratio:.2%}); {report.seconds:.1f}s"
        + (f"; calibrated on {_CALIBRATED_ON.get(report.propagation, report.propagation)}" if report.propagation else "")
        + (f"; whitening: {', '.join(whitening)}" if whitening else "")
        + (f"; {len(report.merged)} merged back to dense (would not run faster)" if report.merged else "")
        + (f"; {refused} column split(s) refused (they lost once compensated)" if refused else "")
        + (f"; {reused} module(s) allocated from the probe table's rows, "
           f"{report.allocation.get('sensitivity_probes', 0)} probes measured" if reused else "")
    )
    return table
