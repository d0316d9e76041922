"""The embedded reference model build path (at tiny size) and the embedded corpus."""

import json

import torch
from safetensors.torch import load_file

from adasvd_lightning import embedded_corpus_path, load_compressed, load_tokenizer
from adasvd_lightning.training.reference import TINY_REFERENCE, build_reference_model, reference_model_path


def test_embedded_corpus_is_shipped_with_attribution():
    train, test = embedded_corpus_path("train"), embedded_corpus_path("test")
    assert train.stat().st_size > 1_000_000 and test.stat().st_size > 1_000_000
    assert "CC BY-SA" in (train.parent / "README.md").read_text()


def test_reference_folder_is_a_standard_hf_model(tiny_reference):
    files = {p.name for p in tiny_reference.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    config = json.loads((tiny_reference / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    model = load_compressed(tiny_reference)
    tokenizer = load_tokenizer(tiny_reference)
    ids = tokenizer("The game was released in Japan .", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "The game was released in Japan ."
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_reference_is_cached_and_deterministic(tiny_reference, tmp_path):
    assert reference_model_path(TINY_REFERENCE) == tiny_reference  # cache hit, no retraining
    rebuilt = build_reference_model(TINY_REFERENCE, tmp_path / "again", show_progress=False)
    a = load_file(str(tiny_reference / "model.safetensors"))
    b = load_file(str(rebuilt / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_lowered_the_loss(tiny_reference):
    from adasvd_lightning import evaluate_perplexity, tokenize_text
    from adasvd_lightning.core.corpus import read_text

    tokenizer = load_tokenizer(tiny_reference)
    tokens = tokenize_text(tokenizer, read_text(embedded_corpus_path("test")))
    ppl = evaluate_perplexity(load_compressed(tiny_reference), tokens, seq_len=64, max_windows=30).perplexity
    assert ppl < 0.5 * len(tokenizer)  # better than a uniform guess after 20 steps
