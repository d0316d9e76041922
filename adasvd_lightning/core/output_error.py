"""Measure factorized modules' output errors inside the dense block's own pass.

Why this exists: a factorization that reads no calibration data (plain SVD) can be built before its
block runs. Its calibration pass then serves one purpose, the report's relative output error
‖(W′ − W)X‖ / ‖W X‖ on the block's inputs. Reading that off Gram statistics costs n² flops per token
and distinct input (about one more block forward at SmolLM2's shapes) and then r·n² or m·n² per
matrix. With the factorized module built first, the pass can run it next to its dense original on
the same input and sum ‖W′x − Wx‖² directly: r(m + n) flops per token, the compressed module's own
forward, and no n×n matrix at all.

The measure is of the stored module (its dtype, its rounding), on the tokens the token mask keeps,
summed over processes. The difference is taken between two outputs in the model's dtype; in float32 it is accurate to about
1e-7 of ‖Wx‖, far below any error a truncation leaves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .distributed import all_reduce_sum
from .profiling import phase
from .statistics import selected_tokens
from .surgery import linear_bias

__all__ = ["OutputErrorMeter"]


def _sum_of_squares(rows: torch.Tensor) -> float:
    """Σ‖row‖²: row sums in float32 (float64 rows stay float64), the total in float64."""
    rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    return float(rows.square().sum(dim=-1).to(torch.float64).sum())


class OutputErrorMeter:
    """Forward hooks on dense target linears that sum each one's output error against its replacement.

    Usage::

        with OutputErrorMeter({name: (dense, factorized)}) as meter:
            for batch in batches:
                with meter.masked(mask):
                    block(hidden, **kwargs)
        errors = meter.relative_errors()  # name -> ‖W′X − WX‖ / ‖WX‖ (None: no token reached it)

    Only the dense modules carry hooks: the block's outputs are the dense block's, exactly as without
    the meter.
    """

    def __init__(self, pairs: dict[str, tuple[nn.Module, nn.Module]]) -> None:
        self.pairs = pairs
        self.token_mask: torch.Tensor | None = None
        self._error: dict[str, float] = {name: 0.0 for name in pairs}
        self._energy: dict[str, float] = {name: 0.0 for name in pairs}
        self._handles: list = []

    def __enter__(self) -> "OutputErrorMeter":
        for name, (dense, _) in self.pairs.items():
            self._handles.append(dense.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def masked(self, mask: torch.Tensor | None) -> Iterator[None]:
        """The token mask (B×T) of the batch about to run; padding does not count."""
        previous, self.token_mask = self.token_mask, mask
        try:
            yield
        finally:
            self.token_mask = previous

    def _make_hook(self, name: str):
        factorized = self.pairs[name][1]

        def hook(module: nn.Module, args: tuple, output) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                return
            with phase("report"), torch.no_grad():
                y = output.detach()
                diff = selected_tokens(factorized(x.detach()) - y, self.token_mask)
                bias = linear_bias(module)
                signal = selected_tokens(y - bias.detach() if bias is not None else y, self.token_mask)
                self._error[name] += _sum_of_squares(diff)
                self._energy[name] += _sum_of_squares(signal)

        return hook

    def relative_errors(self) -> dict[str, float | None]:
        """name → ‖W′X − WX‖_F / ‖WX‖_F over every process's tokens (a collective under a process group)."""
        names = sorted(self.pairs)  # the same order on every rank
        device = next(self.pairs[names[0]][0].parameters()).device if names else "cpu"
        sums = all_reduce_sum([self._error[n] for n in names] + [self._energy[n] for n in names], device=device)
        errors: dict[str, float | None] = {}
        for i, name in enumerate(names):
            error, energy = sums[i], sums[len(names) + i]
            errors[name] = (error / energy) ** 0.5 if energy > 0 else None
        return errors
