"""Each fast linear-algebra path matches its reference path to tolerance."""

import dataclasses
import warnings

import pytest
import torch

from adasvd_lightning import CompressionConfig, CompressionWarning, compress_model, get_method
from adasvd_lightning.core import factorization, pipeline
from adasvd_lightning.core.factorization import factorize, factorize_output_gram, output_gram
from adasvd_lightning.core.linalg import GRAM_MIN_RELATIVE, singular_values, thin_svd
from adasvd_lightning.core.pipeline import _output_error
from adasvd_lightning.core.refinement import (
    GramStatistics, RefinementTarget, adacomp, objective, optimal_factors, u_step, v_step,
)
from adasvd_lightning.core.whitening import DiagonalWhitening, EigenWhitening, IdentityWhitening, compute_whitening
from conftest import FEW_CANDIDATES, compress_tiny, tiny_model, writer_token_weights


def _spectrum_matrix(m: int, n: int, decay: float = 0.9, seed: int = 0) -> torch.Tensor:
    """A random m×n float64 matrix with singular values decay^i (distinct, well separated)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = decay ** torch.arange(k, dtype=torch.float64)
    return (u * s) @ v.T


def _gram(n: int, tokens: int = 400, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, n, dtype=torch.float64)
    return x.T @ x / tokens


@pytest.mark.parametrize("shape", [(96, 48), (48, 96), (64, 64)])
def test_gram_svd_matches_lapack(shape):
    a = _spectrum_matrix(*shape)
    rank = 20
    u, s, vh = thin_svd(a, rank, driver="gram")
    u_ref, s_ref, vh_ref = torch.linalg.svd(a, full_matrices=False)
    assert u.shape == (shape[0], rank) and vh.shape == (rank, shape[1]) and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-12)
    truncated, truncated_ref = (u * s[:rank]) @ vh, (u_ref[:, :rank] * s_ref[:rank]) @ vh_ref[:rank]
    torch.testing.assert_close(truncated, truncated_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(u.T @ u, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-10)


def test_gram_svd_falls_back_when_inaccurate():
    # Rank 5 matrix asked for rank 10: σ_10 ≈ 0 < GRAM_MIN_RELATIVE·σ_1, so LAPACK must be used.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 30, generator=g, dtype=torch.float64)
    u, s, vh = thin_svd(a, 10, driver="gram")
    u_ref, s_ref, vh_ref = torch.linalg.svd(a, full_matrices=False)
    assert float(s_ref[9] / s_ref[0]) < GRAM_MIN_RELATIVE
    torch.testing.assert_close(u, u_ref[:, :10])
    torch.testing.assert_close(vh, vh_ref[:10])
    # Lower precision always takes the reference route.
    a32 = _spectrum_matrix(30, 20).float()
    u32, _, _ = thin_svd(a32, 5, driver="auto")
    torch.testing.assert_close(u32, torch.linalg.svd(a32, full_matrices=False)[0][:, :5])


def test_gram_singular_values_match_lapack():
    a = _spectrum_matrix(80, 50, decay=0.95)
    torch.testing.assert_close(singular_values(a, driver="gram"), torch.linalg.svdvals(a), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(96, 48), (48, 96)])
def test_whitened_factorize_drivers_agree(shape):
    w = _spectrum_matrix(*shape, decay=0.93)
    whitening = compute_whitening(_gram(shape[1]))
    fast = factorize(w, 16, whitening, driver="auto")
    ref = factorize(w, 16, whitening, driver="svd")
    torch.testing.assert_close(fast.dense(), ref.dense(), rtol=0, atol=1e-9)
    torch.testing.assert_close(fast.singular_values, ref.singular_values, rtol=0, atol=1e-10)
    assert abs(fast.truncation_loss - ref.truncation_loss) < 1e-9


def _whitenings(n: int):
    """One whitening of each kind the factorization meets, on an n-wide input."""
    g = torch.Generator().manual_seed(5)
    gram = _gram(n)
    x = torch.randn(n // 2, n, generator=g, dtype=torch.float64)  # fewer tokens than features: singular
    damped = compute_whitening(x.T @ x)
    assert damped.kind == "damped-cholesky" and damped.shift > 0
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigen = EigenWhitening(q, torch.linspace(0.5, 2.0, n, dtype=torch.float64))
    return [IdentityWhitening(), DiagonalWhitening(torch.linspace(0.2, 3.0, n, dtype=torch.float64)),
            compute_whitening(gram), damped, eigen]


@pytest.mark.parametrize("shape", [(40, 96), (96, 40)])
@pytest.mark.parametrize("kind", range(5))
def test_lean_factorize_matches_the_reference_route(shape, kind, monkeypatch):
    # The Gram route forms down = Σ^{-1/2} U_rᵀ W (no solve against S) and converts a float32 W a row /
    # column block at a time; blocks of 16 make every conversion loop run several times here.
    monkeypatch.setattr(factorization, "ROW_BLOCK", 16)
    w = _spectrum_matrix(*shape, decay=0.95).float()
    whitening = _whitenings(shape[1])[kind]
    ref = factorize(w.double(), 12, whitening, driver="svd")
    v = torch.randn(shape[1], 3, dtype=torch.float64)
    eye = torch.eye(shape[1], dtype=torch.float64)
    torch.testing.assert_close(whitening.left_multiply(v), whitening.whiten(eye) @ v, rtol=0, atol=1e-12)
    for keep in (True, False):
        fast = factorize(w, 12, whitening, driver="auto", keep_whitened=keep)
        assert fast.up.dtype == fast.down.dtype == torch.float64
        torch.testing.assert_close(fast.dense(), ref.dense(), rtol=0, atol=1e-9)
        torch.testing.assert_close(fast.singular_values, ref.singular_values, rtol=0, atol=1e-10)
        torch.testing.assert_close(fast.up @ fast.up.T, ref.up @ ref.up.T, rtol=0, atol=1e-9)
        if keep:  # whitened_down = down·S: up·whitened_down is A's truncation (sign-free), what
            # refinement in whitened coordinates starts from
            torch.testing.assert_close(fast.up @ fast.whitened_down, ref.up @ ref.whitened_down, rtol=0, atol=1e-9)
        else:
            assert fast.whitened_down is None


def test_lean_factorize_falls_back_on_rank_deficient_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 50, generator=g, dtype=torch.float64)
    whitening = compute_whitening(_gram(50))
    fast = factorize(w, 10, whitening, keep_whitened=False)
    ref = factorize(w, 10, whitening, driver="svd")
    assert torch.isfinite(fast.down).all()
    torch.testing.assert_close(fast.dense(), ref.dense(), rtol=0, atol=1e-9)
    torch.testing.assert_close(fast.dense(), w, rtol=0, atol=1e-9)


@pytest.mark.parametrize("shape", [(40, 96), (64, 64)])
def test_output_gram_route_matches_the_whitened_svd(shape, monkeypatch):
    """Wide and square W: the fit from G = W·H·Wᵀ is the truncation-aware fit of LAPACK's SVD of W·L."""
    monkeypatch.setattr(factorization, "GRAM_ROW_BLOCK", 16)  # several row and column blocks
    w = _spectrum_matrix(*shape, decay=0.95).float()
    h = _gram(shape[1])
    ref = factorize(w.double(), 12, compute_whitening(h), driver="svd")
    gram = output_gram(w, h)
    torch.testing.assert_close(gram, w.double() @ h @ w.double().T, rtol=0, atol=1e-10)
    fast = factorize_output_gram(w, gram, 12)
    torch.testing.assert_close(fast.dense(), ref.dense(), rtol=0, atol=1e-9)
    torch.testing.assert_close(fast.singular_values, ref.singular_values, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast.up @ fast.up.T, ref.up @ ref.up.T, rtol=0, atol=1e-9)  # same √Σ split
    if shape[0] < shape[1]:
        tall = w.T.contiguous()
        with pytest.raises(ValueError, match="wide or square"):
            factorize_output_gram(tall, output_gram(tall, _gram(shape[0])), 4)


def test_output_gram_start_knows_its_down_gram_and_refines_like_without_it():
    """The output-Gram fit's down·H·downᵀ is diagonal and known from its eigen-decomposition (floored
    directions included): the refinement's start skips that r·n² product and takes the same steps."""
    from adasvd_lightning.core.refinement import GramStatistics, RefinementTarget, adacomp

    g = torch.Generator().manual_seed(5)
    n, m, tokens = 40, 24, 30  # fewer tokens than features: some directions sit on the floor
    x_c = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    x_o = x_c + 0.1 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    h = x_c.T @ x_c / tokens
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    start = factorize_output_gram(w, output_gram(w, h), 20)
    exact = (start.down @ h) @ start.down.T
    torch.testing.assert_close(start.down_gram, exact, rtol=0, atol=1e-9 * float(exact.abs().max()))
    target = RefinementTarget(w, GramStatistics(h_cc=h, h_oc=x_o.T @ x_c / tokens),
                              target_energy=float((x_o @ w.T).square().sum()) / tokens)
    for v_steps in (False, True):
        known = adacomp(target, start.up, start.down, v_steps=v_steps, down_gram=start.down_gram)
        formed = adacomp(target, start.up, start.down, v_steps=v_steps)
        assert len(known[2]) == len(formed[2]) >= 2
        torch.testing.assert_close(torch.tensor(known[2]), torch.tensor(formed[2]), rtol=1e-9, atol=0)
        torch.testing.assert_close(known[0] @ known[1], formed[0] @ formed[1], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("shape", [(24, 40), (32, 32)])
def test_closed_form_writer_from_output_gram_matches_the_whitened_route(shape):
    """SVD-LLM's closed-form update on a wide or square writer starts from W·H_cc·Wᵀ's eigenpairs
    (`pipeline._refined_from_output_gram`): the same factors and objective as the reference route —
    undamped Cholesky whitening, LAPACK's SVD of W·L, the U-step in whitened coordinates — with H_cc
    freed before the eigen-decomposition and no whitening factor ever formed."""
    from adasvd_lightning.core.pipeline import _refined_from_output_gram
    from adasvd_lightning.core.report import ModuleReport
    from adasvd_lightning.core.statistics import InputStatistics
    from adasvd_lightning.core.whitening import CholeskyWhitening

    m, n = shape
    g = torch.Generator().manual_seed(11)
    x_o = torch.randn(300, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, n, dtype=torch.float64)
    x_c = x_o + 0.2 * torch.randn(300, n, generator=g, dtype=torch.float64)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    stats = InputStatistics.empty(n)
    stats.add_pair(x_o, x_c)
    stats.finalize()
    energy = float((x_o @ w.T).square().sum()) / 300
    h_cc, h_oc = stats.gram.clone(), stats.grams().h_oc.clone()
    rank = 9

    whitening = compute_whitening(h_cc.clone())
    assert isinstance(whitening, CholeskyWhitening) and whitening.shift == 0.0
    start = factorize(w, rank, whitening, driver="svd")
    reference = RefinementTarget(w, GramStatistics(h_cc, h_oc), whitening_factor=whitening.factor,
                                 target_energy=energy)
    ref_up, ref_down, ref_history = adacomp(reference, start.up, start.down, v_steps=False,
                                            whitened_down=start.whitened_down)

    report = ModuleReport(name="t", out_features=m, in_features=n, params_before=m * n, params_after=m * n)
    released = []
    stats.release_gram = lambda: (released.append(stats.gram_sum is not None), InputStatistics.release_gram(stats))
    unvalidated = dataclasses.replace(get_method("svd-llm"), heldout_fraction=0.0)
    with pytest.MonkeyPatch.context() as patch:  # no whitening factor on this route
        from adasvd_lightning.core import methods

        for module in (pipeline, methods):
            patch.setattr(module, "compute_whitening", lambda *a, **k: pytest.fail("a factor was formed"))
        report, module = _refined_from_output_gram(report, w, None, rank, unvalidated,
                                                   CompressionConfig(method="svd-llm"), stats, energy, None, None,
                                                   last_use=True)
    assert report.whitening == "output-gram" and report.refinement_steps == len(ref_history) - 1 == 1
    torch.testing.assert_close(module.dense_weight().double(), ref_up @ ref_down, rtol=1e-9, atol=1e-9)
    assert report.relative_error == pytest.approx((ref_history[-1] / energy) ** 0.5, rel=1e-8)
    # H_cc freed once G was formed (and again, as a no-op, with the other sums after the refinement).
    assert released[0] and stats.gram_sum is None and stats.cross_sum is None


def _weighted_writer(form: str, m: int = 24, n: int = 40, tokens: int = 300, held: int = 80):
    """Paired statistics of a residual writer as the pipeline sums them (each token scaled by its √weight),
    its held-out tokens as rows or moments (`core.writer_heldout`), and the weighted energies."""
    from adasvd_lightning.core.statistics import InputStatistics
    from adasvd_lightning.core.writer_heldout import HeldoutMoments, HeldoutRows

    g = torch.Generator().manual_seed(13)
    x_o = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, n, dtype=torch.float64)
    x_c = x_o + 0.3 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    root = 0.5 + torch.rand(tokens, generator=g, dtype=torch.float64)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    y = x_o @ w.T
    stats = InputStatistics.empty(n)
    stats.add_pair(x_o * root[:, None], x_c * root[:, None])
    stats.finalize()
    energy = float((y * root[:, None]).square().sum()) / tokens
    heldout_energy = float((y[:held] * root[:held, None]).square().sum()) / held
    if form == "rows":
        part = HeldoutRows(x_c[:held].float(), y[:held].float(), root[:held].float())
    else:
        part = HeldoutMoments.empty(n, m)
        part.add(x_c[:held], y[:held], root[:held])
        part.finalize()
    return w, stats, part, energy, heldout_energy


@pytest.mark.parametrize("form", ["rows", "moments"])
def test_closed_form_writer_validates_from_output_gram_like_from_the_fit_split_of_h_cc(form):
    """A validated writer: the fit split's start comes from W·H_cc·Wᵀ less the held-out tokens' part
    (`fit_split_output_gram`), after H_cc is freed. Same held-out errors, step count and factors as the
    reference: H_cc turned into the fit split in place (`_validate_refinement`), then the whitened route."""
    from adasvd_lightning.core.pipeline import _refined_from_output_gram, _validate_refinement
    from adasvd_lightning.core.report import ModuleReport

    rank, spec, config = 9, get_method("svd-llm"), CompressionConfig(method="svd-llm")
    w, stats, part, energy, heldout_energy = _weighted_writer(form)
    m, n = w.shape
    ref = ModuleReport(name="t", out_features=m, in_features=n, params_before=m * n, params_after=m * n)
    steps, _ = _validate_refinement(spec, config, w, stats, torch.empty(0, dtype=torch.long), energy, heldout_energy,
                                    rank, None, None, None, ref, part)
    whitening = compute_whitening(stats.gram.clone())
    start = factorize(w, rank, whitening, driver="svd")
    target = RefinementTarget(w, stats.grams(), whitening_factor=whitening.factor, target_energy=energy)
    ref_up, ref_down, _ = adacomp(target, start.up, start.down, v_steps=False, whitened_down=start.whitened_down,
                                  max_half_steps=steps)

    w2, stats2, part2, _, _ = _weighted_writer(form)
    order = []
    stats2.release_gram = lambda: (order.append("released"), type(stats2).release_gram(stats2))[1]
    report = ModuleReport(name="t", out_features=m, in_features=n, params_before=m * n, params_after=m * n)
    real_validate = pipeline._validated_half_steps
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "_validated_half_steps", lambda *a, **k: (order.append("validated"),
                                                                          real_validate(*a, **k))[1])
        report, module = _refined_from_output_gram(report, w2, None, rank, spec, config, stats2, energy,
                                                   heldout_energy, part2, last_use=True)
    assert order[:2] == ["released", "validated"]  # H_cc was gone before the validation's eigen-decomposition
    assert report.refinement_steps == steps
    for field in ("heldout_error_start", "heldout_error", "heldout_plain_error_start", "heldout_plain_error"):
        assert getattr(report, field) == pytest.approx(getattr(ref, field), rel=1e-8), field
    torch.testing.assert_close(module.dense_weight().double(), ref_up @ ref_down, rtol=1e-8, atol=1e-9)


def test_output_gram_route_is_exact_where_whitening_needs_damping():
    """Fewer tokens than features: H is singular and the Cholesky factor needs a shift, so the whitened
    SVD fits H + s·I. Where W has large components in directions the tokens never reach, the shift
    makes them look costly and the damped fit spends rank on them; the output-Gram fit reaches the exact
    optimum of tr(E·H·Eᵀ) (the dropped eigenvalues of W·H·Wᵀ) with finite factors."""
    g = torch.Generator().manual_seed(7)
    n, m, tokens = 48, 24, 16
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    h = x.T @ x / tokens
    unseen = torch.linalg.qr(x.T, mode="complete").Q[:, tokens:]  # H's null space
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    w = w + 1e3 * torch.randn(m, n - tokens, generator=g, dtype=torch.float64) @ unseen.T
    whitening = compute_whitening(h)
    assert whitening.kind == "damped-cholesky"

    def error(approx: torch.Tensor) -> float:
        e = approx - w
        return float((e @ h * e).sum())

    for rank in (8, 12):
        fast = factorize_output_gram(w, output_gram(w, h), rank)
        assert torch.isfinite(fast.up).all() and torch.isfinite(fast.down).all()
        optimum = float(torch.linalg.eigvalsh(w @ h @ w.T).flip(0)[rank:].clamp_min(0).sum())
        assert error(fast.dense()) == pytest.approx(optimum, rel=1e-8)
        # Measured 1.5× (rank 8) and 2.8× (rank 12) the optimum for the damped whitened SVD.
        assert error(factorize(w, rank, whitening, driver="svd").dense()) > 1.4 * optimum


def test_widest_freed_input_is_released_before_any_decomposition_of_its_block(token_batches, monkeypatch):
    """svd-llm-w factors down_proj first: its H (the block's widest, n = 128 here) is freed right after
    G = W·H·Wᵀ is formed, before the first eigen-decomposition of the block; the report keeps the block's
    order, and the model matches the reference driver's (every input whitened, the block's own order)."""
    from adasvd_lightning.core import linalg
    from adasvd_lightning.core.statistics import InputStatistics

    events = []
    release, spectrum = InputStatistics.release_gram, linalg.gram_spectrum
    monkeypatch.setattr(InputStatistics, "release_gram",
                        lambda self: (events.append(("release", self.gram_sum.shape[0])), release(self))[1])
    monkeypatch.setattr(factorization, "gram_spectrum",
                        lambda gram, rank, **kw: (events.append(("eigh", gram.shape[0])), spectrum(gram, rank, **kw))[1])
    report, logits = _compressed("svd-llm-w", token_batches)
    block = events[: len(events) // 2]
    assert block[0] == ("release", 128) and block[1][0] == "eigh"
    assert sum(1 for e in events if e == ("release", 128)) == 2  # once per block
    names = [m.name for m in report.modules]
    assert names[0].endswith("self_attn.q_proj") and names[6].endswith("mlp.down_proj")
    monkeypatch.undo()
    _, ref_logits = _compressed("svd-llm-w", token_batches, svd_driver="svd")
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)


def _paired_target(m=40, n=32, kept=(3, 7)):
    g = torch.Generator().manual_seed(3)
    xo = torch.randn(500, n, generator=g, dtype=torch.float64)
    xc = xo + 0.1 * torch.randn(500, n, generator=g, dtype=torch.float64)
    stats = GramStatistics(h_cc=xc.T @ xc / 500, h_oc=xo.T @ xc / 500, h_oo=xo.T @ xo / 500)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    return RefinementTarget(w, stats, kept=torch.tensor(kept)), w, stats


def test_factored_objective_matches_dense_form():
    target, _, _ = _paired_target()
    g = torch.Generator().manual_seed(4)
    up = torch.randn(40, 8, generator=g, dtype=torch.float64)
    down = torch.randn(8, target.h_rr.shape[0], generator=g, dtype=torch.float64)
    a = up @ down
    dense = float((a @ target.h_rr * a).sum() - 2 * (a * target.g).sum()) + target.y_norm
    assert objective(target, up, down) == pytest.approx(dense, rel=1e-12)


def test_closed_form_refinement_skips_the_v_step_factor():
    target, _, _ = _paired_target()
    g = torch.Generator().manual_seed(5)
    up = torch.randn(40, 8, generator=g, dtype=torch.float64)
    down = torch.randn(8, target.h_rr.shape[0], generator=g, dtype=torch.float64)
    adacomp(target, up, down, v_steps=False)
    assert target._h_rr_chol is None  # the n³ Cholesky of H_rr was never needed
    # Computed on demand for V-steps, equal to the eager reference.
    scale = float(target.h_rr.diagonal().mean())
    eye = torch.eye(target.h_rr.shape[0], dtype=torch.float64)
    chol = torch.linalg.cholesky(target.h_rr + target.damping * scale * eye)
    torch.testing.assert_close(target.h_rr_chol, chol)
    core = torch.linalg.solve(up.T @ up, up.T @ target.g)
    torch.testing.assert_close(v_step(target, up), torch.cholesky_solve(core.T, chol).T)


def test_single_stream_output_error_matches_expanded_form():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(24, 16, generator=g, dtype=torch.float64)
    approx = w + 0.05 * torch.randn(24, 16, generator=g, dtype=torch.float64)
    h = _gram(16)
    num = (approx @ h * approx).sum() - 2 * (w @ h * approx).sum() + (w @ h * w).sum()
    expected = float(num / (w @ h * w).sum()) ** 0.5
    assert _output_error(w, approx, GramStatistics.single_stream(h)) == pytest.approx(expected, rel=1e-9)
    # Paired statistics keep the expanded form.
    _, _, stats = _paired_target(24, 16)
    num = (approx @ stats.h_cc * approx).sum() - 2 * (w @ stats.h_oc * approx).sum() + (w @ stats.h_oo * w).sum()
    expected = float(num / (w @ stats.h_oo * w).sum()) ** 0.5
    assert _output_error(w, approx, stats) == pytest.approx(expected, rel=1e-12)


def _compressed(method: str, batches, **config):
    model, report = compress_tiny(method, batches, **config)
    with torch.no_grad():
        logits = model(batches[0]).logits
    return report, logits


@pytest.mark.parametrize("method", ["svd-llm-w", "svd-llm", "adasvd", "duo-svd", "svd-llm-v2"])
def test_pipeline_fast_driver_matches_reference_driver(method, token_batches):
    """The Gram routes (svd-llm-w: wide and square targets fitted from W·H·Wᵀ with no whitening) give the
    reference driver's modules: LAPACK's SVD of W·L for every target."""
    fast, fast_logits = _compressed(method, token_batches, svd_driver="auto")
    ref, ref_logits = _compressed(method, token_batches, svd_driver="svd")
    assert [m.rank for m in fast.modules] == [m.rank for m in ref.modules]
    assert [m.kept_columns for m in fast.modules] == [m.kept_columns for m in ref.modules]
    for a, b in zip(fast.modules, ref.modules):
        assert (a.relative_error is None) == (b.relative_error is None)
        if a.relative_error is not None:
            assert a.relative_error == pytest.approx(b.relative_error, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_shared_inputs_share_one_whitening(token_batches, monkeypatch):
    """q/k/v (and gate/up) read one tensor: one Cholesky per distinct input, same factors as before.

    The reference driver whitens every input; the default one only the inputs of tall targets (gate/up):
    the wide and square ones are fitted from W·H·Wᵀ (`factorize_output_gram`) and need no factor."""
    import adasvd_lightning.core.methods as methods

    calls = []
    original = methods.compute_whitening

    def counting(gram, **kw):
        calls.append(gram.shape[0])
        return original(gram, **kw)

    monkeypatch.setattr(methods, "compute_whitening", counting)
    report, _ = _compressed("svd-llm-w", token_batches, svd_driver="svd")
    # Per llama block: attention input (q/k/v), o_proj input, MLP input (gate/up), down_proj input.
    assert len(calls) == 4 * 2
    calls.clear()
    default, _ = _compressed("svd-llm-w", token_batches)
    assert len(calls) == 1 * 2  # the MLP input, shared by gate/up
    assert {m.whitening for m in default.modules} == {"cholesky", "output-gram"}
    monkeypatch.setattr(methods, "compute_whitening", original)
    again, _ = _compressed("svd-llm-w", token_batches, svd_driver="svd")
    assert [m.relative_error for m in report.modules] == [m.relative_error for m in again.modules]


def test_grouped_loss_spectra_from_the_output_gram_match_the_whitened_svd(token_batches, monkeypatch):
    """svd-llm-v2's planning pass takes a wide or square target's whitened spectrum from W·H·Wᵀ and
    whitens each distinct input once (tall targets only); the spectra are those of LAPACK's SVD of W·L.

    Whitenings over the whole run (2 phases, planning and compression, × 2 blocks): the default driver
    makes one per block in each phase (gate/up's input), the reference driver one per distinct input (4);
    before this path planning made one per target (7 per block: 16 and 22 in all)."""
    import adasvd_lightning.core.methods as methods
    from adasvd_lightning.core import planning

    calls, spectra = [], []
    original_whitening, original_ranks = methods.compute_whitening, planning.grouped_loss_ranks

    def counting(gram, **kw):
        calls.append(gram.shape[0])
        return original_whitening(gram, **kw)

    def recording(shapes, found, ratio):
        spectra.append(found)
        return original_ranks(shapes, found, ratio)

    monkeypatch.setattr(methods, "compute_whitening", counting)
    monkeypatch.setattr(planning, "grouped_loss_ranks", recording)
    fast, _ = _compressed("svd-llm-v2", token_batches)
    assert len(calls) == 2 * 2 * 1
    calls.clear()
    ref, _ = _compressed("svd-llm-v2", token_batches, svd_driver="svd")
    assert len(calls) == 2 * 2 * 4
    fast_spectra, ref_spectra = spectra
    assert fast_spectra.keys() == ref_spectra.keys() and len(fast_spectra) == 14
    for name, s in fast_spectra.items():
        r = ref_spectra[name]
        assert s.shape == r.shape
        torch.testing.assert_close(s, r, rtol=0, atol=1e-9 * float(r[0]))
    assert [m.rank for m in fast.modules] == [m.rank for m in ref.modules]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2"])
def test_prefix_replay_matches_full_forward(family, token_batches):
    """Probes that replay the cached prefix see the logits of the full forward."""
    from adasvd_lightning.core.planning import _sensitivity_metric
    from adasvd_lightning.core.replay import PrefixReplay
    from adasvd_lightning.core.surgery import find_decoder_blocks

    model = tiny_model(family)
    _, blocks = find_decoder_blocks(model)
    with torch.no_grad():
        full = _sensitivity_metric(model, token_batches, None, "sensitivity-ppl")
        replay = PrefixReplay(model, blocks, token_batches)
        replay.advance(len(blocks) - 1)
        calls = []
        handle = blocks[0].register_forward_hook(lambda *a: calls.append(1))
        with replay.active():
            fast = _sensitivity_metric(model, token_batches, None, "sensitivity-ppl", replay)
        handle.remove()
    assert replay.enabled and not calls  # the prefix really was skipped
    assert fast == pytest.approx(full, rel=1e-6)
    assert all(b is not None and not type(b).__name__.startswith("_Replayed") for b in blocks)


def test_module_kl_allocation_with_replay_matches_full_forwards(token_batches, monkeypatch):
    """The suffix-only probes give the cost table (and ranks) of probes that run the whole model."""
    import adasvd_lightning.core.planning as planning

    fast, _ = _compressed("duo-svd", token_batches)

    class FullForwards(planning.PrefixReplay):
        def __init__(self, *args):
            super().__init__(*args)
            self.enabled = False

    monkeypatch.setattr(planning, "PrefixReplay", FullForwards)
    ref, _ = _compressed("duo-svd", token_batches)
    assert [m.rank for m in fast.modules] == [m.rank for m in ref.modules]
    for name, row in ref.allocation["sensitivity"].items():
        assert fast.allocation["sensitivity"][name] == pytest.approx(row, rel=1e-5, abs=1e-9)


def test_adacomp_with_shared_products_matches_plain_alternation():
    """adaComp reuses V's products between the objective and the next U-step: same iterates as the plain loop."""
    target, _, _ = _paired_target(kept=())
    g = torch.Generator().manual_seed(7)
    up = torch.randn(40, 8, generator=g, dtype=torch.float64)
    down = torch.randn(8, 32, generator=g, dtype=torch.float64)
    fast_up, fast_down, history = adacomp(target, up, down, iterations=6, tolerance=0.0)
    ref_up, ref_down, ref_history = up, down, [objective(target, up, down)]
    for _ in range(6):
        ref_up = u_step(target, ref_down)
        ref_history.append(objective(target, ref_up, ref_down))
        ref_down = v_step(target, ref_up)
        ref_history.append(objective(target, ref_up, ref_down))
    assert len(history) == len(ref_history) == 13
    assert history == pytest.approx(ref_history, rel=1e-10)
    torch.testing.assert_close(fast_up @ fast_down, ref_up @ ref_down, rtol=1e-9, atol=1e-9)


def test_measured_target_energy_replaces_h_oo():
    _, w, stats = _paired_target(kept=(3, 7))
    energy = float((w @ stats.h_oo * w).sum())
    with_h_oo = RefinementTarget(w, stats, kept=torch.tensor([3, 7]))
    measured = RefinementTarget(w, GramStatistics(stats.h_cc, stats.h_oc), kept=torch.tensor([3, 7]),
                                target_energy=energy)
    assert measured.y_norm == pytest.approx(with_h_oo.y_norm, rel=1e-12)
    with pytest.raises(ValueError, match="h_oo"):
        RefinementTarget(w, GramStatistics(stats.h_cc, stats.h_oc))


@pytest.mark.parametrize("method", ["svd", "svd-llm-w", "svd-llm", "adasvd", "adasvd-duo", "adasvd+optimal"])
def test_reported_error_equals_direct_measurement(method, token_batches):
    """The report's error (refinement objective, dropped singular values or Gram form) is the measured one.

    In block 0 the dense model's captured activations are the calibration inputs of single-stream methods,
    so ‖(W′ − W)X‖/‖W X‖ is computed directly; paired methods are measured as ‖W′X_c − W X_o‖/‖W X_o‖ with
    X_c captured from the compressed model itself.
    """
    _check_reported_errors(method, token_batches)


@pytest.mark.parametrize("method", ["svd-llm-w", "svd-llm", "adasvd", "adasvd+optimal"])
def test_reported_error_with_singular_statistics_and_released_gram(method, monkeypatch):
    """Fewer tokens than features: H is singular, whitening is damped (L Lᵀ = H + s·I), and H_cc is freed
    after whitening wherever the factor stands in for it — the reported errors are still the measured ones."""
    from adasvd_lightning.core.statistics import InputStatistics

    released = []
    release = InputStatistics.release_gram
    monkeypatch.setattr(InputStatistics, "release_gram", lambda self: (released.append(1), release(self))[1])
    few = [torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))]  # 80 tokens < 128
    # Unvalidated: validating the refinement keeps H_cc for the fit split (and one of these two
    # sequences would be held out), while this test is about the paths that free it.
    # adaComp's V-steps amplify the float32 products' rounding in H's null space (0.5 % on o_proj's
    # reported error here; the open V-step defect noted in test_statistics); the identities checked
    # are exact in float64.
    dtype = "float64" if method == "adasvd" else "float32"
    report = _check_reported_errors(method, few, statistics_dtype=dtype, heldout_fraction=0.0)
    kinds = {m.whitening for m in report.modules}
    # svd-llm(-w) fit their wide and square targets from W·H·Wᵀ, exact for a singular H without damping
    # (svd-llm's closed-form update needs only the start's known V·H·Vᵀ and W·H_oc·Vᵀ).
    assert ("output-gram" if method in ("svd-llm-w", "svd-llm") else "damped-cholesky") in kinds
    # A damped factor stands in for H too (adaComp's V-steps are then ridge steps of its shift): every
    # input's H is freed, the 8 of the model's two blocks (q/k/v, o_proj, gate/up, down_proj).
    assert len(released) >= 8


def test_validation_factors_the_fit_split_in_its_own_storage_and_rebuilds_it(monkeypatch):
    """adaComp's validation from an output-Gram start (wide and square writers) factors H_fit in place of
    itself, iterates in its whitened coordinates and rebuilds H_fit from the factor before the statistics
    are made whole again: no second damped factor of H_fit is formed (`h_rr_chol`), and the result is
    the one with the factor in a copy of H_fit, up to the rebuild's round-off."""
    from adasvd_lightning.core.refinement import RefinementTarget as Target

    few = [torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(4))]  # 96 tokens < 128
    rebuilt, chol, scores = [], [], []
    real_rebuild, real_chol, real_steps = pipeline.rebuild_from_factor, Target.h_rr_chol, pipeline.validated_steps
    monkeypatch.setattr(pipeline, "rebuild_from_factor", lambda h, shift: (rebuilt.append(h.shape[0]),
                                                                           real_rebuild(h, shift))[1])
    monkeypatch.setattr(Target, "h_rr_chol", property(lambda self: (chol.append(1), real_chol.fget(self))[1]))
    # The held-out score of the start and of every step the fit split accepted (U- and V-steps).
    monkeypatch.setattr(pipeline, "validated_steps", lambda *a, **k: (lambda r: (scores.append(r[1]), r)[1])(
        real_steps(*a, **k)))
    config = CompressionConfig(method="adasvd", ratio=0.4, statistics_dtype="float64")
    model = tiny_model("llama")
    report = compress_model(model, config, few)
    assert sorted(set(rebuilt)) == [64, 128] and not chol  # o_proj's and down_proj's inputs
    assert report.heldout_sequences > 0 and len(scores) == 4 and all(len(s) >= 2 for s in scores)
    first, scores[:] = list(scores), []

    real_whitening = pipeline.compute_whitening
    monkeypatch.setattr(pipeline, "compute_whitening",
                        lambda gram, **k: real_whitening(gram.clone(), **{**k, "overwrite": False}))
    copied = tiny_model("llama")
    again = compress_model(copied, config, few)
    for a, b in zip(first, scores):
        assert a == pytest.approx(b, rel=1e-6)
    assert [m.refinement_steps for m in again.modules] == [m.refinement_steps for m in report.modules]
    for a, b in zip(report.modules, again.modules):
        assert a.relative_error == pytest.approx(b.relative_error, rel=1e-6), a.name
        assert (a.heldout_error is None) == (b.heldout_error is None), a.name
        if a.heldout_error is not None:
            assert a.heldout_error == pytest.approx(b.heldout_error, rel=1e-6), a.name
    for (name, p), q in zip(model.named_parameters(), copied.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def _check_reported_errors(method, token_batches, statistics_dtype: str | None = None, **options):
    import copy

    from adasvd_lightning.core.surgery import find_targets, linear_weight

    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    [(_, _, targets), *_] = find_targets(dense)
    inputs: dict[str, list[torch.Tensor]] = {}
    def capture(name):
        return lambda mod, args: inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [m.register_forward_pre_hook(capture(n)) for n, m in targets.items()]
    with torch.no_grad():
        for batch in token_batches:
            dense(batch)
    for h in handles:
        h.remove()
    config = {"method_options": {**(FEW_CANDIDATES if method == "adasvd-duo" else {}), **options}}
    if method.endswith("+optimal"):
        method, config = method.removesuffix("+optimal"), {"method_options": {"refinement": "optimal", **options}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        dtype = {"statistics_dtype": statistics_dtype} if statistics_dtype else {}
        report = compress_model(model, CompressionConfig(method=method, ratio=0.4, **config, **dtype), token_batches)
    by_name = {m.name: m for m in report.modules}
    modules = dict(model.named_modules())
    # Paired methods fit U·V·X_c to W·X_o, where X_c is what the target receives in the compressed model
    # (inside block 0 that differs from X_o after q/k/v resp. gate/up are compressed); single-stream
    # methods measure ‖(W′ − W)X‖ on the inputs they were calibrated on, the dense ones in block 0.
    paired = get_method(method).refinement != "none" or "refinement" in config.get("method_options", {})
    compressed_inputs: dict[str, list[torch.Tensor]] = {}
    handles = [modules[n].register_forward_pre_hook(
        lambda mod, args, n=n: compressed_inputs.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1])))
        for n in targets]
    with torch.no_grad():
        for batch in token_batches:
            model(batch)
    for h in handles:
        h.remove()
    # Compensated residual writers are fitted, and report, with tokens on the residual's scale.
    weights = writer_token_weights(dense, token_batches)
    checked = 0
    for name, dense_module in targets.items():
        if by_name[name].rank is None:
            continue
        x = torch.cat(inputs[name]).double()
        x_c = torch.cat(compressed_inputs[name]).double() if paired else x
        w = linear_weight(dense_module).detach().double()
        approx = modules[name].dense_weight().detach().double()
        weight = weights[name] if by_name[name].compensated else 1.0
        # Paired methods' targets that are not compensated were fitted to their own compressed input.
        y = (x if by_name[name].compensated or not paired else x_c) @ w.T
        expected = float(((x_c @ approx.T - y).square() * weight).sum() / (y.square() * weight).sum()) ** 0.5
        assert by_name[name].relative_error == pytest.approx(expected, rel=1e-3), name
        checked += 1
    assert checked >= 5
    return report


def test_closed_form_update_never_forms_g():
    """One U-step needs only G·Vᵀ = W·(H_oc·Vᵀ); the m×n matrix G is formed only for V-steps."""
    target, w, stats = _paired_target(kept=())
    g = torch.Generator().manual_seed(8)
    down = torch.randn(8, 32, generator=g, dtype=torch.float64)
    up0 = torch.randn(40, 8, generator=g, dtype=torch.float64)
    up, _, history = adacomp(target, up0, down, v_steps=False)
    assert target._g is None
    explicit = torch.linalg.solve(down @ stats.h_cc @ down.T, (w @ stats.h_oc @ down.T).T).T
    torch.testing.assert_close(up, explicit, rtol=1e-9, atol=1e-9)
    assert history[-1] == pytest.approx(objective(target, explicit, down), rel=1e-12)
    torch.testing.assert_close(target.g, w @ stats.h_oc)  # formed on demand, as before


def _whitened_pair(kept=()):
    """The same paired target in plain and in whitened coordinates (no damping: both exact)."""
    plain, w, stats = _paired_target(kept=kept)
    plain = RefinementTarget(w, GramStatistics(stats.h_cc, stats.h_oc, stats.h_oo), damping=0.0)
    factor = torch.linalg.cholesky(stats.h_cc)
    whitened = RefinementTarget(w, GramStatistics(stats.h_cc, stats.h_oc, stats.h_oo), damping=0.0,
                                whitening_factor=factor)
    return plain, whitened, w, stats, factor


def test_adacomp_in_whitened_coordinates_matches_plain_iterates():
    """Ṽ = V·L: the same objective values and product U·V as the plain alternation, with no n×n products."""
    plain, whitened, _, _, factor = _whitened_pair()
    g = torch.Generator().manual_seed(9)
    up = torch.randn(40, 8, generator=g, dtype=torch.float64)
    down = torch.randn(8, 32, generator=g, dtype=torch.float64)
    ref_up, ref_down, ref_history = adacomp(plain, up, down, iterations=6, tolerance=0.0)
    fast_up, fast_down, history = adacomp(whitened, up, down, iterations=6, tolerance=0.0,
                                          whitened_down=down @ factor)
    assert len(history) == len(ref_history) == 13
    assert history == pytest.approx(ref_history, rel=1e-9)
    assert history[-1] < 0.9 * history[0]  # the iteration did something
    torch.testing.assert_close(fast_up @ fast_down, ref_up @ ref_down, rtol=1e-8, atol=1e-8)
    # The returned V is in the model's coordinates: its objective is the reported one.
    assert objective(plain, fast_up, fast_down) == pytest.approx(history[-1], rel=1e-9)


def test_whitened_closed_form_update_forms_neither_g():
    plain, whitened, w, stats, factor = _whitened_pair()
    g = torch.Generator().manual_seed(10)
    down = torch.randn(8, 32, generator=g, dtype=torch.float64)
    up0 = torch.randn(40, 8, generator=g, dtype=torch.float64)
    up, same_down, history = adacomp(whitened, up0, down, v_steps=False, whitened_down=down @ factor)
    assert whitened._g is None and whitened._g_whitened is None
    assert same_down is down or torch.equal(same_down, down)
    explicit = torch.linalg.solve(down @ stats.h_cc @ down.T, (w @ stats.h_oc @ down.T).T).T
    torch.testing.assert_close(up, explicit, rtol=1e-9, atol=1e-9)
    assert history[-1] == pytest.approx(objective(plain, explicit, down), rel=1e-10)


def test_whitening_factor_is_refused_where_it_does_not_apply():
    _, w, stats = _paired_target(kept=())
    factor = torch.linalg.cholesky(stats.h_cc)
    with pytest.raises(ValueError, match="preserved columns"):
        RefinementTarget(w, stats, kept=torch.tensor([3]), whitening_factor=factor)
    with pytest.raises(ValueError, match="32×32"):
        RefinementTarget(w, stats, whitening_factor=factor[:10, :10])


def test_optimal_factors_are_the_limit_of_adacomp():
    """One SVD of G·L⁻ᵀ reaches what the alternation approaches, and nothing beats it."""
    plain, whitened, _, _, _ = _whitened_pair()
    start = factorize(plain.weight, 8, compute_whitening(plain.stats.h_cc))
    up, down, value = optimal_factors(whitened, 8)
    assert value == pytest.approx(objective(plain, up, down), rel=1e-10)
    _, _, few = adacomp(plain, start.up, start.down, iterations=2, tolerance=0.0)
    _, _, many = adacomp(plain, start.up, start.down, iterations=300, tolerance=0.0)
    assert value < few[-1] < few[0]  # the start is not optimal for paired statistics
    assert value <= many[-1] * (1 + 1e-12)
    assert many[-1] == pytest.approx(value, rel=1e-6)


def test_optimal_factors_with_preserved_columns_use_the_damped_factor():
    target, _, _ = _paired_target(kept=(3, 7))
    up, down, value = optimal_factors(target, 6)
    assert down.shape == (6, 30)
    assert value == pytest.approx(objective(target, up, down), rel=1e-9)
    g = torch.Generator().manual_seed(11)
    for _ in range(5):  # no alternation from a random start does better (up to the 1e-6 damping)
        u = torch.randn(40, 6, generator=g, dtype=torch.float64)
        d = torch.randn(6, 30, generator=g, dtype=torch.float64)
        _, _, history = adacomp(target, u, d, iterations=50, tolerance=0.0)
        assert value <= history[-1] * (1 + 1e-5)


def test_optimal_factors_on_single_stream_statistics_are_the_whitened_svd():
    """X_c = X_o: SVD-LLM's whitened truncation is already optimal, and the closed form says so."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(400, 24, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 24, dtype=torch.float64)
    h = x.T @ x / 400
    w = torch.randn(30, 24, generator=g, dtype=torch.float64)
    whitening = compute_whitening(h)
    target = RefinementTarget(w, GramStatistics.single_stream(h), whitening_factor=whitening.factor)
    up, down, value = optimal_factors(target, 5)
    ref = factorize(w, 5, whitening)
    torch.testing.assert_close(up @ down, ref.dense(), rtol=1e-9, atol=1e-9)
    assert value == pytest.approx(ref.truncation_loss**2, rel=1e-8)


def _singular_pair():
    """Paired statistics from fewer tokens than features (H_cc singular) and its damped whitening."""
    g = torch.Generator().manual_seed(13)
    xo = torch.randn(20, 32, generator=g, dtype=torch.float64)
    xc = xo + 0.1 * torch.randn(20, 32, generator=g, dtype=torch.float64)
    h_cc, h_oc = xc.T @ xc / 20, xo.T @ xc / 20
    h_cc = 0.5 * (h_cc + h_cc.T)
    w = torch.randn(40, 32, generator=g, dtype=torch.float64)
    energy = float((xo @ w.T).square().sum() / 20)
    whitening = compute_whitening(h_cc)
    assert whitening.kind == "damped-cholesky" and whitening.shift > 0
    plain = RefinementTarget(w, GramStatistics(h_cc, h_oc), target_energy=energy)
    factored = RefinementTarget(w, GramStatistics(None, h_oc), target_energy=energy,
                                whitening_factor=whitening.factor, whitening_shift=whitening.shift)
    return plain, factored, w, whitening


def test_closed_form_update_with_a_damped_factor_needs_no_h():
    """V H Vᵀ = Ṽ Ṽᵀ − s·V Vᵀ: the U-step and objective from the damped factor equal those from H."""
    plain, factored, w, whitening = _singular_pair()
    start = factorize(w, 6, whitening)
    ref_up, _, ref_history = adacomp(plain, start.up, start.down, v_steps=False)
    up, down, history = adacomp(factored, start.up, start.down, v_steps=False, whitened_down=start.whitened_down)
    assert history == pytest.approx(ref_history, rel=1e-9)
    torch.testing.assert_close(up, ref_up, rtol=1e-7, atol=1e-9)
    assert objective(factored, up, down) == pytest.approx(objective(plain, up, down), rel=1e-9)


def test_optimal_factors_with_a_damped_factor_report_the_true_objective():
    plain, factored, _, _ = _singular_pair()
    up, down, value = optimal_factors(factored, 6)
    assert value == pytest.approx(objective(plain, up, down), rel=1e-9)
    with pytest.raises(ValueError, match="H_cc"):
        v_step(factored, up)  # V-steps in the model's coordinates would need the released H


def test_released_gram_cannot_be_read():
    from adasvd_lightning.core.statistics import InputStatistics

    stats = InputStatistics.empty(8)
    stats.add_pair(torch.randn(30, 8), torch.randn(30, 8))
    with pytest.raises(RuntimeError, match="finalized"):
        stats.release_gram()
    stats.finalize()
    cross = stats.grams().h_oc.clone()
    stats.release_gram()
    with pytest.raises(RuntimeError, match="released"):
        stats.gram
    grams = stats.grams()
    assert grams.h_cc is None and torch.equal(grams.h_oc, cross)


def _outlier_whitened(m: int, n: int, seed: int = 5) -> torch.Tensor:
    """W·L for activations with a few outlier channels (100× the rest), as in real LLM inputs: a
    whitened matrix whose singular values span many decades, where the Gram route is least accurate."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(n, dtype=torch.float64)
    scale[torch.randperm(n, generator=g)[:3]] = 100.0
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64) * scale
    w = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5
    return compute_whitening(x.T @ x / x.shape[0]).whiten(w)


def test_decomposition_threads_scope_every_lapack_call(monkeypatch):
    """Inside `decomposition_threads(1)` each eigh/Cholesky runs with one thread; torch's count is back
    after each call and after the scope; the factors equal the multi-threaded reference path's."""
    import adasvd_lightning.core.linalg as linalg

    seen: list[int] = []
    eigh, cholesky_ex = torch.linalg.eigh, torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: (seen.append(torch.get_num_threads()), eigh(*a, **k))[1])
    monkeypatch.setattr(torch.linalg, "cholesky_ex",
                        lambda *a, **k: (seen.append(torch.get_num_threads()), cholesky_ex(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = _spectrum_matrix(60, 40, decay=0.93)
        reference = factorize(w, 12, compute_whitening(_gram(40)), driver="svd")
        with linalg.decomposition_threads(1):
            fast = factorize(w, 12, compute_whitening(_gram(40)), driver="auto")
            assert torch.get_num_threads() == 2  # products between the decompositions keep torch's setting
        assert seen[:1] == [2] and seen[1:] == [1, 1]  # reference Cholesky, then the scoped Cholesky and eigh
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(fast.singular_values, reference.singular_values, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast.dense(), reference.dense(), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="decomposition threads"):
        with linalg.decomposition_threads(0):
            pass


@pytest.mark.parametrize("shape", [(150, 60), (60, 150)])
def test_single_threaded_gram_path_matches_lapack_on_outlier_activations(shape):
    """The compression run's default (Gram eigh, one thread) against the reference (LAPACK SVD, torch's
    threads) on a whitened matrix with outlier channels: same spectrum and same rank-r error."""
    from adasvd_lightning.core.linalg import decomposition_threads

    a = _outlier_whitened(*shape)
    rank = 30
    u_ref, s_ref, vh_ref = torch.linalg.svd(a, full_matrices=False)
    with decomposition_threads(1):
        u, s, vh = thin_svd(a, rank, driver="auto")
    assert float(s_ref[0] / s_ref[-1]) > 50  # the wide dynamic range this test is about
    torch.testing.assert_close(s, s_ref, rtol=0, atol=1e-12 * float(s_ref[0]))
    error = torch.linalg.matrix_norm(a - (u * s[:rank]) @ vh)
    error_ref = s_ref[rank:].square().sum().sqrt()
    assert float(abs(error - error_ref)) < 1e-10 * float(error_ref)


def test_pipeline_decomposition_threads_do_not_change_the_result(token_batches):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one, one_logits = _compressed("svd-llm", token_batches, decomposition_threads=1)
        assert torch.get_num_threads() == 2
        torch_threads, torch_logits = _compressed("svd-llm", token_batches, decomposition_threads=None)
    finally:
        torch.set_num_threads(before)
    assert [m.rank for m in one.modules] == [m.rank for m in torch_threads.modules]
    for a, b in zip(one.modules, torch_threads.modules):
        assert a.relative_error == pytest.approx(b.relative_error, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(one_logits, torch_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [0, -1, True, 1.5, "2"])
def test_decomposition_threads_are_validated(threads):
    from adasvd_lightning.core.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="decomposition_threads"):
        CompressionConfig(decomposition_threads=threads)


def test_validation_start_of_a_wide_writer_needs_no_fit_split_factor(token_batches, monkeypatch):
    """svd-llm validates its writers' steps from a start refitted on the fit split. For a wide or square
    writer that start now comes from W·H_fit·Wᵀ: no Cholesky factor of the fit split (0.97 GB at
    down_proj's width 11008), and the same held-out errors as the reference driver's whitened start.

    Both runs form float64 products: with float32 ones the fit split's H can round to indefinite (192
    tokens for 64 features here), the reference's Cholesky factor is then damped, and its start moves by
    the damping (2e-6 relative with transformers 5.24's initialisation of the tiny model), which the
    route from W·H_fit·Wᵀ does not need."""
    from adasvd_lightning.core import pipeline

    widths = []
    real = pipeline.compute_whitening
    monkeypatch.setattr(pipeline, "compute_whitening", lambda gram, **kw: (widths.append(gram.shape[0]), real(gram, **kw))[1])
    fast, fast_logits = _compressed("svd-llm", token_batches, statistics_dtype="float64")
    assert widths == []  # o_proj (64 × 64) and down_proj (64 × 128) both take the route
    ref, ref_logits = _compressed("svd-llm", token_batches, svd_driver="svd", statistics_dtype="float64")
    assert sorted(set(widths)) == [64, 128]
    validated = [(a, b) for a, b in zip(fast.modules, ref.modules) if b.heldout_error_start is not None]
    assert len(validated) == 4  # o_proj and down_proj of both blocks
    for a, b in validated:
        assert a.heldout_error_start == pytest.approx(b.heldout_error_start, rel=1e-6)
        assert a.heldout_error == pytest.approx(b.heldout_error, rel=1e-6)
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-4, atol=1e-4)


def _dense_calls(model) -> dict[str, int]:
    """A counter of the forward calls that every dense target linear of ``model`` completes (hooks left in
    place: the modules swapped in by compression are new objects, so only the dense ones are counted)."""
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            calls[name] = 0
            module.register_forward_hook(lambda m, a, o, n=name: calls.__setitem__(n, calls[n] + 1))
    return calls


def _compress_counting(method: str, batches, through: bool, monkeypatch) -> tuple:
    """(report, state dict, dense calls) of the tiny Llama compressed at 40 %; ``through``: the
    reference path, where every compressed-stream and single-stream pass runs the block to its end."""
    with monkeypatch.context() as patch:
        if through:
            run_until, single_pass = pipeline._run_until, pipeline._single_stream_pass

            def to_the_end(runner, block, inp, module, stop, hidden=None, before=False):
                if before:  # the compressed stream's statistics pass: the block runs through
                    runner.run(block, inp, hidden)
                else:
                    run_until(runner, block, inp, module, stop, hidden)

            patch.setattr(pipeline, "_run_until", to_the_end)
            patch.setattr(pipeline, "_single_stream_pass",
                          lambda *a, stop_after=None, **k: single_pass(*a, stop_after=None, **k))
        model = tiny_model("llama")
        calls = _dense_calls(model)
        options = FEW_CANDIDATES if method in ("duo-svd", "adasvd-duo") else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompressionWarning)
            report = compress_model(model, CompressionConfig(method=method, ratio=0.4, method_options=options),
                                    batches)
    return report, {k: v.clone() for k, v in model.state_dict().items()}, calls


# Per calibration batch, how many more times each dense target computes when every compressed-stream
# and single-stream pass runs to the end of the block. Paired presets' four stages: the q/k/v pass
# skips everything from q_proj on, the o_proj pass everything from o_proj on, the gate/up pass gate/up
# and down_proj (o_proj is already compressed there), the down_proj pass down_proj. A single stream
# propagated by the compressed block's own pass skips down_proj alone.
_STAGED = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 3, "up_proj": 3, "down_proj": 4}
_SINGLE = {"down_proj": 1}


@pytest.mark.parametrize("method, skipped", [("svd-llm", _STAGED), ("adasvd-duo", _STAGED),
                                             ("svd-llm-w", _SINGLE), ("duo-svd", _SINGLE)])
def test_passes_that_need_only_inputs_stop_before_the_targets_compute(method, skipped, token_batches, monkeypatch):
    """A pass whose outputs nobody reads stops as soon as its targets have their inputs: the paired
    presets' compressed stream stops before the stage's first target when the stage has no residual
    writer (q/k/v, gate/up; before its last one otherwise, as it did), and a single stream that the
    compressed block's own pass propagates stops before the block's last target (down_proj). The
    factors and ranks are those of passes run to the end of the block, bit for bit; the reported errors
    too, up to the energy that preserved columns' reports now take from the Gram instead of the float32
    outputs (duo-svd's down_proj: 7e-9 relative); and each dense target computes exactly as many times
    fewer as the passes skip it."""
    fast, fast_state, fast_calls = _compress_counting(method, token_batches, through=False, monkeypatch=monkeypatch)
    ref, ref_state, ref_calls = _compress_counting(method, token_batches, through=True, monkeypatch=monkeypatch)
    assert fast_state.keys() == ref_state.keys()
    for key in ref_state:
        assert torch.equal(fast_state[key], ref_state[key]), key
    assert [(m.name, m.rank, m.kept_columns) for m in fast.modules] == [(m.name, m.rank, m.kept_columns)
                                                                         for m in ref.modules]
    for a, b in zip(fast.modules, ref.modules):
        assert (a.relative_error is None) == (b.relative_error is None), a.name  # None: left dense
        if b.relative_error is not None:
            assert a.relative_error == pytest.approx(b.relative_error, rel=1e-6), a.name
    for name, count in ref_calls.items():
        fewer = skipped.get(name.rsplit(".", 1)[1], 0) * len(token_batches)
        assert count - fast_calls[name] == fewer, (name, count, fast_calls[name])


@pytest.mark.parametrize("method", ["svd-llm", "adasvd", "adasvd-duo"])
def test_writers_pair_their_dense_outputs_like_their_dense_inputs(method, token_batches, monkeypatch):
    """A residual writer that reads its input alone accumulates W·H_oc = Σ y_o x_cᵀ from its dense
    outputs (m·n per token, an m×n sum) instead of H_oc = Σ x_o x_cᵀ (n², n×n): the same refinement,
    up to the float32 rounding of the layer's outputs, as the reference path that pairs the inputs."""
    from adasvd_lightning.core import statistics

    shapes: list[tuple[int, ...]] = []
    real = statistics.InputStatistics.add_output_pair

    def spy(self, y, x):
        real(self, y, x)
        shapes.append(tuple(self.cross_sum.shape))

    monkeypatch.setattr(statistics.InputStatistics, "add_output_pair", spy)
    fast, fast_logits = _compressed(method, token_batches)
    assert sorted(set(shapes)) == [(64, 64), (64, 128)]  # o_proj's and down_proj's W·H_oc: m × n
    init = statistics.BlockStatistics.__init__

    def inputs_paired(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._output_pairs = set()  # the reference: H_oc from the dense inputs, then W·H_oc from it

    monkeypatch.setattr(statistics.BlockStatistics, "__init__", inputs_paired)
    shapes.clear()
    ref, ref_logits = _compressed(method, token_batches)
    assert shapes == []
    assert [(m.name, m.rank, m.kept_columns, m.refinement_steps) for m in fast.modules] == \
        [(m.name, m.rank, m.kept_columns, m.refinement_steps) for m in ref.modules]
    for a, b in zip(fast.modules, ref.modules):
        if b.relative_error is not None:
            assert a.relative_error == pytest.approx(b.relative_error, rel=1e-5), a.name
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-4, atol=1e-4)
