import pytest
import torch

from adasvd_lightning.core.statistics import BlockStatistics, InputStatistics
from adasvd_lightning.core.surgery import find_targets
from conftest import tiny_model


def test_gram_accumulation_matches_direct_product():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(7, 5, generator=g) for _ in range(3)]
    stats = InputStatistics.empty(5)
    for c in chunks:
        stats.add(c)
    x = torch.cat(chunks).double()
    assert stats.tokens == 21
    assert torch.allclose(stats.gram, x.T @ x / 21)
    assert torch.allclose(stats.mean_abs, x.abs().mean(0))


def test_shared_inputs_are_grouped_and_counted_once(token_batches):
    model = tiny_model("llama")
    [(_, _, targets), *_] = find_targets(model)
    block = model.model.layers[0]
    captured = {}
    block.self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("attn", []).append(a[0]))
    block.mlp.gate_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("mlp", []).append(a[0]))
    with BlockStatistics(targets) as stats, torch.no_grad():
        for batch in token_batches:
            model(batch)
    groups = {tuple(sorted(n.rsplit(".", 1)[-1] for n in v)) for v in stats.groups().values()}
    assert groups == {("k_proj", "q_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)}
    q = stats.for_module("model.layers.0.self_attn.q_proj")
    assert q is stats.for_module("model.layers.0.self_attn.v_proj")
    x = torch.cat([t.reshape(-1, 64) for t in captured["attn"]]).double()
    assert q.tokens == x.shape[0] == 256
    assert torch.allclose(q.gram, x.T @ x / x.shape[0])
    assert stats.for_module("model.layers.0.mlp.up_proj").tokens == 256


def test_token_mask_excludes_padding(token_batches):
    model = tiny_model("llama")
    [(_, _, targets), *_] = find_targets(model)
    mask = torch.ones(4, 32, dtype=torch.long)
    mask[:, 20:] = 0
    with BlockStatistics(targets) as stats, torch.no_grad():
        with stats.masked(mask):
            model(token_batches[0], attention_mask=mask)
    assert stats.for_module("model.layers.0.self_attn.q_proj").tokens == 4 * 20


def test_target_energy_is_the_dense_output_energy_without_bias(token_batches):
    """‖W x‖² per token read off the outputs equals tr(W H Wᵀ) from the Gram matrix (masked, bias removed)."""
    model = tiny_model("qwen2")  # q/k/v carry biases
    [(_, _, targets), *_] = find_targets(model)
    mask = torch.ones(4, 32, dtype=torch.long)
    mask[:, 20:] = 0
    with BlockStatistics(targets) as stats, torch.no_grad():
        for batch in token_batches:
            with stats.masked(mask):
                model(batch, attention_mask=mask)
    stats.finalize()
    for name, module in targets.items():
        w = module.weight.detach().double()
        expected = float((w @ stats.for_module(name).gram * w).sum())
        assert stats.target_energy(name) == pytest.approx(expected, rel=1e-5), name
    assert stats.for_module("model.layers.0.self_attn.q_proj").tokens == 2 * 4 * 20


def test_paired_mode_measures_energy_on_the_dense_stream_only():
    """In paired mode ‖W X_o‖² comes from the "original" pass; the compressed-stream pass adds nothing."""
    lin = torch.nn.Linear(6, 4)
    g = torch.Generator().manual_seed(2)
    xo, xc = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
    with BlockStatistics({"lin": lin}) as stats, torch.no_grad():
        stats.mode = "original"
        lin(xo)
        stats.mode = "compressed"
        lin(xc)
    stats.finalize()
    s = stats.for_module("lin")
    w = lin.weight.detach().double()
    assert s.tokens == 10
    assert torch.allclose(s.gram, xc.double().T @ xc.double() / 10)
    assert torch.allclose(s.grams().h_oc, xo.double().T @ xc.double() / 10)
    assert s.grams().h_oo is None  # never accumulated: the energy replaces it
    assert stats.target_energy("lin") == pytest.approx(float((xo.double() @ w.T).square().sum() / 10), rel=1e-6)


def test_block_lower_gram_matches_full_product():
    """The symmetric blocked update computes the same entries as xᵀx, for widths that do and do not divide."""
    from adasvd_lightning.core.statistics import accumulate_gram, mirror_lower

    g = torch.Generator().manual_seed(3)
    for n, block in [(10, 4), (12, 4), (7, 16)]:
        h = torch.zeros(n, n, dtype=torch.float64)
        chunks = [torch.randn(9, n, generator=g, dtype=torch.float64) for _ in range(3)]
        for c in chunks:
            accumulate_gram(h, c, block=block)
        mirror_lower(h, block=block)
        x = torch.cat(chunks)
        torch.testing.assert_close(h, x.T @ x, rtol=1e-13, atol=1e-13)
    # Through InputStatistics at a width above the default block, reading the Gram between batches.
    stats = InputStatistics.empty(700)
    x = torch.randn(40, 700, generator=g)
    stats.add(x[:20])
    first = stats.gram.clone()
    stats.add(x[20:])
    stats.finalize()
    x64 = x.double()
    torch.testing.assert_close(first, x64[:20].T @ x64[:20] / 20, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.gram, x64.T @ x64 / 40, rtol=1e-12, atol=1e-12)
