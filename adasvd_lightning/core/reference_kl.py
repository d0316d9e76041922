"""KL divergence of a model's next-token distribution from the dense model's, per probe.

The module-KL allocations (`core.planning`) measure KL(dense ‖ model with one module truncated) over
the probe tokens, hundreds of times against the same dense distributions. What each measurement
needs from the dense side is computed once here (`DenseReference`), so a probe reads its own logits'
logsumexp and one dot product per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DenseReference", "row_dots"]


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a_tv·b_tv per row t of two T×V float32 tensors (one batched GEMV: no T×V product is formed),
    as float64."""
    return torch.bmm(a[:, None, :], b[:, :, None]).reshape(a.shape[0]).double()


@dataclass
class DenseReference:
    """The dense model's next-token distribution on one probe batch, kept as what every KL from it needs.

    KL(p ‖ softmax(z)) per token is Σ_v p_v·log p_v − Σ_v p_v·z_v + logsumexp(z)·Σ_v p_v. The first and
    last sums are the reference's own (``offset``, ``mass``, per token), so a probe needs only its
    logits' logsumexp and one dot product with p per token. Keeping log p instead cost a log-softmax,
    exp(log p), a difference and a product over the vocabulary per probe: at SmolLM2's 49k vocabulary
    0.11 s per 256-token sequence against 0.05 s (one core; the old KL sums alone were 16 % of the tail
    probes' time; BENCHMARKS.md, "Probes without the reference's exponentials"). The price is
    precision: the terms are of the size of the logits and cancel down to the KL, so float32 sums over
    the vocabulary leave ~1e-6 nats per token (the direct form ~1e-7), under 1 % of the smallest
    tail-probe difference on SmolLM2-135M at 40 % (3e-4 nats per token; the median is 0.02), and random
    in sign over a probe's tokens. The KL of the reference's own logits is 0 exactly: ``offset`` is
    formed with the same two terms (Σ p log p = Σ p z − logsumexp(z)·Σ p).
    """

    probs: torch.Tensor  # B×T×V float32
    offset: torch.Tensor  # B×T float64: Σ_v p log p
    mass: torch.Tensor  # B×T float64: Σ_v p (1 up to rounding; kept so the identity holds for these p)

    @classmethod
    def of(cls, logits: torch.Tensor) -> "DenseReference":
        """From the dense model's float32 logits (B×T×V), which become ``probs`` in place: no second
        vocabulary-sized batch (0.4 GB for 8 × 256 tokens at a 49k vocabulary)."""
        logits = logits.detach()  # overwritten below: never a tensor autograd still needs
        offsets, masses = [], []
        for row in logits:  # one sequence's vocabulary-sized temporaries at a time
            p = torch.softmax(row, dim=-1)
            mass = p.sum(dim=-1, dtype=torch.float64)
            offsets.append(row_dots(p, row) - torch.logsumexp(row, dim=-1).double() * mass)
            masses.append(mass)
            row.copy_(p)
        return cls(logits, torch.stack(offsets), torch.stack(masses))

    @property
    def tokens(self) -> int:
        return int(self.offset.numel())

    def kl_sum(self, logits: torch.Tensor) -> float:
        """Σ over tokens of KL(reference ‖ softmax(logits)) (float32 logits, B×T×V)."""
        total = 0.0
        for z, p, offset, mass in zip(logits, self.probs, self.offset, self.mass):
            total += float((offset - row_dots(p, z) + torch.logsumexp(z, dim=-1).double() * mass).sum())
        return total
