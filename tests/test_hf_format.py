"""Compressed folders in the Hugging Face ecosystem: correct with the package, loud without it."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from adasvd_lightning import (
    CompressionConfig,
    compress_model,
    densify,
    export_dense,
    load_compressed,
    save_compressed,
)
from adasvd_lightning.cli import main
from adasvd_lightning.core.lowrank import ColumnPreservingLinear, FactorizedLinear, LowRankLinear
from conftest import tiny_model

CASES = [("llama", "svd-llm"), ("qwen2", "svd-llm"), ("gpt2", "svd-llm"), ("llama", "duo-svd")]


def compressed_folder(family, method, token_batches, path):
    model = tiny_model(family)
    # Uniform ranks keep the column-preserving case fast; the layers it writes are the same kind.
    options = {"allocation": "uniform"} if method == "duo-svd" else {}
    compress_model(model, CompressionConfig(method=method, ratio=0.4, method_options=options), token_batches)
    return model, save_compressed(model, path, metadata={"method": method})


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def factorized(model):
    return {n: (type(m), m.rank) for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


@pytest.mark.parametrize("family,method", CASES)
def test_from_pretrained_is_bit_identical_to_load_compressed(family, method, token_batches, tmp_path):
    model, folder = compressed_folder(family, method, token_batches, tmp_path / "c")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    reference = load_compressed(folder)
    assert factorized(loaded) == factorized(model) == factorized(reference)
    kinds = {kind for kind, _ in factorized(loaded).values()}
    assert (ColumnPreservingLinear in kinds) == (method == "duo-svd") and LowRankLinear in kinds
    assert isinstance(loaded, type(model))  # a subclass of the base architecture's class
    for batch in token_batches:
        assert torch.equal(logits(loaded, batch), logits(reference, batch))
        assert torch.equal(logits(loaded, batch), logits(model, batch))
    # Factorized weights are plain float parameters: casting and training are allowed.
    from transformers.trainer_utils import validate_quantization_for_training

    validate_quantization_for_training(loaded)  # the HF Trainer's check: passes
    # Dense export of every layer kind (GPT-2's Conv1D, column-preserving) keeps the function.
    densify(loaded)
    assert not factorized(loaded)
    torch.testing.assert_close(logits(loaded, token_batches[0]), logits(model, token_batches[0]), rtol=1e-4, atol=1e-5)
    assert loaded.half().float().dtype == torch.float32


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_pretrained_round_trip(family, token_batches, tmp_path):
    model, folder = compressed_folder(family, "svd-llm", token_batches, tmp_path / "c")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["model_type"] == "adasvd_lightning"
    assert config["quantization_config"]["base_model_type"] == family
    assert config["quantization_config"]["method"] == "svd-llm"  # provenance survives
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert factorized(again) == factorized(model)
    assert torch.equal(logits(again, token_batches[0]), logits(model, token_batches[0]))
    assert torch.equal(logits(load_compressed(tmp_path / "again"), token_batches[0]), logits(model, token_batches[0]))


def test_save_pretrained_writes_the_live_structure(token_batches, tmp_path):
    """A loaded model compressed further is saved with its new ranks, not the manifest it was loaded with."""
    model, folder = compressed_folder("llama", "svd-llm", token_batches, tmp_path / "c")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    densify(loaded.model.layers[0].mlp)  # one block dense again
    loaded.save_pretrained(tmp_path / "again")
    modules = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["modules"]
    assert len(modules) == len(factorized(model)) - 3 and not any(n.startswith("model.layers.0.mlp") for n in modules)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(logits(again, token_batches[0]), logits(loaded, token_batches[0]))


def test_pipeline_generates_like_the_compressed_model(token_batches, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    vocab = {f"w{i}": i for i in range(128)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w1")
    model = tiny_model("llama")
    compress_model(model, CompressionConfig(method="svd-llm", ratio=0.4), token_batches)
    folder = save_compressed(model, tmp_path / "c", tokenizer=tokenizer)

    generate = pipeline("text-generation", model=str(folder))
    assert factorized(generate.model) == factorized(model)
    prompt = "w5 w9 w17 w33"
    out = generate(prompt, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    expected = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
    assert out.split() == tokenizer.convert_ids_to_tokens(expected.tolist())


LOADS = (
    "AutoModelForCausalLM.from_pretrained(folder)",
    "pipeline('text-generation', model=folder)",
    "AutoConfig.from_pretrained(folder)",
)


def test_without_the_package_loading_fails_and_names_it(token_batches, tmp_path):
    """In a fresh interpreter that never imports adasvd_lightning, no load returns a (random) model."""
    _, folder = compressed_folder("llama", "svd-llm", token_batches, tmp_path / "c")
    script = (
        "import sys\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, pipeline\n"
        f"folder = {str(folder)!r}\n"
        f"for call in {LOADS!r}:\n"
        "    try:\n"
        "        eval(call)\n"
        "        print('LOADED', call)\n"
        "    except Exception as exc:\n"
        "        print('ERROR', type(exc).__name__, str(exc).splitlines()[0])\n"
        "print('IMPORTED' if 'adasvd_lightning' in sys.modules else 'NOT IMPORTED')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "NOT IMPORTED", result.stdout + result.stderr[-2000:]
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == len(LOADS) and not any(line.startswith("LOADED") for line in lines), result.stdout
    assert all("model type `adasvd_lightning`" in line for line in errors), errors


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_dense_is_a_plain_folder_with_the_same_function(family, token_batches, tmp_path):
    model, folder = compressed_folder(family, "svd-llm", token_batches, tmp_path / "c")
    out = export_dense(folder, tmp_path / "dense")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and "quantization_config" not in config
    assert config["architectures"] == [type(model).__name__]
    dense = AutoModelForCausalLM.from_pretrained(out)
    assert type(dense) is type(model) and not factorized(dense)  # the stock transformers class
    assert dense.num_parameters() == tiny_model(family).num_parameters()
    torch.testing.assert_close(logits(dense, token_batches[0]), logits(model, token_batches[0]), rtol=1e-4, atol=1e-5)


def test_cli_export_dense_folder(token_batches, tmp_path, capsys):
    _, folder = compressed_folder("qwen2", "svd-llm", token_batches, tmp_path / "c")
    assert main(["export", "--model", str(folder), "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert "--dense" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert main(["export", "--model", str(folder), "--dense", "--out", str(tmp_path / "d"), "--quiet"]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert not factorized(dense) and type(dense).__name__ == "Qwen2ForCausalLM"
    assert main(["export", "--model", str(folder), "--dense", "--out", str(tmp_path / "d"), "--quiet"]) == 2


def test_legacy_manifest_location_still_loads(token_batches, tmp_path):
    """Folders written before the transformers integration (manifest as a top-level "adasvd" key)."""
    model, folder = compressed_folder("llama", "svd-llm", token_batches, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    quant = config.pop("quantization_config")
    config["model_type"] = quant.pop("base_model_type")
    quant.pop("quant_method")
    config["adasvd"] = quant
    (folder / "config.json").write_text(json.dumps(config))
    assert torch.equal(logits(load_compressed(folder), token_batches[0]), logits(model, token_batches[0]))


def test_a_compressed_config_without_its_base_architecture_is_one_clear_error(token_batches, tmp_path):
    from adasvd_lightning.core.errors import InvalidInputError
    from adasvd_lightning.core.serialization import check_model_folder

    _, folder = compressed_folder("llama", "svd-llm", token_batches, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]["base_model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match="base_model_type"):
        check_model_folder(folder)


def test_importing_the_package_is_light_and_enough(token_batches, tmp_path):
    """`import adasvd_lightning` loads neither torch nor transformers, yet transformers imported after it
    opens compressed folders (the registration runs when transformers' AutoConfig module loads)."""
    model, folder = compressed_folder("gpt2", "svd-llm", token_batches, tmp_path / "c")
    torch.save(token_batches[0], tmp_path / "ids.pt")
    torch.save(logits(model, token_batches[0]), tmp_path / "expected.pt")
    script = (
        "import sys\n"
        "import adasvd_lightning\n"
        "print('HEAVY' if {'torch', 'transformers'} & set(sys.modules) else 'LIGHT')\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        "    print('IDENTICAL' if torch.equal(model(ids).logits, expected) else 'DIFFERENT')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["LIGHT", "IDENTICAL"], result.stdout + result.stderr[-2000:]
