"""A writer's held-out tokens as rows (`core.writer_heldout`) give the validation exactly what the
held-out Gram sums gave: the same fit split, the same held-out scores, the same chosen step count —
and the whole data's Grams are back as they were afterwards."""

from __future__ import annotations

import pytest
import torch

from adasvd_lightning.core.factorization import factorize
from adasvd_lightning.core.writer_heldout import HeldoutRows, complement_rows
from adasvd_lightning.core.plain_guard import PlainHeldoutError
from adasvd_lightning.core.refinement import (GramStatistics, RefinementTarget, complement, objective,
                                              validated_steps)
from adasvd_lightning.core.whitening import compute_whitening

M, N, RANK = 7, 20, 5


def _writer(tokens: int = 300, held: int = 80, seed: int = 0, dtype: torch.dtype = torch.float32):
    """W, weighted whole Grams (means, held-out tokens included), held-out Grams and rows (in ``dtype``:
    the statistics' product precision; the Grams are exact float64 products of the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(M, N, generator=g, dtype=torch.float64)
    x_c = (torch.randn(tokens, N, generator=g) @ torch.diag(torch.linspace(2.0, 0.1, N))).to(dtype)
    drift = torch.eye(N) + 0.3 * torch.randn(N, N, generator=g)
    x_o = (x_c.float() @ drift.T).to(dtype)
    root = (0.5 + torch.rand(tokens, generator=g)).to(dtype)  # √ of each token's residual weight
    xo, xc, r = x_o.double(), x_c.double(), root.double()[:, None]
    whole = GramStatistics(h_cc=(xc * r).T @ (xc * r) / tokens, h_oc=(xo * r).T @ (xc * r) / tokens)
    part = GramStatistics(h_cc=(xc[-held:] * r[-held:]).T @ (xc[-held:] * r[-held:]) / held,
                          h_oc=(xo[-held:] * r[-held:]).T @ (xc[-held:] * r[-held:]) / held)
    outputs = (xo[-held:] @ weight.T).to(dtype)
    rows = HeldoutRows(x_c[-held:], outputs, root[-held:])
    energy = float(((xo * r) @ weight.T).square().sum()) / tokens
    held_energy = float(((xo[-held:] * r[-held:]) @ weight.T).square().sum()) / held
    return weight, whole, part, rows, energy, held_energy


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"])
def test_rows_give_the_held_out_sums_fit_split_and_score(dtype, tol):
    """float64 rows: the same numbers as the held-out sums, to rounding. float32 rows (the statistics'
    default product precision, `CompressionConfig.statistics_dtype`): products rounded in float32,
    as the sums' own products are."""
    weight, whole, part, rows, energy, held_energy = _writer(dtype=dtype)
    n, n_v = 300, 80
    fit_energy = (n * energy - n_v * held_energy) / (n - n_v)
    probe = torch.randn(N, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with complement(GramStatistics(whole.h_cc.clone(), whole.h_oc.clone()), n, part, n_v) as grams:
        reference = RefinementTarget(weight, grams, target_energy=fit_energy)
        ref_h, ref_g, ref_g_times = grams.h_cc.clone(), reference.g.clone(), reference.g_times(probe)
    check = RefinementTarget(weight, part, target_energy=held_energy)

    h_cc, h_oc = whole.h_cc.clone(), whole.h_oc.clone()
    with complement_rows(h_cc, h_oc, n, rows) as removed:
        fit = RefinementTarget(weight, GramStatistics(h_cc, h_oc), target_energy=fit_energy, cross_removed=removed)
        scale = float(ref_h.abs().max())
        torch.testing.assert_close(h_cc, ref_h, rtol=0, atol=tol * scale)
        torch.testing.assert_close(fit.g_times(probe), ref_g_times, rtol=0, atol=tol * float(ref_g_times.abs().max()))
        torch.testing.assert_close(fit.g, ref_g, rtol=0, atol=tol * float(ref_g.abs().max()))
        start = factorize(weight, RANK, compute_whitening(h_cc))
        score = PlainHeldoutError(weight, rows.inputs, rows.outputs, root_weights=rows.root_weights)
        assert score.weighted(start.up, start.down) == pytest.approx(objective(check, start.up, start.down),
                                                                     rel=tol / 10)  # outputs rounded to dtype
        got = validated_steps(fit, score.weighted, start.up, start.down, v_steps=True, guard=score)
    # The Gram path, from the same start.
    with complement(GramStatistics(whole.h_cc.clone(), whole.h_oc.clone()), n, part, n_v) as grams:
        reference = RefinementTarget(weight, grams, target_energy=fit_energy)
        guard = PlainHeldoutError(weight, rows.inputs, rows.outputs)
        want = validated_steps(reference, check, start.up, start.down, v_steps=True, guard=guard)
    assert got[0] == want[0] and len(got[1]) == len(want[1]) >= 3
    torch.testing.assert_close(torch.tensor(got[1]), torch.tensor(want[1]), rtol=100 * tol, atol=0)
    assert score.values == pytest.approx(guard.values, rel=100 * tol)  # the plain error, same pass
    # Back to the whole data's Grams.
    torch.testing.assert_close(h_cc, whole.h_cc, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(h_oc, whole.h_oc, rtol=1e-12, atol=1e-13)


def test_rows_that_leave_nothing_to_fit_are_refused():
    weight, whole, _, rows, _, _ = _writer(tokens=80, held=80)
    with pytest.raises(ValueError, match="nothing to fit"), complement_rows(whole.h_cc, whole.h_oc, 80, rows):
        pass
    with pytest.raises(ValueError, match="paired"), complement_rows(whole.h_cc, whole.h_cc, 300, rows):
        pass
    with pytest.raises(RuntimeError, match="weights"):
        HeldoutRows(rows.inputs, rows.outputs, rows.root_weights[:3])


def test_moments_score_and_split_like_the_rows_they_summarise():
    """The moments form (many held-out tokens) against the rows form of the same tokens: the same fit
    split and W·H_oc, the same weighted and plain errors, with preserved columns too."""
    from adasvd_lightning.core.writer_heldout import HeldoutMoments

    weight, whole, _, rows, energy, held_energy = _writer(dtype=torch.float64)
    moments = HeldoutMoments.empty(N, M)
    for part in range(0, rows.tokens, 30):  # in batches, as calibration adds them
        moments.add(rows.inputs[part:part + 30], rows.outputs[part:part + 30], rows.root_weights[part:part + 30])
    moments.finalize()
    assert moments.tokens == rows.tokens
    probe = torch.randn(N, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    results = []
    for form in (rows, moments):
        h_cc, h_oc = whole.h_cc.clone(), whole.h_oc.clone()
        with form.fit_split(h_cc, h_oc, 300) as removed:
            fit = RefinementTarget(weight, GramStatistics(h_cc, h_oc), target_energy=energy, cross_removed=removed)
            results.append((h_cc.clone(), fit.g_times(probe), fit.g.clone()))
        torch.testing.assert_close(h_cc, whole.h_cc, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(h_oc, whole.h_oc, rtol=1e-12, atol=1e-13)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(11)
    up, down = torch.randn(M, RANK, generator=g, dtype=torch.float64), torch.randn(RANK, N - 2, generator=g,
                                                                                   dtype=torch.float64)
    kept = torch.tensor([3, 11])
    for columns, v in ((None, torch.randn(RANK, N, generator=g, dtype=torch.float64)), (kept, down)):
        by_rows, by_moments = rows.scorer(weight, columns), moments.scorer(weight, columns)
        assert by_moments.weighted(up, v) == pytest.approx(by_rows.weighted(up, v), rel=1e-10)
        assert by_moments(up, v) == pytest.approx(by_rows(up, v), rel=1e-10)
        assert by_moments.relative(0) == pytest.approx(by_rows.relative(0), rel=1e-10)
    assert moments.energies[0] == pytest.approx(held_energy, rel=1e-10)


@pytest.mark.parametrize("form", ["rows", "moments"])
def test_fit_split_output_gram_is_w_h_fit_wt_without_h_cc(form, monkeypatch):
    """The fit split's W·H_cc·Wᵀ formed from the whole data's W·H_cc·Wᵀ and the held-out tokens (rows a
    chunk at a time, here three chunks; or moments) equals W·H_fit·Wᵀ of the fit split formed in place,
    and leaves the rows as they were."""
    from adasvd_lightning.core import writer_heldout
    from adasvd_lightning.core.factorization import output_gram
    from adasvd_lightning.core.writer_heldout import HeldoutMoments

    weight, whole, _, rows, _, _ = _writer(tokens=900, held=600, dtype=torch.float64)
    held = rows
    if form == "moments":
        held = HeldoutMoments.empty(N, M)
        held.add(rows.inputs, rows.outputs, rows.root_weights)
        held.finalize()
    chunks = []
    real = writer_heldout.token_chunks
    monkeypatch.setattr(writer_heldout, "token_chunks",
                        lambda x, dtype: chunks.append(1) or real(x, dtype, chunk_bytes=256 * 8 * N))
    before = rows.inputs.clone()
    got = held.fit_split_output_gram(output_gram(weight, whole.h_cc), weight, 900)
    h_cc, h_oc = whole.h_cc.clone(), whole.h_oc.clone()
    with held.fit_split(h_cc, h_oc, 900):
        want = output_gram(weight, h_cc)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-11 * float(want.abs().max()))
    assert torch.equal(rows.inputs, before)
    if form == "rows":
        assert len(list(real(rows.inputs, torch.float64, chunk_bytes=256 * 8 * N))) == 3 and chunks


def test_the_smaller_form_is_chosen_from_the_held_out_token_count():
    from adasvd_lightning.core.writer_heldout import rows_are_smaller

    # Llama-7B's down_proj (n = 11008, m = 4096): rows 60 kB per token, moments 2.7 GB.
    assert rows_are_smaller(512, 11008, 4096)  # 8 × 256 calibration tokens, a quarter held out
    assert not rows_are_smaller(64 * 2048, 11008, 4096)  # 256 × 2048, a quarter held out: 7.9 GB of rows


@pytest.mark.parametrize("method", ["svd-llm", "adasvd"])
def test_compression_is_the_same_with_either_form(method, token_batches, monkeypatch):
    """The whole pipeline on a tiny Llama, every writer's held-out tokens kept as rows, then as moments:
    the same validated step counts, held-out errors and compressed weights."""
    from adasvd_lightning import CompressionConfig, compress_model
    from adasvd_lightning.core import statistics

    from conftest import tiny_model

    runs = []
    for rows in (True, False):
        asked = []
        monkeypatch.setattr(statistics, "rows_are_smaller", lambda *a, rows=rows: asked.append(a) or rows)
        model = tiny_model("llama")
        report = compress_model(model, CompressionConfig(method=method, ratio=0.4), token_batches)
        assert asked, "the form was never chosen"
        runs.append((report, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    (rows_report, rows_state), (moments_report, moments_state) = runs
    validated = [m for m in rows_report.modules if m.heldout_error is not None]
    assert len(validated) == 4  # o_proj and down_proj of both blocks
    for a, b in zip(rows_report.modules, moments_report.modules):
        assert a.refinement_steps == b.refinement_steps
        if a.heldout_error is not None:
            assert b.heldout_error == pytest.approx(a.heldout_error, rel=1e-6)
            assert b.heldout_plain_error == pytest.approx(a.heldout_plain_error, rel=1e-6)
    for key, value in rows_state.items():
        torch.testing.assert_close(moments_state[key], value, rtol=1e-4, atol=1e-5)
