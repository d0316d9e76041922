"""Measure plain SVD's output errors inside the dense block's own pass.

Why this exists: a factorization that reads no calibration data (plain SVD) can be built before its
block runs. Its calibration pass then serves one purpose, the report's relative output error
‖(W′ − W)X‖ / ‖W X‖ on the block's inputs. Reading that off Gram statistics costs n² flops per token
and distinct input (about one more block forward at SmolLM2's shapes), then r·n² per matrix.

Plain SVD's W′ = up·down is U_r U_rᵀ·W, an orthogonal projection of W, so
‖(W′ − W)x‖² = ‖Wx‖² − ‖W′x‖², and ‖W′x‖² = vᵀ(upᵀup)v with v = down·x. With the factors built
first, the pass sums ‖Wx‖² from the dense module's own output and ‖W′x‖² from v: r·n + r² flops per
token (measured on SmolLM2-135M: running the factorized module next to the dense one, r(m + n) flops
and a difference of outputs, cost 1.9× as much).

Precision: the identity holds for the stored float32 factors up to their rounding (~1e-7 of ‖W‖), so
the dropped energy is known to a few 1e-7 of ‖Wx‖²: errors above 1 % are exact to better than 1e-3
of themselves, and no error is reported below ~5e-4 (a factor pair that reproduces W exactly reads as
that floor, not 0). bf16 factors are no projection to that precision; the pipeline keeps the Gram form
for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import all_reduce_sum
from .profiling import phase
from .statistics import selected_tokens
from .surgery import linear_bias

__all__ = ["ProjectionErrorMeter", "projection_error_from_outputs"]


def projection_error_from_outputs(up: torch.Tensor, output_gram: torch.Tensor) -> float | None:
    """‖(W′ − W)X‖ / ‖W X‖ for W′ = P·W, P the orthogonal projection onto the columns of ``up``, from
    the outputs' mean Gram G = Σ y yᵀ / N (y = W x, m×m): ‖(I − P)Y‖² = tr G − tr(QᵀGQ), Q an
    orthonormal basis of up's columns (m²·r flops). None: no output energy.

    Plain and activation-scaled SVD keep W′ = U_r U_rᵀ·W (the truncated SVD of W·S, times S⁻¹), so for
    them this is the stored module's error up to its float32 rounding, as in `ProjectionErrorMeter`:
    errors above 1 % to better than 1e-3 of themselves, and none reads below ~5e-4. A column of ``up``
    that is zero (W·S of lower rank than r) adds a direction to Q; W′ = W then, and the clamp at 0 says so.
    """
    g = output_gram.to(torch.float64)
    total = float(g.diagonal().sum())
    if total <= 0:
        return None
    q, _ = torch.linalg.qr(up.to(torch.float64))
    kept = float((q * (g @ q)).sum())
    return (max(total - kept, 0.0) / total) ** 0.5


def _sum_of_squares(rows: torch.Tensor) -> float:
    """Σ‖row‖²: row sums in float32 (float64 rows stay float64), the total in float64."""
    rows = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    return float(rows.square().sum(dim=-1).to(torch.float64).sum())


class ProjectionErrorMeter:
    """Forward hooks on dense target linears that sum ‖Wx‖² and the energy ‖W′x‖² their plain-SVD
    replacement W′ = up·down keeps.

    Usage::

        with ProjectionErrorMeter({name: (dense, lowrank)}) as meter:
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
        self._kept: dict[str, float] = {name: 0.0 for name in pairs}
        self._energy: dict[str, float] = {name: 0.0 for name in pairs}
        self._handles: list = []

    def __enter__(self) -> "ProjectionErrorMeter":
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
        lowrank = self.pairs[name][1]
        up, down = lowrank.up.detach(), lowrank.down.detach()
        # upᵀup (r×r): the factor pair's own Gram, so ‖W′x‖² is the stored module's, orthogonal or not.
        gram = (up.to(torch.float64).T @ up.to(torch.float64)).to(down.dtype)

        def hook(module: nn.Module, args: tuple, output) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                return
            with phase("report"), torch.no_grad():
                v = selected_tokens(F.linear(x.detach(), down), self.token_mask)
                self._kept[name] += float((v @ gram * v).sum(dim=-1).to(torch.float64).sum())
                y = output.detach()
                bias = linear_bias(module)
                self._energy[name] += _sum_of_squares(
                    selected_tokens(y - bias.detach() if bias is not None else y, self.token_mask))

        return hook

    def relative_errors(self) -> dict[str, float | None]:
        """name → ‖W′X − WX‖_F / ‖WX‖_F over every process's tokens (a collective under a process group)."""
        names = sorted(self.pairs)  # the same order on every rank
        device = next(self.pairs[names[0]][0].parameters()).device if names else "cpu"
        sums = all_reduce_sum([self._kept[n] for n in names] + [self._energy[n] for n in names], device=device)
        errors: dict[str, float | None] = {}
        for i, name in enumerate(names):
            kept, energy = sums[i], sums[len(names) + i]
            errors[name] = (max(energy - kept, 0.0) / energy) ** 0.5 if energy > 0 else None
        return errors
