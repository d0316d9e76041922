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


def test_adacomp_with_a_damped_factor_takes_ridge_v_steps_without_h():
    """Fewer tokens than features: H_cc is singular and the whitening's factor is damped (L Lᵀ = H + s·I).
    adaComp then iterates in whitened coordinates without reading H_cc (released here), its V-step is
    the ridge step (UᵀU)⁻¹ Uᵀ G (H + s·I)⁻¹, and every objective it records is the exact f on the tokens."""
    w, x_o, x_c, stats = _streams(m=12, n=16, tokens=10)
    whitening = compute_whitening(stats.h_cc.clone(), damping=1e-3)
    assert whitening.kind == "damped-cholesky" and whitening.shift > 0
    f = factorize(w, 4, whitening)
    full = RefinementTarget(w, stats)
    released = RefinementTarget(w, GramStatistics(h_cc=None, h_oc=stats.h_oc), target_energy=full.target_energy,
                                whitening_factor=whitening.factor, whitening_shift=whitening.shift)
    up, down, history = adacomp(released, f.up, f.down, iterations=1, tolerance=0.0, whitened_down=f.whitened_down)
    assert len(history) == 3  # the U-step and the V-step both lowered f
    u1 = u_step(full, f.down)
    ridge = stats.h_cc + whitening.shift * torch.eye(16, dtype=torch.float64)
    g = w @ stats.h_oc
    v1 = torch.linalg.solve(u1.T @ u1, u1.T @ g @ torch.linalg.inv(ridge))
    torch.testing.assert_close(up, u1, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(down, v1, rtol=1e-6, atol=1e-9)
    explicit = [float(torch.linalg.norm(a @ b @ x_c - w @ x_o) ** 2 / x_o.shape[1])
                for a, b in ((f.up, f.down), (u1, f.down), (u1, v1))]
    assert history == pytest.approx(explicit, rel=1e-7)


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


def test_complement_is_the_grams_of_the_tokens_left():
    from adasvd_lightning.core.refinement import complement

    _, x_o, x_c, whole = _streams(tokens=300)
    part = GramStatistics(h_cc=x_c[:, :70] @ x_c[:, :70].T / 70, h_oc=x_o[:, :70] @ x_c[:, :70].T / 70)
    before = GramStatistics(h_cc=whole.h_cc.clone(), h_oc=whole.h_oc.clone())
    with complement(whole, 300, part, 70) as rest:
        assert rest.h_cc is whole.h_cc and rest.h_oc is whole.h_oc  # in place: no n×n copies
        assert torch.allclose(rest.h_cc, x_c[:, 70:] @ x_c[:, 70:].T / 230, atol=1e-12)
        assert torch.allclose(rest.h_oc, x_o[:, 70:] @ x_c[:, 70:].T / 230, atol=1e-12)
    torch.testing.assert_close(whole.h_cc, before.h_cc, rtol=1e-14, atol=1e-14)  # restored on exit
    torch.testing.assert_close(whole.h_oc, before.h_oc, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="nothing to fit"), complement(whole, 300, part, 300):
        pass


def _split_targets(w, x_o, x_c, held: int, rank: int):
    """Fit target (first tokens), held-out target (last ``held`` tokens) and the start fitted without them."""
    fit_o, fit_c, val_o, val_c = x_o[:, :-held], x_c[:, :-held], x_o[:, -held:], x_c[:, -held:]

    def target(xo, xc):
        n = xo.shape[1]
        return RefinementTarget(w, GramStatistics(h_cc=xc @ xc.T / n, h_oc=xo @ xc.T / n, h_oo=xo @ xo.T / n))

    fit, val = target(fit_o, fit_c), target(val_o, val_c)
    start = factorize(w, rank, compute_whitening(fit.h_rr))
    return fit, val, start


def _error_on(w, up, down, x_o, x_c) -> float:
    return float(torch.linalg.norm(up @ down @ x_c - w @ x_o) / torch.linalg.norm(w @ x_o))


def test_validated_steps_take_the_compensation_when_the_drift_is_systematic():
    """The compressed prefix distorts its inputs by a fixed linear map: compensation generalises, so the
    held-out sequences choose to take the steps (U-step alone and the alternation)."""
    from adasvd_lightning.core.refinement import validated_steps

    w, x_o, x_c, _ = _streams(tokens=2000, mismatch=0.4)
    fit, val, start = _split_targets(w, x_o, x_c, held=500, rank=5)
    best_u, scores_u = validated_steps(fit, val, start.up, start.down, v_steps=False)
    assert best_u == 1 and scores_u[1] < 0.9 * scores_u[0]
    best, scores = validated_steps(fit, val, start.up, start.down, v_steps=True)
    assert best >= 2 and scores[best] < scores_u[1]


def test_validated_steps_refuse_a_compensation_that_does_not_generalise():
    """The compressed stream's drift is noise in the inputs' own subspace, independent per token, and
    there are about as many fitted tokens as input features: every step lowers the error on the tokens
    it was fitted to but raises it on new text. Unvalidated, adaComp ends far worse on fresh tokens
    than its start; validated on 20 held-out tokens, it keeps the start."""
    from adasvd_lightning.core.refinement import validated_steps

    g = torch.Generator().manual_seed(0)
    m, n = 32, 24
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)

    def stream(count):
        x_o = mix @ torch.randn(n, count, generator=g, dtype=torch.float64)
        return x_o, x_o + 0.2 * (mix @ torch.randn(n, count, generator=g, dtype=torch.float64))

    x_o, x_c = stream(28 + 20)
    fresh_o, fresh_c = stream(4000)
    fit, val, start = _split_targets(w, x_o, x_c, held=20, rank=8)
    up, down, history = adacomp(fit, start.up, start.down, iterations=10)
    assert history[-1] < 0.9 * history[0]  # the fitted tokens: much better
    start_fresh = _error_on(w, start.up, start.down, fresh_o, fresh_c)
    assert _error_on(w, up, down, fresh_o, fresh_c) > 1.3 * start_fresh  # new text: much worse
    best, scores = validated_steps(fit, val, start.up, start.down)
    assert best == 0 and scores[1] > scores[0]
    up, down, _ = adacomp(fit, start.up, start.down, iterations=10, max_half_steps=best)
    assert _error_on(w, up, down, fresh_o, fresh_c) == pytest.approx(start_fresh, rel=1e-9)


def test_adacomp_stops_after_max_half_steps():
    w, _, _, stats = _streams()
    target = RefinementTarget(w, stats)
    f = factorize(w, 5, compute_whitening(stats.h_cc))
    for steps in (0, 1, 3):
        up, down, history = adacomp(target, f.up, f.down, iterations=10, tolerance=0.0, max_half_steps=steps)
        assert len(history) - 1 == steps
    up, down, _ = adacomp(target, f.up, f.down, max_half_steps=0)
    assert torch.equal(up, f.up.double()) and torch.allclose(down, f.down.double())
