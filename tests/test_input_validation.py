"""Bad input is refused with one line and exit code 2 before the expensive work (issue 14)."""

import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adasvd_lightning import CompressionConfig, compress_model, load_compressed, save_compressed
from adasvd_lightning.cli import main, strict_json
from adasvd_lightning.core.budget import BudgetWarning
from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.core.output import check_free_space
from conftest import tiny_model

FAST = ["--ratio", "0.4", "--samples", "4", "--seq-len", "16", "--quiet"]


def _one_line_exit_2(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    return err


# --- output location: read-only, disk full (real mounts in a user namespace) ------------------------

def _unshare_available() -> bool:
    try:
        return subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_unshare = pytest.mark.skipif(not _unshare_available(), reason="needs unprivileged user+mount namespaces")


def _compress_on_mount(mount_options: str, model: Path, where: Path) -> subprocess.CompletedProcess:
    """``adasvd compress --out <tmpfs>/out`` with a fresh tmpfs (``mount_options``) mounted at ``where``."""
    where.mkdir()
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" && shift 2 && exec "$@"'
    command = [sys.executable, "-m", "adasvd_lightning", "compress", "--model", str(model), *FAST,
               "--out", str(where / "out")]
    return subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", mount_options, str(where), *command],
                          capture_output=True, text=True, timeout=600)


@needs_unshare
def test_read_only_output_location_fails_before_work(tiny_reference, tmp_path):
    result = _compress_on_mount("ro,size=1m", tiny_reference, tmp_path / "ro")
    assert result.returncode == 2, result.stderr
    assert "cannot write the output" in result.stderr and "Read-only file system" in result.stderr
    assert "Traceback" not in result.stderr


@needs_unshare
def test_full_disk_fails_before_compressing(tiny_reference, tmp_path):
    # The tiny reference's output is ~0.5 MB; 64 KB of tmpfs cannot hold it.
    result = _compress_on_mount("size=64k", tiny_reference, tmp_path / "small")
    assert result.returncode == 2, result.stderr
    assert "not enough disk space" in result.stderr and "Traceback" not in result.stderr


def test_free_space_check_uses_the_estimate(tmp_path):
    check_free_space(tmp_path, 10_000, free_bytes=10_000)
    with pytest.raises(InvalidInputError, match="needs about 9.8 KB, 9.8 KB free|needs about 9.8 KB"):
        check_free_space(tmp_path, 10_001, free_bytes=10_000)


# --- sequence length beyond the model's positions ------------------------------------------------------

@pytest.mark.parametrize("family,limit", [("gpt2", 128), ("qwen2", 64)])
def test_seq_len_beyond_positions_is_refused(family, limit, tmp_path, capsys):
    model = tiny_model(family)
    if family == "qwen2":
        model.config.max_position_embeddings = limit
    model.save_pretrained(tmp_path / family)
    capsys.readouterr()  # transformers' progress bar
    code = main(["compress", "--model", str(tmp_path / family), "--ratio", "0.4", "--seq-len", str(limit + 1),
                 "--out", str(tmp_path / "out")])
    _one_line_exit_2(capsys, code, f"max_position_embeddings = {limit}")
    code = main(["evaluate", "--model", str(tmp_path / family), "--seq-len", str(2 * limit)])
    _one_line_exit_2(capsys, code, f"max_position_embeddings = {limit}")
    assert not (tmp_path / "out").exists()


# --- corrupt model folders ------------------------------------------------------------------------------

def _corrupt_truncated(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _corrupt_empty(folder):
    (folder / "model.safetensors").write_bytes(b"")


def _corrupt_index(folder):
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')


def _index_outside(folder):
    outside = folder.parent / "elsewhere.safetensors"
    shutil.copy(folder / "model.safetensors", outside)
    keys = load_file(folder / "model.safetensors").keys()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "../elsewhere.safetensors" for k in keys}}))


def _rewrite(folder, change):
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _wrong_shape(folder):
    _rewrite(folder, lambda s: s.update({"model.norm.weight": torch.ones(7)}))


def _nan_weight(folder):
    def poison(state):
        state["model.layers.0.mlp.up_proj.weight"][3, 4] = float("nan")
    _rewrite(folder, poison)


def _inf_weight(folder):
    def poison(state):
        state["model.embed_tokens.weight"][0, 0] = float("inf")
    _rewrite(folder, poison)


@pytest.mark.parametrize("corrupt,message", [
    (_corrupt_truncated, "truncated or corrupt"),
    (_corrupt_empty, "truncated or corrupt"),
    (_corrupt_index, "not a valid shard index"),
    (_index_outside, "not a file inside"),
    (_wrong_shape, "has shape (7,)"),
    (_nan_weight, "NaN or infinite"),
    (_inf_weight, "NaN or infinite"),
])
def test_corrupt_model_folder_is_refused(corrupt, message, tiny_reference, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_reference, folder)
    corrupt(folder)
    code = main(["compress", "--model", str(folder), *FAST, "--out", str(tmp_path / "out")])
    _one_line_exit_2(capsys, code, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model"] + (["elsewhere.safetensors"] if corrupt is _index_outside else []))


@pytest.fixture(scope="module")
def compressed_folder(tmp_path_factory) -> Path:
    model = tiny_model("llama")
    batches = list(torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0)).split(2))
    compress_model(model, CompressionConfig(method="svd-llm", ratio=0.4), batches)
    return save_compressed(model, tmp_path_factory.mktemp("manifest") / "compressed")


NAME = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("edit,message", [
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": -3}, "rank must be a positive integer"),
    ({"rank": "8"}, "rank must be a positive integer"),
    ({"rank": 10**12}, "does not fit a 64×64 layer"),
    ({"rank": 4.5}, "rank must be a positive integer"),
    ({"rank": 7}, r"q_proj.down has shape \(\d+, 64\), the architecture expects \(7, 64\)"),
    ({"in_features": 128}, "says 64×128"),
    ({"out_features": True}, "out_features must be a positive integer"),
    ({"rank": None}, "rank must be a positive integer"),  # missing key
    ({"bias": "no"}, "bias must be true or false"),
])
def test_manifest_that_disagrees_with_the_weights_is_refused(edit, message, compressed_folder, tmp_path):
    folder = tmp_path / "edited"
    shutil.copytree(compressed_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    entry = config["quantization_config"]["modules"][NAME]
    for key, value in edit.items():
        if value is None:
            del entry[key]
        else:
            entry[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInputError, match=message):
        load_compressed(folder)


def test_edited_manifest_of_a_column_preserving_layer(tmp_path):
    from adasvd_lightning.core.lowrank import ColumnPreservingLinear
    from adasvd_lightning.core.surgery import replace_module

    model = tiny_model("llama")
    replace_module(model, NAME, ColumnPreservingLinear(64, 64, 8, 4, bias=False))
    folder = save_compressed(model, tmp_path / "duo")
    assert load_compressed(folder).get_submodule(NAME).kept_columns == 4
    for kept, message in ((64, "rank 8 .kept columns 64. does not fit"), (0, "kept_columns must be a positive")):
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["modules"][NAME]["kept_columns"] = kept
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(InvalidInputError, match=message):
            load_compressed(folder)


# --- method options -------------------------------------------------------------------------------------

@pytest.mark.parametrize("option,message", [
    ("refinement=[a", "cannot read '[a'"),
    ("refinement=!!python/object/apply:os.system [echo]", "could not determine a constructor"),
    ("sensitivity_candidates=[a,b]", "sensitivity_candidates must be numbers"),
    ("adacomp_tolerance=.nan", "adacomp_tolerance a finite number"),
    ("adacomp_tolerance=.inf", "adacomp_tolerance a finite number"),
])
def test_method_options_that_do_not_parse(option, message, tiny_reference, tmp_path, capsys):
    code = main(["compress", "--model", str(tiny_reference), "--method", "adasvd", "--ratio", "0.4", "--method-option", option,
                 "--out", str(tmp_path / "out")])
    _one_line_exit_2(capsys, code, message)
    assert not (tmp_path / "out").exists()


# --- minor: strict JSON, unreachable ratio --------------------------------------------------------------

def test_json_output_is_strict():
    def no_constants(name):
        raise AssertionError(f"bare {name} in JSON output")

    text = strict_json({"perplexity": math.inf, "rows": [{"loss": float("nan"), "ok": 1.5}],
                        "step": torch.tensor(2.0), "out": "x"})
    data = json.loads(text, parse_constant=no_constants)
    assert data["perplexity"] is None and data["rows"][0]["loss"] is None and data["rows"][0]["ok"] == 1.5
    assert data["step"] == 2.0 and data["nonfinite"] == ["perplexity", "rows[0].loss"]
    assert "nonfinite" not in json.loads(strict_json({"a": 1.0}))


def test_ratio_whose_ranks_clamp_warns(token_batches):
    model = tiny_model("llama")
    with pytest.warns(BudgetWarning, match=r"cannot be met.*ratio reached is 9\d\.\d\d%"):
        report = compress_model(model, CompressionConfig(method="svd", ratio=0.999), token_batches)
    assert report.achieved_ratio < 0.999
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)
        compress_model(tiny_model("llama"), CompressionConfig(method="svd", ratio=0.5), token_batches)


def test_recipe_data_module_refuses_windows_beyond_positions(tmp_path):
    """``adasvd fit|validate`` recipes build this data module from the model folder before training."""
    from adasvd_lightning.training.datasets_data import CausalLMDataModule

    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    with pytest.raises(InvalidInputError, match="max_position_embeddings = 128"):
        CausalLMDataModule(str(tmp_path / "gpt2"), seq_len=129)
    assert CausalLMDataModule(str(tmp_path / "gpt2"), seq_len=128).seq_len == 128
