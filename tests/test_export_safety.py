"""``adasvd export`` never runs code from a checkpoint: every file is read with weights_only=True."""

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from adasvd_lightning.cli import main
from adasvd_lightning.training.zero_checkpoint import consolidate_fp32, read_client_state


class _Payload:
    """Unpickling this writes a marker file: what an attacker's checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def _zero2_checkpoint(folder: Path, params: dict[str, torch.Tensor], extra=None) -> Path:
    """A one-rank ZeRO-2 checkpoint laid out as DeepSpeed writes it (with its pickled objects)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    tag = folder / "checkpoint"
    tag.mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    flat = torch.cat([p.flatten() for p in params.values()])
    flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)])  # ZeRO-2 pads to 2 × world size
    torch.save({"module": {}, "buffer_names": [], "param_shapes": [OrderedDict((k, v.shape) for k, v in params.items())],
                "shared_params": {}, "frozen_param_shapes": None, "frozen_param_fragments": None,
                "ds_version": "0.0", "callbacks": {}, "extra": extra}, tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "partition_count": [1],
                                         "single_partition_of_fp32_groups": [flat], "loss_scaler": LossScaler(1.0)},
                "extra": extra}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return folder


def test_consolidation_reads_deepspeed_objects_without_unpickling_them(tmp_path):
    params = {"model.a": torch.randn(3, 5), "model.b": torch.randn(7)}
    state = consolidate_fp32(_zero2_checkpoint(tmp_path / "ckpt", params))
    assert state.keys() == params.keys()
    assert all(torch.equal(state[k], params[k]) for k in params)


def test_export_of_a_crafted_checkpoint_runs_no_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = _zero2_checkpoint(tmp_path / "ckpt", {"model.a": torch.randn(4)}, extra=_Payload(marker))
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "builtins.exec" in err and "refusing" in err, err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="builtins.exec"):
        read_client_state(ckpt)
    assert not marker.exists()


def test_latest_may_not_point_outside_the_checkpoint(tmp_path, capsys):
    ckpt = _zero2_checkpoint(tmp_path / "ckpt", {"model.a": torch.randn(4)})
    (ckpt / "latest").write_text("../../elsewhere")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    assert "not a folder inside" in capsys.readouterr().err
