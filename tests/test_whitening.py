import pytest
import torch

from adasvd_lightning.core.factorization import factorize
from adasvd_lightning.core.whitening import CholeskyWhitening, EigenWhitening, _symmetric, compute_whitening


def _problem(m=48, n=32, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    # Anisotropic inputs: a few strong directions, as in real activations.
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    x = mix @ torch.randn(n, tokens, generator=g, dtype=torch.float64)
    return w, x


def test_truncation_loss_equals_dropped_singular_values():
    w, x = _problem()
    whitening = compute_whitening(x @ x.T)
    assert isinstance(whitening, CholeskyWhitening) and whitening.kind == "cholesky"
    for rank in (4, 10, 20):
        f = factorize(w, rank, whitening)
        measured = torch.linalg.norm((w - f.dense()) @ x)
        predicted = f.singular_values[rank:].square().sum().sqrt()
        assert torch.allclose(measured, predicted, rtol=1e-8)
        assert f.truncation_loss == pytest.approx(float(measured), rel=1e-8)


def test_whitened_truncation_beats_plain_svd_on_activations():
    w, x = _problem()
    whitening = compute_whitening(x @ x.T)
    for rank in (4, 10, 20):
        whitened = torch.linalg.norm((w - factorize(w, rank, whitening).dense()) @ x)
        plain = torch.linalg.norm((w - factorize(w, rank).dense()) @ x)
        assert whitened < 0.9 * plain


def test_whitened_fit_is_optimal_against_random_perturbations():
    w, x = _problem(seed=3)
    f = factorize(w, 8, compute_whitening(x @ x.T))
    best = torch.linalg.norm((w - f.dense()) @ x)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        up = f.up + 1e-3 * torch.randn(f.up.shape, generator=g, dtype=torch.float64)
        assert torch.linalg.norm((w - up @ f.down) @ x) >= best


def test_unwhiten_inverts_whiten():
    w, x = _problem()
    for h in (x @ x.T, torch.zeros(32, 32, dtype=torch.float64)):
        s = compute_whitening(h)
        assert torch.allclose(s.unwhiten(s.whiten(w)), w, atol=1e-6, rtol=1e-6)


def test_fallback_on_singular_gram_dead_channels():
    w, x = _problem()
    x[5] = 0.0  # dead input channel
    x[17] = 0.0
    h = x @ x.T
    assert int(torch.linalg.cholesky_ex(h).info) != 0
    whitening = compute_whitening(h)
    assert whitening.kind == "damped-cholesky"
    f = factorize(w, 10, whitening)
    assert torch.isfinite(f.up).all() and torch.isfinite(f.down).all()
    # Damping 1e-6 moves the optimum by a negligible amount: the measured loss still matches theory.
    measured = torch.linalg.norm((w - f.dense()) @ x)
    # The damped factor is that of H + δ·I, and H itself (damped in place, then restored) is unchanged.
    h_exact = h.double()
    h_exact = 0.5 * (h_exact + h_exact.T)
    symmetric = h_exact.clone()
    again = compute_whitening(symmetric)
    assert torch.equal(symmetric, h_exact)
    shift = 1e-6 * float(h_exact.diagonal().mean())
    expected = torch.linalg.cholesky(h_exact + shift * torch.eye(h.shape[0], dtype=torch.float64))
    torch.testing.assert_close(again.factor, expected, rtol=0, atol=1e-12)
    assert measured <= 1.0001 * f.truncation_loss + 1e-9
    assert measured < torch.linalg.norm((w - factorize(w, 10).dense()) @ x)


def test_fallback_on_rank_deficient_gram_fewer_tokens_than_features():
    w, x = _problem(tokens=12)  # rank(H) = 12 < n = 32
    whitening = compute_whitening(x @ x.T, damping=0.0)  # force past the damped retry
    assert isinstance(whitening, EigenWhitening) and whitening.floored >= 32 - 12
    f = factorize(w, 10, whitening)
    # 10 ranks can reproduce W on a 12-dimensional input span almost exactly.
    rel = torch.linalg.norm((w - f.dense()) @ x) / torch.linalg.norm(w @ x)
    assert rel < 0.5
    assert torch.isfinite(f.dense()).all()


def test_indefinite_gram_goes_to_eigen_route():
    h = torch.diag(torch.tensor([1.0, 0.5, -1e-3, 0.0], dtype=torch.float64))
    whitening = compute_whitening(h, damping=1e-6)
    assert whitening.kind == "eigen"
    assert whitening.floored == 2
    w = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(whitening.unwhiten(whitening.whiten(w)), w)


def test_non_finite_gram_is_rejected():
    h = torch.eye(3)
    h[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compute_whitening(h)


def test_finiteness_check_in_row_blocks_sees_every_block():
    from adasvd_lightning.core.whitening import _all_finite

    h = torch.eye(7, dtype=torch.float64)
    assert _all_finite(h, rows=3)
    h[6, 2] = float("inf")  # in the last, partial block
    assert not _all_finite(h, rows=3)


def test_symmetrization_without_temporaries_matches_the_average():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(37, 37, generator=g, dtype=torch.float64)
    before = a.clone()
    sym = _symmetric(a, block=8)  # blocks that do not divide the width
    torch.testing.assert_close(sym, 0.5 * (a + a.T), rtol=0, atol=1e-15)
    assert torch.equal(sym, sym.T)
    assert torch.equal(a, before)  # the caller's matrix is never written
    exact = a @ a.T
    exact = torch.tril(exact) + torch.tril(exact, -1).T  # exactly symmetric, as the statistics are
    assert _symmetric(exact).data_ptr() == exact.data_ptr()  # passed through: no n×n copy
    f32 = _symmetric(before.float(), block=8)
    torch.testing.assert_close(f32, 0.5 * (before + before.T), rtol=0, atol=1e-6)


def _float32_rounded_singular_gram(n: int = 200) -> torch.Tensor:
    """A singular Gram (one outlier channel, half the channels never excited) plus a symmetric
    perturbation of float32 products' rounding level, ~eps32·‖H‖, which puts eigenvalues of about
    −3e-4 into the null space: far below ‖H‖ = 1e4 but above the default damping shift
    (1e-6 · mean diag ≈ 5e-5, the outlier keeping the mean diagonal small against ‖H‖)."""
    g = torch.Generator().manual_seed(0)
    diagonal = torch.cat([torch.tensor([1e4]), torch.ones(n // 2 - 1), torch.zeros(n - n // 2)]).double()
    noise = torch.randn(n, n, generator=g, dtype=torch.float64)
    noise = (noise + noise.T) / (2 * float(torch.linalg.matrix_norm(noise + noise.T, ord=2) / 2))
    return torch.diag(diagonal) + noise * 0.5 * torch.finfo(torch.float32).eps * 1e4


def test_damping_covers_the_rounding_of_float32_products():
    """Gram products formed in float32 leave null-space eigenvalues at ±eps32·‖H‖. The damped retry
    shifts at least that far (`rounding_shift`), so it stays a damped Cholesky — exact V H Vᵀ through
    the recorded shift, and no eigen-decomposition (several times slower on real models) — while
    float64 products keep the configured damping."""
    h = _float32_rounded_singular_gram()
    assert float(torch.linalg.eigvalsh(h)[0]) < -1e-6 * float(h.diagonal().mean())  # the failing regime
    assert isinstance(compute_whitening(h), EigenWhitening)  # float64 rounding assumed: the shift is too small
    w = compute_whitening(h, product_dtype=torch.float32)
    assert isinstance(w, CholeskyWhitening) and w.kind == "damped-cholesky"
    assert w.shift == pytest.approx(torch.finfo(torch.float32).eps * float(h.abs().sum(dim=1).max()))
    assert w.shift < 1e-6 * float(torch.linalg.eigvalsh(h)[-1]) * 10  # at rounding level, not a real damping
    n = h.shape[0]
    torch.testing.assert_close(w.factor @ w.factor.T, h + w.shift * torch.eye(n, dtype=torch.float64),
                               rtol=0, atol=1e-9)
    # float64 products: the configured relative damping, bit for bit as before.
    singular = torch.diag(torch.tensor([4.0, 1.0, 1.0, -1e-12], dtype=torch.float64))
    plain = compute_whitening(singular)
    assert plain.kind == "damped-cholesky" and plain.shift == 1e-6 * float(singular.diagonal().mean())


# --- In-place Cholesky (`core.inplace_cholesky`): H's storage becomes L, a failure restores H ----------------


def _gram(tokens: int, n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 3] *= 50.0  # an outlier channel, as real activations have
    return x.T @ x / tokens


@pytest.mark.parametrize("n,block", [(50, 7), (64, 16), (300, 256)])
def test_in_place_cholesky_is_the_factor_in_h_storage(n, block):
    from adasvd_lightning.core.inplace_cholesky import cholesky_in_place

    h = _gram(2 * n, n)
    reference = torch.linalg.cholesky(h)
    pointer = h.data_ptr()
    assert cholesky_in_place(h, block=block)
    assert h.data_ptr() == pointer and torch.equal(h, h.tril())
    assert torch.allclose(h, reference, rtol=0, atol=1e-12 * float(reference.abs().max()))


@pytest.mark.parametrize("shift", [0.0, 1e-9])
def test_failed_in_place_cholesky_restores_h_bit_for_bit(shift):
    from adasvd_lightning.core.inplace_cholesky import cholesky_in_place

    h = _gram(20, 60)  # fewer tokens than features: singular, the failure is in a late block
    h[40:, 40:] -= 10.0 * torch.eye(20, dtype=torch.float64)  # indefinite there at any small shift
    before = h.clone()
    assert not cholesky_in_place(h, shift=shift, block=16)
    assert torch.equal(h, before)


@pytest.mark.parametrize("n,block,tokens", [(50, 7, 100), (64, 16, 20), (300, 256, 120)])
def test_rebuild_from_factor_turns_the_in_place_factor_back_into_h(n, block, tokens):
    """`rebuild_from_factor` writes L Lᵀ − shift·I over the factor in its own storage: H again, exactly
    symmetric, to round-off, with or without the damping a singular H (fewer tokens than features) needs."""
    from adasvd_lightning.core.inplace_cholesky import cholesky_in_place, rebuild_from_factor

    h = _gram(tokens, n)
    before, pointer = h.clone(), h.data_ptr()
    shift = 0.0 if tokens > n else 1e-6 * float(h.diagonal().mean())
    assert cholesky_in_place(h, shift=shift, block=block)
    rebuild_from_factor(h, shift, block=block)
    assert h.data_ptr() == pointer and torch.equal(h, h.T)
    assert torch.allclose(h, before, rtol=0, atol=1e-13 * float(before.abs().max()))


def test_overwriting_whitening_matches_the_copying_one_and_falls_back_without_touching_h():
    from adasvd_lightning.core.whitening import overwrote

    for tokens in (200, 20):  # exact Cholesky; singular → damped Cholesky
        h = _gram(tokens, 60)
        expected = compute_whitening(h.clone())
        whitening = compute_whitening(h, overwrite=True)
        assert overwrote(whitening, h) and whitening.kind == expected.kind and whitening.shift == expected.shift
        assert torch.allclose(whitening.factor, expected.factor, rtol=0,
                              atol=1e-10 * float(expected.factor.abs().max()))
    h = -_gram(200, 60)  # negative definite: no shift helps, the eigen route runs on H itself
    before = h.clone()
    whitening = compute_whitening(h, overwrite=True)
    assert isinstance(whitening, EigenWhitening) and not overwrote(whitening, h) and torch.equal(h, before)
    h = _gram(200, 60)
    whitening = compute_whitening(h)  # without overwrite: a new matrix, H unchanged
    assert not overwrote(whitening, h)


def test_compression_with_the_in_place_factor_matches_the_copying_path(monkeypatch):
    """svd-llm-w and svd-llm on a tiny Llama: the same modules whether H's storage is reused or not,
    and the writers (unshared inputs, last use) do reuse it."""
    from adasvd_lightning import CompressionConfig, compress_model
    from adasvd_lightning.core import methods, pipeline

    from conftest import tiny_model

    batches = [torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    # svd-llm-w and svd-llm whiten only their tall targets' inputs by default (the wide and square ones,
    # svd-llm's refined writers included, are fitted from W·H·Wᵀ); the reference driver whitens them all,
    # o_proj and down_proj included.
    for method in ("svd-llm-w", "svd-llm"):
        calls = []
        real = methods.compute_whitening

        def spy(gram, **kwargs):
            whitening = real(gram, **kwargs)
            calls.append(kwargs.get("overwrite", False) and methods.overwrote(whitening, gram))
            return whitening

        monkeypatch.setattr(methods, "compute_whitening", spy)
        reused = tiny_model("llama")
        compress_model(reused, CompressionConfig(method=method, ratio=0.5, svd_driver="svd"), batches)
        assert sum(calls) >= 4  # o_proj and down_proj of both blocks at least
        monkeypatch.setattr(pipeline, "_may_overwrite_gram", lambda *args: False)
        copied = tiny_model("llama")
        compress_model(copied, CompressionConfig(method=method, ratio=0.5, svd_driver="svd"), batches)
        monkeypatch.undo()
        a, b = reused.state_dict(), copied.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
