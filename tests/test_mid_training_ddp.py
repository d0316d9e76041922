"""Mid-training progressive compression under DDP and DeepSpeed ZeRO-2/3 with 2 real CPU processes (gloo).

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


def _relative_errors(a: dict, b: dict) -> list[float]:
    """Sorted ‖a − b‖ / ‖b‖ of every weight (factor pairs multiplied out)."""
    a, b = _products(a), _products(b)
    assert a.keys() == b.keys()
    return sorted(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


def _runs(out: Path, modes: tuple[str, ...], reference: str = "single") -> tuple[dict, dict, dict]:
    """Run the single-process reference and the 2-process modes; check what every strategy must give.

    Both ranks end the stages at step 6 with the single process's structure (same parameter counts
    per stage), identical weights right after the last stage and at the end, and an optimizer that
    holds exactly the model's parameters.
    """
    for mode in (reference, *modes):
        _run(out, mode)
    single = torch.load(out / f"{reference}-rank0.pt", weights_only=True)
    r0, r1 = (torch.load(out / f"{modes[0]}-rank{rank}.pt", weights_only=True) for rank in (0, 1))
    for r in (r0, r1):
        assert r["completed"] == [2, 4] and r["step"] == 6 and r["optimized"]
        assert r["reports"] == single["reports"] and r["reports"][0] > r["reports"][1]
    for key in ("after_stage", "state"):
        assert r0[key].keys() == r1[key].keys() and any(k.endswith(".up") for k in r0[key])
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key])
    return single, r0, r1


def _assert_exports(out: Path, checkpoint: str, state: dict) -> None:
    """``adasvd export`` turns the checkpoint into a model folder holding exactly ``state``."""
    from adasvd_lightning import load_compressed
    from test_cli import run

    result = run("export", "--checkpoint", str(out / checkpoint), "--out", str(out / "out"))
    assert result.returncode == 0, result.stderr
    exported = load_compressed(out / "out").state_dict()
    assert exported.keys() == state.keys() and any(k.endswith(".up") for k in exported)
    assert all(torch.equal(exported[k], state[k]) for k in exported)


def test_progressive_schedule_under_ddp_matches_one_process_and_resumes(tmp_path):
    single, r0, r1 = _runs(tmp_path, ("ddp", "resume"))
    load = lambda name: torch.load(tmp_path / f"{name}.pt", weights_only=True)  # noqa: E731
    # The same run as one process on the same data: the ranks' mean loss equals its loss at every
    # step, before and after both stages, and the weights after the last stage agree (to the rounding
    # that summation order leaves, which Adam's first steps on fresh factors amplify).
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert len(mean) == 6 and max(abs(a - b) for a, b in zip(mean, single["losses"])) < 1e-3
    errors = _relative_errors(r0["after_stage"], single["after_stage"])
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
    _assert_exports(tmp_path, "after-stages.ckpt", r0["state"])


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
    _assert_exports(tmp_path, "zero2.ckpt", r0["state"])
    for name in ("zero2-resume-rank0", "zero2-resume-rank1"):
        resumed = load(name)
        assert resumed["step"] == 8 and resumed["completed"] == [2, 4] and resumed["optimized"]
        assert resumed["reports"] == [] and sum(resumed["losses"]) / 2 < mean[0] - 0.3


def test_progressive_schedule_under_deepspeed_zero3_gathers_shards_and_matches_one_process(tmp_path):
    """ZeRO-3: each stage gathers the partitioned weights, compresses them identically on both ranks and
    rebuilds the engine, which partitions the new factors; the run is the single process's run.

    Plain SGD keeps no optimizer state, so the engine's fresh state after a stage changes nothing and
    the whole 6-step run (two stages) must equal one process taking the same steps on the same
    batches. What remains is float32 rounding (eps 1.2e-7): the ranks' gradients are averaged by
    reduce-scatter and their calibration statistics summed in another order than one process sums
    them. Measured: losses within 5e-7, every weight within 1.3e-6 relative (median 4e-7) after each
    stage and at the end; the bounds leave 20-100x for other BLAS builds and thread counts, while a
    factor in the wrong param group, a stale shard or a rank's own decomposition would show up as
    1e-3 or more.
    """
    single, r0, r1 = _runs(tmp_path, ("zero3-sgd", "zero3-resume-sgd"), reference="single-sgd")
    assert r0["partitioned"] and r1["partitioned"]  # every weight a shard again, the new factors included
    assert r0["groups"] > 2  # the 2 param groups ran as several ZeRO-3 sub-groups
    load = lambda name: torch.load(tmp_path / f"{name}.pt", weights_only=True)  # noqa: E731
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert len(mean) == 6 and max(abs(a - b) for a, b in zip(mean, single["losses"])) < 1e-5
    for key in ("after_first", "after_stage", "state"):  # right after each stage, and at the end
        errors = _relative_errors(r0[key], single[key])
        assert errors[-1] < 1e-4 and errors[len(errors) // 2] < 1e-5, (key, errors[-3:])
    assert mean[-1] < mean[0] - 0.3  # training went on after the stages and the loss fell
    # The sharded checkpoint written after the stages resumes on 2 ranks without compressing again…
    for name in ("zero3-resume-sgd-rank0", "zero3-resume-sgd-rank1"):
        resumed = load(name)
        assert resumed["step"] == 8 and resumed["completed"] == [2, 4] and resumed["optimized"]
        assert resumed["reports"] == [] and sum(resumed["losses"]) / 2 < mean[0] - 0.3
    assert all(torch.equal(load("zero3-resume-sgd-rank0")["state"][k], load("zero3-resume-sgd-rank1")["state"][k])
               for k in r0["state"])
    # …and exports to a model folder holding exactly the trained (gathered) weights.
    _assert_exports(tmp_path, "zero3-sgd.ckpt", r0["state"])


def test_fit_end_compression_under_deepspeed_zero3_matches_one_process_and_exports(tmp_path):
    """``at="fit_end"`` under ZeRO-3 runs after Lightning's teardown, with the engine still holding the
    shards: the stage gathers them, compresses, and rebuilds the engine, so the checkpoint written
    afterwards holds the factors. Same SGD run and rounding argument as the schedule test above."""
    for mode in ("single-fitend-sgd", "zero3-fitend-sgd"):
        _run(tmp_path, mode)
    single, r0, r1 = (torch.load(tmp_path / f"{name}.pt", weights_only=True)
                      for name in ("single-fitend-sgd-rank0", "zero3-fitend-sgd-rank0", "zero3-fitend-sgd-rank1"))
    for r in (r0, r1):
        assert r["reports"] == single["reports"] and len(r["reports"]) == 1 and r["partitioned"] and r["optimized"]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])
    errors = _relative_errors(r0["state"], single["state"])
    assert errors[-1] < 1e-4 and errors[len(errors) // 2] < 1e-5, errors[-3:]
    _assert_exports(tmp_path, "zero3-sgd.ckpt", r0["state"])
