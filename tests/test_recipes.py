"""Shipped recipes and the LightningCLI subcommands (`adasvd fit | validate | test`).

Most runs are in-process through `adasvd_lightning.cli.main` (one import of Lightning for the whole
module); the ZeRO-3 recipe runs as a real `adasvd` subprocess because Lightning re-launches the command
line for its second process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adasvd_lightning.cli import main
from adasvd_lightning.core.methods import PRESETS
from test_cli import last_json, run

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ALL_RECIPES = sorted(RECIPES.rglob("*.yaml"))
TRAINING_RECIPES = {"recover-zero3.yaml", "progressive.yaml"}
# Small sizes for the tiny reference model; every run reads the embedded text through `datasets`.
TINY = ["--data.seq_len", "32", "--data.calibration_samples", "8", "--trainer.limit_val_batches", "4"]


def command_for(path: Path) -> str:
    return "fit" if path.name in TRAINING_RECIPES else "validate"


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_print_config_of_every_shipped_recipe(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command_for(path), "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    source = yaml.safe_load(path.read_text())
    assert printed["model"]["model_path"] == source["model"]["model_path"]
    names = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
    assert "SVDCompression" in names
    # The recipe says how to run it in its header comment.
    assert path.read_text().startswith("#") and f"--config recipes/{path.relative_to(RECIPES)}" in path.read_text()


def test_one_recipe_per_preset_plus_the_documented_ones():
    shipped = {p.stem.removeprefix("compress-"): p for p in RECIPES.glob("compress-*.yaml")}
    assert set(shipped) == set(PRESETS)
    for preset, path in shipped.items():
        callback = yaml.safe_load(path.read_text())["trainer"]["callbacks"][0]["init_args"]
        assert callback["method"] == preset and 0 < callback["ratio"] < 1
    quickstart = yaml.safe_load((RECIPES / "quickstart.yaml").read_text())["trainer"]["callbacks"][0]["init_args"]
    assert (quickstart["method"], quickstart["ratio"]) == ("adasvd", 0.4)
    gpu = sorted(p.name for p in (RECIPES / "gpu").glob("*.yaml"))
    assert gpu == [f"{m}-{r}.yaml" for m in ("llama-2-7b", "mistral-7b", "qwen2-7b") for r in (40, 60)]
    for name in gpu:
        data = yaml.safe_load((RECIPES / "gpu" / name).read_text())
        assert data["data"]["seq_len"] == 2048 and data["data"]["calibration_samples"] == 256
        assert data["trainer"]["callbacks"][0]["init_args"]["ratio"] == int(name[-7:-5]) / 100


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_recipe_runs_at_tiny_size(preset, tiny_reference, capsys):
    code, out, err = run_main(capsys, "validate", "--config", str(RECIPES / f"compress-{preset}.yaml"),
                              "--model.model_path", str(tiny_reference), *TINY, "--json")
    assert code == 0, err
    result = last_json(out)
    report = result["reports"][0]
    assert report["method"] == preset and abs(report["achieved_ratio"] - 0.4) < 0.01
    assert result["parameters"] == report["parameters_after"] < report["parameters_before"]
    assert 1.0 < result["metrics"]["val_ppl"] < 5000.0
    assert "rel. err" in err  # the summary table


def test_quickstart_validate_equals_compress_then_evaluate(tiny_reference, tmp_path, capsys):
    """One recipe format for both: the one-shot command calibrates and compresses exactly as the recipe
    run does, and the recipe's val_ppl follows the evaluate command's perplexity protocol."""
    recipe = str(RECIPES / "quickstart.yaml")
    code, out, err = run_main(capsys, "validate", "--config", recipe, "--model.model_path", str(tiny_reference),
                              *TINY, "--json", "--quiet")
    assert code == 0, err
    assert "rel. err" not in err and "Validate metric" not in out  # quiet: no tables
    validated = last_json(out)
    folder = tmp_path / "compressed"
    code, out, err = run_main(capsys, "compress", "--recipe", recipe, "--model", str(tiny_reference),
                              "--seq-len", "32", "--samples", "8", "--out", str(folder), "--json", "--quiet")
    assert code == 0, err
    assert last_json(out)["parameters_after"] == validated["parameters"]
    code, out, err = run_main(capsys, "evaluate", "--model", str(folder), "--seq-len", "32",
                              "--max-windows", "32", "--json", "--quiet")  # 4 batches × 8
    evaluated = last_json(out)
    assert evaluated["perplexity"] == pytest.approx(validated["metrics"]["val_ppl"], rel=1e-5)


def test_test_subcommand_reports_test_perplexity(tiny_reference, capsys):
    code, out, err = run_main(capsys, "test", "--config", str(RECIPES / "compress-svd.yaml"),
                              "--model.model_path", str(tiny_reference), "--data.test_files", "[embedded:test]",
                              "--data.seq_len", "32", "--trainer.limit_test_batches", "2", "--json")
    assert code == 0, err
    result = last_json(out)
    assert result["command"] == "test" and result["metrics"]["test_ppl"] > 1.0


def test_progressive_recipe_trains_through_its_schedule(tiny_reference, tmp_path, capsys, monkeypatch):
    recipe = yaml.safe_load((RECIPES / "progressive.yaml").read_text())
    recipe["trainer"]["callbacks"][0]["init_args"]["schedule"] = [[1, 0.2], [2, 0.4], [3, 0.6]]
    recipe["trainer"].update(max_steps=5, val_check_interval=5)
    path = tmp_path / "progressive.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)  # the recipe writes runs/progressive under the working directory
    code, out, err = run_main(capsys, "fit", "--config", str(path), "--model.model_path", str(tiny_reference),
                              *TINY, "--json")
    assert code == 0, err
    result = last_json(out)
    assert [r["ratio"] for r in result["reports"]] == [0.2, 0.4, 0.6]
    assert abs(result["reports"][-1]["achieved_ratio"] - 0.6) < 0.01
    assert result["global_step"] == 5
    assert Path(result["checkpoint"]).is_file()
    assert (tmp_path / "runs" / "progressive" / "lightning_logs" / "version_0" / "config.yaml").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero3_recovery_recipe_then_export(tiny_reference, tmp_path):
    # The installed command, as a user runs it: it lives beside this interpreter (PATH may not say so).
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "MASTER_PORT": str(_free_port()), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PATH": path}
    args = ["adasvd", "fit", "--config", str(RECIPES / "recover-zero3.yaml"), "--model.model_path",
            str(tiny_reference), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", *TINY, "--json"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = last_json(proc.stdout)
    assert result["global_step"] == 3 and result["reports"][0]["method"] == "svd-llm"
    checkpoint = Path(result["checkpoint"])
    assert (checkpoint / "latest").is_file()  # a directory of ZeRO shards
    exported = run("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "recovered"), "--json")
    assert exported.returncode == 0, exported.stderr
    # The tokenizer comes from the model_path the recipe recorded; the structure from the checkpoint.
    evaluated = last_json(run("evaluate", "--model", str(tmp_path / "recovered"), "--seq-len", "32",
                              "--max-windows", "4", "--json").stdout)
    assert evaluated["parameters"] == result["reports"][0]["parameters_after"]


# --------------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line, no traceback, no output folder — one test per row.
# --------------------------------------------------------------------------------------------------

BASE = {
    "model": {"model_path": "MODEL"},
    "data": {"seq_len": 32, "calibration_samples": 8},
    "trainer": {"max_steps": 2, "default_root_dir": "OUT", "logger": False,
                "callbacks": [{"class_path": "adasvd_lightning.callbacks.SVDCompression",
                               "init_args": {"method": "svd-llm", "ratio": 0.4}}]},
}


def _callback(**init_args) -> dict:
    return {"trainer": {"callbacks": [{"class_path": "adasvd_lightning.callbacks.SVDCompression",
                                       "init_args": {"method": "svd-llm", "ratio": 0.4, **init_args}}]}}


def _merge(base: dict, change: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else (lists included) replaces."""
    out = dict(base)
    for key, value in change.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


BAD_RECIPES = {
    "unknown-key": ({"trainer": {"max_step": 3}}, "did you mean 'trainer.max_steps'"),
    "unknown-section": ({"modle": {"model_path": "x"}}, "did you mean 'model"),
    "unknown-callback-argument": (_callback(ratoi=0.4), "did you mean 'ratio'"),
    "wrong-type": ({"data": {"seq_len": "long"}}, "data.seq_len: expected int"),
    "wrong-callback-type": (_callback(ratio="half"), "ratio: expected float or None, got 'half'"),
    "ratio-above-one": (_callback(ratio=1.5), "ratio must be in (0, 1)"),
    "ratio-zero": (_callback(ratio=0.0), "ratio must be in (0, 1)"),
    "schedule-not-increasing": (_callback(at="step", ratio=None, schedule=[[1, 0.4], [2, 0.3]]), "ratios must increase"),
    "schedule-beyond-max-steps": (_callback(at="step", ratio=None, schedule=[[1, 0.2], [9, 0.4]]), "never reached"),
    "ratio-with-schedule": (_callback(at="step", schedule=[[1, 0.2]]), "give either ratio or schedule"),
    "unknown-method": (_callback(method="svd-lm"), "unknown method"),
    "missing-execution-device": (_callback(execution_device="cuda:99"), "cuda:99"),
    "statistics-dtype": (_callback(statistics_dtype="float16"), "statistics_dtype must be one of"),
    "missing-model": ({"model": {"model_path": "/no/such/model"}}, "folder not found"),
    "missing-data": ({"data": {"train_files": ["/no/such/text.txt"]}}, "text file not found"),
    "deepspeed-stage": ({"trainer": {"strategy": {
        "class_path": "adasvd_lightning.training.strategies.CPUDeepSpeedStrategy", "init_args": {"stage": 4}}}},
        "stage 4 does not exist"),
    "unknown-strategy": ({"trainer": {"strategy": "deepspeed_stage_4"}}, "unknown strategy 'deepspeed_stage_4'"),
    "unknown-class": ({"trainer": {"callbacks": [{"class_path": "adasvd_lightning.callbacks.SVDCompresion"}]}},
                      "did you mean adasvd_lightning.callbacks.SVDCompression"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_exits_2_with_one_line(case, tiny_reference, tmp_path, capsys):
    change, message = BAD_RECIPES[case]
    recipe = _merge(BASE, change)
    text = yaml.safe_dump(recipe).replace("MODEL", str(tiny_reference)).replace("OUT", str(tmp_path / "out"))
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    code, out, err = run_main(capsys, "fit", "--config", str(path))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and message in lines[0], err
    assert lines[0].startswith("adasvd fit: error:") and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_compress_recipe_and_flag_set_the_statistics_dtype(tmp_path):
    """The recipe's callback argument reaches `adasvd compress --recipe`; the flag wins over it."""
    from adasvd_lightning.cli import build_parser, compression_config
    from adasvd_lightning.lightning_cli import one_shot_settings, parse_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_merge(BASE, _callback(statistics_dtype="float64"))).replace("MODEL", "reference"))
    recipe = one_shot_settings(parse_recipe(path))
    for flags, expected in [([], "float64"), (["--statistics-dtype", "float32"], "float32")]:
        args = build_parser().parse_args(["compress", "--recipe", str(path), *flags, "--out", "OUT"])
        assert compression_config(args, recipe).statistics_dtype == expected


def test_compress_recipe_passes_decomposition_threads_and_probe_table(tmp_path):
    """These callback arguments reach `adasvd compress --recipe` (the threads were once dropped there)."""
    from adasvd_lightning.cli import build_parser, compression_config
    from adasvd_lightning.lightning_cli import one_shot_settings, parse_recipe

    table = tmp_path / "probes.jsonl"
    path = tmp_path / "recipe.yaml"
    callback = _callback(method="duo-svd", decomposition_threads=3, probe_table=str(table),
                         activation_dir=str(tmp_path))
    path.write_text(yaml.safe_dump(_merge(BASE, callback)).replace("MODEL", "reference"))
    recipe = one_shot_settings(parse_recipe(path))
    args = build_parser().parse_args(["compress", "--recipe", str(path), "--out", "OUT"])
    config = compression_config(args, recipe)
    assert (config.decomposition_threads, config.probe_table, config.activation_dir) == (3, str(table), str(tmp_path))
    other = tmp_path / "other.jsonl"
    args = build_parser().parse_args(["compress", "--recipe", str(path), "--probe-table", str(other), "--out", "OUT"])
    assert compression_config(args, recipe).probe_table == str(other)


@pytest.mark.parametrize("text,message", [("model: [unclosed\n", "not valid YAML"), ("", "an empty file")])
def test_unreadable_recipe_file(text, message, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    code, _, err = run_main(capsys, "compress", "--recipe", str(path), "--out", str(tmp_path / "out"))
    assert code == 2 and "Traceback" not in err
    assert message in err and not (tmp_path / "out").exists()


def test_missing_recipe_file(tmp_path, capsys):
    code, _, err = run_main(capsys, "compress", "--recipe", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o"))
    assert code == 2 and "recipe not found" in err


def test_training_recipe_is_refused_by_one_shot_compress(tmp_path, capsys):
    code, _, err = run_main(capsys, "compress", "--recipe", str(RECIPES / "progressive.yaml"),
                            "--out", str(tmp_path / "out"))
    assert code == 2 and "adasvd fit --config" in err and not (tmp_path / "out").exists()


def test_bad_recipe_through_the_installed_command(tmp_path):
    """The real console script: exit status 2 and a single stderr line."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_merge(BASE, {"trainer": {"max_step": 3}})).replace("MODEL", "reference"))
    result = run("fit", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["adasvd fit: error: unknown key 'trainer.max_step' "
                                                  "(did you mean 'trainer.max_steps'?)"]


@pytest.mark.parametrize("flag, suggestion", [("--trainer.max_stepz", "--trainer.max_steps"),
                                              ("--modle.model_path", "--model.model_path")])
def test_mistyped_dotted_flag_gets_a_suggestion(flag, suggestion, capsys):
    code, _, err = run_main(capsys, "fit", "--config", str(RECIPES / "quickstart.yaml"), flag, "5")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"adasvd fit: error: unknown option {flag} (did you mean '{suggestion}'?)"]


@pytest.mark.parametrize("extra, expected", [({}, "StepRunProgressBar"), ({"enable_progress_bar": False}, None)])
def test_step_limited_run_has_no_negative_epoch_total(extra, expected, tiny_reference, tmp_path):
    """Lightning's bar read "Epoch 6/-2" for max_steps runs; ours says "Epoch 6"; off stays off."""
    from adasvd_lightning.lightning_cli import run_cli

    recipe = _merge(BASE, {"trainer": extra})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe).replace("MODEL", str(tiny_reference)).replace("OUT", str(tmp_path / "o")))
    trainer = run_cli(["--config", str(path)], run=False).trainer
    bar = trainer.progress_bar_callback
    assert type(bar).__name__ == expected if expected else bar is None
    if bar is not None:
        trainer.fit_loop.max_epochs = -1  # what `trainer.fit` makes of max_steps without max_epochs
        bar.setup(trainer, None, "fit")
        assert bar._get_train_description(6).strip() == "Epoch 6"
