"""Allocation strategies and budget arithmetic on synthetic data with known answers."""

import itertools
import random

import pytest
import torch

from adasvd_lightning.core.allocation import (
    adacr_block_retentions,
    block_importance,
    group_key,
    grouped_loss_ranks,
    knapsack,
)
from adasvd_lightning.core.budget import MatrixShape, budget_for_ratio, ranks_for_budget, total_cost


@pytest.mark.parametrize("seed", range(5))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    options = [[(rng.randint(1, 30), rng.uniform(-1, 5)) for _ in range(rng.randint(2, 4))] for _ in range(5)]
    cheapest = sum(min(c for c, _ in o) for o in options)
    budget = rng.randint(cheapest, sum(max(c for c, _ in o) for o in options))
    best = None
    for combo in itertools.product(*[range(len(o)) for o in options]):
        cost = sum(options[i][k][0] for i, k in enumerate(combo))
        value = sum(options[i][k][1] for i, k in enumerate(combo))
        if cost <= budget and (best is None or value < best - 1e-12):
            best = value
    picked = knapsack(options, budget)
    assert sum(options[i][k][0] for i, k in enumerate(picked)) <= budget
    assert sum(options[i][k][1] for i, k in enumerate(picked)) == pytest.approx(best)


def test_knapsack_reports_infeasible_budget():
    with pytest.raises(ValueError):
        knapsack([[(10, 0.0)], [(10, 0.0)]], 15)


@pytest.mark.parametrize("seed", range(5))
def test_ranks_for_budget_is_within_half_a_percent_and_never_over(seed):
    rng = random.Random(seed)
    shapes = [MatrixShape(f"m{i}", rng.choice([128, 256, 704]), rng.choice([128, 256, 704])) for i in range(20)]
    for ratio in (0.2, 0.4, 0.6, 0.8):
        # Non-uniform retentions whose parameter-weighted mean is exactly 1 − ratio, as strategies give.
        u = {s.name: rng.uniform(0.8, 1.2) for s in shapes}
        mean = sum(u[s.name] * s.dense_params for s in shapes) / sum(s.dense_params for s in shapes)
        retentions = {s.name: (1 - ratio) * u[s.name] / mean for s in shapes}
        budget = budget_for_ratio(shapes, ratio)
        ranks = ranks_for_budget(shapes, retentions, budget)
        cost = total_cost(shapes, ranks)
        assert cost <= budget
        assert cost >= 0.995 * budget


def test_adacr_budget_exact_and_monotone_in_importance():
    importances = [3.0, 1.0, 0.5, 0.4, 0.6, 2.5]
    params = [100] * 6
    trr, mrr = 0.4, 0.2
    rho = adacr_block_retentions(importances, params, trr, mrr)
    assert sum(r * p for r, p in zip(rho, params)) / sum(params) == pytest.approx(trr, abs=1e-9)
    order = sorted(range(6), key=lambda i: importances[i])
    assert all(rho[a] <= rho[b] for a, b in zip(order, order[1:]))
    assert rho[0] > trr > rho[3]


def test_adacr_clamps_and_redistributes():
    rho = adacr_block_retentions([10.0, 0.1, 0.1, 0.1], [1, 1, 1, 1], 0.8, 0.4)
    assert max(rho) <= 1.0
    assert sum(rho) / 4 == pytest.approx(0.8, abs=1e-9)


def test_block_importance_extremes():
    h = torch.randn(2, 5, 8)
    assert block_importance(h, h)[0] == pytest.approx(0.0, abs=1e-9)
    assert block_importance(h, -h)[0] == pytest.approx(2.0 * 10)
    mask = torch.zeros(2, 5)
    mask[0, :3] = 1
    assert block_importance(h, -h, mask) == pytest.approx((6.0, 3))


def test_group_key_wildcards_the_block_index():
    assert group_key("model.layers.12.self_attn.q_proj") == "model.layers.*.self_attn.q_proj"
    assert group_key("transformer.h.3.mlp.c_fc") == "transformer.h.*.mlp.c_fc"


def test_grouped_loss_gives_flat_spectra_more_rank():
    shapes = [MatrixShape("model.layers.0.q", 64, 64), MatrixShape("model.layers.1.q", 64, 64)]
    spectra = {
        "model.layers.0.q": torch.logspace(0, -4, 64),  # steep: few directions matter
        "model.layers.1.q": torch.linspace(1.0, 0.5, 64),  # flat: every direction matters
    }
    rho = grouped_loss_ranks(shapes, spectra, 0.5)
    assert rho["model.layers.1.q"] > rho["model.layers.0.q"]
    budget = budget_for_ratio(shapes, 0.5)
    assert total_cost(shapes, ranks_for_budget(shapes, rho, budget)) <= budget
