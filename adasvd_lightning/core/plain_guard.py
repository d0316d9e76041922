"""The plain held-out output error of a residual writer: a second test a compensation step must pass.

Why a second test
-----------------
A residual writer's refinement is fitted and validated on the residual's scale: each token's error is
divided by the root-mean-square of the residual it lands in (`core.residual`), so every ordinary token
counts once. A few "attention sink" tokens carry residuals two orders of magnitude larger than the
rest, and every later attention layer reads them. On the residual's scale the sink is one token among
hundreds, so a weighted step is free to give it up: on SmolLM2-135M at 40 % with 64 calibration
windows, block 11's ``down_proj`` (the writer that creates the sink) cut its weighted held-out error
from 3.00 to 0.73 while sacrificing the sink, and the model read 122.25 against 89.60 with that
writer left at its whitened start (BENCHMARKS.md, "Quality on a real model"). With 32 windows the
weighted validation happened to reject the same step, hence the run that got *worse* with more text.

Unweighted, the opposite happens: the sink dominates the squared error and the fit spends itself on
it, raising every ordinary token's error. Neither scale alone is the model's loss. A step is therefore
taken only when it improves on both: the weighted held-out error chooses the number of steps
(`core.refinement.validated_steps`), among the counts whose *plain* held-out output error
‖W′X_c − W X_o‖² is not above the start's. A step that trades the sink for the ordinary tokens, or the
other way round, is refused; one that helps both is taken.

Why token rows rather than Gram sums
------------------------------------
The weighted statistics are Gram sums; the plain error would need two more n×n sums per writer
(970 MB each in float64 at Llama-7B's MLP width). The held-out sequences are few (a quarter of the
calibration windows), so their compressed inputs X_c and dense outputs W X_o as float32 rows are
smaller (N_v·(n + m): 0.25 GB at that width with 4 k held-out tokens) and give the error of any factors
directly, in N_v·r·(n + m) flops per candidate. With the tokens' weights the same rows also replace
the writer's held-out weighted sums (`core.writer_heldout`); one pass over them gives both errors.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

__all__ = ["PlainHeldoutError"]

#: Held-out rows scored at a time: bounds the float64 copy of a chunk (rows × n).
CHUNK_ROWS = 1024


@dataclass
class PlainHeldoutError:
    """Mean squared plain output error per held-out token of candidate factors, recorded per call.

    ``inputs``: the writer's held-out compressed inputs X_c (N × n); ``outputs``: the dense outputs
    W X_o without bias (N × m), row for row. ``weight`` is W (m × n); ``kept`` the preserved input
    columns (their dense part W_keep X_c[kept] is added to the low-rank part U V X_c[rest]).
    ``root_weights`` (N, √ of each token's residual weight): `weighted` also gives the weighted error
    Σ w_t‖·‖²/N — the validation's own score (`core.writer_heldout`) — from the same pass over the rows.
    """

    weight: torch.Tensor
    inputs: torch.Tensor
    outputs: torch.Tensor
    kept: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    values: list[float] = field(default_factory=list)
    root_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        m, n = self.weight.shape
        if self.inputs.ndim != 2 or self.inputs.shape[1] != n:
            raise ValueError(f"held-out inputs must be N×{n}, got {tuple(self.inputs.shape)}")
        if tuple(self.outputs.shape) != (self.inputs.shape[0], m):
            raise ValueError(f"held-out outputs must be {self.inputs.shape[0]}×{m}, got {tuple(self.outputs.shape)}")
        if self.root_weights is not None and tuple(self.root_weights.shape) != (self.inputs.shape[0],):
            raise ValueError(f"held-out weights must be ({self.inputs.shape[0]},), "
                             f"got {tuple(self.root_weights.shape)}")
        self._last: tuple | None = None
        mask = torch.ones(n, dtype=torch.bool)
        mask[self.kept.to(torch.long)] = False
        self.rest = mask.nonzero().squeeze(1)
        self.w_keep = self.weight[:, self.kept.to(torch.long)].to(torch.float64)

    @property
    def tokens(self) -> int:
        return self.inputs.shape[0]

    @property
    def energy(self) -> float:
        """Mean ‖W x_o‖² per held-out token (the plain error's denominator)."""
        return float(self.outputs.to(torch.float64).square().sum()) / max(1, self.tokens)

    def _errors(self, up: torch.Tensor, down: torch.Tensor) -> tuple[float, float | None]:
        """(plain, weighted) mean squared error per token; the weighted one None without weights.

        The last candidate's pair is remembered: validation asks for the weighted score and then the
        plain one of the very same factors.
        """
        # The same tensors (weak references: the cache must not keep a candidate alive), not changed
        # in place since.
        last = self._last
        if (last is not None and last[0]() is up and last[1]() is down
                and last[2:4] == (up._version, down._version)):
            return last[4]
        u, v = up.to(torch.float64), down.to(torch.float64)
        kept = self.kept.to(torch.long)
        plain, weighted = 0.0, 0.0
        for start in range(0, self.tokens, CHUNK_ROWS):
            x = self.inputs[start:start + CHUNK_ROWS].to(torch.float64)
            y = self.outputs[start:start + CHUNK_ROWS].to(torch.float64)
            pred = (x[:, self.rest] @ v.T) @ u.T
            if kept.numel():
                pred = pred + x[:, kept] @ self.w_keep.T
            per_token = (pred - y).square().sum(dim=1)
            plain += float(per_token.sum())
            if self.root_weights is not None:
                root = self.root_weights[start:start + CHUNK_ROWS].to(torch.float64)
                weighted += float((per_token * root.square()).sum())
        tokens = max(1, self.tokens)
        errors = (plain / tokens, weighted / tokens if self.root_weights is not None else None)
        self._last = (weakref.ref(up), weakref.ref(down), up._version, down._version, errors)
        return errors

    def __call__(self, up: torch.Tensor, down: torch.Tensor) -> float:
        """Σ_t ‖U V x_t[rest] + W_keep x_t[kept] − y_t‖² / N, recorded in ``values``."""
        value = self._errors(up, down)[0]
        self.values.append(value)
        return value

    def weighted(self, up: torch.Tensor, down: torch.Tensor) -> float:
        """Σ_t w_t ‖U V x_t[rest] + W_keep x_t[kept] − y_t‖² / N (not recorded); needs ``root_weights``."""
        if self.root_weights is None:
            raise ValueError("the weighted held-out error needs the tokens' weights")
        return self._errors(up, down)[1]

    def relative(self, index: int) -> float:
        """The recorded value ``index`` as a relative error ‖·‖ / ‖W X_o‖."""
        energy = self.energy
        return (self.values[index] / energy) ** 0.5 if energy > 0 else float("nan")
