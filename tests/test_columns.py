"""Duo-SVD column preservation and its module."""

import pytest
import torch

from adasvd_lightning import CompressionConfig, get_method
from adasvd_lightning.core.columns import (column_preserving_factorize, column_scores, preserved_columns_for,
                                           truncation_floor, whitened_error)
from adasvd_lightning.core.factorization import factorize
from adasvd_lightning.core.lowrank import ColumnPreservingLinear
from adasvd_lightning.core.writer_heldout import HeldoutRows
from adasvd_lightning.core.pipeline import _split_pays_after_compensation
from adasvd_lightning.core.statistics import InputStatistics
from adasvd_lightning.core.whitening import compute_whitening


def _problem(m=48, n=40, outliers=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(n, 500, generator=g, dtype=torch.float64)
    for j in outliers:  # activation outlier channels, as in real LLMs
        x[j] *= 30.0
    h = x @ x.T / x.shape[1]
    return w, h


def _whiten(h):
    return lambda cols: compute_whitening(h if cols is None else h[cols][:, cols])


def test_column_budget_never_exceeds_the_plain_rank():
    for m, n, r in [(48, 40, 10), (256, 704, 60), (704, 256, 60), (16, 64, 7)]:
        for drop in range(1, r):
            c = preserved_columns_for(drop, r, m, n)
            assert (r - drop) * (m + n - c) + m * c <= r * (m + n)


@pytest.mark.parametrize("seed", range(3))
def test_never_worse_than_plain_at_equal_parameters(seed):
    w, h = _problem(seed=seed, outliers=(3,) if seed else ())
    rank = 12
    plain = factorize(w, rank, compute_whitening(h))
    plain_error = whitened_error(w, plain.dense(), h)
    split = column_preserving_factorize(w, rank, h, _whiten(h), base=plain)
    if split is not None:
        assert split.error < 0.99 * plain_error
        assert whitened_error(w, split.dense(), h) == pytest.approx(split.error, rel=1e-8)
        m, n = w.shape
        assert split.rank * (m + n - split.kept.numel()) + m * split.kept.numel() <= rank * (m + n)


@pytest.mark.parametrize("m, n", [(48, 40), (24, 40), (40, 40)])
def test_each_split_is_scored_with_the_error_its_factorization_attains(m, n):
    """The search scores a Δr by the tail of the rest's whitened spectrum (`truncation_floor`), not by
    building its split: for every Δr the score equals the built split's error, so the search takes the
    path it took when it built each candidate (tall, wide and square W). A tall W's score from WᵀW,
    formed once for the search (Lᵀ(WᵀW)L instead of (W·L)ᵀ(W·L)), is the same."""
    w, h = _problem(m=m, n=n, outliers=(3, 17))
    weight_gram = w.T @ w
    rank = 12
    order = torch.argsort(column_scores(w, factorize(w, rank, compute_whitening(h)).dense(), h), descending=True)
    for drop in range(1, rank):
        count = preserved_columns_for(drop, rank, m, n)
        mask = torch.ones(n, dtype=torch.bool)
        mask[order[:count]] = False
        rest = mask.nonzero().squeeze(1)
        r_c = min(rank - drop, rest.numel(), m)
        built = factorize(w[:, rest], r_c, compute_whitening(h[rest][:, rest]))
        error = whitened_error(w[:, rest], built.dense(), h[rest][:, rest])
        assert truncation_floor(w[:, rest], h[rest][:, rest], r_c) == pytest.approx(error, rel=1e-9)
        assert truncation_floor(w[:, rest], h[rest][:, rest], r_c, weight_gram[rest][:, rest]) == pytest.approx(
            error, rel=1e-9)


def test_truncation_floor_of_a_tall_matrix_is_right_where_h_is_singular():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(30, 12, generator=g, dtype=torch.float64)
    x = torch.randn(12, 8, generator=g, dtype=torch.float64)  # 8 tokens: H has rank 8, no Cholesky factor
    h = x @ x.T / 8
    sigma = torch.linalg.svdvals(w @ x / 8 ** 0.5)  # W·X/√T: (W·X/√T)(W·X/√T)ᵀ = W·H·Wᵀ
    for rank in (2, 5, 8):
        assert truncation_floor(w, h, rank) == pytest.approx(float(sigma[rank:].square().sum()), rel=1e-9, abs=1e-12)


SPIKES = (1, 5, 9, 13, 17, 21, 25, 31)


def _spiky_problem(seed=0):
    """W = rank-6 structure + 8 input columns with independent energy: plain rank 10 cannot hold all."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 40, generator=g, dtype=torch.float64)
    for j in SPIKES:
        w[:, j] += 4.0 * torch.randn(48, generator=g, dtype=torch.float64)
    x = torch.randn(40, 500, generator=g, dtype=torch.float64)
    return w, x @ x.T / x.shape[1]


def test_isolated_heavy_columns_are_preserved():
    w, h = _spiky_problem()
    rank = 10
    plain_error = whitened_error(w, factorize(w, rank, compute_whitening(h)).dense(), h)
    split = column_preserving_factorize(w, rank, h, _whiten(h))
    assert split is not None
    assert len(set(split.kept.tolist()) & set(SPIKES)) >= 6
    assert split.error < 0.3 * plain_error


def test_column_preserving_module_matches_its_dense_weight():
    w, h = _spiky_problem()
    split = column_preserving_factorize(w, 10, h, _whiten(h))
    bias = torch.randn(48, dtype=torch.float64)
    layer = ColumnPreservingLinear.from_parts(split.up, split.down, split.kept_weight, split.kept, split.rest, bias)
    x = torch.randn(7, 40, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ split.dense().T + bias)
    assert torch.allclose(layer.dense_weight(), split.dense())
    k = split.kept.numel()
    assert sum(p.numel() for p in layer.parameters()) == split.rank * (48 + 40 - k) + 48 * k + 48


def _drifting_writer(drift: float, seed: int):
    """A residual writer whose weight is low-rank plus six large incoherent columns (what Duo-SVD
    preserves), seen through a compressed stream whose six matching input channels are scaled by
    ``drift`` relative to the dense stream. Returns W, X_o, X_c and the paired statistics."""
    g = torch.Generator().manual_seed(seed)
    m, n, tokens = 48, 64, 4000
    scale = torch.ones(n, dtype=torch.float64)
    scale[:6] = 8.0
    xo = torch.randn(tokens, n, generator=g, dtype=torch.float64) * scale
    xc = xo.clone()
    xc[:, 6:12] *= drift
    xc += 0.05 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    w = torch.randn(m, 8, generator=g, dtype=torch.float64) @ torch.randn(8, n, generator=g, dtype=torch.float64) / n**0.5
    w += 0.02 * torch.randn(m, n, generator=g, dtype=torch.float64)
    w[:, 6:12] += 3.0 * torch.randn(m, 6, generator=g, dtype=torch.float64)
    stats = InputStatistics.empty(n)
    stats.add_pair(xo, xc)
    stats.finalize()
    return w, xo, xc, stats


def _compensated_error(w, xo, xc, kept, down):
    """min over U of ‖U V X_c,rest + W_kept X_c,kept − W X_o‖² per token, by least squares on the tokens."""
    rest = torch.tensor([j for j in range(w.shape[1]) if j not in set(kept.tolist())])
    y = xo @ w.T - xc[:, kept] @ w[:, kept].T
    z = xc[:, rest] @ down.T
    u = torch.linalg.lstsq(z, y).solution
    return float((z @ u - y).square().sum() / xo.shape[0])


@pytest.mark.parametrize("drift, pays", [(0.5, False), (1.0, True)])
def test_column_split_is_judged_after_compensation(drift, pays):
    # Preserved columns are the dense weights: no compensation step changes them. When their inputs
    # drift between the streams, the split that wins on the whitened error ‖(W − W′)X_c‖² loses once
    # both forms are fitted to the dense outputs (the failure of adasvd-duo at 60 % on SmolLM2-135M).
    w, xo, xc, stats = _drifting_writer(drift, seed=2)
    spec, config = get_method("adasvd-duo"), CompressionConfig(method="adasvd-duo", ratio=0.6)

    def whitening(cols):
        return compute_whitening(stats.gram if cols is None else stats.gram[cols][:, cols])

    base = factorize(w, 10, whitening(None))
    split = column_preserving_factorize(w, 10, stats.gram, whitening, base=base, min_gain=0.01)
    assert split is not None and split.kept.numel() >= 5
    assert split.error < 0.8 * whitened_error(w, base.dense(), stats.gram)  # the whitened error prefers it
    plain_after = _compensated_error(w, xo, xc, torch.empty(0, dtype=torch.long), base.down)
    split_after = _compensated_error(w, xo, xc, split.kept, split.down)
    assert (split_after < 0.99 * plain_after) == pays
    if not pays:
        assert split_after > 1.2 * plain_after
    energy = float((xo @ w.T).square().sum() / xo.shape[0])
    assert _split_pays_after_compensation(spec, config, w, stats, split, base, energy) == pays


def test_refusing_a_split_must_not_raise_the_plain_heldout_error():
    # The same writer, whose split loses on the weighted compensated objective, plus held-out sink
    # tokens: huge activations in the preserved channels, undrifted. The preserved columns are exact on
    # them; the plain form, compensated for the drift, is not — so the refusal would raise the plain
    # held-out error, and the split stays.
    w, xo, xc, stats = _drifting_writer(0.5, seed=2)
    spec, config = get_method("adasvd-duo"), CompressionConfig(method="adasvd-duo", ratio=0.6)

    def whitening(cols):
        return compute_whitening(stats.gram if cols is None else stats.gram[cols][:, cols])

    base = factorize(w, 10, whitening(None))
    split = column_preserving_factorize(w, 10, stats.gram, whitening, base=base, min_gain=0.01)
    energy = float((xo @ w.T).square().sum() / xo.shape[0])
    sink = torch.randn(20, 64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    sink[:, 6:12] *= 50.0
    rows = HeldoutRows(sink.float(), (sink @ w.T).float())
    assert not _split_pays_after_compensation(spec, config, w, stats, split, base, energy)
    assert _split_pays_after_compensation(spec, config, w, stats, split, base, energy, rows)
    # Ordinary held-out tokens from the writer's own distribution do not overturn the refusal.
    ordinary = HeldoutRows(xc[:200].float(), (xo[:200] @ w.T).float())
    assert not _split_pays_after_compensation(spec, config, w, stats, split, base, energy, ordinary)
