"""Whitening transforms for truncation-aware low-rank factorization.

SVD-LLM's observation: if the calibration Gram matrix factors as H = X Xᵀ = S Sᵀ, then truncating the
SVD of W·S to rank r gives W′ with ‖(W − W′)X‖_F² equal to the sum of the dropped squared singular
values of W·S — the optimal rank-r fit *for the inputs the layer actually sees*. Every whitening here
exposes the same two operations so the factorization code does not care which one it got:

* ``whiten(w)``  → w·S
* ``unwhiten(a)`` → a·S⁻¹ (by triangular solve or an orthogonal/diagonal formula, never an explicit
  inverse).

The Cholesky route can fail on real statistics (dead channels, fewer tokens than features, round-off
making H slightly indefinite). :func:`compute_whitening` therefore walks a fallback chain that never
raises on a finite symmetric input: float64 Cholesky → Cholesky with relative damping → eigen-
decomposition with eigenvalues floored to a small fraction of the largest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .inplace_cholesky import cholesky_in_place
from .linalg import lapack_threads

__all__ = [
    "Whitening",
    "IdentityWhitening",
    "DiagonalWhitening",
    "CholeskyWhitening",
    "EigenWhitening",
    "compute_whitening",
    "rounding_shift",
    "shifted_cholesky",
    "overwrote",
]


class Whitening:
    """Interface: an invertible n×n transform S applied on the input side of a weight matrix."""

    kind: str = "abstract"

    def whiten(self, w: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def unwhiten(self, a: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def left_multiply(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """S·v (n×k): lets a factorization form A·v = W·(S·v) without A = W·S itself."""
        raise NotImplementedError


@dataclass
class IdentityWhitening(Whitening):
    """S = I: plain SVD of the weight, blind to the data (the baseline)."""

    kind: str = "identity"

    def whiten(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def unwhiten(self, a: torch.Tensor) -> torch.Tensor:
        return a

    def left_multiply(self, v: torch.Tensor) -> torch.Tensor:
        return v


@dataclass
class DiagonalWhitening(Whitening):
    """S = diag(scale): per-input-channel scaling (ASVD's activation-aware transform)."""

    scale: torch.Tensor
    kind: str = "diagonal"

    def whiten(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.scale.to(w.dtype)

    def unwhiten(self, a: torch.Tensor) -> torch.Tensor:
        return a / self.scale.to(a.dtype)

    def left_multiply(self, v: torch.Tensor) -> torch.Tensor:
        return self.scale.to(v.dtype)[:, None] * v


@dataclass
class CholeskyWhitening(Whitening):
    """S = L, the lower Cholesky factor of H (+ damping·mean(diag H)·I when ``damping`` > 0).

    ``shift`` is that absolute diagonal shift (L Lᵀ = H + shift·I), so exact quantities in H can still
    be had from L: V H Vᵀ = (V L)(V L)ᵀ − shift·V Vᵀ.
    """

    factor: torch.Tensor
    damping: float = 0.0
    kind: str = "cholesky"
    shift: float = 0.0

    def whiten(self, w: torch.Tensor) -> torch.Tensor:
        return w @ self.factor.to(w.dtype)

    def unwhiten(self, a: torch.Tensor) -> torch.Tensor:
        # Solve X·L = A for X without forming L⁻¹.
        return torch.linalg.solve_triangular(self.factor.to(a.dtype), a, upper=False, left=False)

    def left_multiply(self, v: torch.Tensor) -> torch.Tensor:
        return self.factor.to(v.dtype) @ v


@dataclass
class EigenWhitening(Whitening):
    """S = Q·diag(√s) from H = Q diag(s) Qᵀ with s floored; S⁻¹ = diag(1/√s)·Qᵀ exactly."""

    eigenvectors: torch.Tensor
    sqrt_eigenvalues: torch.Tensor
    floored: int = 0
    kind: str = "eigen"

    def whiten(self, w: torch.Tensor) -> torch.Tensor:
        return (w @ self.eigenvectors.to(w.dtype)) * self.sqrt_eigenvalues.to(w.dtype)

    def unwhiten(self, a: torch.Tensor) -> torch.Tensor:
        return (a / self.sqrt_eigenvalues.to(a.dtype)) @ self.eigenvectors.to(a.dtype).T

    def left_multiply(self, v: torch.Tensor) -> torch.Tensor:
        return self.eigenvectors.to(v.dtype) @ (self.sqrt_eigenvalues.to(v.dtype)[:, None] * v)


def _symmetric(gram: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """float64 ``gram`` made exactly symmetric, without n×n temporaries.

    The pipeline's statistics are symmetric by construction and pass through uncopied (a float64 input
    is returned as is; nothing here writes to it). Otherwise (user input, round-off) one float64 copy
    is averaged with its transpose block by block — ``0.5·(H + Hᵀ)`` would hold two more n×n
    matrices, 2 GB for an 11008-wide MLP input, at the memory peak of a compression run.
    """
    h = gram.detach().to(torch.float64)
    if torch.equal(h, h.T):
        return h
    h = gram.detach().to(torch.float64, copy=True)  # `detach` shares storage: always a fresh copy here
    n = h.shape[0]
    for i in range(0, n, block):
        rows = slice(i, min(i + block, n))
        diag = h[rows, rows]
        diag.copy_(0.5 * (diag + diag.T))
        for j in range(i + block, n, block):
            cols = slice(j, min(j + block, n))
            mean = 0.5 * (h[rows, cols] + h[cols, rows].T)
            h[rows, cols] = mean
            h[cols, rows] = mean.T
    return h


def _all_finite(t: torch.Tensor, rows: int = 1024) -> bool:
    """``torch.isfinite(t).all()`` in row blocks: on a whole float64 n×n matrix, isfinite makes
    float64 temporaries of its size (318 MB at n = 5504, more than the Cholesky factor itself;
    `benchmarks/whitening_memory.py`) at the very moment a compression run peaks in memory."""
    return all(bool(torch.isfinite(t[i : i + rows]).all()) for i in range(0, t.shape[0], rows))


def shifted_cholesky(h: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``cholesky_ex(H + shift·I)`` without an n×n copy of H.

    The shift goes onto h's own diagonal and the saved diagonal (n numbers) is copied back afterwards,
    bit for bit, also if the factorization raises. Shared by the whitening's damped retry and the
    V-step's damped factor: ``H + s·I`` as an expression costs two n×n temporaries (I and the sum), and
    in whitening a copy of H plus the failed first factor plus the new one were three n×n float64
    matrices at a run's memory peak (`benchmarks/whitening_memory.py`).
    """
    diagonal = h.diagonal()
    saved = diagonal.clone()
    try:
        diagonal.add_(shift)
        with lapack_threads():
            return torch.linalg.cholesky_ex(h)
    finally:
        diagonal.copy_(saved)


def _max_abs_row_sum(h: torch.Tensor, rows: int = 1024) -> float:
    """‖H‖_∞ (an upper bound of ‖H‖₂ for symmetric H), in row blocks: no n×n temporary."""
    return max(float(h[i : i + rows].abs().sum(dim=1).max()) for i in range(0, h.shape[0], rows))


def rounding_shift(h: torch.Tensor, product_dtype: torch.dtype) -> float:
    """The diagonal shift that covers the rounding of a Gram matrix whose products were formed in
    ``product_dtype``: eps(product_dtype)·‖H‖_∞.

    A Gram matrix of fewer tokens than features is singular; its null space's eigenvalues are zero up
    to the products' rounding, ±eps·‖H‖₂ — about 1e-16 relative in float64 but 1e-7 in float32, larger
    than the default damping (1e-6 of the *mean* diagonal, which outlier channels put orders of
    magnitude below ‖H‖₂). Below that level H carries no information, so a damped Cholesky must shift at
    least that far; otherwise it fails and the run falls back to the eigen-decomposition (several
    times slower, and it disables refinement in whitened coordinates). For float64 products the bound
    is ~1e-10 of the default shift or less, so it changes nothing there.
    """
    return torch.finfo(product_dtype).eps * _max_abs_row_sum(h)


def overwrote(whitening: Whitening, gram: torch.Tensor) -> bool:
    """Whether `compute_whitening(gram, overwrite=True)` wrote its factor into ``gram``'s storage."""
    return isinstance(whitening, CholeskyWhitening) and whitening.factor.data_ptr() == gram.data_ptr()


def compute_whitening(
    gram: torch.Tensor,
    *,
    damping: float = 1e-6,
    eigen_floor: float = 1e-10,
    product_dtype: torch.dtype = torch.float64,
    overwrite: bool = False,
) -> Whitening:
    """Return a whitening S with S Sᵀ ≈ ``gram``, falling back instead of failing.

    Args:
        gram: symmetric n×n Gram matrix (any float dtype; promoted to float64 — Cholesky of a
            near-singular matrix in float32 loses most of its digits).
        damping: relative damping for the second attempt: H + max(damping·mean(diag H),
            `rounding_shift`)·I.
        eigen_floor: last resort floors eigenvalues at ``eigen_floor``·max(eigenvalue) (and at a tiny
            absolute value for an all-zero H) so every direction stays invertible.
        product_dtype: precision the Gram's per-chunk products were formed in
            (`CompressionConfig.statistics_dtype`); sets the damped attempt's smallest shift.
        overwrite: the caller will not read ``gram`` again: a (damped) Cholesky factor may then be
            written into its storage (`core.inplace_cholesky`; one n×n float64 matrix less at the
            peak). Applies to a contiguous, exactly symmetric float64 ``gram``; check with
            `overwrote` whether it happened (the eigen fallback leaves ``gram`` as it was).

    The returned object's ``kind`` says which route succeeded, so callers can report it.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"Gram matrix must be square, got shape {tuple(gram.shape)}")
    h = _symmetric(gram)
    if not _all_finite(h):
        raise ValueError("Gram matrix contains NaN or Inf; the calibration activations are not finite")

    in_place = overwrite and h.data_ptr() == gram.data_ptr() and h.is_contiguous()
    scale = float(h.diagonal().mean().clamp_min(0.0))
    shift = max(damping * scale, rounding_shift(h, product_dtype)) if damping > 0 and scale > 0 else None
    if in_place:
        if cholesky_in_place(h):
            return CholeskyWhitening(factor=h)
        if shift is not None and cholesky_in_place(h, shift):
            return CholeskyWhitening(factor=h, damping=shift / scale, kind="damped-cholesky", shift=shift)
    else:
        with lapack_threads():
            factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return CholeskyWhitening(factor=factor)
        del factor  # garbage: free it before a retry allocates the next n×n factor
        if shift is not None:
            factor, info = shifted_cholesky(h, shift)
            if int(info) == 0:
                return CholeskyWhitening(factor=factor, damping=shift / scale, kind="damped-cholesky", shift=shift)

    with lapack_threads():
        eigenvalues, eigenvectors = torch.linalg.eigh(h)
    top = float(eigenvalues.max().clamp_min(0.0))
    floor = max(top * eigen_floor, torch.finfo(torch.float64).tiny ** 0.5)
    floored = int((eigenvalues < floor).sum())
    sqrt_eigenvalues = eigenvalues.clamp_min(floor).sqrt()
    return EigenWhitening(eigenvectors=eigenvectors, sqrt_eigenvalues=sqrt_eigenvalues, floored=floored)
