import pytest
import torch

from adasvd_lightning.core.factorization import breakeven_rank, factorize, rank_for_ratio, saves_parameters
from adasvd_lightning.core.lowrank import LowRankLinear


@pytest.mark.parametrize(
    "m,n,ratio,expected",
    [(64, 64, 0.5, 16), (4096, 4096, 0.4, 1228), (4096, 11008, 0.6, 1194), (1024, 4096, 0.2, 655), (8, 8, 0.99, 1)],
)
def test_rank_for_ratio(m, n, ratio, expected):
    assert rank_for_ratio(m, n, ratio) == expected


def test_rank_parameter_accounting_meets_ratio():
    for m, n in [(256, 256), (256, 704), (704, 256), (64, 256)]:
        for ratio in (0.2, 0.4, 0.6, 0.8):
            r = rank_for_ratio(m, n, ratio)
            kept = r * (m + n) / (m * n)
            assert kept <= 1 - ratio + 1e-12  # never over budget
            assert (r + 1) * (m + n) / (m * n) > 1 - ratio  # and the largest such rank


def test_saves_parameters_boundary():
    assert breakeven_rank(64, 64) == 32
    assert saves_parameters(64, 64, 31) and not saves_parameters(64, 64, 32)


def test_lowrank_linear_matches_factors_and_counts_parameters():
    w = torch.randn(40, 24, dtype=torch.float64)
    f = factorize(w, 6)
    bias = torch.randn(40, dtype=torch.float64)
    layer = LowRankLinear.from_factors(f.up, f.down, bias)
    x = torch.randn(5, 24, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ f.dense().T + bias)
    assert sum(p.numel() for p in layer.parameters()) == 6 * (40 + 24) + 40
    assert layer.dense_weight().shape == (40, 24)


def test_plain_svd_is_eckart_young_optimal():
    w = torch.randn(30, 20, dtype=torch.float64)
    f = factorize(w, 5)
    s = torch.linalg.svdvals(w)
    assert torch.linalg.norm(w - f.dense()) == pytest.approx(float(s[5:].square().sum().sqrt()), rel=1e-10)
    # √Σ split: both factors carry the same singular-value scale.
    assert torch.allclose(f.up.norm(dim=0), f.down.norm(dim=1))


def test_factorize_rejects_bad_rank():
    with pytest.raises(ValueError):
        factorize(torch.randn(4, 3), 4)
