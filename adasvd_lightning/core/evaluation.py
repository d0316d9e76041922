"""Perplexity with a fixed, documented protocol.

Protocol: the token stream of the evaluation text is cut into non-overlapping windows of ``seq_len``
tokens (the final partial window is dropped); each window is scored independently (no context carried
over) and every position except the first of a window is predicted. For a tokenizer that adds a
beginning-of-sequence token (``bos_token_id``, see `corpus.added_bos_token_id`) each window is BOS +
``seq_len − 1`` text tokens: the model sees text start as in training, and BOS itself is not scored. The negative log-likelihood is
computed from fp32 logits and summed in float64; perplexity = exp(total NLL / predicted tokens).

Windows whose loss is not finite are counted in ``nonfinite_windows``. They make ``perplexity``
infinite (a model that produces NaN is broken, and an average that hides it would mislead);
``perplexity_finite`` gives the value over the finite windows alone for diagnosis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .corpus import cut_windows

__all__ = ["PerplexityResult", "evaluate_perplexity"]


@dataclass
class PerplexityResult:
    perplexity: float
    perplexity_finite: float
    nll: float
    tokens: int
    windows: int
    nonfinite_windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def _exp(value: float) -> float:
    return math.exp(value) if value < 709.0 else float("inf")


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    max_windows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    bos_token_id: int | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM on a 1-D token stream (see module docstring for the protocol)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    windows = cut_windows(token_ids, seq_len, bos_token_id, max_windows)
    n_windows = windows.shape[0]
    if n_windows == 0:
        raise ValueError(f"text has {token_ids.numel()} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll = 0.0
    finite_nll = 0.0
    finite_tokens = 0
    nonfinite = 0
    try:
        for start in range(0, n_windows, batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch).logits if hasattr(model, "config") else model(batch)
            logits = logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            per_window = nll.view(batch.shape[0], -1).double().sum(dim=1)
            for value in per_window.tolist():
                total_nll += value
                if math.isfinite(value):
                    finite_nll += value
                    finite_tokens += seq_len - 1
                else:
                    nonfinite += 1
            if progress:
                progress(min(start + batch_size, n_windows), n_windows)
    finally:
        model.train(was_training)
    tokens = n_windows * (seq_len - 1)
    ppl = _exp(total_nll / tokens) if nonfinite == 0 else float("inf")
    ppl_finite = _exp(finite_nll / finite_tokens) if finite_tokens else float("nan")
    return PerplexityResult(
        perplexity=ppl,
        perplexity_finite=ppl_finite,
        nll=total_nll / tokens if nonfinite == 0 else float("inf"),
        tokens=tokens,
        windows=n_windows,
        nonfinite_windows=nonfinite,
        seq_len=seq_len,
    )
