"""Every preset end to end on tiny models: budgets, structure, save/load, overrides."""

import warnings

import pytest
import torch

from adasvd_lightning import CompressionConfig, PRESETS, compress_model, load_compressed, save_compressed
from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.core.methods import get_method
from adasvd_lightning.core.lowrank import ColumnPreservingLinear, FactorizedLinear
from conftest import tiny_model


def _outlier_batches():
    """Token batches; the tiny models get one activation-outlier channel so column preservation has work."""
    g = torch.Generator().manual_seed(2)
    return list(torch.randint(0, 128, (8, 32), generator=g).split(4))


@pytest.mark.parametrize("method", sorted(PRESETS))
@pytest.mark.parametrize("family,ratio", [("llama", 0.6), ("mistral", 0.4)])
def test_every_preset_meets_the_budget(method, family, ratio):
    model = tiny_model(family)
    with torch.no_grad():
        dense = model(_outlier_batches()[0]).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress_model(model, CompressionConfig(method=method, ratio=ratio), _outlier_batches())
    assert -0.005 <= report.budget_deviation <= 0.0, (method, report.budget_deviation)
    assert report.linear_parameters_after < report.linear_parameters_before
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    with torch.no_grad():
        out = model(_outlier_batches()[0]).logits
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    if PRESETS[method].allocation in ("adacr",):
        assert len(report.allocation["block_importance"]) == 2
    if PRESETS[method].refinement != "none":  # every refinement was validated on held-out sequences
        assert report.heldout_sequences > 0
        compensated = [m for m in report.modules if m.rank is not None and m.compensated]
        assert compensated and all(m.heldout_error <= m.heldout_error_start for m in compensated)


def test_adacomp_alternates_when_its_steps_are_not_validated():
    """8 tokens-sequences of 32 for 64 features: held out, the V-steps do not validate on this random
    model; with validation off the alternation runs (U- and V-steps)."""
    model = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress_model(model, CompressionConfig(method="adasvd", ratio=0.4,
                                                         method_options={"heldout_fraction": 0.0}), _outlier_batches())
    assert report.heldout_sequences == 0
    assert max(m.refinement_steps for m in report.modules) >= 2


def test_duo_svd_round_trip_with_preserved_columns(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():  # an outlier input channel in every block's MLP
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[7] = 40.0
    report = compress_model(model, CompressionConfig(method="adasvd-duo", ratio=0.4), _outlier_batches())
    assert sum(m.kept_columns for m in report.modules) > 0
    assert any(isinstance(m, ColumnPreservingLinear) for m in model.modules())
    with torch.no_grad():
        expected = model(_outlier_batches()[0]).logits
    loaded = load_compressed(save_compressed(model, tmp_path / "duo"))
    with torch.no_grad():
        assert torch.equal(loaded(_outlier_batches()[0]).logits, expected)


def test_refinement_lowers_output_error_against_dense_model():
    """adaComp fits the compressed prefix's inputs to the dense targets: lower logit error on the data it
    was fitted to (unvalidated: 8 sequences are too few to hold any out on this random model)."""
    errors = {}
    batches = _outlier_batches()
    for method, options in [("svd-llm-w", {}), ("svd-llm-w", {"refinement": "adacomp", "heldout_fraction": 0.0})]:
        model = tiny_model("llama", seed=5)
        with torch.no_grad():
            dense = model(batches[0]).logits
        compress_model(model, CompressionConfig(method=method, ratio=0.5, method_options=options), batches)
        with torch.no_grad():
            errors[bool(options)] = float((model(batches[0]).logits - dense).norm())
    assert errors[True] < errors[False]


def test_method_options_override_and_validate():
    config = CompressionConfig(method="svd-llm", ratio=0.4, method_options={"refinement": "adacomp"})
    assert config.spec.refinement == "adacomp" and config.spec.name == "svd-llm+custom"
    with pytest.raises(InvalidInputError, match="did you mean 'refinement'"):
        CompressionConfig(method="svd-llm", ratio=0.4, method_options={"refinment": "adacomp"})
    with pytest.raises(InvalidInputError, match="unknown allocation"):
        CompressionConfig(method="svd-llm", ratio=0.4, method_options={"allocation": "magic"})
    # The module-KL presets' tail scale goes with their estimated table: asking for the exhaustive
    # probes drops it, asking for both is refused.
    assert (get_method("duo-svd").allocation, get_method("duo-svd").fisher_scale) == ("module-kl-fisher", "tail")
    assert get_method("duo-svd").tail_sequences == 4
    # adasvd-duo's U-steps absorb what a tail probe measures (test_fisher.py): the estimate alone, no probe.
    duo = get_method("adasvd-duo")
    assert (duo.allocation, duo.fisher_scale, duo.tail_sequences, duo.probes) == ("module-kl-fisher", "none", 0, False)
    spec = CompressionConfig(method="adasvd-duo", method_options={"fisher_scale": "tail", "tail_sequences": 4}).spec
    assert (spec.fisher_scale, spec.tail_sequences, spec.probes) == ("tail", 4, True)
    spec = CompressionConfig(method="duo-svd", method_options={"allocation": "module-kl"}).spec
    assert (spec.allocation, spec.fisher_scale, spec.tail_sequences, spec.probes) == ("module-kl", "none", 0, True)
    with pytest.raises(InvalidInputError, match="needs allocation 'module-kl-fisher'"):
        CompressionConfig(method="duo-svd", method_options={"allocation": "module-kl", "fisher_scale": "tail"})
    # So does the tail probes' sequence cap, when another scale is asked for; a cap given with it is refused.
    spec = CompressionConfig(method="adasvd-duo", method_options={"fisher_scale": "none"}).spec
    assert (spec.fisher_scale, spec.tail_sequences) == ("none", 0)
    with pytest.raises(InvalidInputError, match="tail_sequences=4 needs fisher_scale 'tail'"):
        CompressionConfig(method="adasvd-duo", method_options={"fisher_scale": "probed", "tail_sequences": 4})


def test_propagation_is_the_methods_unless_the_config_sets_it():
    """svd (whose factors read no data) and asvd (as its paper calibrates) take the dense model's
    activations, the others the compressed stream; the config or a method option overrides that, and
    the two cannot disagree."""
    methods = {name: CompressionConfig(method=name, ratio=0.4).spec.propagation for name in PRESETS}
    assert methods == {"svd": "original", "asvd": "original", "svd-llm-w": "compressed", "svd-llm": "compressed",
                       "svd-llm-v2": "compressed", "adasvd": "compressed", "duo-svd": "compressed",
                       "adasvd-duo": "compressed"}
    config = CompressionConfig(method="svd-llm-w", ratio=0.4, propagation="original")
    assert config.spec.propagation == "original" and config.spec.name == "svd-llm-w"
    assert CompressionConfig(method="svd", ratio=0.4,
                             method_options={"propagation": "compressed"}).spec.propagation == "compressed"
    with pytest.raises(InvalidInputError, match="contradicts the method option"):
        CompressionConfig(method="svd", ratio=0.4, propagation="original", method_options={"propagation": "compressed"})
    with pytest.raises(InvalidInputError, match="unknown propagation 'dense'"):
        CompressionConfig(method="svd", ratio=0.4, method_options={"propagation": "dense"})


@pytest.mark.parametrize("allocation", ["uniform", "adacr", "grouped-loss", "module-kl", "module-kl-fisher",
                                        "sensitivity-ppl"])
@pytest.mark.parametrize("form", ["low-rank", "column-preserving"])
def test_every_allocation_and_form_composes(allocation, form):
    model = tiny_model("qwen2")
    options = {"allocation": allocation, "form": form, "sensitivity_candidates": [0.2, 0.5, 0.8, 1.0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress_model(model, CompressionConfig(method="svd-llm", ratio=0.5, method_options=options),
                                _outlier_batches())
    assert -0.005 <= report.budget_deviation <= 0.0
    if allocation == "uniform" and form == "low-rank":  # every matrix within one rank of half its weights
        for m in report.modules:
            dense, rank_cost = m.out_features * m.in_features, m.out_features + m.in_features
            assert abs(m.params_after - m.bias_params - 0.5 * dense) <= rank_cost
    elif allocation in ("module-kl", "module-kl-fisher", "sensitivity-ppl"):
        assert len(report.allocation["sensitivity"]) == len(report.modules)
