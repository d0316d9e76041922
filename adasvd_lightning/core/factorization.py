"""Rank arithmetic and truncated (whitened) SVD.

Ratio convention used everywhere in this package: the *compression ratio* c is the fraction of a
matrix's parameters removed; retention ρ = 1 − c. A rank-r factor pair of an m×n matrix costs r·(m+n)
parameters, so the rank for ratio c is r = ⌊(1 − c)·m·n / (m + n)⌋.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .linalg import thin_svd
from .whitening import IdentityWhitening, Whitening

__all__ = [
    "rank_for_ratio",
    "breakeven_rank",
    "saves_parameters",
    "LowRankFactors",
    "factorize",
]


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """r = ⌊(1 − ratio)·m·n/(m + n)⌋, at least 1 (a rank-0 layer would delete the module)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"compression ratio must be in [0, 1), got {ratio}")
    m, n = out_features, in_features
    # The small epsilon keeps exact products (e.g. 0.5·64·64/128 = 16) from flooring to 15.
    return max(1, math.floor((1.0 - ratio) * m * n / (m + n) + 1e-9))


def breakeven_rank(out_features: int, in_features: int) -> float:
    """The rank at which factor pair and dense matrix cost the same: m·n/(m + n)."""
    return out_features * in_features / (out_features + in_features)


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    """True when r·(m+n) < m·n, i.e. factorizing actually shrinks the matrix."""
    return rank * (out_features + in_features) < out_features * in_features


@dataclass
class LowRankFactors:
    """W ≈ up @ down (+ bias handled by the module).

    ``up`` is m×r (applied second), ``down`` is r×n (applied first). ``singular_values`` are those of the
    whitened matrix W·S (all of them), so ``truncation_loss`` = √(Σ_{i>r} σᵢ²) is the predicted
    ‖(W − W′)X‖_F when S Sᵀ = X Xᵀ. ``whitened_down`` = down·S, the factor before unwhitening, which
    refinement in whitened coordinates starts from.
    """

    up: torch.Tensor
    down: torch.Tensor
    singular_values: torch.Tensor
    whitened_down: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    @property
    def truncation_loss(self) -> float:
        return float(self.singular_values[self.rank :].square().sum().sqrt())

    def dense(self) -> torch.Tensor:
        return self.up @ self.down


def factorize(
    weight: torch.Tensor,
    rank: int,
    whitening: Whitening | None = None,
    *,
    compute_dtype: torch.dtype = torch.float64,
    driver: str = "auto",
) -> LowRankFactors:
    """Best rank-``rank`` fit of ``weight`` (m×n) in the metric the whitening defines.

    SVD of A = W·S = U Σ Vᵀ; keep the top r and split √Σ into both factors so neither factor's scale
    dominates (better conditioned for later fine-tuning and low-precision storage):
    up = U_r √Σ_r, down = √Σ_r V_rᵀ S⁻¹. With the identity whitening this is plain truncated SVD.
    ``driver`` picks the SVD route (:func:`.linalg.thin_svd`; ``"svd"`` is the LAPACK reference).
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be a matrix, got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} outside [1, {min(m, n)}] for a {m}×{n} matrix")
    whitening = whitening or IdentityWhitening()
    w = weight.detach().to(compute_dtype)
    a = whitening.whiten(w)
    u, s, vh = thin_svd(a, rank, driver=driver)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    whitened_down = root[:, None] * vh[:rank]
    down = whitening.unwhiten(whitened_down)
    return LowRankFactors(up=up, down=down, singular_values=s, whitened_down=whitened_down)
