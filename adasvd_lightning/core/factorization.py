"""Rank arithmetic and truncated (whitened) SVD.

Ratio convention used everywhere in this package: the *compression ratio* c is the fraction of a
matrix's parameters removed; retention ρ = 1 − c. A rank-r factor pair of an m×n matrix costs r·(m+n)
parameters, so the rank for ratio c is r = ⌊(1 − c)·m·n / (m + n)⌋.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .linalg import GRAM_MIN_RELATIVE, gram_spectrum, lapack_threads, use_gram
from .whitening import CholeskyWhitening, IdentityWhitening, Whitening

__all__ = [
    "rank_for_ratio",
    "breakeven_rank",
    "saves_parameters",
    "LowRankFactors",
    "factorize",
    "output_gram",
    "factorize_output_gram",
    "times_converted",
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
    refinement in whitened coordinates starts from. ``down_gram`` = down·H·downᵀ (r×r) where the
    factorization knows it without the r·n² product (`factorize_output_gram`: diagonal).
    """

    up: torch.Tensor
    down: torch.Tensor
    singular_values: torch.Tensor
    whitened_down: torch.Tensor | None = None
    down_gram: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    @property
    def truncation_loss(self) -> float:
        return float(self.singular_values[self.rank :].square().sum().sqrt())

    def dense(self) -> torch.Tensor:
        return self.up @ self.down


#: Rows (or columns) of W converted to the compute dtype per product: bounds each float64 temporary of W
#: to one block (the whole of W in float64 is 0.36 GB at 4096 × 11008).
ROW_BLOCK = 1024


def _whitened(weight: torch.Tensor, whitening: Whitening, dtype: torch.dtype) -> torch.Tensor:
    """A = W·S in ``dtype``, a row block at a time: S acts on each row alone, so no float64 copy of the
    whole of W exists next to A."""
    m, n = weight.shape
    if weight.dtype == dtype or m <= ROW_BLOCK:
        return whitening.whiten(weight.to(dtype))
    a = torch.empty(m, n, dtype=dtype, device=weight.device)
    for start in range(0, m, ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        a[rows] = whitening.whiten(weight[rows].to(dtype))
    return a


def times_converted(weight: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W·B in B's dtype, W converted a row block at a time (never all of W in B's dtype)."""
    out = torch.empty(weight.shape[0], b.shape[1], dtype=b.dtype, device=b.device)
    for start in range(0, weight.shape[0], ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        out[rows] = weight[rows].to(b.dtype) @ b
    return out


def _project_rows(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Uᵀ·W in U's dtype, W converted a column block at a time."""
    out = torch.empty(u.shape[1], weight.shape[1], dtype=u.dtype, device=u.device)
    for start in range(0, weight.shape[1], ROW_BLOCK):
        cols = slice(start, start + ROW_BLOCK)
        out[:, cols] = u.T @ weight[:, cols].to(u.dtype)
    return out


def _whitened_gram(weight: torch.Tensor, whitening: Whitening, dtype: torch.dtype, tall: bool) -> torch.Tensor:
    """The smaller Gram matrix of A = W·S — AᵀA (n×n) when W is tall, A·Aᵀ (m×m) when wide — without
    ever holding all of A.

    Tall: AᵀA = Σ_b A_bᵀ A_b over row blocks A_b = W_b·S. Wide with a Cholesky factor: A·Aᵀ = Σ_j A_j A_jᵀ
    over column blocks, and since L is lower triangular A_j = W[:, j₀:]·L[j₀:, j] — half the flops of the
    full product W·L (m·n²/2 instead of m·n², 0.25 TFLOP less for a 4096 × 11008 down_proj). Other wide
    whitenings form A a row block at a time and multiply it out.
    """
    m, n = weight.shape
    if tall:
        gram = torch.zeros(n, n, dtype=dtype, device=weight.device)
        for start in range(0, m, ROW_BLOCK):
            a_b = whitening.whiten(weight[start:start + ROW_BLOCK].to(dtype))
            gram.addmm_(a_b.T, a_b)
        return gram
    if isinstance(whitening, CholeskyWhitening):
        factor = whitening.factor
        gram = torch.zeros(m, m, dtype=dtype, device=weight.device)
        for j0 in range(0, n, ROW_BLOCK):
            panel = factor[j0:, j0:j0 + ROW_BLOCK].to(dtype)
            a_j = times_converted(weight[:, j0:], panel)
            gram.addmm_(a_j, a_j.T)
        return gram
    a = _whitened(weight, whitening, dtype)
    return a @ a.T


def _factorize_by_gram(
    weight: torch.Tensor, rank: int, whitening: Whitening, dtype: torch.dtype, keep_whitened: bool
) -> LowRankFactors | None:
    """The Gram route of :func:`.linalg.thin_svd`, arranged for memory: None where it is not accurate.

    With A = W·S = U Σ Vᵀ the kept factors are up = U_r √Σ_r and down = √Σ_r V_rᵀ S⁻¹, and neither needs
    A once its Gram matrix is formed (`_whitened_gram`, which never holds all of A either):
    wide W (m < n, e.g. down_proj): down = Σ_r^{-1/2} U_rᵀ A S⁻¹ = Σ_r^{-1/2} U_rᵀ W — for *any*
    invertible S, so no triangular solve against S (n²·r flops, and rounding amplified by S's
    condition number); tall W: up = A V_r Σ_r^{-1/2} = W·(S V_r)·Σ_r^{-1/2}. Memory at the eigen-
    decomposition is the Gram matrix, its eigenvectors and LAPACK's workspace; no m×n float64 array.
    """
    m, n = weight.shape
    tall = m >= n
    found = gram_spectrum(_whitened_gram(weight, whitening, dtype, tall), rank)
    if found is None:
        return None  # near rank-deficient: the caller runs the reference SVD
    s, top = found
    root = s[:rank].sqrt()
    if tall:  # top = V_r
        up = times_converted(weight, whitening.left_multiply(top)).div_(root)
        whitened_down = root[:, None] * top.T
        return LowRankFactors(up=up, down=whitening.unwhiten(whitened_down), singular_values=s,
                              whitened_down=whitened_down if keep_whitened else None)
    up = top * root  # top = U_r
    down = _project_rows(top, weight).div_(root[:, None])
    return LowRankFactors(up=up, down=down, singular_values=s,
                          whitened_down=whitening.whiten(down) if keep_whitened else None)


def factorize(
    weight: torch.Tensor,
    rank: int,
    whitening: Whitening | None = None,
    *,
    compute_dtype: torch.dtype = torch.float64,
    driver: str = "auto",
    keep_whitened: bool = True,
) -> LowRankFactors:
    """Best rank-``rank`` fit of ``weight`` (m×n) in the metric the whitening defines.

    SVD of A = W·S = U Σ Vᵀ; keep the top r and split √Σ into both factors so neither factor's scale
    dominates (better conditioned for later fine-tuning and low-precision storage):
    up = U_r √Σ_r, down = √Σ_r V_rᵀ S⁻¹. With the identity whitening this is plain truncated SVD.
    ``driver`` picks the SVD route (:func:`.linalg.thin_svd`; ``"svd"`` is the LAPACK reference).
    ``weight`` may stay in its own dtype (float32): it is converted to ``compute_dtype`` a block at a
    time. ``keep_whitened=False`` skips ``whitened_down`` (only refinement in whitened coordinates reads
    it).
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be a matrix, got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} outside [1, {min(m, n)}] for a {m}×{n} matrix")
    whitening = whitening or IdentityWhitening()
    weight = weight.detach()
    if use_gram(compute_dtype, driver):
        factors = _factorize_by_gram(weight, rank, whitening, compute_dtype, keep_whitened)
        if factors is not None:
            return factors
    a = _whitened(weight, whitening, compute_dtype)
    with lapack_threads():
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    del a
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    whitened_down = root[:, None] * vh[:rank]
    down = whitening.unwhiten(whitened_down)
    return LowRankFactors(up=up, down=down, singular_values=s, whitened_down=whitened_down if keep_whitened else None)


#: Rows per block in `output_gram`: it runs while the widest input's H is still alive (the run's memory
#: peak), so its float64 row blocks are kept at a quarter of `ROW_BLOCK` (22 MB each at n = 11008).
GRAM_ROW_BLOCK = ROW_BLOCK // 4


def output_gram(weight: torch.Tensor, input_gram: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """W·H·Wᵀ (m×m) for the input Gram matrix H (n×n), W converted a row block at a time.

    Only the blocks on and above the diagonal are multiplied out (the result is symmetric), so the cost
    is m·n² + m²·n/2 multiply-adds and the temporaries are two blocks of rows, never all of W in ``dtype``.
    """
    m = weight.shape[0]
    h = input_gram.to(dtype)
    gram = torch.empty(m, m, dtype=dtype, device=weight.device)
    for i0 in range(0, m, GRAM_ROW_BLOCK):
        rows = slice(i0, i0 + GRAM_ROW_BLOCK)
        weighted = torch.mm(weight[rows].to(dtype), h)  # W_i·H; the converted rows are freed right away
        for j0 in range(i0, m, GRAM_ROW_BLOCK):
            cols = slice(j0, j0 + GRAM_ROW_BLOCK)
            block = weighted @ weight[cols].to(dtype).T
            gram[rows, cols] = block
            if j0 != i0:
                gram[cols, rows] = block.T
    return gram


def factorize_output_gram(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> LowRankFactors:
    """Best rank-``rank`` fit of a wide or square W (m ≤ n) in the metric of its input Gram matrix H,
    given G = W·H·Wᵀ (`output_gram`): no whitening factor and no damping.

    Why it is the same fit as `factorize` with the truncation-aware whitening: for any S with S·Sᵀ = H,
    A = W·S has A·Aᵀ = G, so A's left singular vectors U and singular values are G's eigenpairs, and the
    truncation's kept factor down = Σ_r^{-1/2}·U_rᵀ·A·S⁻¹ = Σ_r^{-1/2}·U_rᵀ·W never needs S. W′ =
    U_r·U_rᵀ·W minimises tr((W − W′)·H·(W − W′)ᵀ) over rank r for every positive semi-definite H,
    singular ones included (fewer calibration tokens than features), where a Cholesky factor needs a
    damping shift and then fits H + s·I instead. The caller may free H between `output_gram` and this
    call: the eigen-decomposition runs without the n×n input statistics (970 MB at n = 11008).

    The √σ split between the factors is floored at `GRAM_MIN_RELATIVE`·σ₁: a direction the calibration
    data barely excites (σ ≈ 0) would otherwise get a huge ``down`` row; the product U_r·U_rᵀ·W is the
    same for any split. With root_i the split, down·H·downᵀ = diag(σᵢ² / root_i²) (U_rᵀ·G·U_r is
    diagonal): ``down_gram``, which a refinement starting here would otherwise form in r·n² flops
    (217 GFLOP for a 4096 × 11008 down_proj at 40 %).
    """
    m, n = weight.shape
    if m > n:
        raise ValueError(f"factorize_output_gram needs a wide or square matrix, got {m}×{n}")
    if not 1 <= rank <= m:
        raise ValueError(f"rank {rank} outside [1, {m}] for a {m}×{n} matrix")
    s, top = gram_spectrum(gram, rank, check=False)
    floor = GRAM_MIN_RELATIVE * float(s[0])
    root = s[:rank].clamp_min(floor).sqrt() if floor > 0 else torch.ones(rank, dtype=s.dtype, device=s.device)
    up = top * root
    down = _project_rows(top, weight).div_(root[:, None])
    return LowRankFactors(up=up, down=down, singular_values=s, down_gram=torch.diag(s[:rank].square() / root.square()))
