"""Cholesky factorization that overwrites the Gram matrix it factors, and can undo a failed attempt.

Why
---
Whitening factors H = L Lᵀ and, for most targets, nothing reads H afterwards: the factor stands in for
it (`pipeline._factor_replaces_gram`). torch's Cholesky writes L into a new matrix, so H and L — each
n×n float64, 970 MB at Llama-7B's MLP width — are alive together at the run's memory peak (BENCHMARKS.md,
"a Llama-7B-width run"). Factoring in place removes one of them. (At that width the run's peak turned
out to be in the svd phase, so the peak itself did not drop: BENCHMARKS.md, "In-place Cholesky".)

Why not LAPACK's in-place potrf through torch
---------------------------------------------
``torch.linalg.cholesky_ex(H.T, upper=True, out=...)`` does run in place, but it zeroes the other
triangle, so a failed attempt (the first, undamped attempt fails for every Gram of fewer tokens than
features) would leave H destroyed and nothing to retry the damped factorization on.

How
---
A right-looking blocked Cholesky on the lower triangle, whose every update touches only entries on or
below the diagonal. The strict upper triangle keeps Hᵀ (H is symmetric) and the diagonal is saved
(n numbers), so a failure restores H exactly: the lower triangle is copied back from the upper one.
On success the upper triangle is zeroed and the storage holds L, equal to torch's factor up to
round-off (the same arithmetic in another order). Per diagonal block of width b: a b×b Cholesky, a
triangular solve for the panel below, and the trailing lower triangle updated in column blocks
(temporaries of (n − k)×b, never n×n). Flops are LAPACK's n³/3 in GEMMs of width b; one ad-hoc timing
(not a benchmark: 1 thread, shared machine) gave 0.22 s for both it and torch's Cholesky at n = 3000.
`rebuild_from_factor` turns the factor back into H (up to round-off) in the same storage, for
statistics that are needed again after their factor has served.
"""

from __future__ import annotations

import torch

from .linalg import lapack_threads

__all__ = ["cholesky_in_place", "restore_lower", "rebuild_from_factor"]

#: Block width: GEMMs of this width run near full speed; the Python loop makes (n/b)²/2 of them.
BLOCK = 256


def restore_lower(h: torch.Tensor, diagonal: torch.Tensor, block: int = BLOCK) -> None:
    """H's lower triangle copied back from its (untouched) strict upper triangle and saved diagonal."""
    n = h.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = h[start:stop, start:stop]
        rows.copy_(torch.triu(rows, diagonal=1) + torch.triu(rows, diagonal=1).T)
        if stop < n:
            h[stop:, start:stop].copy_(h[start:stop, stop:].T)
    h.diagonal().copy_(diagonal)


def cholesky_in_place(h: torch.Tensor, shift: float = 0.0, block: int = BLOCK) -> bool:
    """Overwrite symmetric float64 ``h`` with the lower Cholesky factor of H + shift·I; True on success.

    On failure (not positive definite at that shift) ``h`` is restored to H bit for bit and False is
    returned, so the caller can retry with a larger shift or another method.
    """
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.dtype != torch.float64 or not h.is_contiguous():
        raise ValueError("in-place Cholesky needs a contiguous square float64 matrix")
    n = h.shape[0]
    diagonal = h.diagonal().clone()
    if shift:
        h.diagonal().add_(shift)
    for k in range(0, n, block):
        e = min(k + block, n)
        a11 = h[k:e, k:e]
        with lapack_threads():
            l11, info = torch.linalg.cholesky_ex(torch.tril(a11) + torch.tril(a11, diagonal=-1).T)
        if int(info) != 0:
            restore_lower(h, diagonal, block)
            return False
        lower = torch.ones_like(l11, dtype=torch.bool).tril()
        a11.copy_(torch.where(lower, l11, a11))
        if e == n:
            break
        panel = h[e:, k:e]
        panel.copy_(torch.linalg.solve_triangular(l11.T, panel, upper=True, left=False))
        for j in range(e, n, block):
            je = min(j + block, n)
            cols = panel[j - e:je - e]
            diag_block = h[j:je, j:je]
            diag_block.sub_(torch.tril(cols @ cols.T))
            if je < n:
                h[je:, j:je].sub_(panel[je - e:] @ cols.T)
    for start in range(0, n, block):  # the upper triangle held Hᵀ: L is lower triangular
        stop = min(start + block, n)
        h[start:stop, start:stop].tril_()
        h[start:stop, stop:].zero_()
    return True


def rebuild_from_factor(h: torch.Tensor, shift: float = 0.0, block: int = BLOCK) -> None:
    """Overwrite the lower-triangular factor L held in ``h`` (upper triangle zero, as `cholesky_in_place`
    leaves it) with L Lᵀ − shift·I, the matrix it was factored from, up to round-off.

    Why: a validation fits on the fit split's Gram H_fit, which the statistics hold in place of the
    whole H until they are restored (`refinement.complement`); factoring H_fit in its own storage and
    rebuilding it afterwards saves an n×n float64 matrix at the run's peak for n³/3 more flops.
    Column blocks from the last to the first: block j of L Lᵀ reads only L's columns up to block j,
    which no earlier write touched, so each (n − j)×b panel is written over the factor it came from,
    and its transpose into the upper triangle, which nothing reads any more.
    """
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.dtype != torch.float64 or not h.is_contiguous():
        raise ValueError("rebuilding in place needs a contiguous square float64 matrix")
    n = h.shape[0]
    for start in reversed(range(0, n, block)):
        stop = min(start + block, n)
        panel = h[start:, :stop] @ h[start:stop, :stop].T  # rows start.., columns start..stop of L Lᵀ
        top = panel[: stop - start]  # the diagonal block: its lower triangle mirrored, exactly symmetric
        top.copy_(torch.tril(top) + torch.tril(top, diagonal=-1).T)
        h[start:, start:stop].copy_(panel)
        if stop < n:
            h[start:stop, stop:].copy_(panel[stop - start:].T)
        del panel
    if shift:
        h.diagonal().sub_(shift)
