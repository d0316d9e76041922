"""Calibration plumbing: feeding batches to a model and capturing what its decoder blocks receive.

Compression works block by block, so instead of running the whole model for every block we run it once
up to the first decoder block, keep exactly what that block is called with (hidden states, attention
masks, rotary embeddings, …) and from then on call blocks directly on those inputs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["BlockInput", "ProgressEvent", "ProgressFn", "StopForward", "normalise_batch", "model_forward",
           "capture_block_inputs", "run_block", "first_sequences"]


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

    stage: str  # "calibrate" | "allocate" | "sensitivity" | "block"
    completed: int
    total: int
    detail: str = ""


ProgressFn = Callable[[ProgressEvent], None]


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needed has been seen."""


def normalise_batch(batch: Any) -> tuple[Any, dict, torch.Tensor | None]:
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


def model_forward(model: nn.Module, batch: Any) -> Any:
    positional, kwargs, _ = normalise_batch(batch)
    device = _model_device(model)
    extra = _forward_kwargs(model)
    if positional is not None:
        return model(_to(positional, device), **extra)
    return model(**_to(kwargs, device), **extra)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Iterable[Any],
                         keep: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[BlockInput]:
    """Run ``model`` on each batch only until ``block`` is called, and keep what it receives.

    ``keep`` stores each batch's hidden states as soon as it is captured (`BlockRunner.keep`), so with
    activations kept in files not even the first stream is ever whole in memory.
    """
    captured: list[BlockInput] = []
    current_mask: list[torch.Tensor | None] = [None]

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append(BlockInput(hidden=keep(hidden) if keep is not None else hidden, args=rest, kwargs=kwargs,
                                   mask=current_mask[0]))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            _, _, mask = normalise_batch(batch)
            current_mask[0] = mask.to(_model_device(model)) if mask is not None else None
            try:
                model_forward(model, batch)
            except StopForward:
                continue
            raise RuntimeError("the model finished its forward pass without calling the first decoder block")
    finally:
        handle.remove()
    return captured


def first_sequences(inp: BlockInput, hidden: torch.Tensor | None = None,
                    count: int = 1) -> tuple[BlockInput, torch.Tensor] | None:
    """The first ``count`` sequences of a batch's block input (and of ``hidden``, another stream's
    hidden states for the same batch), or None where there is nothing to cut.

    For runs that learn the block's *structure* — which targets share an input, which ones add into
    the residual stream — whose answer does not depend on how many sequences run: on one sequence of
    a batch of 8 they cost an eighth. Cut generically: every tensor argument whose leading dimension is
    the batch size and that has at least two dimensions (hidden states, B×T masks, B×1×T×T attention
    masks, per-sequence rotary tables); 1-D tensors (cache positions) and broadcast ones (leading 1)
    stay whole. A model whose block reads the batch some other way fails on the cut input, so callers
    fall back to the whole batch on any error (the cut changes no value, only which rows run).
    """
    batch = inp.hidden.shape[0] if inp.hidden.ndim >= 2 else 0
    if batch <= count:
        return None

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value[:count] if value.ndim >= 2 and value.shape[0] == batch else value
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            return type(value)(*(cut(v) for v in value))
        if isinstance(value, (list, tuple)):
            return type(value)(cut(v) for v in value)
        return value  # other objects (caches, configs) pass as they are

    sliced = BlockInput(hidden=inp.hidden[:count], args=cut(inp.args), kwargs=cut(inp.kwargs),
                        mask=inp.mask[:count] if inp.mask is not None and inp.mask.ndim >= 1 else inp.mask)
    return sliced, (hidden if hidden is not None else inp.hidden)[:count]


def run_block(block: nn.Module, inp: BlockInput, hidden: torch.Tensor | None = None) -> torch.Tensor:
    out = block(inp.hidden if hidden is None else hidden, *inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
