"""Lightning checkpoints of compressed models: find the structure they carry and rebuild it.

A checkpoint written after `SVDCompression` ran holds factor weights (``...q_proj.up``) that only load
into a model of the same structure. The callback stores that structure (the manifest: rank and shape
of every factorized module) in its state, and these helpers put it back before the weights load:

* `restore_structure` — call it from ``on_load_checkpoint`` (the library's `CausalLMModule` does), so
  ``MyModule.load_from_checkpoint(...)`` works without any callback;
* the callback itself runs it before the module's hook in ``fit``/``validate``/``test(ckpt_path=...)``;
* `read_checkpoint` opens a checkpoint file (``weights_only=True``, memory-mapped, so peeking at a large
  file costs little) or a DeepSpeed checkpoint folder's client state (`zero_checkpoint.read_client_state`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.errors import InvalidInputError
from ..core.serialization import apply_manifest, build_manifest

__all__ = ["compression_state", "model_of", "read_checkpoint", "restore_structure"]


def compression_state(checkpoint: dict) -> dict | None:
    """The `SVDCompression` state saved in a checkpoint (the last one holding a manifest), or None."""
    found = None
    for value in (checkpoint.get("callbacks") or {}).values():
        if isinstance(value, dict) and value.get("manifest"):
            found = value
    return found


def model_of(pl_module: nn.Module, model_attr: str | None) -> nn.Module:
    """``pl_module.<model_attr>`` (the whole module for ``None`` or ``""``); a missing attribute is an error."""
    if not model_attr:
        return pl_module
    module = getattr(pl_module, model_attr, None)
    if not isinstance(module, nn.Module):
        raise InvalidInputError(
            f"{type(pl_module).__name__} has no module attribute {model_attr!r}; pass model_attr= naming the "
            "attribute that holds the model to compress (model_attr=None for the whole LightningModule)"
        )
    return module


def restore_structure(pl_module: nn.Module, checkpoint: dict, *, model_attr: str | None = None) -> bool:
    """Give the module's model the factorized structure recorded in ``checkpoint``; True if it has one.

    ``model_attr`` defaults to the attribute the callback compressed (saved in its state).
    """
    state = compression_state(checkpoint)
    if state is None:
        return False
    attr = model_attr if model_attr is not None else state.get("model_attr", "model")
    model = model_of(pl_module, attr)
    manifest = state["manifest"]
    if build_manifest(model)["modules"] != manifest["modules"]:
        apply_manifest(model, manifest)
    return True


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint file, or a DeepSpeed checkpoint folder's client state (Lightning's keys).

    Read with ``weights_only=True``: a checkpoint is never unpickled. Memory-mapped, so only what is
    used is read.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        from .zero_checkpoint import read_client_state

        try:
            return read_client_state(path)
        except InvalidInputError as error:
            raise InvalidInputError(f"{path} is neither a Lightning .ckpt file nor a DeepSpeed checkpoint directory "
                                    f"({error})") from None
    if not path.is_file():
        raise InvalidInputError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InvalidInputError(f"cannot read checkpoint {path} with weights_only=True: {first}") from None
