"""Refinement of low-rank factors against calibration data, in exact Gram form.

Setting: a target matrix W (m×n) sees inputs X_c in the compressed model (produced by the already
compressed earlier layers) where the dense model saw X_o. We want factors U (m×r), V (r×n) with
U·V·X_c ≈ W·X_o. Some input columns may be preserved exactly (Duo-SVD); then the low-rank part covers
the remaining ("rest") columns and must explain Y = W·X_o − W_keep·X_c[kept].

Everything needed is expressible with n×n Gram matrices accumulated during calibration — no token-
sized matrices are ever stored and no sample averaging changes the statistics:

    H_cc = X_c X_cᵀ,  H_oc = X_o X_cᵀ
    G    = Y X_restᵀ = W H_oc[:, rest] − W_keep H_cc[kept, rest]
    f(U, V) = ‖U V X_rest − Y‖² = tr(U V H_rr Vᵀ Uᵀ) − 2 tr(U V Gᵀ) + ‖Y‖²
    ‖Y‖²  = ‖W X_o‖² − 2 tr(W H_oc[:, kept] W_keepᵀ) + tr(W_keep H_cc[kept, kept] W_keepᵀ)

‖W X_o‖² (the *target energy*) is a number per matrix: the statistics read it off the dense outputs
(`BlockStatistics.target_energy`), so the n×n Gram H_oo = X_o X_oᵀ is never needed; without it it is
tr(W H_oo Wᵀ) from an explicit ``h_oo`` (tests, single-stream statistics where H_oo = H_cc).

* U-step (SVD-LLM's closed-form update): U = G Vᵀ (V H_rr Vᵀ)⁻¹.
* V-step: V = (UᵀU)⁻¹ Uᵀ G H_rr⁻¹.
* Whitened coordinates: with the exact Cholesky factor H_rr = L Lᵀ that truncation-aware whitening has
  already computed, Ṽ = V L turns V H_rr Vᵀ into Ṽ Ṽᵀ and G H_rr⁻¹ into G̃ L⁻¹ with G̃ = G L⁻ᵀ:
  f = tr(UᵀU ṼṼᵀ) − 2 tr(Uᵀ G̃ Ṽᵀ) + ‖Y‖², U-step G̃ Ṽᵀ (ṼṼᵀ)⁻¹, V-step Ṽ = (UᵀU)⁻¹ Uᵀ G̃. The same
  iterates without any r·n² product per iteration (the n×n matrix is the identity there) and with one
  triangular solve per matrix for G̃ instead of a Cholesky solve; V = Ṽ L⁻¹ once at the end.
  Where H_rr is singular (fewer tokens than features, dead channels) the whitening's factor is damped,
  L Lᵀ = H_rr + s·I: f stays exact (V H_rr Vᵀ = ṼṼᵀ − s·V Vᵀ, so each V-step also recovers V, one
  triangular solve), and the V-step becomes the ridge step (UᵀU)⁻¹ Uᵀ G (H_rr + s·I)⁻¹ with the
  whitening's own shift, the smallest that covers the statistics' rounding
  (`whitening.rounding_shift`). No second factor of H_rr is formed, and H_rr itself is not read.
* In those coordinates f = ‖U Ṽ − G̃‖² + ‖Y‖² − ‖G̃‖²: adaComp is alternating least squares for the
  best rank-r approximation of G̃, whose global minimiser is its truncated SVD (Eckart–Young).
  `optimal_factors` computes that limit directly — one decomposition, no iterations, and an objective
  no alternation can beat: f* = ‖Y‖² − Σ_{i≤r} σᵢ(G̃)².
* adaComp (AdaSVD) alternates them. Each step minimises f exactly in its block, so f never increases;
  a step that would increase it through round-off or damping is rejected and the iteration stops.
  If X_c = X_o and the start is the whitened optimum, nothing can improve: the gain comes from the
  mismatch between the compressed prefix's inputs and the dense targets (or from a worse start).
* Validation (`validated_steps`): f falls on the tokens it is fitted to at every step, but the V-step
  solves against H_cc, and where the calibration inputs barely excite some directions it puts large
  weights there that raise the error on new text (on a real 135M model the alternation lost to the
  U-step alone). With some calibration sequences held out (`core.holdout`), the alternation is run on
  the rest (H_fit = (N·H − N_v·H_v)/(N − N_v), exactly, from the sums) and scored after every
  half-step on the held-out Grams (a residual writer: on its held-out rows or their moments,
  `core.writer_heldout`, which give the same fit split and score); the number of half-steps that
  scored best is then run on all tokens. Zero half-steps (the whitened start) is a candidate, so a
  refinement never does worse on held-out text than no refinement. A residual writer's counts must also pass a second held-out
  measure, its plain (unweighted) output error (`core.plain_guard`): its objective is on the
  residual's scale, where a step may give up the few attention-sink tokens every later layer reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .factorization import factorize, times_converted
from .linalg import lapack_threads
from .whitening import shifted_cholesky

__all__ = [
    "GramStatistics", "RefinementTarget", "objective", "u_step", "v_step", "adacomp", "optimal_factors",
    "balance_factors", "complement", "validated_steps",
]


@dataclass
class GramStatistics:
    """Gram matrices of one linear input (float64, already divided by the token count).

    ``h_oo`` is optional: it only serves ‖W X_o‖², which the pipeline takes from the dense outputs.
    ``h_cc`` may be None once the whitening's Cholesky factor stands in for it (see `RefinementTarget`).
    ``w_h_oc``: W·H_oc (m×n) accumulated from the dense outputs (`InputStatistics.add_output_pair`) in
    place of H_oc (then None): everything refinement reads of H_oc is W·H_oc.
    """

    h_cc: torch.Tensor | None
    h_oc: torch.Tensor | None
    h_oo: torch.Tensor | None = None
    w_h_oc: torch.Tensor | None = None

    @property
    def cross(self) -> torch.Tensor:
        """The paired cross statistic as kept: W·H_oc where accumulated so, else H_oc (for in-place
        turns into a fit split, which only scale it)."""
        return self.w_h_oc if self.w_h_oc is not None else self.h_oc

    def __post_init__(self) -> None:
        if self.h_cc is not None and self.h_oc is not None and self.h_cc.shape != self.h_oc.shape:
            raise ValueError(f"H_cc {tuple(self.h_cc.shape)} and H_oc {tuple(self.h_oc.shape)} differ in shape")

    @classmethod
    def single_stream(cls, h: torch.Tensor) -> "GramStatistics":
        """X_c = X_o: all three are the same matrix."""
        return cls(h, h, h)

    def target_energy(self, weight: torch.Tensor) -> float:
        """‖W X_o‖² = tr(W H_oo Wᵀ) (m·n² flops); needs ``h_oo``."""
        if self.h_oo is None:
            raise ValueError("‖W X_o‖² needs h_oo or a measured target energy")
        w = weight.to(torch.float64)
        return float((w @ self.h_oo * w).sum())


@dataclass
class RefinementTarget:
    """W, its statistics and the preserved columns; precomputes G, H_rr and ‖Y‖².

    ``target_energy`` = ‖W X_o‖² per token when measured (see module docstring); otherwise computed
    from ``stats.h_oo``. ``whitening_factor`` is the whitening's lower-triangular Cholesky factor L
    (nothing preserved), with L Lᵀ = H_cc exactly: `adacomp` then iterates in whitened coordinates
    (module docstring). A damped factor has L Lᵀ = H_cc + ``whitening_shift``·I; the U-step
    and the objective stay exact with it (V H Vᵀ = Ṽ Ṽᵀ − shift·V Vᵀ), and V-steps are ridge steps of
    that shift. With a factor, H_cc itself is never read (``stats.h_cc`` may be None); nor without
    one, where U-steps refine a start whose V·H_cc·Vᵀ is known (`adacomp`'s ``down_gram``).
    ``cross_removed``: a part every W·H_oc below must lose — rows (Ỹ, X̃), subtracted as Ỹᵀ·X̃, or an
    m×n matrix (a fit split made from a writer's held-out tokens, `core.writer_heldout`). ``w_h_oc``:
    W·H_oc given outright (held-out moments' Σ y xᵀ), ``stats.h_oc`` then unread.
    """

    weight: torch.Tensor
    stats: GramStatistics
    kept: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    damping: float = 1e-6
    target_energy: float | None = None
    whitening_factor: torch.Tensor | None = None
    whitening_shift: float = 0.0
    cross_removed: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None
    w_h_oc: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # W stays in its own dtype: every product converts it a row block at a time (a float64 copy of
        # a 4096 × 11008 down_proj is 360 MB at the run's memory peak).
        w = self.weight
        n = w.shape[1]
        kept = self.kept.to(torch.long)
        mask = torch.ones(n, dtype=torch.bool)
        mask[kept] = False
        rest = mask.nonzero().squeeze(1)
        s = self.stats
        if self.w_h_oc is None:
            self.w_h_oc = s.w_h_oc
        self.rest = rest
        self.w_keep = w[:, kept].to(torch.float64)
        self._w = w
        self._g: torch.Tensor | None = None
        if s.h_cc is None and kept.numel():
            raise ValueError("without H_cc a refinement target cannot preserve columns")
        if kept.numel():
            self.h_rr = s.h_cc[rest][:, rest]
            w_hoc_kept = self._w_h_oc(kept)
            self._g = self._w_h_oc(rest) - self.w_keep @ s.h_cc[kept][:, rest]
        else:  # nothing preserved: the rest is everything, no n×n copies needed
            self.h_rr = s.h_cc
        if self.target_energy is None:
            self.target_energy = s.target_energy(w)
        y_norm = torch.tensor(self.target_energy, dtype=torch.float64)
        if kept.numel():
            y_norm = y_norm - 2 * (w_hoc_kept * self.w_keep).sum()
            y_norm = y_norm + (self.w_keep @ s.h_cc[kept][:, kept] * self.w_keep).sum()
        self.y_norm = float(y_norm)
        self._h_rr_chol: torch.Tensor | None = None
        self._g_solved: torch.Tensor | None = None
        self._g_whitened: torch.Tensor | None = None
        if self.whitening_factor is not None:
            if kept.numel():
                raise ValueError("whitened coordinates need the whole input: no preserved columns")
            if tuple(self.whitening_factor.shape) != (n, n):
                raise ValueError(f"whitening factor must be {n}×{n}, got {tuple(self.whitening_factor.shape)}")
            self.whitening_factor = self.whitening_factor.to(torch.float64)

    def _w_h_oc(self, columns: torch.Tensor | None = None) -> torch.Tensor:
        """W·H_oc (its ``columns``), less the removed part when there is one."""
        if self.w_h_oc is not None:
            product = self.w_h_oc if columns is None else self.w_h_oc[:, columns]
        else:
            product = times_converted(self._w, self.stats.h_oc if columns is None else self.stats.h_oc[:, columns])
        removed = self.cross_removed
        if isinstance(removed, torch.Tensor):
            product = product - (removed if columns is None else removed[:, columns])
        elif removed is not None:
            y, x = removed
            product = product - y.T @ (x if columns is None else x[:, columns]).to(product.dtype)
        return product

    @property
    def g(self) -> torch.Tensor:
        """G = Y X_restᵀ (m×n_rest); formed on first use (V-steps, kept columns)."""
        if self._g is None:
            self._g = self._w_h_oc()
        return self._g

    def g_times(self, right: torch.Tensor) -> torch.Tensor:
        """G·R. Without G formed and nothing preserved, W·(H_oc·R): n²·k + m·n·k flops instead of m·n²
        — the closed-form update (one U-step, R = Vᵀ with k = r < m) never forms G at all (removed
        rows: minus Ỹᵀ·(X̃·R), N_v·k·(n + m) more)."""
        if self._g is None:
            product = (self.w_h_oc @ right if self.w_h_oc is not None
                       else times_converted(self._w, self.stats.h_oc @ right))
            removed = self.cross_removed
            if isinstance(removed, torch.Tensor):
                product -= removed @ right
            elif removed is not None:
                y, x = removed
                product -= y.T @ (x.to(right.dtype) @ right)
            return product
        return self._g @ right

    @property
    def g_solved(self) -> torch.Tensor:
        """G·H_rr⁻¹ (m×n_rest, damped), the V-step's right-hand side, which no iteration changes.

        Solving it once (2·m·n² flops) makes every later V-step one r·m·n product instead of a product
        plus an r-column triangular solve pair against the n×n factor (2·r·n² more per iteration).
        """
        if self._g_solved is None:
            self._g_solved = torch.cholesky_solve(self.g.T, self.h_rr_chol).T
        return self._g_solved

    def plain_h(self) -> torch.Tensor:
        """H_rr, for products in the model's coordinates; a clear error where it was released.

        H_cc may be released without a whitening factor standing in when only a start whose V·H·Vᵀ is
        known is refined by U-steps (`adacomp` with ``down_gram``): every other product needs it.
        """
        if self.h_rr is None:
            raise ValueError("this product needs H_cc (or the whitening factor), which was released")
        return self.h_rr

    @property
    def h_rr_chol(self) -> torch.Tensor:
        """Damped Cholesky of H_rr for the V-step's solve (H_rr may be singular: dead channels).

        Computed on first use: the closed-form refinement (U-steps only) never needs this n³ factor.
        """
        if self._h_rr_chol is None:
            if self.h_rr is None:
                raise ValueError("V-steps in the model's coordinates need H_cc, which was released")
            scale = float(self.h_rr.diagonal().mean().clamp_min(1e-30))
            for factor in (self.damping, 1e-4, 1e-2):  # H_rr is restored after each attempt
                chol, info = shifted_cholesky(self.h_rr, factor * scale)
                if int(info) == 0:
                    break
            self._h_rr_chol = chol
        return self._h_rr_chol

    @property
    def factor(self) -> torch.Tensor:
        """L with L Lᵀ = H_rr: the given whitening factor (exact), else the damped `h_rr_chol`."""
        return self.whitening_factor if self.whitening_factor is not None else self.h_rr_chol

    @property
    def g_whitened(self) -> torch.Tensor:
        """G̃ = G L⁻ᵀ (m×n), the whitened V-step's right-hand side: one triangular solve (m·n²).

        G itself is not kept when nothing forced it earlier: every later product uses G̃.
        """
        if self._g_whitened is None:
            g = self._g if self._g is not None else self._w_h_oc()
            self._g_whitened = torch.linalg.solve_triangular(self.factor.T, g, upper=True, left=False)
        return self._g_whitened

    def whiten(self, down: torch.Tensor) -> torch.Tensor:
        """Ṽ = V L (r·n² flops)."""
        return down @ self.factor

    def unwhiten(self, whitened: torch.Tensor) -> torch.Tensor:
        """V = Ṽ L⁻¹ by triangular solve."""
        return torch.linalg.solve_triangular(self.factor, whitened, upper=False, left=False)


@dataclass
class _DownProducts:
    """Products of the objective and the U-step that depend only on V (= ``down``).

    For a fixed V, f(·, V) and the U-step need V·H_rr·Vᵀ (r×r) and G·Vᵀ (m×r); computing them once
    per V instead of once per use saves two r·n² and two m·n·r products per adaComp iteration.
    In whitened coordinates (``whitened`` = Ṽ = V L) they are Ṽ·Ṽᵀ (r²·n) and G̃·Ṽᵀ = G·Vᵀ, and
    ``down`` is only known where it was given (the start); it is recovered from Ṽ once at the end.
    """

    down: torch.Tensor | None
    vhv: torch.Tensor  # V H_rr Vᵀ
    gv: torch.Tensor  # G Vᵀ
    whitened: torch.Tensor | None = None

    @classmethod
    def of(cls, target: "RefinementTarget", down: torch.Tensor) -> "_DownProducts":
        return cls(down, (down @ target.plain_h()) @ down.T, target.g_times(down.T))

    @classmethod
    def of_whitened(
        cls, target: "RefinementTarget", whitened: torch.Tensor, down: torch.Tensor | None = None
    ) -> "_DownProducts":
        # G·Vᵀ without G̃ when V is known and G̃ is not formed yet (the closed-form update never forms it).
        if down is not None and target._g_whitened is None:
            gv = target.g_times(down.T)
        else:
            gv = target.g_whitened @ whitened.T
        vhv = whitened @ whitened.T
        if target.whitening_shift:  # L Lᵀ = H + shift·I
            if down is None:
                raise ValueError("a damped factor needs V itself for V H Vᵀ")
            vhv = vhv - target.whitening_shift * (down @ down.T)
        return cls(down, vhv, gv, whitened)

    def plain_down(self, target: "RefinementTarget") -> torch.Tensor:
        """V in the model's coordinates (one triangular solve when only Ṽ is known)."""
        if self.down is None:
            self.down = target.unwhiten(self.whitened)
        return self.down

    def objective(self, target: "RefinementTarget", up: torch.Tensor) -> float:
        """f(U, V) = tr((UᵀU)(V H Vᵀ)) − 2 tr(Uᵀ G Vᵀ) + ‖Y‖²."""
        return float(((up.T @ up) * self.vhv).sum() - 2 * (self.gv * up).sum()) + target.y_norm

    def u_step(self) -> torch.Tensor:
        return _solve_right(self.vhv, self.gv)


@contextmanager
def complement(whole: GramStatistics, tokens: int, part: GramStatistics, part_tokens: int) -> Iterator[GramStatistics]:
    """``whole`` turned, in place and for the ``with`` body, into the mean Grams of the tokens *not* in
    ``part``: (N·H − N_p·H_p) / (N − N_p), for H_cc and H_oc; restored on exit.

    Both inputs are means over their tokens (finalized statistics), ``part`` a subset of ``whole``.
    In place because a copy is two more n×n float64 matrices at a run's memory peak (the widest
    input's validation: 1.9 GB at width 11008). The round trip changes ``whole`` by a few float64
    ulps of (N/(N − N_p))·|H| per entry. Nothing may read ``whole`` as the whole inside the block.
    """
    if not 0 < part_tokens < tokens:
        raise ValueError(f"a part of {part_tokens} tokens out of {tokens} leaves nothing to fit on")
    rest = tokens - part_tokens
    pairs = [(whole.h_cc, part.h_cc)] + ([] if whole.h_oc is whole.h_cc else [(whole.cross, part.cross)])
    for mine, theirs in pairs:
        mine.mul_(tokens / rest).sub_(theirs, alpha=part_tokens / rest)
    try:
        yield whole
    finally:
        for mine, theirs in pairs:
            mine.mul_(rest / tokens).add_(theirs, alpha=part_tokens / tokens)


def objective(target: RefinementTarget, up: torch.Tensor, down: torch.Tensor) -> float:
    """f(U, V) = ‖U V X_rest − Y‖²_F (per token, as the Grams are means).

    Evaluated in factored form, tr((UᵀU)(V H Vᵀ)) − 2 tr(Uᵀ G Vᵀ) + ‖Y‖²: r·n² + m·n·r flops instead of
    forming the m×n product and multiplying it by H (m·n² + m·n·r) — the dense form costs m/r times more.
    """
    if target.h_rr is None and target.whitening_factor is not None:  # H released: the factor stands in for it
        return _DownProducts.of_whitened(target, target.whiten(down), down).objective(target, up)
    return _DownProducts.of(target, down).objective(target, up)


def u_step(target: RefinementTarget, down: torch.Tensor) -> torch.Tensor:
    """Least-squares U for fixed V: G Vᵀ (V H_rr Vᵀ)⁻¹."""
    return _DownProducts.of(target, down).u_step()


def v_step(target: RefinementTarget, up: torch.Tensor) -> torch.Tensor:
    """Least-squares V for fixed U: (UᵀU)⁻¹ Uᵀ (G H_rr⁻¹), with G H_rr⁻¹ solved once per target."""
    return _solve_left(up.T @ up, up.T @ target.g_solved)


def _solve_right(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B·A⁻¹ for symmetric positive (semi)definite A, with a least-squares fallback."""
    return _solve_left(a, b.T).T


def _solve_left(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with lapack_threads():  # decompositions run with the run's decomposition thread count (.linalg)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(b, chol)
        return torch.linalg.lstsq(a, b).solution


def adacomp(
    target: RefinementTarget,
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    iterations: int = 10,
    tolerance: float = 1e-4,
    v_steps: bool = True,
    whitened_down: torch.Tensor | None = None,
    max_half_steps: int | None = None,
    observe: Callable[[torch.Tensor, Callable[[], torch.Tensor]], bool] | None = None,
    down_gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Alternate U- and V-steps (``v_steps=False``: a single U-step, SVD-LLM's closed-form update).

    Returns the refined factors and the objective after each accepted step (first entry: the start).
    Stops early when a full iteration improves f by less than ``tolerance`` (relative), after
    ``max_half_steps`` accepted steps (U- and V-steps count one each; 0 returns the start), or when
    ``observe(U, V)`` — called at the start and after every accepted step, V as a thunk since in
    whitened coordinates it costs a triangular solve — returns False. The V-dependent products are
    computed once per V and shared by the objective and the next U-step. A target with a whitening
    factor is iterated in whitened coordinates; ``whitened_down`` (= ``down``·L, which the whitened SVD
    produces anyway) saves the r·n² product that would compute it; so does ``down_gram`` (= V·H_rr·Vᵀ
    of the start, where its factorization knows it: `LowRankFactors.down_gram`) in the model's
    coordinates.
    """
    up, down = up.to(torch.float64), down.to(torch.float64)
    # With a damped factor (L Lᵀ = H + s·I) the whitened V-step is the ridge step of shift s; the
    # objective stays exact (`_DownProducts.of_whitened`), so a step is only taken where f falls.
    whitened = target.whitening_factor is not None
    if whitened:
        start = whitened_down.to(torch.float64) if whitened_down is not None else target.whiten(down)
        products = _DownProducts.of_whitened(target, start, down)
    elif down_gram is not None:
        products = _DownProducts(down, down_gram.to(torch.float64), target.g_times(down.T))
    else:
        products = _DownProducts.of(target, down)
    history = [products.objective(target, up)]
    limit = max_half_steps if max_half_steps is not None else 2 * max(1, iterations)

    def accept(value: float) -> bool:
        # Reject a step that does not help (round-off, damping) — f must never increase.
        return bool(torch.isfinite(torch.tensor(value))) and value <= history[-1]

    def go_on(up: torch.Tensor, products: _DownProducts) -> bool:
        if len(history) - 1 >= limit:
            return False
        return observe is None or bool(observe(up, lambda: products.plain_down(target)))

    if not go_on(up, products):
        return up, products.plain_down(target), history

    def next_products(up: torch.Tensor) -> _DownProducts:
        if whitened:  # Ṽ = (UᵀU)⁻¹ Uᵀ G̃; V itself (one triangular solve) where the damping needs V·Vᵀ
            new = _solve_left(up.T @ up, up.T @ target.g_whitened)
            return _DownProducts.of_whitened(target, new, target.unwhiten(new) if target.whitening_shift else None)
        return _DownProducts.of(target, v_step(target, up))

    for _ in range(max(1, iterations) if v_steps else 1):
        start_value = history[-1]
        new_up = products.u_step()
        value = products.objective(target, new_up)
        if not accept(value):
            break
        up = new_up
        history.append(value)
        if not go_on(up, products):
            break
        if v_steps:
            new_products = next_products(up)
            value = new_products.objective(target, up)
            if not accept(value):
                break
            products = new_products
            history.append(value)
            if not go_on(up, products):
                break
        if start_value - history[-1] <= tolerance * max(abs(start_value), 1e-30):
            break
    return up, products.plain_down(target), history


def validated_steps(
    fit: RefinementTarget,
    heldout: RefinementTarget | Callable[[torch.Tensor, torch.Tensor], float],
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    iterations: int = 10,
    tolerance: float = 1e-4,
    v_steps: bool = True,
    guard: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    down_gram: torch.Tensor | None = None,
) -> tuple[int, list[float]]:
    """How many half-steps of the alternation to run: the count that scores best on held-out tokens.

    Runs `adacomp` on ``fit`` (the statistics without the held-out sequences) from the start (U, V)
    and evaluates the held-out objective (``heldout``: its Grams, or a function of (U, V) such as a
    writer's weighted held-out error, `core.writer_heldout`) at the start and after every accepted
    half-step, stopping at the first rise (early stopping: past it the steps fit what the held-out text does not share).
    ``guard(U, V)``, when given, is a second held-out error (a residual writer's plain output error,
    `core.plain_guard`): only counts whose guard value is not above the start's are candidates, so a
    step must help on both measures. Returns (best count, held-out objectives per half-step). The
    count is then run on all tokens. ``down_gram``: the start's V·H_rr·Vᵀ on ``fit``, when known.
    """
    scores: list[float] = []
    guarded: list[float] = []

    def observe(u: torch.Tensor, v: Callable[[], torch.Tensor]) -> bool:
        down = v()
        scores.append(heldout(u, down) if callable(heldout) else objective(heldout, u, down))
        if guard is not None:
            guarded.append(guard(u, down))
        return len(scores) < 2 or scores[-1] <= scores[-2]

    adacomp(fit, up, down, iterations=iterations, tolerance=tolerance, v_steps=v_steps, observe=observe,
            down_gram=down_gram)
    allowed = [k for k in range(len(scores)) if guard is None or guarded[k] <= guarded[0]]
    best = min(allowed, key=lambda k: (scores[k], k))
    return best, scores


def optimal_factors(
    target: RefinementTarget, rank: int, *, driver: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The rank-``rank`` U·V minimising f = ‖U V X_rest − Y‖², in closed form (module docstring).

    Truncated SVD of G̃ = G L⁻ᵀ, split √Σ on both sides: U = P√Σ, V = √Σ Qᵀ L⁻¹. This is the limit
    adaComp's alternation approaches from its start, computed with one decomposition of an m×n matrix.
    With the exact factor the objective is ‖Y‖² − Σ_{i≤r} σᵢ²; with a damped one (singular H_rr,
    L Lᵀ = H_rr + s·I) the minimiser is that of the damped objective f + s‖U V‖², and f = ‖Y‖² −
    Σ_{i≤r} σᵢ² − s‖U V‖² (or, for the damped `h_rr_chol`, evaluated in the model's coordinates).
    Returns (U, V, f).
    """
    m, n = target.weight.shape[0], target.rest.numel()
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} outside [1, {min(m, n)}] for a {m}×{n} target")
    whitened = factorize(target.g_whitened, rank, driver=driver)  # G̃ ≈ P√Σ · √Σ Qᵀ
    up, down = whitened.up, target.unwhiten(whitened.down)
    s = whitened.singular_values
    if target.whitening_factor is not None:
        value = target.y_norm - float(s[:rank].square().sum())
        if target.whitening_shift:
            value -= target.whitening_shift * float(((up.T @ up) * (down @ down.T)).sum())
    else:
        value = objective(target, up, down)
    return up, down, max(value, 0.0)


def balance_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same product U·V, with the singular values split as √Σ on both sides (well-conditioned factors).

    The scalings are in place: each product is a new m×r / r×n matrix already (158 MB for the r×n one
    of a 4096 × 11008 down_proj at 40 %); a scaled copy would be one more.
    """
    with lapack_threads():
        q_u, r_u = torch.linalg.qr(up)
        q_v, r_v = torch.linalg.qr(down.T)
        p, s, qh = torch.linalg.svd(r_u @ r_v.T)
    del r_u, r_v
    root = s.sqrt()
    new_up = (q_u @ p).mul_(root)
    del q_u
    return new_up, (qh @ q_v.T).mul_(root[:, None])
