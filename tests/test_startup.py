"""Start-up of the ``adasvd`` command: help and argument errors stay light; Ctrl-C is one line and 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from startup import run_probed  # noqa: E402  (the start-up benchmark's probe: same check, one place)


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["compress", "--help"], 0),
    (["quickstart", "--help"], 0),
    (["compress", "--ratio", "2", "--out", "x"], 2),
    (["evaluate", "--batch-size", "0"], 2),
    (["quickstart", "--ratios", "1.5"], 2),
    (["reference", "--device", "cuda"], 2),
    (["nonsense"], 2),
])
def test_help_and_argument_errors_import_no_heavy_library(args, code):
    returncode, stderr, heavy = run_probed(args)
    assert returncode == code, stderr
    assert heavy == [], f"adasvd {' '.join(args)} imported {heavy}"
    if code == 2:  # one line saying what is wrong
        assert len(stderr) == 1 and "error:" in stderr[0]


def test_help_documents_quickstart_and_evaluate_defaults(capsys):
    from adasvd_lightning.cli import main

    for command, flags in (("quickstart", ("--ratios", "--methods", "--samples", "--seq-len")),
                           ("evaluate", ("--batch-size",))):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        options = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
        for flag in flags:
            text = options.split(flag, 1)[1].split(" --", 1)[0]
            assert "default" in text, f"{command} {flag} has no default in its help: {text!r}"


def test_ctrl_c_during_start_up_exits_130_with_one_line(tmp_path):
    # Interrupted while it imports torch/transformers or starts building the reference model
    # (empty cache): either way one line and exit status 130, no traceback.
    env = {**os.environ, "ADASVD_CACHE": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "adasvd_lightning", "evaluate", "--max-windows", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "adasvd: interrupted"
    assert "Traceback" not in stderr
