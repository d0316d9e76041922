"""Fast thin SVD for truncation: eigen-decomposition of the smaller Gram matrix, with a safe fallback.

Every factorization here needs all singular values of the whitened matrix A (m×n, float64) but only
its top-k singular vectors. LAPACK's divide-and-conquer SVD (``torch.linalg.svd``) computes all of
them and is 2–7× slower on CPU than the symmetric eigensolver on the min(m, n)-sized Gram matrix
(measured in BENCHMARKS.md). With AᵀA = V Λ Vᵀ: σ = √λ, and the top-k left vectors are U_k = A V_k / σ_k
(one m×n×k product); for wide A the roles swap.

Squaring A squares its condition number: λ carries an absolute error of about ε·σ₁², so the Gram route
is only accurate for singular values well above √ε·σ₁ (≈1e-8·σ₁ in float64). It is therefore used
only in float64 and only when σ_k ≥ ``GRAM_MIN_RELATIVE``·σ₁ for the last vector actually kept;
otherwise — rank-deficient or nearly so, or lower precision — the reference SVD runs instead. Tail
singular values (used for truncation losses and allocation spectra) come from λ with the same absolute
accuracy, far below anything the allocation or the reports resolve.

Threads. LAPACK's eigensolver and SVD reduce the matrix to tridiagonal / bidiagonal form first, a
sequence of ~n matrix-vector steps; MKL (and OpenBLAS) run each step as its own OpenMP parallel
region, so one decomposition synchronises all its threads thousands of times. When the process does
not own its cores — a shared machine, or several processes each sized to the whole machine — every
synchronisation waits for a thread the kernel has descheduled, and a decomposition of a 1536 × 576
matrix took 5–100× longer with 2 threads than with 1 on a 2-core machine shared with other jobs
(measured per routine: eigh, eigvalsh, svd, svdvals, cholesky; the GEMMs around them were unaffected;
BENCHMARKS.md, "Decomposition threads"). `decomposition_threads` therefore sets, for a scope such as
one compression run, the thread count every LAPACK call of this package runs with; GEMMs outside
those calls keep torch's setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["SVD_DRIVERS", "GRAM_MIN_RELATIVE", "thin_svd", "gram_spectrum", "use_gram", "singular_values", "decomposition_threads",
           "lapack_threads", "gram_singular_values"]

_decomposition_threads: int | None = None


@contextmanager
def decomposition_threads(threads: int | None) -> Iterator[None]:
    """Within this scope every decomposition of the package (`lapack_threads`) runs with ``threads``
    CPU threads; ``None`` leaves torch's intra-op setting. Scopes nest; the previous value is restored."""
    global _decomposition_threads
    if threads is not None and threads < 1:
        raise ValueError(f"decomposition threads must be >= 1 or None, got {threads}")
    previous, _decomposition_threads = _decomposition_threads, threads
    try:
        yield
    finally:
        _decomposition_threads = previous


@contextmanager
def lapack_threads() -> Iterator[None]:
    """Run the enclosed LAPACK call with the active `decomposition_threads` count, then restore torch's.

    Wrap only the decomposition itself: products before and after it keep torch's thread count, which
    they use well (a few large parallel regions each).
    """
    wanted, have = _decomposition_threads, torch.get_num_threads()
    if wanted is None or wanted == have:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(have)

SVD_DRIVERS = ("auto", "gram", "svd")
#: Smallest σ_k/σ₁ for which the Gram route's k-th singular vector is trusted (float64).
GRAM_MIN_RELATIVE = 1e-5


def use_gram(dtype: torch.dtype, driver: str) -> bool:
    """Whether ``driver`` allows the Gram route for a matrix of ``dtype`` (float64 only)."""
    if driver not in SVD_DRIVERS:
        raise ValueError(f"svd driver must be one of {SVD_DRIVERS}, got {driver!r}")
    return driver != "svd" and dtype == torch.float64


def gram_spectrum(gram: torch.Tensor, rank: int, *, check: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(σ descending, the top ``rank`` eigenvectors in that order) of a matrix A whose smaller Gram
    matrix is ``gram`` — or None where the Gram route is not accurate for that rank (σ_rank <
    `GRAM_MIN_RELATIVE`·σ₁), and the caller should run the reference SVD instead. ``check=False``
    always returns: for callers that only need the top subspace to be right where it carries energy."""
    with lapack_threads():
        eigenvalues, vectors = torch.linalg.eigh(gram)
    s = eigenvalues.flip(0).clamp_min(0.0).sqrt()
    del eigenvalues
    if check and not (s[0] > 0 and s[rank - 1] >= GRAM_MIN_RELATIVE * s[0]):
        return None
    return s, vectors[:, -rank:].flip(1)


def thin_svd(a: torch.Tensor, rank: int, *, driver: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U[:, :rank], all singular values, Vh[:rank]) of ``a`` (m×n), singular values descending.

    ``driver``: ``"svd"`` is the reference (``torch.linalg.svd``); ``"gram"`` / ``"auto"`` use the Gram
    eigen-decomposition when it is accurate for the requested rank (float64, σ_rank/σ₁ ≥
    `GRAM_MIN_RELATIVE`) and fall back to the reference otherwise.
    """
    if a.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(a.shape)}")
    k = min(rank, *a.shape)
    if use_gram(a.dtype, driver) and k >= 1:
        tall = a.shape[0] >= a.shape[1]
        found = gram_spectrum(a.T @ a if tall else a @ a.T, k)
        if found is not None:
            s, top = found
            if tall:  # top = V_k: U_k = A V_k / σ_k
                return (a @ top) / s[:k], s, top.T
            return top, s, (top.T @ a) / s[:k, None]  # top = U_k: Vh_k = U_kᵀ A / σ_k
    with lapack_threads():
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[:, :k], s, vh[:k]


def gram_singular_values(gram: torch.Tensor) -> torch.Tensor:
    """The singular values of any A with A·Aᵀ (or Aᵀ·A) = ``gram``, descending: √ of its eigenvalues."""
    with lapack_threads():
        return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0).sqrt()


def singular_values(a: torch.Tensor, *, driver: str = "auto") -> torch.Tensor:
    """All singular values of ``a``, descending (the Gram's eigenvalues when the driver allows it)."""
    if use_gram(a.dtype, driver):
        return gram_singular_values(a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T)
    with lapack_threads():
        return torch.linalg.svdvals(a)
