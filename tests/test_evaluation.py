import math

import pytest
import torch
import torch.nn.functional as F

from adasvd_lightning import count_parameters, evaluate_perplexity
from conftest import tiny_model


def test_perplexity_matches_manual_computation():
    model = tiny_model("llama")
    tokens = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(0))
    result = evaluate_perplexity(model, tokens, seq_len=32, batch_size=3)
    assert result.windows == 6 and result.tokens == 6 * 31 and result.nonfinite_windows == 0
    windows = tokens[:192].view(6, 32)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, 128).float(), windows[:, 1:].reshape(-1))
    assert result.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)
    # A random model is close to uniform over 128 tokens.
    assert 64 < result.perplexity < 400


def test_nonfinite_windows_are_counted_not_hidden():
    model = tiny_model("llama")
    poison = 7
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    tokens = torch.randint(8, 128, (160,), generator=torch.Generator().manual_seed(0))
    tokens[40] = poison  # inside window 1 of 5
    result = evaluate_perplexity(model, tokens, seq_len=32)
    assert result.nonfinite_windows == 1
    assert math.isinf(result.perplexity)
    assert math.isfinite(result.perplexity_finite)


def test_too_short_text_is_an_error():
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate_perplexity(tiny_model("llama"), torch.arange(10), seq_len=32)


def test_tied_parameters_counted_once():
    model = tiny_model("gpt2")  # ties lm_head to wte
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert count_parameters(model) < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
