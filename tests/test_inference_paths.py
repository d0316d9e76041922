"""Fast forward paths of the factorized layers and merge-back to dense.

Every path is checked against the reference maths ``x @ dense_weight().T + bias`` computed in
float64 from the layer's own parameters, so a wrong index, transpose or dropped bias fails.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from adasvd_lightning import CompressionConfig, compress_model, load_compressed, save_compressed
from adasvd_lightning.core.hf_format import manifest_of
from adasvd_lightning.core.lowrank import ColumnPreservingLinear, LowRankLinear
from adasvd_lightning.core.merging import MergeWarning, flop_saving, merge_to_linear, merge_unprofitable
from adasvd_lightning.core.params import count_parameters
from adasvd_lightning.core.serialization import build_manifest

from conftest import tiny_model

DTYPES = [torch.float32, torch.bfloat16]
# relative max error against the float64 reference; bf16 keeps 8 mantissa bits
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x @ Wᵀ + b in float64 from the module's parameters (the maths every path must match)."""
    weight = module.dense_weight(torch.float64)
    out = x.double() @ weight.T
    if module.bias is not None:
        out = out + module.bias.double()
    return out


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype and actual.shape == expected.shape
    error = (actual.double() - expected).abs().max() / expected.abs().max()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e}"


def low_rank(bias: bool, dtype: torch.dtype, m: int = 48, n: int = 40, r: int = 12) -> LowRankLinear:
    torch.manual_seed(0)
    module = LowRankLinear(n, m, r, bias=bias, dtype=dtype)
    if bias:
        nn.init.normal_(module.bias)
    return module


def column_preserving(bias: bool, dtype: torch.dtype, m: int = 48, n: int = 40, r: int = 10,
                      k: int = 6) -> ColumnPreservingLinear:
    """Kept columns scattered (not a prefix), so an index mix-up changes the output."""
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=generator)
    kept, rest = order[:k].sort().values, order[k:].sort().values
    up = torch.randn(m, r, generator=generator) / r**0.5
    down = torch.randn(r, n - k, generator=generator) / n**0.5
    kept_weight = torch.randn(m, k, generator=generator)
    b = torch.randn(m, generator=generator) if bias else None
    return ColumnPreservingLinear.from_parts(up, down, kept_weight, kept, rest, b, dtype=dtype)


# Column-preserving: 2 rows < rank 10 take the gather path; 23 / 21 / 64 rows ≥ rank the zero-padded-down path.
FORWARD_CASES = {
    **{f"low-rank-{k}": (low_rank, v) for k, v in {"2d": (23, 40), "3d": (3, 7, 40), "3d-many": (4, 16, 40)}.items()},
    **{f"column-preserving-{k}": (column_preserving, v) for k, v in {
        "2d-few": (2, 40), "2d": (23, 40), "3d": (3, 7, 40), "3d-many": (4, 16, 40), "3d-few": (1, 1, 40)}.items()},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_forward_matches_reference(dtype, bias, case):
    make, shape = FORWARD_CASES[case]
    module = make(bias, dtype)
    x = torch.randn(*shape).to(dtype)
    assert_matches(module(x), reference(module, x), dtype)


def test_column_preserving_paths_agree_and_padded_down_is_exact():
    """Both paths give the same result on the same rows; the padded matrix holds `down` at the rest columns."""
    module = column_preserving(True, torch.float32)
    x = torch.randn(30, 40)
    padded = module.padded_down()
    assert torch.equal(padded[:, module.rest_index], module.down)
    assert torch.count_nonzero(padded[:, module.kept_index]) == 0
    many = module(x)  # 30 rows ≥ rank: padded path
    few = torch.cat([module(row) for row in x.split(1)])  # 1 row: gather path
    torch.testing.assert_close(many, few, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [2, 32], ids=["gather-path", "padded-path"])
def test_column_preserving_gradients_match_reference(rows):
    """Training through the fast path gives the gradients of the reference maths (index_copy, addmm_)."""
    module = column_preserving(True, torch.float32)
    x = torch.randn(rows, 40, requires_grad=True)
    target = torch.randn(rows, 48)
    ((module(x) - target) ** 2).sum().backward()
    fast = {name: p.grad.clone() for name, p in module.named_parameters()}
    fast_x = x.grad.clone()

    module.zero_grad()
    x.grad = None
    rest, kept = module.rest_index, module.kept_index
    slow = (x[:, rest] @ module.down.T) @ module.up.T + x[:, kept] @ module.kept_weight.T + module.bias
    ((slow - target) ** 2).sum().backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(fast_x, x.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [2, 32], ids=["gather-path", "padded-path"])
@pytest.mark.parametrize("maker", [low_rank, column_preserving], ids=["low_rank", "column_preserving"])
def test_forward_under_autocast(maker, rows):
    """fp32 layer inside bf16 autocast (Lightning's bf16-mixed): runs, returns bf16, gradients reach every factor."""
    module = maker(True, torch.float32)
    x = torch.randn(rows, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16
    assert_matches(out, reference(module, x), torch.bfloat16)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_multiply_adds_counts_the_layer_maths():
    lr = LowRankLinear(40, 48, 12)
    assert lr.multiply_adds() == 12 * (40 + 48)
    assert flop_saving(lr) == pytest.approx(1 - 12 * 88 / (40 * 48))
    cp = column_preserving(False, torch.float32)  # m 48, n 40, r 10, k 6
    assert cp.multiply_adds() == 10 * (34 + 48) + 48 * 6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("maker", [low_rank, column_preserving], ids=["low_rank", "column_preserving"])
@pytest.mark.parametrize("bias", [True, False])
def test_merge_to_linear_gives_same_outputs(dtype, maker, bias):
    module = maker(bias, dtype)
    linear = merge_to_linear(module)
    assert type(linear) is nn.Linear
    assert linear.weight.dtype == dtype and (linear.bias is None) == (not bias)
    assert count_parameters(linear) == 48 * 40 + (48 if bias else 0)
    x = torch.randn(5, 9, 40).to(dtype)
    assert_matches(linear(x), reference(module, x), dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(linear(x), module(x), rtol=1e-5, atol=1e-5)


def _model_of(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


def test_merge_unprofitable_merges_only_below_threshold():
    torch.manual_seed(0)
    cheap = LowRankLinear(64, 64, 8)  # saves 75 %
    near = LowRankLinear(64, 64, 30)  # saves 6.25 %
    cp_near = column_preserving(True, torch.float32, m=40, n=64, r=22, k=6)  # saves 6.4 %
    model = _model_of(cheap, near, nn.ReLU(), cp_near)
    x = torch.randn(10, 64)
    before = model(x)
    params_before = count_parameters(model)
    with pytest.warns(MergeWarning, match="merged 2 of 3"):
        merged = merge_unprofitable(model)
    assert [m.name for m in merged] == ["1", "3"]
    assert model[0] is cheap and type(model[1]) is nn.Linear and type(model[3]) is nn.Linear
    assert merged[0].params_before == 30 * 128 and merged[0].params_after == 64 * 64
    assert merged[1].params_before == 22 * (58 + 40) + 40 * 6 and merged[1].params_after == 40 * 64
    assert count_parameters(model) == params_before + sum(m.params_after - m.params_before for m in merged)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_merge_unprofitable_size_rule_threshold_zero_and_no_warning_when_nothing_merged():
    torch.manual_seed(0)
    model = _model_of(LowRankLinear(16, 16, 2), LowRankLinear(64, 64, 30))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert merge_unprofitable(model, min_flop_saving=0.0) == []  # both still save something
    merged = merge_unprofitable(model, min_flop_saving=0.0, min_weight_elements=1000, warn=False)
    assert [m.name for m in merged] == ["0"] and "elements" in merged[0].reason
    assert isinstance(model[1], LowRankLinear)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        merge_unprofitable(model, min_flop_saving=1.0)
    from adasvd_lightning.callbacks import SVDCompression

    with pytest.raises(ValueError, match="merge_unprofitable"):  # the same check, at construction
        SVDCompression(method="svd", ratio=0.4, merge_unprofitable=1.5)
    with pytest.raises(ValueError):
        merge_unprofitable(model, min_weight_elements=-1)


def test_save_load_round_trip_after_merge(tmp_path):
    """Merged layers leave the manifest; the loaded model has the same structure and logits."""
    model = tiny_model("llama")
    compress_model(model, CompressionConfig(method="svd", ratio=0.3))
    # attention matrices are 64 × 64 = 4096 elements, the MLP ones 64 × 128: merge only attention
    merged = merge_unprofitable(model, min_flop_saving=0.0, min_weight_elements=5000, warn=False)
    assert merged and all("self_attn" in m.name for m in merged)
    manifest = build_manifest(model)["modules"]
    assert manifest and all("mlp" in name for name in manifest)
    assert not any(m.name in manifest for m in merged)

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    path = save_compressed(model, tmp_path / "merged")
    loaded = load_compressed(path)
    assert set(manifest_of(loaded.config)["modules"]) == set(manifest)
    for m in merged:
        assert type(loaded.get_submodule(m.name)) is nn.Linear
    for name in manifest:
        assert isinstance(loaded.get_submodule(name), LowRankLinear)
    assert count_parameters(loaded) == count_parameters(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_merged_gpt2_layers_save_and_load_as_conv1d(tmp_path):
    """GPT-2 folders are rebuilt with Conv1D (weights in × out): a merged nn.Linear would load
    transposed. Merged layers must come back as Conv1Ds with the same outputs."""
    import torch

    from adasvd_lightning.core.config import CompressionConfig
    from adasvd_lightning.core.merging import merge_unprofitable
    from adasvd_lightning.core.pipeline import compress_model
    from adasvd_lightning.core.serialization import load_compressed, save_compressed
    from adasvd_lightning.core.surgery import Conv1D
    from conftest import tiny_model

    model = tiny_model("gpt2")
    compress_model(model, CompressionConfig(method="svd", ratio=0.4))
    merged = merge_unprofitable(model, min_flop_saving=0.99, warn=False)
    assert merged and all(isinstance(model.get_submodule(m.name), Conv1D) for m in merged)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    save_compressed(model, tmp_path / "gpt2")
    with torch.no_grad():
        after = load_compressed(tmp_path / "gpt2")(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
