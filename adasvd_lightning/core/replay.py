"""Prefix replay: rerun only the suffix of the model from a block on.

Module-level sensitivity probes (Duo-SVD's KL allocation) run the whole model once per module and
candidate rank, although only the probed module changes: the blocks before it compute exactly what
they computed for the previous probe. `PrefixReplay` caches the output of block ``start − 1`` for each
probe batch (under the current, baseline, model) and, while active, swaps the blocks before ``start``
for stubs that return that cached output without computing anything. The model's own forward still
runs end to end (embeddings, remaining blocks, final norm, head), so the logits are those of the full
forward, computed by the same kernels on the same inputs, and nothing model-specific is needed beyond
"the blocks are called one after another". Probing block i costs the blocks i… instead of all of them.

Memory: one block's output per probe batch (the batches the probes use anyway).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .calibration import capture_block_inputs

__all__ = ["PrefixReplay"]


class _Replayed(nn.Module):
    """Stands in for a prefix block: returns the cached output of the last prefix block."""

    def __init__(self, replay: "PrefixReplay") -> None:
        super().__init__()
        self._replay = [replay]  # a list: not registered as a submodule

    def forward(self, *args, **kwargs):
        replay = self._replay[0]
        return replay.outputs[replay.batch]


class PrefixReplay:
    """Cached prefix outputs for a fixed list of probe batches.

    Usage: ``advance(i)`` (with blocks < i in the state the probes should see), then run probes inside
    ``with replay.active(): ...`` setting ``replay.batch`` to each batch's index before its forward.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, batches: Sequence[Any]) -> None:
        self.model = model
        self.blocks = blocks
        # Replaying needs the list to be the model's own (a plain module is its own single "block").
        self.enabled = any(m is blocks for m in model.modules())
        self.inputs = capture_block_inputs(model, blocks[0], batches) if self.enabled else []
        self.start = 0
        self.outputs: list[Any] = []
        self.batch = 0

    @torch.no_grad()
    def advance(self, start: int) -> None:
        """Move the replay point forward to ``start`` by running blocks ``self.start … start−1``."""
        if not self.enabled:
            return
        while self.start < start:
            block = self.blocks[self.start]
            outputs = []
            for b, inp in enumerate(self.inputs):
                hidden = self._hidden(b)
                outputs.append(block(hidden, *inp.args, **inp.kwargs))
            self.outputs = outputs
            self.start += 1

    def _hidden(self, b: int) -> torch.Tensor:
        if self.start == 0:
            return self.inputs[b].hidden
        out = self.outputs[b]
        return out[0] if isinstance(out, (tuple, list)) else out

    @contextmanager
    def active(self) -> Iterator[None]:
        """Blocks before the replay point are stubs for the duration."""
        if not self.enabled or self.start == 0:
            yield
            return
        originals = [self.blocks[j] for j in range(self.start)]
        stub = _Replayed(self)
        for j in range(self.start):
            self.blocks[j] = stub
        try:
            yield
        finally:
            for j, block in enumerate(originals):
                self.blocks[j] = block
