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


def _word_tokenizer(adds_bos: bool):
    """A word-level tokenizer over w0…w99 with <bos>=100; it puts <bos> in front of text only if asked."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(100)} | {"<bos>": 100, "<unk>": 101}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 100)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", unk_token="<unk>")


@pytest.mark.parametrize("adds_bos", [True, False])
def test_windows_start_with_bos_exactly_when_the_tokenizer_adds_one(adds_bos, tmp_path):
    from adasvd_lightning.core.corpus import added_bos_token_id, tokenize_text
    from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

    tokenizer = _word_tokenizer(adds_bos)
    # Both define a BOS token; only the behaviour (what encoding adds) decides.
    assert tokenizer.bos_token_id == 100
    bos = added_bos_token_id(tokenizer)
    assert bos == (100 if adds_bos else None)
    text = tmp_path / "t.txt"
    text.write_text("\n".join(" ".join(f"w{(7 * i + j) % 100}" for j in range(10)) for i in range(40)) + "\n")
    stream = tokenize_text(tokenizer, text.read_text())
    assert stream.numel() == 400 and not (stream == 100).any()  # the stream itself never holds BOS
    windows = torch.cat(calibration_batches(tokenizer, CalibrationSpec(str(text), samples=6, seq_len=16)))
    assert windows.shape == (6, 16)
    assert bool((windows[:, 0] == 100).all()) == adds_bos
    assert not (windows[:, 1:] == 100).any()

    model = tiny_model("llama")
    result = evaluate_perplexity(model, stream, seq_len=16, bos_token_id=bos)
    text_per_window = 15 if adds_bos else 16
    assert result.windows == 400 // text_per_window and result.tokens == result.windows * 15
    manual = stream[: result.windows * text_per_window].view(result.windows, text_per_window)
    if adds_bos:  # BOS + the next 15 text tokens; every text token is predicted, BOS is not
        manual = torch.cat([torch.full((result.windows, 1), 100), manual], dim=1)
    with torch.no_grad():
        logits = model(manual).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, 128).float(), manual[:, 1:].reshape(-1))
    assert result.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)
