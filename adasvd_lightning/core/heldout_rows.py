"""A residual writer's held-out calibration tokens, kept as rows instead of Gram sums.

Validating a writer's refinement (`core.refinement.validated_steps`) needs two things from the
held-out sequences (`core.holdout`): the statistics *without* them, to fit on (the fit split), and a
score of candidate factors *on* them. Both used to come from two more n×n float64 sums per writer,
H_cc and H_oc over the held-out tokens: 1.9 GB at Llama-7B's MLP width (n = 11008), alive next to the
whole data's pair at the run's memory peak (down_proj's validation).

The same tokens are kept anyway as float32 rows for the plain-error guard (`core.plain_guard`): the
compressed inputs X_c (N_v × n) and the dense outputs Y = W·X_o without bias (N_v × m). With each
token's residual weight w_t (`core.residual`) they give everything the held-out sums gave:

* the score: Σ_t w_t ‖U V x_t − y_t‖² / N_v, the weighted objective on the held-out tokens, computed
  in the same pass as the plain error (`PlainHeldoutError`, ``root_weights``);
* the fit split's H_cc: (N·H_cc − X̃ᵀX̃) / (N − N_v) with X̃ = √w·X_c, in place (`complement_rows`);
* the fit split's H_oc: only ever used as W·H_oc (`core.refinement.RefinementTarget`), and
  W·H_oc over the held-out tokens is Σ_t w_t (W x_o,t) x_c,tᵀ = Ỹᵀ X̃ with Ỹ = √w·Y. So it is
  N/(N − N_v)·W·H_oc minus a rank-N_v correction applied lazily — the dense inputs X_o are not needed.

So a writer's held-out tokens go straight into the whole sums during calibration, and the rows are
the only held-out data: N_v·(n + m + 1) float32 numbers. Cost: the fit split forms X̃ᵀX̃ twice (out,
and back in on exit), N_v·n² multiply-adds each, where the held-out sums formed it once while
accumulating.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["HeldoutRows", "complement_rows"]


@dataclass
class HeldoutRows:
    """A writer's held-out tokens, row for row (float32): compressed inputs X_c (N×n), dense outputs
    W·X_o without bias (N×m) and each token's √(residual weight) (N; None: unweighted)."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    root_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.inputs.ndim != 2 or self.outputs.ndim != 2:
            raise ValueError("held-out inputs and outputs must be matrices of rows")
        rows = self.inputs.shape[0]
        if self.outputs.shape[0] != rows:
            raise RuntimeError(f"{rows} held-out input rows but {self.outputs.shape[0]} output rows")
        if self.root_weights is not None and tuple(self.root_weights.shape) != (rows,):
            raise RuntimeError(f"{rows} held-out rows but {tuple(self.root_weights.shape)} weights")

    @property
    def tokens(self) -> int:
        return self.inputs.shape[0]

    def _weighted(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.root_weights is None else rows * self.root_weights[:, None].to(rows.dtype)


@contextmanager
def complement_rows(h_cc: torch.Tensor, h_oc: torch.Tensor, tokens: int,
                    rows: HeldoutRows) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole data's mean Grams turned, in place and for the ``with`` body, into the fit split's:
    H_cc ← (N·H_cc − X̃ᵀX̃)/(N − N_v), H_oc ← N/(N − N_v)·H_oc. Yields the correction (Ỹ/(N − N_v), X̃)
    that every W·H_oc product must subtract as Ỹᵀ·(X̃·R) (`RefinementTarget`'s ``cross_removed``).

    ``tokens`` = N, the whole data's token count (the rows are among them: their weighted products are
    in the sums). Restored on exit, up to a few float64 ulps of (N/(N − N_v))·|H| per entry, like
    `core.refinement.complement`. Nothing may read the Grams as the whole inside the block.
    """
    from .statistics import accumulate_gram, mirror_lower

    if h_oc is h_cc:
        raise ValueError("held-out rows complement paired statistics (H_oc distinct from H_cc)")
    part = rows.tokens
    if not 0 < part < tokens:
        raise ValueError(f"a part of {part} tokens out of {tokens} leaves nothing to fit on")
    rest = tokens - part
    x = rows._weighted(rows.inputs)
    y = rows._weighted(rows.outputs.to(torch.float64)) / rest
    h_cc.mul_(tokens / rest)
    accumulate_gram(h_cc, x, alpha=-1.0 / rest)
    mirror_lower(h_cc)
    h_oc.mul_(tokens / rest)
    try:
        yield y, x
    finally:
        accumulate_gram(h_cc, x, alpha=1.0 / rest)
        mirror_lower(h_cc)
        h_cc.mul_(rest / tokens)
        h_oc.mul_(rest / tokens)
