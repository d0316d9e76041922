"""Compress at setup, then DeepSpeed ZeRO recovery on 2 CPU processes, checkpoint, export, reload."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adasvd_lightning import load_compressed
from adasvd_lightning.core.lowrank import FactorizedLinear
from test_cli import last_json, run
from test_distributed import _free_port

SCRIPT = Path(__file__).resolve().parent / "scripts" / "deepspeed_recover.py"


@pytest.mark.parametrize("stage,method", [(3, "adasvd-duo"), (2, "svd-llm")])
def test_zero_recovery_checkpoint_export_reload(tiny_reference, tmp_path, stage, method):
    env = {**os.environ, "MASTER_PORT": str(_free_port()), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tiny_reference), str(tmp_path), str(stage), method],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    trained = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert trained["step"] == 3
    assert trained["partitioned"] == (stage == 3)  # ZeRO-3 held shards when save_compressed was called

    out = tmp_path / "exported"
    result = run("export", "--checkpoint", str(tmp_path / "ckpt"), "--base-model", str(tiny_reference),
                 "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["out"] == str(out.resolve())
    model = load_compressed(out)
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    ids = torch.randint(0, 500, (32, 32), generator=torch.Generator().manual_seed(0))[:2]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.allclose(logits, trained["logits"], atol=1e-4, rtol=1e-4)
    saved = load_compressed(tmp_path / "saved")  # save_compressed during the run gathered the shards itself
    assert saved.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in saved.state_dict().items())

    # Without --base-model the architecture comes from the config stored by SVDCompression.
    dense = tmp_path / "dense"
    result = run("export", "--checkpoint", str(tmp_path / "ckpt"), "--dense", "--out", str(dense))
    assert result.returncode == 0, result.stderr
    dense_model = load_compressed(dense)
    assert not any(isinstance(m, FactorizedLinear) for m in dense_model.modules())
    with torch.no_grad():
        assert torch.allclose(dense_model(ids).logits, trained["logits"], atol=1e-4, rtol=1e-4)

    if stage == 3:  # resume the ZeRO-3 run from its sharded checkpoint and keep training
        env["MASTER_PORT"] = str(_free_port())
        proc = subprocess.run([sys.executable, str(SCRIPT), str(tiny_reference), str(tmp_path), "3", method,
                               "resume"], capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert torch.load(tmp_path / "resumed.pt", weights_only=True)["step"] == 5


def test_export_rejects_a_folder_that_is_not_a_zero_checkpoint(tmp_path):
    result = run("export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "neither a Lightning .ckpt file nor a DeepSpeed checkpoint" in result.stderr
