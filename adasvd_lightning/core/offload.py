"""Block offload: keep the model (and the calibration activations) where they are, run one block elsewhere.

A 70B model does not fit on one accelerator, but one decoder block, its calibration activations for a
batch and its statistics do. With an execution device set, the pipeline moves a block there before
its statistics pass, factorizes it there, moves it (now compressed) back, and moves each batch's
activations over and back as the block runs them. Between blocks nothing but the storage copy exists,
so accelerator memory is bounded by one block regardless of depth. Without an execution device every
method here is a no-op and the pipeline runs in place, exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .activation_store import ActivationStore
from .calibration import BlockInput, run_block
from .errors import InvalidInputError

__all__ = ["BlockRunner", "usable_device"]


def usable_device(value: str | torch.device) -> torch.device:
    """``torch.device(value)``, refusing a CUDA device this process cannot use — before any work starts.

    The one check behind ``CompressionConfig.execution_device`` (so the callback, recipes and the CLI
    all refuse ``cuda:99`` at construction, not after loading a model) and the CLI's ``--device``.
    """
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"{value!r} is not a device: {exc}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device {value!r} requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(
                f"device {value!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible"
            )
    return device


def _move(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_move(v, device) for v in obj)
    return obj


def _device_of(module: nn.Module) -> torch.device | None:
    for p in module.parameters():
        return p.device
    return None


@dataclass
class BlockRunner:
    """Runs decoder blocks on ``device`` (None: wherever they are, no copies), with the calibration
    activations at rest in ``store`` (memory, or files: :mod:`.activation_store`)."""

    device: torch.device | None = None
    store: ActivationStore = field(default_factory=ActivationStore)

    @classmethod
    def for_device(cls, device: str | torch.device | None, activation_dir: str | None = None) -> "BlockRunner":
        return cls(torch.device(device) if device is not None else None, ActivationStore(activation_dir))

    def keep(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` as the run keeps activations between passes (`ActivationStore.keep`)."""
        return self.store.keep(hidden)

    @contextmanager
    def resident(self, block: nn.Module) -> Iterator[None]:
        """Hold ``block`` on the execution device for the duration, then put it back where it was.

        Modules swapped into the block meanwhile (its compressed linears) travel back with it.
        """
        home = _device_of(block)
        if self.device is None or home is None:
            yield
            return
        block.to(self.device)
        try:
            yield
        finally:
            block.to(home)

    def run(self, block: nn.Module, inp: BlockInput, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """``run_block`` with the batch moved to the execution device and the output moved back.

        A stored input's pages are released once the block has read it (also when a hook ends the
        forward early), so a pass over every batch holds one batch of them at a time.
        """
        source = inp.hidden if hidden is None else hidden
        try:
            if self.device is None:
                return run_block(block, inp, hidden)
            moved = BlockInput(hidden=source.to(self.device), args=_move(inp.args, self.device),
                               kwargs=_move(inp.kwargs, self.device),
                               mask=inp.mask.to(self.device) if inp.mask is not None else None)
            return run_block(block, moved).to(source.device)
        finally:
            self.store.release(source)
