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
* adaComp (AdaSVD) alternates them. Each step minimises f exactly in its block, so f never increases;
  a step that would increase it through round-off or damping is rejected and the iteration stops.
  If X_c = X_o and the start is the whitened optimum, nothing can improve: the gain comes from the
  mismatch between the compressed prefix's inputs and the dense targets (or from a worse start).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["GramStatistics", "RefinementTarget", "objective", "u_step", "v_step", "adacomp", "balance_factors"]


@dataclass
class GramStatistics:
    """Gram matrices of one linear input (float64, already divided by the token count).

    ``h_oo`` is optional: it only serves ‖W X_o‖², which the pipeline takes from the dense outputs.
    """

    h_cc: torch.Tensor
    h_oc: torch.Tensor
    h_oo: torch.Tensor | None = None

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
    from ``stats.h_oo``.
    """

    weight: torch.Tensor
    stats: GramStatistics
    kept: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    damping: float = 1e-6
    target_energy: float | None = None

    def __post_init__(self) -> None:
        w = self.weight.to(torch.float64)
        n = w.shape[1]
        kept = self.kept.to(torch.long)
        mask = torch.ones(n, dtype=torch.bool)
        mask[kept] = False
        rest = mask.nonzero().squeeze(1)
        s = self.stats
        self.rest = rest
        self.w_keep = w[:, kept]
        self._w = w
        self._g: torch.Tensor | None = None
        if kept.numel():
            self.h_rr = s.h_cc[rest][:, rest]
            w_hoc_kept = w @ s.h_oc[:, kept]
            self._g = w @ s.h_oc[:, rest] - self.w_keep @ s.h_cc[kept][:, rest]
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

    @property
    def g(self) -> torch.Tensor:
        """G = Y X_restᵀ (m×n_rest); formed on first use (V-steps, kept columns)."""
        if self._g is None:
            self._g = self._w @ self.stats.h_oc
        return self._g

    def g_times(self, right: torch.Tensor) -> torch.Tensor:
        """G·R. Without G formed and nothing preserved, W·(H_oc·R): n²·k + m·n·k flops instead of m·n²
        — the closed-form update (one U-step, R = Vᵀ with k = r < m) never forms G at all."""
        if self._g is None:
            return self._w @ (self.stats.h_oc @ right)
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

    @property
    def h_rr_chol(self) -> torch.Tensor:
        """Damped Cholesky of H_rr for the V-step's solve (H_rr may be singular: dead channels).

        Computed on first use: the closed-form refinement (U-steps only) never needs this n³ factor.
        """
        if self._h_rr_chol is None:
            scale = float(self.h_rr.diagonal().mean().clamp_min(1e-30))
            eye = torch.eye(self.h_rr.shape[0], dtype=torch.float64, device=self.h_rr.device)
            for factor in (self.damping, 1e-4, 1e-2):
                chol, info = torch.linalg.cholesky_ex(self.h_rr + factor * scale * eye)
                if int(info) == 0:
                    break
            self._h_rr_chol = chol
        return self._h_rr_chol


@dataclass
class _DownProducts:
    """Products of the objective and the U-step that depend only on V (= ``down``).

    For a fixed V, f(·, V) and the U-step need V·H_rr·Vᵀ (r×r) and G·Vᵀ (m×r); computing them once
    per V instead of once per use saves two r·n² and two m·n·r products per adaComp iteration.
    """

    down: torch.Tensor
    vhv: torch.Tensor  # V H_rr Vᵀ
    gv: torch.Tensor  # G Vᵀ

    @classmethod
    def of(cls, target: "RefinementTarget", down: torch.Tensor) -> "_DownProducts":
        return cls(down, (down @ target.h_rr) @ down.T, target.g_times(down.T))

    def objective(self, target: "RefinementTarget", up: torch.Tensor) -> float:
        """f(U, V) = tr((UᵀU)(V H Vᵀ)) − 2 tr(Uᵀ G Vᵀ) + ‖Y‖²."""
        return float(((up.T @ up) * self.vhv).sum() - 2 * (self.gv * up).sum()) + target.y_norm

    def u_step(self) -> torch.Tensor:
        return _solve_right(self.vhv, self.gv)


def objective(target: RefinementTarget, up: torch.Tensor, down: torch.Tensor) -> float:
    """f(U, V) = ‖U V X_rest − Y‖²_F (per token, as the Grams are means).

    Evaluated in factored form, tr((UᵀU)(V H Vᵀ)) − 2 tr(Uᵀ G Vᵀ) + ‖Y‖²: r·n² + m·n·r flops instead of
    forming the m×n product and multiplying it by H (m·n² + m·n·r) — the dense form costs m/r times more.
    """
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
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Alternate U- and V-steps (``v_steps=False``: a single U-step, SVD-LLM's closed-form update).

    Returns the refined factors and the objective after each accepted step (first entry: the start).
    Stops early when a full iteration improves f by less than ``tolerance`` (relative). The V-dependent
    products are computed once per V and shared by the objective and the next U-step.
    """
    up, down = up.to(torch.float64), down.to(torch.float64)
    products = _DownProducts.of(target, down)
    history = [products.objective(target, up)]

    def accept(value: float) -> bool:
        # Reject a step that does not help (round-off, damping) — f must never increase.
        return bool(torch.isfinite(torch.tensor(value))) and value <= history[-1]

    for _ in range(max(1, iterations) if v_steps else 1):
        start = history[-1]
        new_up = products.u_step()
        value = products.objective(target, new_up)
        if not accept(value):
            return up, down, history
        up = new_up
        history.append(value)
        if v_steps:
            new_products = _DownProducts.of(target, v_step(target, up))
            value = new_products.objective(target, up)
            if not accept(value):
                return up, down, history
            products, down = new_products, new_products.down
            history.append(value)
        if start - history[-1] <= tolerance * max(abs(start), 1e-30):
            break
    return up, down, history


def balance_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same product U·V, with the singular values split as √Σ on both sides (well-conditioned factors)."""
    q_u, r_u = torch.linalg.qr(up)
    q_v, r_v = torch.linalg.qr(down.T)
    p, s, qh = torch.linalg.svd(r_u @ r_v.T)
    root = s.sqrt()
    return (q_u @ p) * root, root[:, None] * (qh @ q_v.T)
