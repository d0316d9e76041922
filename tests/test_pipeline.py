import warnings

import pytest
import torch
from torch import nn

from adasvd_lightning import CompressionConfig, CompressionWarning, LowRankLinear, compress_model, count_parameters
from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.core.factorization import rank_for_ratio
from adasvd_lightning.core.output_error import ProjectionErrorMeter
from conftest import FAMILIES, tiny_model, writer_token_weights


@pytest.mark.parametrize("family", FAMILIES)
def test_surgery_on_every_family(family, token_batches):
    model = tiny_model(family)
    with torch.no_grad():
        reference = model(token_batches[0]).logits
    before = count_parameters(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        report = compress_model(model, CompressionConfig(method="svd-llm", ratio=0.4), token_batches)
    lowrank = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank, family
    # Uniform ranks follow the formula (+1 where the budget's flooring remainder is handed out),
    # and the modules in the model carry them.
    for m in report.modules:
        if m.rank is not None:
            floor = rank_for_ratio(m.out_features, m.in_features, 0.4)
            assert floor <= m.rank <= floor + 1
            assert lowrank[m.name].rank == m.rank
            assert lowrank[m.name].up.shape == (m.out_features, m.rank)
            assert 0.0 <= m.relative_error < 1.0
    assert count_parameters(model) == report.parameters_after < before
    assert before - report.parameters_after == report.linear_parameters_before - report.linear_parameters_after
    assert -0.005 <= report.budget_deviation <= 0.0
    assert 0.4 <= report.achieved_ratio < 0.403
    # Embeddings / head untouched; logits still finite and close-ish to the dense model's.
    with torch.no_grad():
        out = model(token_batches[0]).logits
    assert torch.isfinite(out).all()
    assert out.shape == reference.shape


def test_gpt2_conv1d_transposed_weight_is_handled(token_batches):
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].mlp.c_fc
    x = torch.randn(3, 64)
    dense = conv(x)
    compress_model(model, CompressionConfig(method="svd", ratio=0.1, include=[r"h\.0\.mlp\.c_fc"]))
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, LowRankLinear) and (layer.out_features, layer.in_features) == (256, 64)
    # At 10% on a 256×64 matrix the rank is 46 of 64: outputs move by less than the dropped energy.
    rel = (layer(x) - dense).norm() / dense.norm()
    assert rel < 0.5


def test_qwen2_bias_is_kept(token_batches):
    model = tiny_model("qwen2")
    q_bias = model.model.layers[0].self_attn.q_proj.bias.detach().clone()
    compress_model(model, CompressionConfig(method="svd-llm", ratio=0.3), token_batches)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LowRankLinear)
    assert torch.equal(layer.bias.detach(), q_bias)


def test_skip_with_warning_when_rank_saves_nothing():
    # A 1×64 matrix: even rank 1 costs 65 > 64 parameters, so factorizing it can only grow the model.
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    with pytest.warns(CompressionWarning, match="no rank saves parameters"):
        report = compress_model(model, CompressionConfig(method="svd-llm", ratio=0.5), [torch.randn(32, 64)])
    skipped = [m for m in report.modules if m.skipped]
    assert [m.name for m in skipped] == ["2"]
    assert skipped[0].params_after == skipped[0].params_before == 65
    assert isinstance(model[2], nn.Linear) and isinstance(model[0], LowRankLinear)


def test_gqa_kv_projections_compress_within_budget(token_batches):
    model = tiny_model("mistral")  # k/v are 16×64: break-even rank 12.8
    report = compress_model(model, CompressionConfig(method="svd-llm", ratio=0.2), token_batches)
    kv = [m for m in report.modules if m.name.endswith(("k_proj", "v_proj"))]
    assert all(m.rank == 10 and m.params_after <= 0.8 * m.params_before for m in kv)


def test_svd_llm_beats_svd_on_block_outputs(token_batches):
    errors = {}
    for method in ("svd", "svd-llm"):
        model = tiny_model("llama", seed=3)
        report = compress_model(model, CompressionConfig(method=method, ratio=0.5), token_batches)
        errors[method] = sum(m.relative_error for m in report.modules)
    assert errors["svd-llm"] < errors["svd"]


def test_plain_module_without_decoder_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    x = [torch.randn(16, 32) for _ in range(2)]
    report = compress_model(model, CompressionConfig(method="svd-llm", ratio=0.5), x)
    assert [m.name for m in report.modules] == ["0", "2"]
    assert isinstance(model[0], LowRankLinear)
    assert rank_for_ratio(64, 32, 0.5) <= model[0].rank <= rank_for_ratio(64, 32, 0.5) + 1


def test_patterns_matching_nothing_fail_before_work(token_batches):
    with pytest.raises(InvalidInputError, match="no linear layer matches"):
        compress_model(tiny_model("llama"), CompressionConfig(ratio=0.4, include=["nonexistent_proj"]), token_batches)


def test_data_aware_method_requires_calibration():
    with pytest.raises(ValueError, match="needs calibration"):
        compress_model(tiny_model("llama"), CompressionConfig(method="svd-llm", ratio=0.4), None)


@pytest.mark.parametrize("bad", [dict(ratio=0.0), dict(ratio=1.0), dict(ratio=-0.2), dict(method="svdllm"),
                                 dict(propagation="both"), dict(include="q_proj"), dict(include=["("])])
def test_config_validation(bad):
    with pytest.raises(InvalidInputError):
        CompressionConfig(**bad)


def test_statistics_dtype_is_validated():
    assert CompressionConfig().statistics_dtype == "float32"  # measured on a real model (BENCHMARKS.md)
    assert CompressionConfig(statistics_dtype="float32").torch_statistics_dtype == torch.float32
    assert CompressionConfig(statistics_dtype="float64").torch_statistics_dtype == torch.float64
    message = r"statistics_dtype must be one of \('float64', 'float32'\).*'float16'"
    with pytest.raises(InvalidInputError, match=message):
        CompressionConfig(statistics_dtype="float16")


def test_unknown_method_suggests_close_name():
    with pytest.raises(InvalidInputError, match="did you mean 'svd-llm'"):
        CompressionConfig(method="svd_llm")


def test_compression_is_deterministic(token_batches):
    outs = []
    for _ in range(2):
        model = tiny_model("llama")
        compress_model(model, CompressionConfig(method="svd-llm", ratio=0.4), token_batches)
        with torch.no_grad():
            outs.append(model(token_batches[0]).logits)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("method", ["svd-llm", "adasvd"])
def test_paired_refinement_with_a_block_left_out(method, token_batches):
    """Paired (dense + compressed) streams still advance through a block that has no targets.

    Regression: with block 0 excluded, the dense stream was never produced and block 1 crashed.
    Block 0 is untouched, so block 1's two streams are identical and the report of its first input
    stage (q/k/v, which no other target of the block precedes) equals a run whose inputs are the dense
    model's (propagation="original"). Later stages see the already compressed q/k/v (see
    `_compress_block_paired`), so they differ by design.
    """
    model = tiny_model("llama")
    block0 = {n: p.detach().clone() for n, p in model.model.layers[0].named_parameters()}
    config = CompressionConfig(method=method, ratio=0.4, include=[r"layers\.1\."])
    report = compress_model(model, config, token_batches)
    assert report.modules and all(m.name.startswith("model.layers.1.") for m in report.modules)
    for n, p in model.model.layers[0].named_parameters():
        torch.testing.assert_close(p, block0[n], rtol=0, atol=0)
    if method == "svd-llm":  # uniform allocation: the ranks match module by module (adaCR's do not)
        reference = tiny_model("llama")
        full = compress_model(reference, CompressionConfig(method=method, ratio=0.4, propagation="original"),
                              token_batches)
        same = {m.name: m for m in full.modules}
        matching = [m for m in report.modules if m.rank == same[m.name].rank and "_proj" in m.name
                    and m.name.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj")]
        assert len(matching) == 3
        for m in matching:
            assert m.relative_error == pytest.approx(same[m.name].relative_error, rel=1e-5), m.name
    with torch.no_grad():
        assert torch.isfinite(model(token_batches[0]).logits).all()


def _block_calls(model):
    """Forward runs per decoder block (a list, and the hooks' handles), counted at the block's first
    module: a statistics pass whose outputs nobody reads stops inside the block once its targets have
    their inputs, and capturing block 0's inputs stops before it runs."""
    calls = [0] * len(model.model.layers)
    handles = [layer.input_layernorm.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(model.model.layers)]
    return calls, handles


@pytest.mark.parametrize("propagation", ["original", "compressed"])
def test_original_propagation_runs_each_block_once_on_the_dense_models_inputs(propagation, token_batches):
    """``original`` takes the statistics pass's outputs as the next block's inputs: one forward per block
    and batch, and block 1 is fitted to exactly what the dense model feeds it, so its factors are
    bit-identical to a run that leaves block 0 dense. ``compressed`` runs every block but the last a
    second time, compressed, and block 1 then sees (and is fitted to) block 0's compression."""
    model = tiny_model("llama")
    calls, handles = _block_calls(model)
    config = CompressionConfig(method="svd-llm-w", ratio=0.4, propagation=propagation)
    report = compress_model(model, config, token_batches)
    for h in handles:
        h.remove()
    assert report.propagation == propagation
    last = len(calls) - 1
    per_batch = 1 if propagation == "original" else 2
    assert calls == [len(token_batches) * (per_batch if i < last else 1) for i in range(len(calls))]
    alone = tiny_model("llama")
    compress_model(alone, CompressionConfig(method="svd-llm-w", ratio=0.4, propagation=propagation,
                                            include=[r"layers\.1\."]), token_batches)
    # The budget's flooring remainder goes to other targets when block 0 is left out: compare the
    # factors of equal rank.
    pairs = [(m, alone.get_submodule(n)) for n, m in model.model.layers[1].named_modules(prefix="model.layers.1")
             if isinstance(m, LowRankLinear) and m.rank == alone.get_submodule(n).rank]
    assert len(pairs) >= 6
    same = [torch.equal(a.up, b.up) and torch.equal(a.down, b.down) for a, b in pairs]
    assert all(same) if propagation == "original" else not any(same)


def _target_inputs(model, names, batches):
    """Each named linear's input over the batches (tokens × n), recorded by hooks on a real forward."""
    seen = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


@pytest.mark.parametrize("method", ["svd-llm", "adasvd"])
def test_compensation_is_fitted_to_the_inputs_the_compressed_model_produces(method, token_batches):
    """The error each compensated target reports is its real error in the compressed model.

    Refinement fits U·V·X_c to the dense outputs W·X_o, so X_c must be what the target receives once
    the model is compressed. Inside a block that includes the earlier targets' compression: o_proj reads
    attention over the compressed q/k/v, down_proj the activations of the compressed gate/up. Root
    cause of the collapse of svd-llm / adasvd on SmolLM2-135M (ppl 849 / 1298 vs 155 for whitening
    alone at 40 %): all of a block's statistics were collected before any of its targets was replaced,
    so o_proj, gate/up and down_proj were compensated for inputs that never occur, and their reported
    (fitted) errors understated the real ones. Here, replaying the calibration batches through the dense
    and the compressed model, every target's measured ‖W′x_c − W x_o‖ / ‖W x_o‖ equals its report —
    for the compensated residual writers with each token weighted by 1 / ms(dense residual after the
    addition), as they are fitted (`core.residual`).
    """
    # float64 models: the comparison is about which inputs were fitted, not about float32 storage.
    dense = tiny_model("llama", seed=3).double()
    model = tiny_model("llama", seed=3).double()
    report = compress_model(model, CompressionConfig(method=method, ratio=0.5), token_batches)
    names = [m.name for m in report.modules if m.rank is not None]
    assert len(names) == 14
    x_o, x_c = _target_inputs(dense, names, token_batches), _target_inputs(model, names, token_batches)
    weights = writer_token_weights(dense, token_batches)
    assert sum(m.compensated for m in report.modules) == 4
    for m in report.modules:
        w = dense.get_submodule(m.name).weight.detach().double()
        approx = model.get_submodule(m.name).dense_weight().detach().double()
        # Targets that are not compensated were fitted to (and report on) their own compressed input.
        y = (x_o[m.name] if m.compensated else x_c[m.name]) @ w.T
        weight = weights[m.name] if m.compensated else torch.ones(len(y), 1, dtype=torch.float64)
        measured = float(((x_c[m.name] @ approx.T - y).square() * weight).sum() / (y.square() * weight).sum()) ** 0.5
        assert m.relative_error == pytest.approx(measured, rel=1e-6, abs=1e-9), m.name


@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_projection_methods_report_their_measured_error_on_the_dense_inputs(method, token_batches):
    """svd and asvd read their error off the energy the projection keeps (``_projected_error``:
    ‖WX‖² − ‖W′X‖², r·n² flops) instead of the Gram form. It must be the error the stored module makes
    on what it was calibrated on, the dense model's inputs (their propagation is ``original``)."""
    dense = tiny_model("llama", seed=3).double()
    model = tiny_model("llama", seed=3).double()
    # float64 statistics: the check is about the identity, not about the products' rounding.
    config = CompressionConfig(method=method, ratio=0.5, statistics_dtype="float64")
    report = compress_model(model, config, token_batches)
    names = [m.name for m in report.modules if m.rank is not None]
    assert len(names) == 14 and report.phase_seconds.get("report", 0.0) > 0
    x = _target_inputs(dense, names, token_batches)
    for m in report.modules:
        w = dense.get_submodule(m.name).weight.detach().double()
        approx = model.get_submodule(m.name).dense_weight().detach().double()
        measured = float((x[m.name] @ (approx - w).T).norm() / (x[m.name] @ w.T).norm())
        assert 0.05 < measured < 1.0
        # ‖W X‖² is summed from float32 rows of the outputs (`statistics._add_energy`).
        assert m.relative_error == pytest.approx(measured, rel=1e-6), m.name


@pytest.mark.parametrize("propagation", ["original", "compressed"])
def test_plain_svd_factors_first_and_measures_the_stored_modules_in_its_one_pass(propagation, token_batches):
    """svd's factors read no data, so they are built before the block runs and the calibration pass only
    measures them (`pipeline._factor_then_measure`): no Gram statistics, the same factors as a run
    without calibration data, one forward per block and batch under ``original``, and each report's
    error is the stored module's ‖(W′ − W)X‖ / ‖WX‖ on the inputs it was measured on."""
    dense = tiny_model("llama", seed=3)
    model = tiny_model("llama", seed=3)
    calls, handles = _block_calls(model)
    report = compress_model(model, CompressionConfig(method="svd", ratio=0.5, propagation=propagation),
                            token_batches)
    for h in handles:
        h.remove()
    assert "statistics" not in report.phase_seconds and report.phase_seconds["report"] > 0
    per_batch = 1 if propagation == "original" else 2
    assert calls == [len(token_batches) * (per_batch if i < len(calls) - 1 else 1) for i in range(len(calls))]
    no_data = tiny_model("llama", seed=3)
    compress_model(no_data, CompressionConfig(method="svd", ratio=0.5), None)
    names = [m.name for m in report.modules]
    assert len(names) == 14 and all(m.rank is not None for m in report.modules)
    for name in names:
        got, alone = model.get_submodule(name), no_data.get_submodule(name)
        assert torch.equal(got.up, alone.up) and torch.equal(got.down, alone.down), name
    # What each target received: the dense model's inputs, or under ``compressed`` the compressed
    # prefix's block inputs through the dense block (as SVD-LLM's statistics are taken), which the
    # compressed model reproduces for the block's first stage, q/k/v.
    if propagation == "compressed":
        names = [n for n in names if n.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj")]
    x = _target_inputs(dense if propagation == "original" else model, names, token_batches)
    for m in (m for m in report.modules if m.name in names):
        w = dense.get_submodule(m.name).weight.detach().double()
        approx = model.get_submodule(m.name).dense_weight().detach().double()
        measured = float((x[m.name] @ (approx - w).T).norm() / (x[m.name] @ w.T).norm())
        assert 0.05 < measured < 1.0
        # ‖WX‖² − ‖W′X‖² from float32 outputs and factors: a few 1e-7 of ‖WX‖², against errors of 5 %
        # and more.
        assert m.relative_error == pytest.approx(measured, rel=1e-4), m.name


def test_projection_meter_is_the_direct_error_and_floors_an_exact_fit_low():
    """`ProjectionErrorMeter` reads ‖(W′ − W)X‖ / ‖WX‖ off the energy the projection keeps: the direct
    error for a truncated SVD, on the unmasked tokens only, and no more than its documented ~5e-4
    floor where the factors reproduce W exactly (rank-8 W kept at rank 8)."""
    torch.manual_seed(0)
    full = nn.Linear(96, 64, bias=True)
    exact = nn.Linear(96, 64, bias=False)
    with torch.no_grad():
        exact.weight.copy_(torch.randn(64, 8) @ torch.randn(8, 96))
    pairs = {}
    for name, dense, rank in (("full", full, 12), ("exact", exact, 8)):
        u, s, vt = torch.linalg.svd(dense.weight.detach().double(), full_matrices=False)
        pairs[name] = (dense, LowRankLinear.from_factors((u[:, :rank] * s[:rank]).float(), vt[:rank].float(), None))
    x = torch.randn(3, 40, 96) * torch.linspace(0.1, 3.0, 96)  # anisotropic: the input matters
    mask = torch.rand(3, 40) > 0.3
    with ProjectionErrorMeter(pairs) as meter, meter.masked(mask):
        full(x), exact(x)
    errors = meter.relative_errors()
    xs = x[mask].double()
    w, approx = full.weight.detach().double(), pairs["full"][1].dense_weight().detach().double()
    direct = float((xs @ (approx - w).T).norm() / (xs @ w.T).norm())
    assert 0.2 < direct < 0.9 and errors["full"] == pytest.approx(direct, rel=1e-5)
    assert errors["exact"] < 5e-4, errors["exact"]


@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_projections_in_bf16_keep_the_gram_form(method, token_batches, monkeypatch):
    """bf16 factors are rounded, so W′ is no projection to the precision ‖WX‖² − ‖W′X‖² needs: the
    report keeps measuring them against the exact W from the Gram statistics of every input (down_proj's
    128-wide one too, which float32 asvd does not form)."""
    widths = _gram_widths(monkeypatch)
    model = tiny_model("llama", seed=3).to(torch.bfloat16)
    report = compress_model(model, CompressionConfig(method=method, ratio=0.5), token_batches)
    assert report.phase_seconds.get("statistics", 0.0) > 0
    assert all(0.05 < m.relative_error < 1.0 for m in report.modules)
    assert widths == {64, 128}


def _gram_widths(monkeypatch) -> set[int]:
    """The widths of every Gram sum the statistics accumulate from here on (input or output side)."""
    from adasvd_lightning.core import statistics

    widths: set[int] = set()
    accumulate = statistics.accumulate_gram

    def recording(h, x, *args, **kwargs):
        widths.add(h.shape[0])
        return accumulate(h, x, *args, **kwargs)

    monkeypatch.setattr(statistics, "accumulate_gram", recording)
    return widths


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_asvd_reads_a_biased_or_transposed_writers_error_off_its_outputs(family, token_batches, monkeypatch):
    """OPT's fc2 (128 → 64) carries a bias and GPT-2's mlp.c_proj is a Conv1D (weight stored n × m): the
    output Gram is of W·x without the bias, in the module's own orientation, and each reported error is
    the stored module's on the dense inputs (float64 statistics: the identity, not the rounding)."""
    from adasvd_lightning.core.surgery import linear_weight

    widths = _gram_widths(monkeypatch)
    dense = tiny_model(family, seed=3).double()
    model = tiny_model(family, seed=3).double()
    report = compress_model(model, CompressionConfig(method="asvd", ratio=0.5, statistics_dtype="float64"),
                            token_batches)
    assert widths == {64}  # the hidden width only: no H of the MLP's 128 (OPT) or 256 (GPT-2) features
    names = [m.name for m in report.modules if m.rank is not None]
    x = _target_inputs(dense, names, token_batches)
    assert len(names) >= 8
    for name in names:
        w = linear_weight(dense.get_submodule(name)).detach().double()
        approx = model.get_submodule(name).dense_weight().detach().double()
        measured = float((x[name] @ (approx - w).T).norm() / (x[name] @ w.T).norm())
        error = next(m.relative_error for m in report.modules if m.name == name)
        assert 0.01 < measured < 1.0 and error == pytest.approx(measured, rel=1e-6), name


def test_asvd_keeps_down_projs_output_gram_instead_of_its_input_gram(token_batches, monkeypatch):
    """asvd's down_proj (64 × 128) reads its input alone; its report needs only ‖(I − P)Y‖², so the pass
    keeps the outputs' 64×64 Gram, not the input's 128×128 one (at SmolLM2's shapes 576² instead of
    1536² per token). The error reported is still the stored module's on the dense inputs (the float32
    statistics' rounding aside: `test_projection_methods_report_their_measured_error_on_the_dense_inputs`)."""
    widths = _gram_widths(monkeypatch)
    dense = tiny_model("llama", seed=3)
    model = tiny_model("llama", seed=3)
    report = compress_model(model, CompressionConfig(method="asvd", ratio=0.5), token_batches)
    assert widths == {64}
    x = _target_inputs(dense, [m.name for m in report.modules], token_batches)
    for m in report.modules:
        w = dense.get_submodule(m.name).weight.detach().double()
        approx = model.get_submodule(m.name).dense_weight().detach().double()
        xd = x[m.name].double()
        measured = float((xd @ (approx - w).T).norm() / (xd @ w.T).norm())
        assert m.relative_error == pytest.approx(measured, rel=1e-4), m.name


def test_projection_error_from_outputs_is_the_gram_form():
    """‖(I − P)Y‖ / ‖Y‖ from the outputs' Gram equals tr(E H Eᵀ) / tr(W H Wᵀ) for a scaled SVD's truncation
    (W′ = U_r U_rᵀ W); a rank that keeps everything reads 0, also with zero columns in ``up``."""
    from adasvd_lightning.core.output_error import projection_error_from_outputs
    from adasvd_lightning.core.pipeline import _output_error
    from adasvd_lightning.core.refinement import GramStatistics

    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, dtype=torch.float64, generator=g)
    x = torch.randn(200, 40, dtype=torch.float64, generator=g) * torch.linspace(0.1, 3.0, 40, dtype=torch.float64)
    h = x.T @ x / 200
    y = x @ w.T
    out_gram = y.T @ y / 200
    scale = x.abs().mean(0).sqrt()
    u, sigma, vt = torch.linalg.svd(w * scale, full_matrices=False)
    for rank in (1, 8, 20):
        up, down = u[:, :rank] * sigma[:rank].sqrt(), sigma[:rank, None].sqrt() * vt[:rank] / scale
        exact = _output_error(w, up @ down, GramStatistics(h_cc=h, h_oc=h), float((w @ h * w).sum()))
        assert exact > 0.01 and projection_error_from_outputs(up, out_gram) == pytest.approx(exact, rel=1e-10)
    low = w[:3].clone()  # four rows of rank 3: a rank-4 truncation keeps them whole, its last σ is 0
    u, sigma, vt = torch.linalg.svd(torch.cat([low, low[:1] + low[1:2]]), full_matrices=False)
    up = u[:, :4] * sigma[:4].sqrt()
    yl = x @ torch.cat([low, low[:1] + low[1:2]]).T
    assert float(sigma[3]) < 1e-12
    assert projection_error_from_outputs(up, yl.T @ yl / 200) == pytest.approx(0.0, abs=1e-7)
    assert projection_error_from_outputs(up, torch.zeros(4, 4, dtype=torch.float64)) is None


def test_asvd_is_the_truncated_svd_of_the_activation_scaled_weight_and_never_beats_whitening(token_batches):
    """asvd's modules are its definition, computed independently here: S = diag(mean |x_j|)^α from the
    dense model's inputs, W·S's SVD truncated at the reported rank, S⁻¹ folded back. And at the same
    rank its output error is never below the whitened truncation's, the optimum for ‖(W − W′)X‖ — why
    asvd collapses on SmolLM2-135M where svd-llm-w does not (BENCHMARKS.md, "Where `asvd` breaks")."""
    dense = tiny_model("llama", seed=3).double()
    model = tiny_model("llama", seed=3).double()
    report = compress_model(model, CompressionConfig(method="asvd", ratio=0.5, statistics_dtype="float64"),
                            token_batches)
    names = [m.name for m in report.modules]
    x = _target_inputs(dense, names, token_batches)
    worse = 0
    for m in report.modules:
        w = dense.get_submodule(m.name).weight.detach().double()
        scale = x[m.name].abs().mean(0).pow(0.5)
        u, sigma, vt = torch.linalg.svd(w * scale, full_matrices=False)
        expected = (u[:, :m.rank] * sigma[:m.rank]) @ vt[:m.rank] / scale
        got = model.get_submodule(m.name).dense_weight().detach().double()
        assert (got - expected).norm() <= 1e-8 * w.norm(), m.name
        h = x[m.name].T @ x[m.name]
        whitened = torch.linalg.svdvals(w @ torch.linalg.cholesky(h))
        optimal = float(whitened[m.rank:].square().sum() / whitened.square().sum()) ** 0.5
        assert m.relative_error >= optimal * (1 - 1e-9), m.name
        worse += m.relative_error > 1.05 * optimal
    assert worse >= len(names) // 2  # not a tie: the scaling leaves real error on the table


def test_projected_error_is_the_gram_forms_and_defers_near_exact_fits():
    """``_projected_error`` (‖WX‖² − ‖W′X‖² for W′ = U_r U_rᵀ W) equals tr(E H Eᵀ) / tr(W H Wᵀ) for a
    scaled SVD's truncation, and leaves a fit within 1 % to the Gram form, where the difference of two
    nearly equal energies would lose the digits."""
    from adasvd_lightning.core.pipeline import _output_error, _projected_error
    from adasvd_lightning.core.refinement import GramStatistics

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, dtype=torch.float64, generator=g)
    x = torch.randn(200, 40, dtype=torch.float64, generator=g) * torch.linspace(0.1, 3.0, 40, dtype=torch.float64)
    h = x.T @ x / 200
    grams = GramStatistics(h_cc=h, h_oc=h)
    energy = float((w @ h * w).sum())
    scale = x.abs().mean(0).sqrt()  # ASVD's column scaling (α = ½)
    for s in (torch.ones(40, dtype=torch.float64), scale):
        u, sigma, vt = torch.linalg.svd(w * s, full_matrices=False)
        for rank, projected in ((8, True), (24, False)):
            up, down = u[:, :rank] * sigma[:rank].sqrt(), sigma[:rank, None].sqrt() * vt[:rank] / s
            exact = _output_error(w, up @ down, grams, energy)
            if projected:
                assert 0.1 < exact and _projected_error(up, down, grams, energy) == pytest.approx(exact, rel=1e-10)
            else:  # full rank: W′ = W, nothing dropped
                assert exact < 1e-6 and _projected_error(up, down, grams, energy) is None
    assert _projected_error(up, down, GramStatistics(h_cc=h, h_oc=h.clone()), energy) is None  # two streams


@pytest.mark.parametrize("method", ["svd-llm", "adasvd"])
def test_the_last_stage_is_factorized_without_the_dense_modules_of_the_earlier_ones(method, token_batches,
                                                                                    monkeypatch):
    """A paired block keeps the dense modules of its replaced stages for the dense stream's passes. After
    the last stage's pass none is run, so when down_proj is factorized (its n² statistics are the run's
    largest) no dense q/k/v/o or gate/up is alive any more, while down_proj's own dense weight is."""
    import gc
    import weakref

    from adasvd_lightning.core import pipeline

    model = tiny_model("llama")
    layer = model.model.layers[0]
    earlier = {n: weakref.ref(m) for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] in
               ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")}
    assert len(earlier) == 6
    alive: dict[str, list[str]] = {}
    factorize = pipeline._factorize_target

    def spy(name, module, *a, **k):
        if name == "model.layers.0.mlp.down_proj":
            gc.collect()
            alive[name] = [n for n, ref in earlier.items() if ref() is not None]
            assert isinstance(module, nn.Linear)
        return factorize(name, module, *a, **k)

    monkeypatch.setattr(pipeline, "_factorize_target", spy)
    report = compress_model(model, CompressionConfig(method=method, ratio=0.4), token_batches)
    assert alive == {"model.layers.0.mlp.down_proj": []}
    assert sum(m.rank is not None for m in report.modules) == 14


def test_a_writers_statistics_are_freed_before_its_factors_are_balanced(token_batches, monkeypatch):
    """The balance of refitted factors (n×r work) runs after the writer's H_oc, whitening factor and
    whitened SVD are gone (2.3 GB of them at Llama-7B width). Each compensated writer's sums are
    released before its balance, and the reports still carry the refinement's error."""
    from adasvd_lightning.core import pipeline, refinement
    from adasvd_lightning.core.statistics import InputStatistics

    events: list[tuple[str, int]] = []
    release, balance = InputStatistics.release_sums, refinement.balance_factors

    def released(self):
        events.append(("release", self.cross_sum is not None))  # H itself may be the factor's storage by now
        return release(self)

    def balanced(up, down):
        events.append(("balance", up.shape[1]))
        return balance(up, down)

    monkeypatch.setattr(InputStatistics, "release_sums", released)
    monkeypatch.setattr(pipeline, "balance_factors", balanced)
    model = tiny_model("llama")
    report = compress_model(model, CompressionConfig(method="svd-llm", ratio=0.4), token_batches)
    assert [e[0] for e in events] == ["release", "balance"] * 4  # o_proj, down_proj of both blocks
    assert all(held for kind, held in events if kind == "release")  # H_oc was still there
    writers = [m for m in report.modules if m.compensated]
    assert len(writers) == 4 and all(m.relative_error is not None and m.relative_error > 0 for m in writers)
