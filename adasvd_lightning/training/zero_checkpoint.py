"""Read a DeepSpeed ZeRO checkpoint without running code from it.

DeepSpeed's own consolidation (``zero_to_fp32``) unpickles every shard with ``weights_only=False``,
so a crafted checkpoint runs whatever its pickle says the moment it is exported. Here every file is
opened with ``torch.load(weights_only=True)``. The optimizer shards also pickle a few DeepSpeed
objects (the ZeRO stage enum, the loss scaler, fragment addresses); those names — and only those —
are mapped to inert local stand-ins (`torch.serialization.safe_globals` with a substitute class), so
DeepSpeed's classes are never instantiated either. A file naming any other global is refused.

The consolidation itself (concatenating the per-rank flat fp32 partitions back into named tensors)
is DeepSpeed's: its merge functions only do tensor arithmetic on what this module loaded.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import torch

from ..core.errors import InvalidInputError

__all__ = ["safe_load", "checkpoint_files", "read_client_state", "consolidate_fp32"]


class _Inert:
    """Stand-in for a pickled DeepSpeed object: keeps its constructor arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Stage(int):
    """Stand-in for ``ZeroStageEnum`` (an int enum pickled as ``ZeroStageEnum(value)``)."""


_STAND_INS = {
    "deepspeed.runtime.zero.config.ZeroStageEnum": _Stage,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": _Inert,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": _Inert,
    "deepspeed.utils.tensor_fragment.fragment_address": _Inert,
}


def safe_load(file: Path) -> dict:
    """``torch.load(weights_only=True)`` of one checkpoint file, with DeepSpeed's few objects inert."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except Exception as exc:
        raise InvalidInputError(f"{file} is not a readable PyTorch checkpoint: {str(exc).splitlines()[0]}") from None
    unknown = [n for n in names if n not in _STAND_INS]
    if unknown:
        raise InvalidInputError(
            f"{file} pickles {unknown[0]}, which export does not load (only tensors and plain data); refusing it"
        )
    try:
        with torch.serialization.safe_globals([(_STAND_INS[n], n) for n in names]):
            data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidInputError(f"cannot read {file} safely: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"{file} does not hold a checkpoint dictionary")
    return data


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def checkpoint_files(checkpoint_dir: Path) -> tuple[list[Path], list[Path]]:
    """(model-state files, optimizer-state files) of the checkpoint tag named in ``latest``."""
    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        raise InvalidInputError(f"{checkpoint_dir} is not a DeepSpeed checkpoint directory (no 'latest' / shards)")
    tag = latest.read_text().strip()
    folder = (checkpoint_dir / tag).resolve()
    if not tag or folder.parent != checkpoint_dir.resolve() or not folder.is_dir():
        raise InvalidInputError(f"{latest} names {tag!r}, which is not a folder inside {checkpoint_dir}")
    models = sorted(folder.glob("*_model_states.pt"), key=_natural)
    optims = sorted(folder.glob("*_optim_states.pt"), key=_natural)
    if not models or not optims:
        raise InvalidInputError(f"{checkpoint_dir} is not a DeepSpeed checkpoint directory (no 'latest' / shards)")
    return models, optims


def read_client_state(checkpoint_dir: Path) -> dict:
    """The first model-state file: Lightning's client state (callbacks, hyper-parameters) lives there."""
    return safe_load(checkpoint_files(checkpoint_dir)[0][0])


def consolidate_fp32(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO-1/2/3 checkpoint, every file loaded with `safe_load`."""
    from deepspeed.utils import zero_to_fp32 as z

    model_files, optim_files = checkpoint_files(checkpoint_dir)
    states = []
    for file in model_files:
        sd = safe_load(file)
        if "buffer_names" not in sd or "param_shapes" not in sd:
            raise InvalidInputError(f"{file} is not a DeepSpeed model-state file")
        states.append(z.zero_model_state(
            buffers={k: v.float() if v.is_floating_point() else v
                     for k, v in sd["module"].items() if k in sd["buffer_names"]},
            param_shapes=sd["param_shapes"], shared_params=list(map(list, sd["shared_params"].items())),
            ds_version=sd.get("ds_version"), frozen_param_shapes=sd.get("frozen_param_shapes"),
            frozen_param_fragments=sd.get("frozen_param_fragments"),
        ))
    optims = [safe_load(f).get("optimizer_state_dict") or {} for f in optim_files]
    stage, world = optims[0].get("zero_stage"), optims[0].get("partition_count")
    world = max(world) if isinstance(world, list) else world
    if stage not in (1, 2, 3) or world != len(optim_files):
        raise InvalidInputError(
            f"{checkpoint_dir}: ZeRO stage {stage!r} with {world!r} partitions but {len(optim_files)} optimizer files"
        )
    key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    groups = [o[key] for o in optims]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress chatter
        if stage == 3:
            state = z._get_fp32_state_dict_from_zero3_checkpoint(world, groups, states, False)
        else:
            state = z._get_fp32_state_dict_from_zero2_checkpoint(world, groups, states, False,
                                                                 optims[0].get("param_alignment_paddings"))
        return z.to_torch_tensor(state)
