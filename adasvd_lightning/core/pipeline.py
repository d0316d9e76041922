"""Block-by-block compression of a model.

The model is processed one decoder block at a time, so at most one block's calibration statistics are
alive at once (the reference SVD-LLM code keeps every layer's float64 factor and needs ~57 GB for a
7B model):

1. run the model up to the first block on the calibration batches and keep that block's inputs;
2. for each block: stream the Gram statistics of its target linears' inputs while running it, factor
   each target (rank from the ratio, whitening from the method), swap in `LowRankLinear`s, then run
   the block again to produce the next block's inputs (``propagation="compressed"``) or reuse the
   dense outputs (``"original"``);
3. free the block's statistics and move on.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import CompressionConfig
from .factorization import factorize, rank_for_ratio, saves_parameters
from .lowrank import LowRankLinear
from .params import count_parameters
from .report import CompressionReport, ModuleReport
from .statistics import BlockStatistics
from .surgery import find_decoder_blocks, find_targets, linear_bias, linear_shape, linear_weight, replace_module

__all__ = ["CompressionWarning", "BlockInput", "ProgressEvent", "capture_block_inputs", "compress_model"]


class CompressionWarning(UserWarning):
    """A target matrix was left dense or handled in a degraded way."""


@dataclass
class BlockInput:
    """Everything one calibration batch passes into a decoder block."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    mask: torch.Tensor | None


@dataclass
class ProgressEvent:
    """Reported to the optional progress callback (the display lives in the upper layers)."""

    stage: str  # "calibrate" | "block"
    completed: int
    total: int
    detail: str = ""


ProgressFn = Callable[[ProgressEvent], None]


class _StopForward(Exception):
    pass


def _normalise_batch(batch: Any) -> tuple[Any, dict, torch.Tensor | None]:
    """(positional input, keyword inputs, token mask) for one calibration batch."""
    if isinstance(batch, torch.Tensor):
        return batch, {}, None
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError("a calibration batch dict needs an 'input_ids' entry")
        kwargs = {"input_ids": batch["input_ids"]}
        mask = batch.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = mask
        return None, kwargs, mask
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], {}, None
    raise TypeError(f"unsupported calibration batch type {type(batch).__name__}")


def _forward_kwargs(model: nn.Module) -> dict:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Iterable[Any]) -> list[BlockInput]:
    """Run ``model`` on each batch only until ``block`` is called, and keep what it receives."""
    captured: list[BlockInput] = []
    device = _model_device(model)
    extra = _forward_kwargs(model)
    current_mask: list[torch.Tensor | None] = [None]

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append(BlockInput(hidden=hidden, args=rest, kwargs=kwargs, mask=current_mask[0]))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            positional, kwargs, mask = _normalise_batch(batch)
            current_mask[0] = mask.to(device) if mask is not None else None
            try:
                if positional is not None:
                    model(_to(positional, device), **extra)
                else:
                    model(**_to(kwargs, device), **extra)
            except _StopForward:
                continue
            raise RuntimeError("the model finished its forward pass without calling the first decoder block")
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    out = block(inp.hidden, *inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _relative_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W − W′)X‖_F / ‖W X‖_F from the Gram matrix: tr(E H Eᵀ) / tr(W H Wᵀ)."""
    w = weight.to(torch.float64)
    e = w - approx.to(torch.float64)
    num = float(((e @ gram) * e).sum())
    den = float(((w @ gram) * w).sum())
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else float("nan")


def _compress_target(
    model: nn.Module,
    name: str,
    module: nn.Module,
    config: CompressionConfig,
    stats: BlockStatistics | None,
) -> ModuleReport:
    out_features, in_features = linear_shape(module)
    dense_params = out_features * in_features
    bias = linear_bias(module)
    bias_params = bias.numel() if bias is not None else 0
    # A target that is already low-rank counts at its current size; re-compression is measured
    # against the dense shape, like every other target.
    before = count_parameters(module)
    report = ModuleReport(
        name=name, out_features=out_features, in_features=in_features, params_before=before, params_after=before
    )
    rank = rank_for_ratio(out_features, in_features, config.ratio)
    if not saves_parameters(out_features, in_features, rank):
        report.skipped = f"rank {rank} would not save parameters for a {out_features}×{in_features} matrix"
        warnings.warn(f"{name}: {report.skipped}; left dense", CompressionWarning, stacklevel=3)
        return report
    input_stats = stats.for_module(name) if stats is not None else None
    whitening = config.spec.make_whitening(input_stats, damping=config.damping)
    weight = linear_weight(module).detach()
    factors = factorize(weight, rank, whitening, compute_dtype=config.torch_compute_dtype)
    new = LowRankLinear.from_factors(
        factors.up.to(weight.device), factors.down.to(weight.device), bias.detach() if bias is not None else None,
        dtype=weight.dtype,
    )
    new.train(module.training)
    replace_module(model, name, new)
    report.rank = rank
    report.params_after = rank * (out_features + in_features) + bias_params
    report.whitening = whitening.kind
    if input_stats is not None:
        report.relative_error = _relative_error(weight, new.dense_weight().detach(), input_stats.gram)
    return report


@torch.no_grad()
def compress_model(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Sequence[Any] | None = None,
    *,
    progress: ProgressFn | None = None,
) -> CompressionReport:
    """Compress ``model`` in place and return a report.

    Args:
        model: a Hugging Face causal LM or any `nn.Module` with linear layers.
        config: method, ratio and targets.
        calibration: batches (LongTensor B×T, dicts with ``input_ids``/``attention_mask``, or plain
            input tensors for non-LM modules). Required by data-aware methods; optional for ``svd``
            (given, it adds measured errors to the report).
    """
    start = time.perf_counter()
    spec = config.spec
    if spec.needs_calibration and not calibration:
        raise ValueError(f"method {spec.name!r} needs calibration batches")
    plan = find_targets(model, config.selector)
    _, blocks = find_decoder_blocks(model)
    report = CompressionReport(method=config.method, ratio=config.ratio, parameters_before=count_parameters(model))

    was_training = model.training
    model.eval()
    try:
        inputs: list[BlockInput] | None = None
        if calibration:
            inputs = capture_block_inputs(model, blocks[0], calibration)
            report.calibration_tokens = sum(
                int(i.mask.sum()) if i.mask is not None else i.hidden.shape[:-1].numel() for i in inputs
            )
            if progress:
                progress(ProgressEvent("calibrate", len(inputs), len(inputs)))
        for index, block_name, targets in plan:
            block = blocks[index]
            stats = None
            outputs = None
            if inputs is not None:
                stats = BlockStatistics(targets)
                with stats:
                    outputs = []
                    for inp in inputs:
                        with stats.masked(inp.mask):
                            outputs.append(_run_block(block, inp))
            for name, module in targets.items():
                report.modules.append(_compress_target(model, name, module, config, stats))
            del stats
            if inputs is not None and index + 1 < len(blocks):
                if config.propagation == "compressed":
                    outputs = [_run_block(block, inp) for inp in inputs]
                for inp, out in zip(inputs, outputs):
                    inp.hidden = out
            if progress:
                progress(ProgressEvent("block", index + 1, len(plan), block_name))
    finally:
        model.train(was_training)
    report.parameters_after = count_parameters(model)
    report.seconds = time.perf_counter() - start
    return report
