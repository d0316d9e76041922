"""adaComp / closed-form refinement in Gram form, against explicit token matrices."""

import pytest
import torch

from adasvd_lightning.core.factorization import factorize
from adasvd_lightning.core.refinement import (
    GramStatistics,
    RefinementTarget,
    adacomp,
    balance_factors,
    objective,
    u_step,
)
from adasvd_lightning.core.whitening import compute_whitening


def _streams(m=24, n=16, tokens=300, mismatch=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, n, dtype=torch.float64)
    x_o = mix @ torch.randn(n, tokens, generator=g, dtype=torch.float64)
    # The compressed prefix delivers a distorted version of the dense inputs.
    x_c = x_o + mismatch * (torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5) @ x_o
    stats = GramStatistics(h_cc=x_c @ x_c.T / tokens, h_oc=x_o @ x_c.T / tokens, h_oo=x_o @ x_o.T / tokens)
    return w, x_o, x_c, stats


def test_gram_objective_equals_explicit_error():
    w, x_o, x_c, stats = _streams()
    target = RefinementTarget(w, stats)
    f = factorize(w, 5, compute_whitening(stats.h_cc))
    explicit = float(torch.linalg.norm(f.up @ f.down @ x_c - w @ x_o) ** 2 / x_o.shape[1])
    assert objective(target, f.up, f.down) == pytest.approx(explicit, rel=1e-9)


def test_gram_objective_with_preserved_columns_equals_explicit_error():
    w, x_o, x_c, stats = _streams()
    kept = torch.tensor([2, 7, 11])
    rest = torch.tensor([i for i in range(16) if i not in (2, 7, 11)])
    target = RefinementTarget(w, stats, kept=kept)
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(24, 4, generator=g, dtype=torch.float64), torch.randn(4, 13, generator=g, dtype=torch.float64)
    approx = up @ down @ x_c[rest] + w[:, kept] @ x_c[kept]
    explicit = float(torch.linalg.norm(approx - w @ x_o) ** 2 / x_o.shape[1])
    assert objective(target, up, down) == pytest.approx(explicit, rel=1e-9)


def test_u_step_is_the_least_squares_solution():
    w, x_o, x_c, stats = _streams()
    target = RefinementTarget(w, stats, damping=0.0)
    down = factorize(w, 6, compute_whitening(stats.h_cc)).down
    # min_U ‖U (V X_c) − W X_o‖  ⇔  (V X_c)ᵀ Uᵀ ≈ (W X_o)ᵀ
    expected = torch.linalg.lstsq((down @ x_c).T, (w @ x_o).T).solution.T
    assert torch.allclose(u_step(target, down), expected, atol=1e-8)


@pytest.mark.parametrize("seed", range(4))
def test_adacomp_never_increases_the_objective_and_improves_on_mismatch(seed):
    w, x_o, x_c, stats = _streams(seed=seed)
    target = RefinementTarget(w, stats)
    f = factorize(w, 5, compute_whitening(stats.h_cc))
    up, down, history = adacomp(target, f.up, f.down, iterations=20, tolerance=0.0)
    assert all(b <= a + 1e-12 * abs(a) for a, b in zip(history, history[1:]))
    assert objective(target, up, down) == pytest.approx(history[-1])
    assert history[-1] < 0.95 * history[0]  # the mismatch leaves real room to improve


def test_adacomp_cannot_improve_the_whitened_optimum_without_mismatch():
    w, x_o, _, _ = _streams()
    h = x_o @ x_o.T / x_o.shape[1]
    target = RefinementTarget(w, GramStatistics.single_stream(h), damping=0.0)
    f = factorize(w, 5, compute_whitening(h))
    _, _, history = adacomp(target, f.up, f.down, iterations=10, tolerance=0.0)
    assert history[-1] == pytest.approx(history[0], rel=1e-8)


def test_closed_form_is_one_u_step():
    w, _, _, stats = _streams()
    target = RefinementTarget(w, stats)
    f = factorize(w, 5, compute_whitening(stats.h_cc))
    up, down, history = adacomp(target, f.up, f.down, v_steps=False)
    assert len(history) == 2 and torch.equal(down, f.down)
    assert torch.allclose(up, u_step(target, f.down))


def test_balance_factors_keeps_the_product():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(10, 3, generator=g, dtype=torch.float64) * 100, torch.randn(3, 8, generator=g, dtype=torch.float64)
    bu, bd = balance_factors(up, down)
    assert torch.allclose(bu @ bd, up @ down, atol=1e-9)
    assert torch.allclose(bu.norm(dim=0), bd.norm(dim=1))
