"""End-to-end operations on model folders, shared by the CLI, the quickstart and the benchmarks.

Each function validates everything it was given *before* loading a model, so bad input fails in
milliseconds with an `InvalidInputError` and no output folder is created. `compress_folder` also
proves the output location writable (its temporary folder exists before the model is loaded) and
checks the free disk space against an estimate of the output before compressing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .core.config import CompressionConfig
from .core.corpus import added_bos_token_id, read_text, resolve_text_path, sample_calibration_windows, tokenize_text
from .core.errors import InvalidInputError
from .core.evaluation import evaluate_perplexity
from .core.merging import merge_and_record
from .core.offload import usable_device
from .core.params import count_parameters
from .core.pipeline import ProgressFn, compress_model
from .core.output import atomic_directory, check_destination, check_free_space
from .core.report import CompressionReport
from .core.serialization import check_model_folder, load_compressed, load_tokenizer, write_compressed
from .core.surgery import find_targets, linear_shape
from .progress import progress_display

__all__ = ["CalibrationSpec", "ModelSource", "model_folder", "resolve_device", "calibration_batches", "check_seq_len",
           "estimate_output_bytes", "compress_folder", "evaluate_folder"]

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


#: A model folder, or a function returning one, called only after the cheap checks (the CLI passes
#: one that resolves ``reference`` through `training.reference`, which may train the model first).
ModelSource = str | Path | Callable[[], Path]


def model_folder(value: ModelSource) -> Path:
    """A checked model folder; this layer never resolves ``reference`` itself (that is the Lightning layer)."""
    path = Path(value() if callable(value) else value).expanduser()
    check_model_folder(path)
    return path


def resolve_device(value: str | None) -> torch.device:
    if value in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return usable_device(value)


def check_seq_len(path: Path, seq_len: int) -> None:
    """Refuse windows longer than the model's position table (GPT-2 would index past it; RoPE models
    would silently run out of the range they were trained on)."""
    limit = getattr(check_model_folder(path), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise InvalidInputError(f"--seq-len {seq_len} is longer than {path} supports (max_position_embeddings = {limit})")


def estimate_output_bytes(model: torch.nn.Module, config: CompressionConfig, folder: Path) -> int:
    """Bytes the compressed folder will take: every tensor, the target matrices shrunk by the ratio,
    plus the input folder's other files (tokenizer, configs) and a margin for headers."""
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    weights = sum(tensors.values())
    targets = sum(math.prod(linear_shape(m)) * next(m.parameters()).element_size()
                  for _, _, found in find_targets(model, config.selector) for m in found.values())
    others = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix != ".safetensors")
    return int(weights - config.ratio * targets) + others + (1 << 20)


def calibration_batches(tokenizer, spec: CalibrationSpec) -> list[torch.Tensor]:
    token_ids = tokenize_text(tokenizer, read_text(spec.path))
    windows = sample_calibration_windows(token_ids, spec.samples, spec.seq_len, spec.seed,
                                         bos_token_id=added_bos_token_id(tokenizer))
    return list(windows.split(spec.batch_size))


def compress_folder(
    model: ModelSource,
    config: CompressionConfig,
    calibration: CalibrationSpec | Callable[[Path], list],
    out: str | Path,
    *,
    overwrite: bool = False,
    device: str | None = None,
    progress: ProgressFn | None = None,
    merge_min_saving: float | None = None,
    seq_len: int | None = None,
) -> CompressionReport:
    """Load a model folder, compress it, save the compressed folder atomically, return the report.

    ``calibration`` is a `CalibrationSpec` (random windows of a text file) or a function of the model
    folder returning the batches (recipes use their data module's calibration loader, so a one-shot
    ``compress --recipe`` calibrates on exactly what ``adasvd validate`` of the same recipe does);
    ``seq_len`` is then its window length, checked against the model's positions.
    ``overwrite`` replaces only an earlier output of this project, never the model or a folder holding it.
    """
    inputs = [] if callable(model) else [model]
    if isinstance(calibration, CalibrationSpec):
        inputs.append(calibration.path)
        seq_len = calibration.seq_len
    check_destination(out, overwrite=overwrite, inputs=inputs)  # before a lazy model source runs (it may train)
    torch_device = resolve_device(device)
    path = model_folder(model)
    if seq_len is not None:
        check_seq_len(path, seq_len)
    with atomic_directory(out, overwrite=overwrite, inputs=[*inputs, path]) as tmp:
        tokenizer = load_tokenizer(path)
        net = load_compressed(path, device=torch_device)
        check_free_space(tmp, estimate_output_bytes(net, config, path))
        if isinstance(calibration, CalibrationSpec):
            batches = calibration_batches(tokenizer, calibration)
        else:
            batches = calibration(path)
        report = compress_model(net, config, batches, progress=progress)
        if merge_min_saving is not None:
            merge_and_record(net, report, min_flop_saving=merge_min_saving)
        write_compressed(
            net.cpu(),
            tmp,
            tokenizer=tokenizer,
            metadata={"method": config.method, "ratio": config.ratio, "achieved_ratio": report.achieved_ratio},
        )
    return report


def evaluate_folder(
    model: ModelSource,
    data: str | None = None,
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    max_windows: int | None = None,
    device: str | None = None,
    show_progress: bool = False,
) -> dict:
    """Perplexity of a model folder on a text file (embedded test split by default) + parameter count.

    ``show_progress``: windows done / total, on the shared progress display.
    """
    if seq_len < 2:
        raise InvalidInputError(f"--seq-len must be >= 2, got {seq_len}")
    data_path = resolve_text_path(data, "test")
    torch_device = resolve_device(device)
    path = model_folder(model)
    check_seq_len(path, seq_len)
    tokenizer = load_tokenizer(path)
    net = load_compressed(path, device=torch_device)
    token_ids = tokenize_text(tokenizer, read_text(data_path))
    with progress_display(show_progress, transient=True) as display:
        progress = None if display is None else (
            lambda done, total: display.update("evaluate", done, total, unit="windows"))
        result = evaluate_perplexity(net, token_ids, seq_len=seq_len, batch_size=batch_size, max_windows=max_windows,
                                     bos_token_id=added_bos_token_id(tokenizer), progress=progress)
    return {**result.to_dict(), "parameters": count_parameters(net), "model": str(path), "data": str(data_path)}
