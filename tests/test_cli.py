"""The ``adasvd`` command line, run as a real subprocess (the installed console script)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest


def run(*args, env_cache=None):
    env = dict(os.environ)
    if env_cache is not None:
        env["ADASVD_CACHE"] = str(env_cache)
    exe = shutil.which("adasvd") or sys.executable
    cmd = [exe, *args] if exe != sys.executable else [exe, "-m", "adasvd_lightning", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_compress_then_evaluate_round_trip(tiny_reference, tmp_path):
    out = tmp_path / "svdllm"
    result = run("compress", "--model", str(tiny_reference), "--method", "svd-llm", "--ratio", "0.4",
                 "--samples", "8", "--seq-len", "32", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report["parameters_after"] < report["parameters_before"]
    assert 0.4 <= report["achieved_ratio"] < 0.42
    assert report["seconds"] > 0
    assert all(m["rank"] for m in report["modules"])
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    # stderr is a pipe, not a terminal: progress comes as plain lines, each stage's last one saying done
    assert re.search(r"^\[adasvd\] calibrate: 1/1 \(100%\), \d+:\d\d:\d\d elapsed, done", result.stderr, re.M)
    assert re.search(r"^\[adasvd\] block: 2/2 \(100%\), \d+:\d\d:\d\d elapsed, done", result.stderr, re.M)

    dense = last_json(run("evaluate", "--model", str(tiny_reference), "--seq-len", "64", "--max-windows", "20",
                          "--json").stdout)
    comp = run("evaluate", "--model", str(out), "--seq-len", "64", "--max-windows", "20", "--json")
    assert comp.returncode == 0, comp.stderr
    assert re.search(r"^\[adasvd\] evaluate: 20/20 windows \(100%\), .* done", comp.stderr, re.M)
    comp = last_json(comp.stdout)
    for key in ("perplexity", "tokens", "nonfinite_windows", "parameters"):
        assert key in comp
    assert comp["tokens"] == dense["tokens"] == 20 * 63
    assert comp["nonfinite_windows"] == 0
    assert comp["parameters"] == report["parameters_after"]
    assert dense["parameters"] == report["parameters_before"]
    assert comp["perplexity"] > 1.0 and dense["perplexity"] > 1.0


def test_evaluate_on_user_text_file(tiny_reference, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("the quick brown fox jumps over the lazy dog .\n" * 200)
    result = run("evaluate", "--model", str(tiny_reference), "--data", str(text), "--seq-len", "32", "--json")
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["windows"] > 10


@pytest.mark.parametrize(
    "args,message",
    [
        (["compress", "--model", "/nonexistent/model", "--ratio", "0.4", "--out", "OUT"], "model folder not found"),
        (["compress", "--model", "MODEL", "--ratio", "1.5", "--out", "OUT"], "ratio must be in (0, 1)"),
        (["compress", "--model", "MODEL", "--ratio", "0", "--out", "OUT"], "ratio must be in (0, 1)"),
        (["compress", "--model", "MODEL", "--ratio", "abc", "--out", "OUT"], "ratio must be a number"),
        (["compress", "--model", "MODEL", "--method", "svd-lm", "--ratio", "0.4", "--out", "OUT"], "unknown method"),
        (["compress", "--model", "VIT", "--ratio", "0.4", "--out", "OUT"], "not a causal language model"),
        (["compress", "--model", "MODEL", "--ratio", "0.4", "--calibration", "/no/such.txt", "--out", "OUT"],
         "text file not found"),
        (["compress", "--model", "MODEL", "--ratio", "0.4", "--include", "nomatch_xyz", "--out", "OUT"],
         "no linear layer matches"),
        (["compress", "--model", "MODEL", "--ratio", "0.4", "--execution-device", "cuda:99", "--out", "OUT"],
         "cuda:99"),
        (["compress", "--model", "MODEL", "--ratio", "0.4", "--svd-driver", "lapack", "--out", "OUT"],
         "invalid choice"),
        (["compress", "--model", "MODEL", "--ratio", "0.4", "--statistics-dtype", "float16", "--out", "OUT"],
         "invalid choice"),
        (["compress", "--model", "MODEL", "--ratio", "0.4", "--merge-unprofitable", "1.5", "--out", "OUT"],
         "merge_unprofitable"),
        (["evaluate", "--model", "MODEL", "--data", "/no/such.txt"], "text file not found"),
        (["evaluate", "--model", "/nonexistent/model"], "model folder not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tiny_reference, tmp_path):
    from transformers import ViTConfig

    vit = tmp_path / "vit"
    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(vit)
    out = tmp_path / "out"
    subst = {"MODEL": str(tiny_reference), "VIT": str(vit), "OUT": str(out)}
    result = run(*[subst.get(a, a) for a in args])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("flags,expected", [([], "float32"), (["--statistics-dtype", "float64"], "float64")])
def test_statistics_dtype_flag_reaches_the_config(flags, expected):
    from adasvd_lightning.cli import build_parser, compression_config

    args = build_parser().parse_args(["compress", "--ratio", "0.4", *flags, "--out", "OUT"])
    assert compression_config(args, {}).statistics_dtype == expected


@pytest.mark.parametrize("flags,expected", [([], 1), (["--decomposition-threads", "4"], 4)])
def test_decomposition_threads_flag_reaches_the_config(flags, expected):
    from adasvd_lightning.cli import build_parser, compression_config

    args = build_parser().parse_args(["compress", "--ratio", "0.4", *flags, "--out", "OUT"])
    assert compression_config(args, {}).decomposition_threads == expected


@pytest.mark.parametrize("flags,message", [
    (["--method", "svd-llm"], "probes nothing"),
    (["--method", "duo-svd", "--probe-table", "{tmp}"], "is a folder"),
])
def test_probe_table_flag_is_checked_before_any_work(flags, message, tmp_path):
    out = tmp_path / "out"
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    if "--probe-table" not in flags:
        flags += ["--probe-table", str(tmp_path / "t.jsonl")]
    result = run("compress", "--model", "reference", "--ratio", "0.4", *flags, "--out", str(out))
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists() and not (tmp_path / "t.jsonl").exists()


def test_activation_dir_flag_is_checked_before_any_work_and_leaves_the_folder_empty(tiny_reference, tmp_path):
    out = tmp_path / "out"
    result = run("compress", "--model", "reference", "--ratio", "0.4", "--activation-dir", str(tmp_path / "missing"),
                 "--out", str(out))
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "is not an existing folder" in lines[0], result.stderr
    assert not out.exists()
    folder = tmp_path / "activations"
    folder.mkdir()
    result = run("compress", "--model", str(tiny_reference), "--ratio", "0.4", "--samples", "8", "--seq-len", "32",
                 "--activation-dir", str(folder), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["calibration_tokens"] == 8 * 32
    assert list(folder.iterdir()) == []


def test_composed_method_from_the_command_line(tiny_reference, tmp_path):
    out = tmp_path / "duo"
    result = run("compress", "--model", str(tiny_reference), "--method", "adasvd-duo", "--ratio", "0.6",
                 "--method-option", "refinement=adacomp", "--method-option", "adacomp_iterations=3",
                 "--method-option", "allocation=adacr", "--samples", "8", "--seq-len", "32",
                 "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report["method"] == "adasvd-duo+custom"
    assert -0.005 <= report["budget_deviation"] <= 0.0
    assert len(report["allocation"]["block_importance"]) == 2
    assert max(m["refinement_steps"] for m in report["modules"]) <= 6  # 3 iterations × (U, V)
    evaluated = last_json(run("evaluate", "--model", str(out), "--seq-len", "64", "--max-windows", "5",
                              "--json").stdout)
    assert evaluated["parameters"] == report["parameters_after"]


@pytest.mark.parametrize("option,message", [("refinment=adacomp", "did you mean 'refinement'"),
                                            ("adacomp_iterations=many", "expects int"),
                                            ("noequals", "KEY=VALUE")])
def test_bad_method_option_exits_2(option, message, tiny_reference, tmp_path):
    result = run("compress", "--model", str(tiny_reference), "--ratio", "0.4", "--method-option", option,
                 "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused(tiny_reference, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = run("compress", "--model", str(tiny_reference), "--ratio", "0.4", "--out", str(out))
    assert result.returncode == 2 and "already exists" in result.stderr


@pytest.mark.parametrize("command", ["", "compress", "evaluate", "quickstart", "export", "reference", "fit",
                                     "validate", "test"])
def test_help_of_every_subcommand(command, capsys):
    from adasvd_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "usage:" in out
    if command in ("fit", "validate", "test"):
        assert "--config" in out and "--print_config" in out
    if not command:
        assert all(name in out for name in ("fit", "validate", "compress", "export"))


def test_quickstart_table_on_a_given_model(tiny_reference):
    result = run("quickstart", "--model", str(tiny_reference), "--methods", "svd", "svd-llm", "--ratios", "0.5",
                 "--samples", "8", "--seq-len", "32", "--max-windows", "16", "--json")
    assert result.returncode == 0, result.stderr
    rows = last_json(result.stdout)["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == [("dense", 0.0), ("svd", 0.5), ("svd-llm", 0.5)]
    dense, svd, svd_llm = (r["perplexity"] for r in rows)
    assert dense < svd_llm < svd  # data-aware whitening beats plain SVD at equal parameters
    assert rows[1]["parameters"] == rows[2]["parameters"] < rows[0]["parameters"]
    assert "perplexity on the embedded test split" in result.stderr
    for line in ("quickstart 0/2: dense", "quickstart 1/2: svd at 50%", "quickstart 2/2: svd-llm at 50%"):
        assert line in result.stderr  # where the run is, between the phases' progress lines
    assert result.stderr.count("[adasvd] evaluate: 16/16 windows (100%)") == 3


def test_merge_unprofitable_from_the_command_line(tiny_reference, tmp_path):
    """Merged layers are dense in the saved folder and in the report; outputs do not change."""
    common = ["--model", str(tiny_reference), "--method", "svd-llm", "--ratio", "0.4", "--samples", "8",
              "--seq-len", "32", "--json"]
    plain = last_json(run("compress", *common, "--out", str(tmp_path / "plain")).stdout)
    result = run("compress", *common, "--merge-unprofitable", "0.5", "--out", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    merged = last_json(result.stdout)
    # Every layer saves ~40% < 50%: all merge back, so nothing is removed any more.
    assert len(merged["merged"]) == len(merged["modules"]) and merged["achieved_ratio"] == 0.0
    assert all(m["rank"] is None and "multiply-adds" in m["skipped"] for m in merged["modules"])
    assert merged["parameters_after"] == merged["parameters_before"]
    assert "merged back to dense" in " ".join(result.stderr.split())  # the summary may wrap at 80 columns
    scores = [last_json(run("evaluate", "--model", str(tmp_path / name), "--seq-len", "32", "--max-windows", "8",
                            "--json").stdout) for name in ("plain", "merged")]
    assert scores[1]["parameters"] == merged["parameters_after"] > plain["parameters_after"]
    assert abs(scores[1]["perplexity"] / scores[0]["perplexity"] - 1) < 1e-4
