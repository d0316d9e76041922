"""End-to-end operations on model folders, shared by the CLI, the quickstart and the benchmarks.

Each function validates everything it was given *before* loading a model, so bad input fails in
milliseconds with an `InvalidInputError` and no output folder is created.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .core.config import CompressionConfig
from .core.corpus import read_text, resolve_text_path, sample_calibration_windows, tokenize_text
from .core.errors import InvalidInputError
from .core.evaluation import evaluate_perplexity
from .core.merging import merge_and_record
from .core.offload import usable_device
from .core.params import count_parameters
from .core.pipeline import ProgressFn, compress_model
from .core.report import CompressionReport
from .core.serialization import check_model_folder, load_compressed, load_tokenizer, save_compressed
from .progress import progress_display

__all__ = ["REFERENCE", "CalibrationSpec", "resolve_model", "resolve_device", "calibration_batches", "compress_folder", "evaluate_folder"]

#: Model argument naming the embedded reference model.
REFERENCE = "reference"


@dataclass
class CalibrationSpec:
    """Calibration data: ``samples`` random windows of ``seq_len`` tokens from a text file."""

    text: str | None = None  # None → embedded training split
    samples: int = 64
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise InvalidInputError(f"--samples must be >= 1, got {self.samples}")
        if self.seq_len < 2:
            raise InvalidInputError(f"--seq-len must be >= 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise InvalidInputError(f"batch size must be >= 1, got {self.batch_size}")
        self.path = resolve_text_path(self.text, "train")


def resolve_model(value: str | Path | None, *, show_progress: bool = True) -> Path:
    """A model folder path; ``None``/``"reference"`` means the embedded reference model (trained once)."""
    if value is None or str(value) == REFERENCE:
        from .training.reference import reference_model_path

        return reference_model_path(show_progress=show_progress)
    path = Path(value).expanduser()
    check_model_folder(path)
    return path


def resolve_device(value: str | None) -> torch.device:
    if value in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return usable_device(value)


def calibration_batches(tokenizer, spec: CalibrationSpec) -> list[torch.Tensor]:
    token_ids = tokenize_text(tokenizer, read_text(spec.path))
    windows = sample_calibration_windows(token_ids, spec.samples, spec.seq_len, spec.seed)
    return list(windows.split(spec.batch_size))


def compress_folder(
    model: str | Path | None,
    config: CompressionConfig,
    calibration: CalibrationSpec | Callable[[Path], list],
    out: str | Path,
    *,
    overwrite: bool = False,
    device: str | None = None,
    progress: ProgressFn | None = None,
    merge_min_saving: float | None = None,
) -> CompressionReport:
    """Load a model folder, compress it, save the compressed folder atomically, return the report.

    ``calibration`` is a `CalibrationSpec` (random windows of a text file) or a function of the model
    folder returning the batches (recipes use their data module's calibration loader, so a one-shot
    ``compress --recipe`` calibrates on exactly what ``adasvd validate`` of the same recipe does).
    """
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise InvalidInputError(f"output folder {out} already exists (use --overwrite to replace it)")
    torch_device = resolve_device(device)
    path = resolve_model(model, show_progress=progress is not None)
    tokenizer = load_tokenizer(path)
    net = load_compressed(path, device=torch_device)
    if isinstance(calibration, CalibrationSpec):
        batches = calibration_batches(tokenizer, calibration)
    else:
        batches = calibration(path)
    report = compress_model(net, config, batches, progress=progress)
    if merge_min_saving is not None:
        merge_and_record(net, report, min_flop_saving=merge_min_saving)
    save_compressed(
        net.cpu(),
        out,
        tokenizer=tokenizer,
        overwrite=overwrite,
        metadata={"method": config.method, "ratio": config.ratio, "achieved_ratio": report.achieved_ratio},
    )
    return report


def evaluate_folder(
    model: str | Path | None,
    data: str | None = None,
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    max_windows: int | None = None,
    device: str | None = None,
    show_progress: bool = False,
) -> dict:
    """Perplexity of a model folder on a text file (embedded test split by default) + parameter count.

    ``show_progress``: windows done / total (and the reference build, if it has to run first).
    """
    if seq_len < 2:
        raise InvalidInputError(f"--seq-len must be >= 2, got {seq_len}")
    data_path = resolve_text_path(data, "test")
    torch_device = resolve_device(device)
    path = resolve_model(model, show_progress=show_progress)
    tokenizer = load_tokenizer(path)
    net = load_compressed(path, device=torch_device)
    token_ids = tokenize_text(tokenizer, read_text(data_path))
    with progress_display(show_progress, transient=True) as display:
        progress = None if display is None else (
            lambda done, total: display.update("evaluate", done, total, unit="windows"))
        result = evaluate_perplexity(net, token_ids, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows,
                                     progress=progress)
    return {**result.to_dict(), "parameters": count_parameters(net), "model": str(path), "data": str(data_path)}
