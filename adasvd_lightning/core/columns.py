"""Column-preserving factorization (Duo-SVD).

After a whitened rank-r fit W_r, some input columns carry most of the remaining error: column j's share
is ‖(W − W_r)[:, j]‖² · H_jj (its residual times its activation energy). Duo-SVD keeps the worst such
columns exactly and fits the rest at a lower rank, at equal parameters: giving up Δr ranks frees
Δr·(m+n) parameters, and each preserved column costs m − r_c (m dense weights, minus the r_c entries it
no longer needs in the down factor), so Δc = ⌊Δr·(m+n)/(m − r_c)⌋ columns fit, r_c = r − Δr.

Because preserved columns are exact, the error of the split is that of the rest alone,
‖(W_rest − A)·X_rest‖², whose optimum is the truncated SVD whitened with H restricted to the rest: the
tail of that whitened spectrum (`truncation_floor`). So each candidate Δr is scored with its spectrum's
tail, without building its factors, and Δr is chosen by a golden-section search over the integers (the
error is unimodal in Δr in practice; every score is exact, so a poor bracket can only cost optimality,
never correctness); only the chosen split is factorized. The split is kept only if it lowers the error
by more than ``min_gain`` (1%): otherwise the plain factorization is simpler and as good.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .factorization import LowRankFactors, factorize, output_gram
from .linalg import lapack_threads
from .whitening import Whitening

__all__ = ["ColumnSplit", "whitened_error", "column_scores", "preserved_columns_for", "column_preserving_factorize",
           "truncation_floor"]

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
    del base_dense
    errors: dict[int, float] = {}
    # A tall W's candidate spectra are those of L_rᵀ(WᵀW)_rr L_r (`truncation_floor`): WᵀW once (m·n²),
    # then 2·n_r³ per candidate instead of the 2·m·n_r² of forming W_r·L_r and its Gram.
    weight_gram = w.T @ w if m > n else None

    def rest_of(count: int) -> torch.Tensor:
        mask = torch.ones(n, dtype=torch.bool)
        mask[order[:count]] = False
        return mask.nonzero().squeeze(1)

    def cost(drop: int) -> float:
        # Scored by the floor of the rest's error, not by building the split: no whitening, no singular
        # vectors, no product with H per probe (1.8–2.8× less per probe at SmolLM2's shapes, ad hoc).
        if drop not in errors:
            count = preserved_columns_for(drop, rank, m, n)
            if count < 1:
                errors[drop] = math.inf
            else:
                rest = rest_of(count)
                errors[drop] = truncation_floor(w[:, rest], gram[rest][:, rest], min(rank - drop, rest.numel(), m),
                                                weight_gram[rest][:, rest] if weight_gram is not None else None)
        return errors[drop]

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
    count = preserved_columns_for(chosen, rank, m, n)
    if count < 1:
        return None
    kept = order[:count].sort().values
    rest = rest_of(count)
    f = factorize(w[:, rest], min(rank - chosen, rest.numel(), m), make_whitening(rest), driver=driver)
    error = whitened_error(w[:, rest], f.dense(), gram[rest][:, rest])
    if error >= (1.0 - min_gain) * base_error:
        return None
    return ColumnSplit(f.up, f.down, kept, rest, w[:, kept].clone(), error)


def truncation_floor(weight: torch.Tensor, gram: torch.Tensor, rank: int,
                     weight_gram: torch.Tensor | None = None) -> float:
    """Σ_{i>rank} σ_i² of W·S for any S with S·Sᵀ = H (``gram``): the least ‖(W − A)X‖² per token of
    a rank-``rank`` A, which the whitened truncated SVD attains when S is H's exact Cholesky factor (a
    damped one lands just above it). The spectrum comes from the smaller side: the eigenvalues of
    W·H·Wᵀ (m×m) for a wide W, of (W·L)ᵀ(W·L) = Lᵀ(WᵀW)L (n×n, H = L·Lᵀ) for a tall one whose H has a
    Cholesky factor (else the m×m route). ``weight_gram``: WᵀW (float64) where the caller has it, so a
    tall W's product costs 2·n³ instead of 2·m·n² (2.7× fewer at 1536 × 576; the column search forms
    it once for all its candidates)."""
    w = weight.to(torch.float64)
    m, n = w.shape
    product = None
    if m > n:
        with lapack_threads():
            factor, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0 and weight_gram is not None:
            product = factor.T @ (weight_gram @ factor)
        elif int(info) == 0:
            a = w @ factor
            product = a.T @ a
            del a
        del factor
    if product is None:
        product = output_gram(w, gram)
    with lapack_threads():
        energies = torch.linalg.eigvalsh(product).clamp_min(0.0)  # ascending: the tail comes first
    return float(energies[: max(0, energies.numel() - rank)].sum())
