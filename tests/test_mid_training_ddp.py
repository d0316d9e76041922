"""Mid-training progressive compression under DDP and DeepSpeed ZeRO-2 with 2 real CPU processes (gloo).

Each rank calibrates on its shard, statistics are all-reduced, every matrix is decomposed once and
broadcast, the DDP wrapper is rebuilt and the new factors join the user's optimizer. The run must
match a single process taking the same gradient steps, keep training, and resume from a checkpoint
written after the stages.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from test_distributed import _free_port

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "scripts" / "ddp_progressive.py"


def _run(out: Path, mode: str) -> None:
    env = {**os.environ, "MASTER_PORT": str(_free_port()), "PL_DISABLE_FORK": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), str(TESTS), mode], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _products(state: dict) -> dict[str, torch.Tensor]:
    """Every weight, with factor pairs multiplied out (their split is not unique)."""
    out = {}
    for key, value in state.items():
        if key.endswith(".up"):
            out[key[:-3]] = value.double() @ state[key[:-3] + ".down"].double()
        elif not key.endswith(".down"):
            out[key] = value.double()
    return out


def _runs(out: Path, modes: tuple[str, ...]) -> tuple[dict, dict, dict]:
    """Run the single-process reference and the 2-process modes; check what every strategy must give.

    Both ranks end the stages at step 6 with the single process's structure (same parameter counts
    per stage), identical weights right after the last stage and at the end, and an optimizer that
    holds exactly the model's parameters.
    """
    for mode in ("single", *modes):
        _run(out, mode)
    single = torch.load(out / "single-rank0.pt", weights_only=True)
    r0, r1 = (torch.load(out / f"{modes[0]}-rank{rank}.pt", weights_only=True) for rank in (0, 1))
    for r in (r0, r1):
        assert r["completed"] == [2, 4] and r["step"] == 6 and r["optimized"]
        assert r["reports"] == single["reports"] and r["reports"][0] > r["reports"][1]
    for key in ("after_stage", "state"):
        assert r0[key].keys() == r1[key].keys() and any(k.endswith(".up") for k in r0[key])
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key])
    return single, r0, r1


def test_progressive_schedule_under_ddp_matches_one_process_and_resumes(tmp_path):
    single, r0, r1 = _runs(tmp_path, ("ddp", "resume"))
    load = lambda name: torch.load(tmp_path / f"{name}.pt", weights_only=True)  # noqa: E731
    # The same run as one process on the same data: the ranks' mean loss equals its loss at every
    # step, before and after both stages, and the weights after the last stage agree (to the rounding
    # that summation order leaves, which Adam's first steps on fresh factors amplify).
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert len(mean) == 6 and max(abs(a - b) for a, b in zip(mean, single["losses"])) < 1e-3
    ddp, one = _products(r0["after_stage"]), _products(single["after_stage"])
    assert ddp.keys() == one.keys()
    errors = sorted(float((ddp[k] - one[k]).norm() / one[k].norm()) for k in one)
    assert errors[-1] < 1e-2 and errors[len(errors) // 2] < 1e-3, errors[-3:]
    # Training went on and the loss fell; the checkpoint written after the stages resumes (2 ranks).
    assert mean[-1] < mean[0] - 0.3
    for name in ("resume-rank0", "resume-rank1"):
        resumed = load(name)
        assert resumed["step"] == 8 and resumed["completed"] == [2, 4] and resumed["optimized"]
        assert resumed["reports"] == []  # no stage ran again
        assert sum(resumed["losses"]) / 2 < mean[0] - 0.3
    assert all(torch.equal(load("resume-rank0")["state"][k], load("resume-rank1")["state"][k]) for k in r0["state"])

    # The DDP checkpoint exports to a model folder holding exactly the trained weights.
    from adasvd_lightning import load_compressed
    from test_cli import run

    result = run("export", "--checkpoint", str(tmp_path / "after-stages.ckpt"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    exported = load_compressed(tmp_path / "out").state_dict()
    assert exported.keys() == r0["state"].keys()
    assert all(torch.equal(exported[k], r0["state"][k]) for k in exported)


def test_progressive_schedule_under_deepspeed_zero2_reinitialises_the_engine_and_resumes(tmp_path):
    single, r0, r1 = _runs(tmp_path, ("zero2", "zero2-resume"))  # the new engine holds the factors
    load = lambda name: torch.load(tmp_path / f"{name}.pt", weights_only=True)  # noqa: E731
    # Up to the first optimizer step after the first stage the run is the single-process one; after it
    # the re-initialised engine starts every parameter's Adam state afresh (the single process keeps
    # the untouched parameters' state), so only the trend is compared.
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert max(abs(a - b) for a, b in zip(mean[:3], single["losses"][:3])) < 1e-3
    assert mean[-1] < mean[0] - 0.3
    # The ZeRO checkpoint written after the stages exports to exactly the trained weights.
    from adasvd_lightning import load_compressed
    from test_cli import run

    result = run("export", "--checkpoint", str(tmp_path / "zero2.ckpt"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    exported = load_compressed(tmp_path / "out").state_dict()
    assert exported.keys() == r0["state"].keys()
    assert all(torch.equal(exported[k], r0["state"][k]) for k in exported)
    for name in ("zero2-resume-rank0", "zero2-resume-rank1"):
        resumed = load(name)
        assert resumed["step"] == 8 and resumed["completed"] == [2, 4] and resumed["optimized"]
        assert resumed["reports"] == [] and sum(resumed["losses"]) / 2 < mean[0] - 0.3


def test_mid_training_points_under_zero3_are_refused_before_training():
    import lightning as L
    import pytest

    from adasvd_lightning.callbacks import SVDCompression
    from adasvd_lightning.core.errors import InvalidInputError
    from adasvd_lightning.training.module import CausalLMModule
    from adasvd_lightning.training.strategies import CPUDeepSpeedStrategy
    from conftest import tiny_model

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(stage=3), max_steps=4,
                        logger=False, enable_checkpointing=False)
    callback = SVDCompression(at="step", schedule=[(2, 0.4)], show_progress=False)
    with pytest.raises(InvalidInputError, match="DeepSpeed ZeRO-3 does not support yet"):
        callback.setup(trainer, CausalLMModule(tiny_model("llama")), "fit")
