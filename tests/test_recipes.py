"""Shipped recipes and recipe validation."""

from pathlib import Path

import pytest

from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.core.methods import PRESETS
from adasvd_lightning.recipe import load_recipe
from test_cli import last_json, run

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_one_recipe_per_preset_and_all_valid():
    shipped = sorted(RECIPES.glob("compress-*.yaml"))
    assert {p.stem.removeprefix("compress-") for p in shipped} == set(PRESETS)
    for path in shipped:
        recipe = load_recipe(path)
        assert recipe["compress"]["method"] in PRESETS
        assert 0 < recipe["compress"]["ratio"] < 1


def test_recipe_runs_with_flag_overrides(tiny_reference, tmp_path):
    out = tmp_path / "out"
    result = run("compress", "--recipe", str(RECIPES / "compress-svd-llm.yaml"), "--model", str(tiny_reference),
                 "--samples", "4", "--seq-len", "32", "--ratio", "0.5", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report["method"] == "svd-llm" and report["ratio"] == 0.5
    assert report["calibration_tokens"] == 4 * 32


@pytest.mark.parametrize(
    "text,message",
    [
        ("compress:\n  ratoi: 0.4\n", "did you mean 'ratio'"),
        ("compres:\n  ratio: 0.4\n", "did you mean 'compress'"),
        ("compress:\n  ratio: high\n", "compress.ratio must be float/int"),
        ("calibration:\n  samples: 2.5\n", "calibration.samples must be int"),
        ("- just\n- a list\n", "mapping of sections"),
        ("compress: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_recipes_are_rejected(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(path)


def test_bad_recipe_exits_2_before_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("compress:\n  ratoi: 0.4\n")
    result = run("compress", "--recipe", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "did you mean 'ratio'" in result.stderr
    assert not (tmp_path / "out").exists()
