import json

import pytest
import torch

from adasvd_lightning import CompressionConfig, LowRankLinear, compress_model, load_compressed, save_compressed
from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.core.serialization import MANIFEST_KEY, atomic_directory
from conftest import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_is_bit_identical(family, token_batches, tmp_path):
    model = tiny_model(family)
    compress_model(model, CompressionConfig(method="svd-llm", ratio=0.4), token_batches)
    with torch.no_grad():
        expected = model(token_batches[0]).logits
    out = save_compressed(model, tmp_path / "compressed", metadata={"method": "svd-llm"})
    config = json.loads((out / "config.json").read_text())
    manifest = config["quantization_config"]
    assert config["model_type"] == "adasvd_lightning" and manifest["quant_method"] == "adasvd"
    assert manifest["base_model_type"] == model.config.model_type
    assert manifest["method"] == "svd-llm"
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert {n: e["rank"] for n, e in manifest["modules"].items()} == ranks
    loaded = load_compressed(out)
    with torch.no_grad():
        got = loaded(token_batches[0]).logits
    assert torch.equal(got, expected)
    assert {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == ranks
    # Saving must not leave the manifest on the live model's config.
    assert not hasattr(model.config, MANIFEST_KEY) and getattr(model.config, "quantization_config", None) is None


def test_bfloat16_round_trip_keeps_dtype(token_batches, tmp_path):
    model = tiny_model("llama")
    compress_model(model, CompressionConfig(method="svd-llm", ratio=0.4), token_batches)
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    model = model.to(torch.bfloat16)
    # from_pretrained keeps the non-persistent rotary frequencies in float32 for a bf16 checkpoint (as
    # it does for dense ones); `.to(bfloat16)` had rounded them, so restore them for the comparison.
    model.model.rotary_emb.inv_freq = inv_freq
    with torch.no_grad():
        expected = model(token_batches[0]).logits
    loaded = load_compressed(save_compressed(model, tmp_path / "bf16"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert loaded.model.layers[0].self_attn.q_proj.up.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(loaded(token_batches[0]).logits, expected)


def test_load_dense_folder(tmp_path, token_batches):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "dense")
    loaded = load_compressed(tmp_path / "dense")
    with torch.no_grad():
        assert torch.equal(loaded(token_batches[0]).logits, model(token_batches[0]).logits)


def test_existing_output_is_not_overwritten_without_permission(tmp_path):
    model = tiny_model("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(InvalidInputError, match="already exists"):
        save_compressed(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    with pytest.raises(InvalidInputError, match="not written by adasvd"):  # a folder of the user's
        save_compressed(model, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "partial.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_previous_model(tmp_path):
    model = tiny_model("llama")
    save_compressed(model, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out", overwrite=True):
            raise RuntimeError("interrupted")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_not_a_causal_lm_folder_is_rejected(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "vit"
    )
    with pytest.raises(InvalidInputError, match="not a causal language model"):
        load_compressed(tmp_path / "vit")
    with pytest.raises(InvalidInputError, match="not found"):
        load_compressed(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="no config.json"):
        load_compressed(tmp_path / "empty")


def test_weights_that_do_not_match_the_manifest_are_rejected(tmp_path, token_batches):
    model = tiny_model("llama")
    compress_model(model, CompressionConfig(method="svd-llm", ratio=0.4), token_batches)
    out = save_compressed(model, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="unexpected"):
        load_compressed(out)


def test_loading_holds_the_weights_once_and_not_mapped_to_the_file(tmp_path, token_batches, monkeypatch):
    """The tensors read from the file become the parameters (no second copy at the end of loading),
    and they are private memory: rewriting the file in place leaves the loaded model intact."""
    import adasvd_lightning.core.serialization as serialization

    model = tiny_model("llama")
    with torch.no_grad():
        expected = model(token_batches[0]).logits
    out = save_compressed(model, tmp_path / "dense")
    read = {}
    original = serialization._load_state_dict
    monkeypatch.setattr(serialization, "_load_state_dict", lambda files: read.update(original(files)) or read)
    loaded = load_compressed(out)
    params = dict(loaded.named_parameters())
    assert read and all(params[k].data_ptr() == t.data_ptr() for k, t in read.items() if k in params)
    weights = out / "model.safetensors"
    with open(weights, "r+b") as f:  # in place: a mapped tensor would now read zeros (or fault)
        f.write(b"\0" * weights.stat().st_size)
    with torch.no_grad():
        assert torch.equal(loaded(token_batches[0]).logits, expected)
