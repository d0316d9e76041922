"""Column-preserving factorization (Duo-SVD).

After a whitened rank-r fit W_r, some input columns carry most of the remaining error: column j's share
is ‖(W − W_r)[:, j]‖² · H_jj (its residual times its activation energy). Duo-SVD keeps the worst such
columns exactly and fits the rest at a lower rank, at equal parameters: giving up Δr ranks frees
Δr·(m+n) parameters, and each preserved column costs m − r_c (m dense weights, minus the r_c entries it
no longer needs in the down factor), so Δc = ⌊Δr·(m+n)/(m − r_c)⌋ columns fit, r_c = r − Δr.

Because preserved columns are exact, the error of the split is that of the rest alone,
‖(W_rest − A)·X_rest‖², whose optimum is the truncated SVD whitened with H restricted to the rest — so
each candidate Δr is scored with the exact error, and Δr is chosen by a golden-section search over the
integers (the error is unimodal in Δr in practice; every probe is exact, so a poor bracket can only
cost optimality, never correctness). The split is kept only if it lowers the error by more than
``min_gain`` (1%): otherwise the plain factorization is simpler and as good.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .factorization import LowRankFactors, factorize
from .whitening import Whitening

__all__ = ["ColumnSplit", "whitened_error", "column_scores", "preserved_columns_for", "column_preserving_factorize"]

_PHI = (math.sqrt(5) - 1) / 2


@dataclass
class ColumnSplit:
    """A column-preserving factorization: W ≈ [W_keep at kept | up·down at rest]."""

    up: torch.Tensor
    down: torch.Tensor
    kept: torch.Tensor  # long indices, sorted
    rest: torch.Tensor
    kept_weight: torch.Tensor
    error: float  # ‖(W − W′)X‖² per token

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    def dense(self) -> torch.Tensor:
        w = self.up.new_zeros(self.up.shape[0], self.kept.numel() + self.rest.numel())
        w[:, self.rest] = self.up @ self.down
        w[:, self.kept] = self.kept_weight
        return w


def whitened_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(W − W′)X‖_F² per token = tr(E H Eᵀ) with H the mean Gram matrix."""
    e = weight.to(torch.float64) - approx.to(torch.float64)
    return float(((e @ gram) * e).sum().clamp_min(0.0))


def column_scores(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Duo-SVD column score ‖(W − W_r)[:, j]‖² · H_jj."""
    residual = (weight.to(torch.float64) - approx.to(torch.float64)).square().sum(dim=0)
    return residual * gram.diagonal()


def preserved_columns_for(rank_drop: int, rank: int, out_features: int, in_features: int) -> int:
    """Δc = ⌊Δr·(m+n)/(m − r_c)⌋, capped so at least one column stays low-rank."""
    r_c = rank - rank_drop
    if r_c < 1 or out_features - r_c <= 0:
        return 0
    return min(in_features - 1, (rank_drop * (out_features + in_features)) // (out_features - r_c))


def column_preserving_factorize(
    weight: torch.Tensor,
    rank: int,
    gram: torch.Tensor,
    make_whitening: Callable[[torch.Tensor | None], Whitening],
    *,
    base: LowRankFactors | None = None,
    min_gain: float = 0.01,
    driver: str = "auto",
) -> ColumnSplit | None:
    """Best column-preserving split at the parameter cost of rank ``rank``, or None if not worth it.

    Args:
        weight: W (m×n).
        rank: the plain factorization's rank r (its cost r·(m+n) is the budget).
        gram: mean Gram matrix H of the inputs the layer sees (n×n, float64); errors are measured in it.
        make_whitening: the method's whitening restricted to the given input columns (None = all).
        base: the plain rank-r factorization, if already computed.
        min_gain: required relative error reduction over the plain factorization.
        driver: SVD route of the candidate factorizations (:func:`.linalg.thin_svd`).
    """
    w = weight.to(torch.float64)
    m, n = w.shape
    base = base or factorize(w, rank, make_whitening(None), driver=driver)
    base_dense = base.dense()
    base_error = whitened_error(w, base_dense, gram)
    if rank < 2 or base_error <= 0.0:
        return None
    order = torch.argsort(column_scores(w, base_dense, gram), descending=True)
    # The search probes ~log(rank) splits; only their errors are kept, plus the best split so far
    # (each split holds float64 factors of the whole matrix: keeping all of them was the largest
    # transient of a column-preserving run).
    errors: dict[int, float] = {}
    best: dict = {"drop": None, "split": None}

    def build(drop: int) -> ColumnSplit | None:
        count = preserved_columns_for(drop, rank, m, n)
        if count < 1:
            return None
        kept = order[:count].sort().values
        mask = torch.ones(n, dtype=torch.bool)
        mask[kept] = False
        rest = mask.nonzero().squeeze(1)
        h_rr = gram[rest][:, rest]
        r_c = min(rank - drop, rest.numel(), m)
        f = factorize(w[:, rest], r_c, make_whitening(rest), driver=driver)
        error = whitened_error(w[:, rest], f.dense(), h_rr)
        return ColumnSplit(f.up, f.down, kept, rest, w[:, kept].clone(), error)

    def cost(drop: int) -> float:
        if drop not in errors:
            candidate = build(drop)
            errors[drop] = candidate.error if candidate is not None else math.inf
            if candidate is not None and (best["split"] is None or candidate.error < best["split"].error):
                best.update(drop=drop, split=candidate)
            del candidate
        return errors[drop]

    def split(drop: int) -> ColumnSplit | None:
        cost(drop)
        return best["split"] if best["drop"] == drop else build(drop)  # build is deterministic

    lo, hi = 1, rank - 1
    while hi - lo > 2:
        a = hi - round(_PHI * (hi - lo))
        b = lo + round(_PHI * (hi - lo))
        if a >= b:
            a, b = lo + (hi - lo) // 3, hi - (hi - lo) // 3
        if cost(a) <= cost(b):
            hi = b - 1 if cost(a) < cost(b) else b
        else:
            lo = a + 1
    chosen = min(range(lo, hi + 1), key=cost)
    result = split(chosen)
    if result is None or result.error >= (1.0 - min_gain) * base_error:
        return None
    return result
