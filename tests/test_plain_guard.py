"""The plain held-out guard of a residual writer's compensation (`core.plain_guard`).

The case it exists for, in miniature: a writer whose ordinary tokens drift systematically between the
dense and the compressed stream, plus one "sink" token per sequence with a residual far larger than
the rest and no drift. On the residual's scale (each token weighted by 1 / ms of its residual) the
sink hardly counts, so the compensating U-step learns the ordinary tokens' drift and applies it to the
sink too: the weighted held-out error falls, the plain one — which the sink dominates, as it
dominates what later attention layers read — rises many-fold. The guard refuses that step.
"""

from __future__ import annotations

import pytest
import torch

from adasvd_lightning.core.factorization import factorize
from adasvd_lightning.core.plain_guard import PlainHeldoutError
from adasvd_lightning.core.refinement import GramStatistics, RefinementTarget, validated_steps
from adasvd_lightning.core.whitening import compute_whitening

N_FEATURES, RANK, SINK_SCALE = 12, 4, 300.0


def _sequences(count: int, seed: int, tokens: int = 32):
    """(x_o, x_c, weight) rows of ``count`` sequences: token 0 of each is the sink."""
    d = torch.Generator().manual_seed(0)  # one drift for every draw: it is the model's, not the text's
    drift = torch.eye(N_FEATURES, dtype=torch.float64) + 0.6 * torch.randn(N_FEATURES, N_FEATURES, generator=d,
                                                                            dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    rows_o, rows_c, weights = [], [], []
    for _ in range(count):
        x_c = torch.randn(tokens, N_FEATURES, generator=g, dtype=torch.float64) @ torch.diag(
            torch.linspace(2.0, 0.2, N_FEATURES, dtype=torch.float64))
        x_o = x_c @ drift.T  # systematic drift on ordinary tokens
        sink = SINK_SCALE * torch.randn(N_FEATURES, generator=g, dtype=torch.float64)
        x_c[0], x_o[0] = sink, sink  # the sink is the same in both streams
        w = torch.ones(tokens, dtype=torch.float64)
        w[0] = 1.0 / SINK_SCALE**2  # 1 / ms(residual): the sink counts like an ordinary token
        rows_o.append(x_o), rows_c.append(x_c), weights.append(w)
    return torch.cat(rows_o), torch.cat(rows_c), torch.cat(weights)


def _target(weight: torch.Tensor, x_o: torch.Tensor, x_c: torch.Tensor, w: torch.Tensor) -> RefinementTarget:
    """The writer's refinement target on the residual's scale (weighted means), as the pipeline forms it."""
    s = w.sqrt()[:, None]
    xo, xc = x_o * s, x_c * s
    n = x_o.shape[0]
    stats = GramStatistics(h_cc=xc.T @ xc / n, h_oc=xo.T @ xc / n)
    return RefinementTarget(weight, stats, target_energy=float((xo @ weight.T).square().sum()) / n)


def _case():
    weight = torch.randn(N_FEATURES, N_FEATURES, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fit_o, fit_c, fit_w = _sequences(12, seed=1)
    held_o, held_c, held_w = _sequences(4, seed=2)
    fit, held = _target(weight, fit_o, fit_c, fit_w), _target(weight, held_o, held_c, held_w)
    start = factorize(weight, RANK, compute_whitening(fit.h_rr))
    guard = PlainHeldoutError(weight, held_c.float(), (held_o @ weight.T).float())
    return fit, held, start, guard


def test_a_step_that_gives_up_the_sink_validates_on_the_residual_scale_but_the_guard_refuses_it():
    fit, held, start, guard = _case()
    best, scores = validated_steps(fit, held, start.up, start.down, v_steps=False)
    assert best == 1 and scores[1] < 0.8 * scores[0]  # the weighted held-out error alone takes the step
    best, scores = validated_steps(fit, held, start.up, start.down, v_steps=False, guard=guard)
    assert len(guard.values) == 2 and guard.values[1] > 4 * guard.values[0]  # ... which ruins the sink
    assert best == 0


def test_a_step_that_helps_both_measures_is_kept():
    fit, held, start, _ = _case()
    weight = fit.weight
    # Without the sink the plain and the weighted errors agree: the guard lets the step through.
    held_o, held_c, _ = _sequences(4, seed=2)
    ordinary = torch.arange(held_c.shape[0]) % 32 != 0
    guard = PlainHeldoutError(weight, held_c[ordinary].float(), (held_o[ordinary] @ weight.T).float())
    best, _ = validated_steps(fit, held, start.up, start.down, v_steps=False, guard=guard)
    assert best == 1 and guard.values[1] < guard.values[0]


def test_plain_error_matches_the_dense_computation_with_preserved_columns():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 10, generator=g, dtype=torch.float64)
    x = torch.randn(2500, 10, generator=g)  # more rows than one scoring chunk
    y = x.double() @ weight.T + 0.1 * torch.randn(2500, 6, generator=g, dtype=torch.float64)
    kept = torch.tensor([2, 7])
    rest = torch.tensor([i for i in range(10) if i not in (2, 7)])
    up, down = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    guard = PlainHeldoutError(weight, x, y.float(), kept=kept)
    value = guard(up, down)
    pred = x.double()[:, rest] @ (up @ down).T + x.double()[:, kept] @ weight[:, kept].T
    expected = float((pred - y.float().double()).square().sum()) / 2500
    assert abs(value - expected) <= 1e-9 * expected
    assert guard.values == [value]
    assert abs(guard.relative(0) - (expected / (float(y.float().double().square().sum()) / 2500)) ** 0.5) < 1e-12


def test_mismatched_rows_are_refused():
    import pytest

    with pytest.raises(ValueError, match="outputs must be"):
        PlainHeldoutError(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(4, 3))


def test_weighted_and_plain_errors_come_from_one_pass_and_follow_in_place_changes():
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(5, 9, generator=g, dtype=torch.float64)
    x, y = torch.randn(300, 9, generator=g), torch.randn(300, 5, generator=g)
    root = torch.rand(300, generator=g) + 0.5
    up, down = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(2, 9, generator=g, dtype=torch.float64)
    guard = PlainHeldoutError(weight, x, y, root_weights=root)

    def direct():
        err = ((x.double() @ (up @ down).T - y.double()).square()).sum(dim=1)
        return float(err.sum()) / 300, float((err * root.double().square()).sum()) / 300

    plain, weighted = direct()
    assert guard.weighted(up, down) == pytest.approx(weighted, rel=1e-12)
    assert guard(up, down) == pytest.approx(plain, rel=1e-12) and guard.values == [guard.values[0]]
    down.mul_(2.0)  # the same tensor, changed in place: not the remembered candidate any more
    plain, weighted = direct()
    assert guard.weighted(up, down) == pytest.approx(weighted, rel=1e-12)
    assert guard(up, down) == pytest.approx(plain, rel=1e-12) and len(guard.values) == 2
