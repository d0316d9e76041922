import torch

from adasvd_lightning.core.reference_kl import DenseReference, row_dots


def _direct_kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Σ over tokens of Σ_v p (log p − log q), in float64 from the start."""
    logp = torch.log_softmax(dense_logits.double(), dim=-1)
    logq = torch.log_softmax(logits.double(), dim=-1)
    return float((logp.exp() * (logp - logq)).sum())


def test_kl_from_the_references_probabilities_is_the_direct_kl():
    """KL = Σ p log p − Σ p z + logsumexp(z)·Σ p per token: the reference's two sums are kept, a probe
    reads only its logsumexp and one dot product. It must be the direct formula's float64 value on
    logits with a wide range (a vocabulary of 3,000 over 2 × 40 tokens), to float32 sums' precision."""
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(2, 40, 3000, generator=g) * 4 + torch.randn(1, 1, 3000, generator=g) * 6
    for noise in (0.0, 0.01, 0.5):
        logits = dense + noise * torch.randn(dense.shape, generator=g)
        reference = DenseReference.of(dense.clone())
        expected = _direct_kl(dense, logits)
        got = reference.kl_sum(logits)
        if noise == 0.0:
            assert got == 0.0  # the reference's own logits: the same terms as its offset
        else:  # float32 sums over the vocabulary: within 2e-6 nats per token (measured: 5e-7)
            assert expected > 1e-3 and abs(got - expected) < 2e-6 * 80
    assert reference.tokens == 80


def test_the_reference_takes_the_logits_storage():
    """The dense logits become the probabilities in place: no second vocabulary-sized batch."""
    logits = torch.randn(3, 5, 7)
    reference = DenseReference.of(logits)
    assert reference.probs.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(reference.mass, torch.ones(3, 5, dtype=torch.float64))
    assert reference.offset.dtype == torch.float64 and bool((reference.offset <= 0).all())


def test_row_dots_are_the_row_sums_of_products():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(70, 9, generator=g), torch.randn(70, 9, generator=g)
    torch.testing.assert_close(row_dots(a, b), (a.double() * b.double()).sum(-1), rtol=1e-6, atol=1e-6)
    assert row_dots(a, b).dtype == torch.float64
