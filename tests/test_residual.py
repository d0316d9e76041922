"""Residual writers: which targets the compensating refinements may fit to the dense outputs, and how
their tokens are weighted (`core.residual`). BENCHMARKS.md ("the compensated presets at 20 %") has the
real-model measurements behind the rule."""

import warnings

import pytest
import torch
from torch import nn

from adasvd_lightning import CompressionConfig, compress_model
from adasvd_lightning.core.factorization import factorize
from adasvd_lightning.core.refinement import GramStatistics, RefinementTarget, adacomp
from adasvd_lightning.core.residual import find_residual_writers, residual_weights
from adasvd_lightning.core.statistics import BlockStatistics
from adasvd_lightning.core.whitening import compute_whitening

from conftest import tiny_model

WRITERS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "opt": ("self_attn.out_proj", "fc2"),  # OPT flattens the tokens around its MLP
    "gpt2": ("attn.c_proj", "mlp.c_proj"),  # Conv1D with bias
}


@pytest.mark.parametrize("family", sorted(WRITERS))
def test_compensation_reaches_exactly_the_residual_writers(family):
    model = tiny_model(family).eval()
    batches = [torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "no residual writer" warning on these families
        report = compress_model(model, CompressionConfig(method="svd-llm", ratio=0.4), batches)
    modules = [m for m in report.modules if m.rank is not None]
    assert modules
    for m in modules:
        writer = m.name.endswith(WRITERS[family])
        assert m.compensated is writer, m.name
        if not writer:
            assert m.refinement_steps == 0 and m.heldout_error is None
    assert sum(m.compensated for m in modules) == 2 * model.config.num_hidden_layers


class _Norm(nn.Module):
    def forward(self, x):
        return x / x.square().mean(-1, keepdim=True).add(1e-6).sqrt()


class _PreNorm(nn.Module):
    """x + b(act(a(norm x))): b writes into the residual stream, a does not."""

    def __init__(self, d=8):
        super().__init__()
        self.norm, self.a, self.b = _Norm(), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(self.norm(x))))


class _PostNorm(_PreNorm):
    """norm(x + b(act(a x))) (the original Transformer): b's output is added, then normalised."""

    def forward(self, x):
        return self.norm(x + self.b(torch.relu(self.a(x))))


class _Sandwich(_PreNorm):
    """x + norm(b(act(a(norm x)))) (Gemma-2's sandwich norms): b's output is normalised *before* the
    addition, so its error is not its contribution to the residual stream."""

    def forward(self, x):
        return x + self.norm(self.b(torch.relu(self.a(self.norm(x)))))


class _Parallel(nn.Module):
    """x + b(norm x) + c(norm x) with separate norms (GPT-J / Phi-2 style parallel sublayers)."""

    def __init__(self, d=8):
        super().__init__()
        self.n1, self.n2, self.a, self.b = _Norm(), _Norm(), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.a(self.n1(x)) + self.b(self.n2(x))


def _writers(block, x):
    targets = {name: getattr(block, name) for name in ("a", "b")}
    return find_residual_writers(block, targets, x, lambda: block(x))


def test_residual_writers_are_found_by_the_addition_not_by_name():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    pre = _writers(_PreNorm(), x)
    assert set(pre) == {"b"} and pre["b"].source == ""  # the residual before it is the block's input
    assert set(_writers(_PostNorm(), x)) == {"b"}
    # Not an addition of the target's output: no compensation there (the pipeline warns).
    assert _writers(_Sandwich(), x) == {}
    assert _writers(_Parallel(), x) == {}


def test_writer_tokens_are_weighted_by_the_residual_after_the_addition():
    """H_cc, W·H_oc and ‖W X_o‖² of a writer are sums over tokens weighted by 1 / ms(r_t), r_t the dense
    stream's residual after the addition, exactly as the explicit token matrices give them. A writer
    that reads its input alone pairs its dense outputs with the compressed inputs: W·H_oc, no H_oc."""
    torch.manual_seed(0)
    dense, compressed = _PreNorm(), _PreNorm()
    with torch.no_grad():
        for p in compressed.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x_o = torch.randn(3, 6, 8)
    x_o[:, 0] *= 50  # a sink-like token with a large residual
    x_c = x_o + 0.05 * torch.randn_like(x_o)
    targets = {"b": dense.b}
    stats = BlockStatistics(targets, residual_sources={"b": None})
    with stats:
        with stats.masked(None, None, x_o):
            stats.mode = "original"
            dense(x_o)
            seen = {}
            handle = dense.b.register_forward_pre_hook(lambda m, a: seen.__setitem__("x_c", a[0].detach()))
            stats.mode = "compressed"
            # The compressed stream: its own inputs into the same target.
            hidden = torch.relu(dense.a(dense.norm(x_c)))
            dense.b(hidden)
            handle.remove()
    stats.finalize()
    with torch.no_grad():
        h_o = torch.relu(dense.a(dense.norm(x_o)))
        y_o = dense.b(h_o)
        w = residual_weights(x_o + y_o).reshape(-1, 1).double()
    xo, xc = h_o.reshape(-1, 16).double(), seen["x_c"].reshape(-1, 16).double()
    n = xo.shape[0]
    got = stats.for_module("b")
    assert torch.allclose(got.gram, (xc * w).T @ xc / n, rtol=1e-6, atol=1e-9)
    weight = dense.b.weight.detach().double()
    assert got.grams().h_oc is None
    # The outputs are the float32 layer's (W·x_o rounded once): agreement to float32's precision of |W·H_oc|.
    assert torch.allclose(got.grams().w_h_oc, weight @ ((xo * w).T @ xc / n), rtol=1e-6, atol=1e-7)
    energy = ((y_o - dense.b.bias.detach()).reshape(-1, 8).double().square().sum(-1, keepdim=True) * w).sum() / n
    assert stats.target_energy("b") == pytest.approx(float(energy), rel=1e-6)
    assert float(w[0]) < 1e-3 * float(w[1])  # the sink token counts on its residual's scale


def test_an_unweighted_compensation_spends_itself_on_the_sink_tokens():
    """The root cause of `svd-llm` losing to whitening alone on SmolLM2 at 20 % (block 11's down_proj):
    a few tokens whose residual — and input — are ~100× the others dominate the squared error. The
    unweighted closed-form U-step then fits their drift and makes every other token's error larger
    than before the step, on the very tokens it was fitted to. Weighted by 1 / ms(residual), the same
    step improves the ordinary tokens, and both the start and the step are better for them."""
    g = torch.Generator().manual_seed(0)
    n, tokens, rank = 16, 400, 6
    w = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1, n, dtype=torch.float64)
    x_o = mix @ torch.randn(n, tokens, generator=g, dtype=torch.float64)
    sink = torch.arange(tokens) % 20 == 0
    direction = torch.randn(n, generator=g, dtype=torch.float64)
    x_o[:, sink] = 300 * (direction / direction.norm())[:, None] + 0.1 * x_o[:, sink]
    x_c = x_o + 0.05 * (torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5) @ x_o
    x_c[:, sink] = x_o[:, sink] + 3.0 * torch.randn(n, int(sink.sum()), generator=g, dtype=torch.float64)
    residual = torch.randn(n, tokens, generator=g, dtype=torch.float64) * 3
    residual[:, sink] *= 100
    weight = residual_weights((residual + w @ x_o).T).squeeze(-1)

    def fit(token_weights):
        s = token_weights.sqrt()
        xo, xc = x_o * s, x_c * s
        stats = GramStatistics(h_cc=xc @ xc.T / tokens, h_oc=xo @ xc.T / tokens, h_oo=xo @ xo.T / tokens)
        start = factorize(w, rank, compute_whitening(stats.h_cc))
        up, down, _ = adacomp(RefinementTarget(w, stats, damping=0.0), start.up, start.down, max_half_steps=1)
        return (start.up, start.down), (up, down)

    def ordinary_error(factors):  # on the residual's scale, over the non-sink tokens
        e = (factors[0] @ factors[1] @ x_c - w @ x_o)[:, ~sink]
        y = (w @ x_o)[:, ~sink]
        return float((e.square().sum(0) * weight[~sink]).sum() / (y.square().sum(0) * weight[~sink]).sum()) ** 0.5

    start, step = fit(torch.ones(tokens, dtype=torch.float64))
    assert ordinary_error(step) > 1.03 * ordinary_error(start)
    w_start, w_step = fit(weight)
    assert ordinary_error(w_step) < ordinary_error(w_start) < 0.85 * ordinary_error(start)
    assert ordinary_error(w_step) < 0.8 * ordinary_error(step)


def test_targets_that_are_not_writers_keep_the_whitened_fit_to_their_own_input(token_batches):
    """svd-llm's q/k/v of the first block read the same inputs as svd-llm-w's (the embeddings, before any
    compression) and take no step: the same factors, and the same reported error, as whitening alone."""
    models = {m: tiny_model("llama") for m in ("svd-llm", "svd-llm-w")}
    reports = {m: {r.name: r for r in compress_model(model, CompressionConfig(method=m, ratio=0.4), token_batches).modules}
               for m, model in models.items()}
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}"
        paired, single = (models[m].get_submodule(name).dense_weight().detach() for m in ("svd-llm", "svd-llm-w"))
        torch.testing.assert_close(paired, single, rtol=1e-5, atol=1e-6)
        assert reports["svd-llm"][name].compensated is False and reports["svd-llm"][name].refinement_steps == 0
        assert reports["svd-llm"][name].relative_error == pytest.approx(reports["svd-llm-w"][name].relative_error, rel=1e-5)
    assert reports["svd-llm"]["model.layers.0.self_attn.o_proj"].compensated is True


def test_a_writers_heldout_tokens_are_rows_in_the_whole_sums_not_gram_sums():
    """With held-out sequences a writer keeps no held-out Gram sums (two n×n float64 matrices): its
    held-out tokens enter the whole weighted sums, and their compressed inputs, dense outputs and
    √weights are kept as rows (`core.writer_heldout`), exactly the explicit token matrices."""
    torch.manual_seed(0)
    dense = _PreNorm()
    x_o = torch.randn(4, 6, 8)
    x_o[:, 0] *= 50
    x_c = x_o + 0.05 * torch.randn_like(x_o)
    held_rows = torch.tensor([False, True, False, True])
    stats = BlockStatistics({"b": dense.b}, holdout=True, residual_sources={"b": None})
    with stats, torch.no_grad():
        with stats.masked(None, held_rows, x_o):
            stats.mode = "original"
            dense(x_o)
            stats.mode = "compressed"
            dense.b(torch.relu(dense.a(dense.norm(x_c))))
    stats.finalize()
    with torch.no_grad():
        h_o, h_c = torch.relu(dense.a(dense.norm(x_o))), torch.relu(dense.a(dense.norm(x_c)))
        y_o = dense.b(h_o)
        w = residual_weights(x_o + y_o).double()
    got = stats.for_module("b")
    assert got.heldout is None and got.tokens == 24
    xo, xc, wf = h_o.reshape(-1, 16).double(), h_c.reshape(-1, 16).double(), w.reshape(-1, 1)
    assert torch.allclose(got.gram, (xc * wf).T @ xc / 24, rtol=1e-6, atol=1e-9)
    weight = dense.b.weight.detach().double()  # W·H_oc from the float32 layer's outputs (see above)
    assert torch.allclose(got.grams().w_h_oc, weight @ ((xo * wf).T @ xc / 24), rtol=1e-6, atol=1e-7)
    rows = stats.writer_heldout("b")
    assert rows.tokens == 12
    torch.testing.assert_close(rows.inputs, h_c[held_rows].reshape(-1, 16))
    torch.testing.assert_close(rows.outputs, (y_o - dense.b.bias)[held_rows].reshape(-1, 8))
    torch.testing.assert_close(rows.root_weights.double().square(), w[held_rows].reshape(-1), rtol=1e-5, atol=0)
