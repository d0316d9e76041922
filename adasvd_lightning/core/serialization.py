"""Save and load compressed models as Hugging Face-style folders.

A compressed folder is a normal model folder (``config.json``, ``*.safetensors``, tokenizer files)
whose config carries a manifest of every factorized module (rank and shape) as its
``quantization_config`` and the model type ``adasvd_lightning``, so that tools without this package
refuse it instead of loading random weights (`hf_format` explains the format). Compressed folders load
through transformers' ``from_pretrained`` on the meta device; dense folders (no manifest) and folders
with the older top-level ``adasvd`` manifest load by building the architecture and swapping in empty
`LowRankLinear` modules where the manifest says.

Writes go through `adasvd_lightning.core.output.atomic_directory`: a uniquely named hidden sibling,
put in place in one rename when complete, and only replacing a previous output this project wrote.
Weights are read with safetensors only (no pickle). Reading validates before allocating: the shard
index may only name files inside the folder, every file's header must be whole, the manifest's
entries must be positive integers that fit the architecture, and weights must have the shapes the
architecture expects and be finite — each a one-line `InvalidInputError`, never a traceback or a huge
allocation.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hf_format
from .distributed import gathered_parameters
from .errors import InvalidInputError
from .manifest import FORMAT_VERSION, MANIFEST_KEY, apply_manifest, build_manifest
from .model_folder import (
    _load_state_dict,
    _weight_files,
    build_empty_model,
    check_model_folder,
    inspect_weights,
    load_weights,
)
from .output import atomic_directory

# The manifest helpers (`manifest`) and the folder readers (`model_folder`) live below both this module
# and `hf_format`, which loads through transformers; they are re-exported here, where callers know them.
__all__ = [
    "MANIFEST_KEY",
    "FORMAT_VERSION",
    "build_manifest",
    "apply_manifest",
    "atomic_directory",
    "save_compressed",
    "write_compressed",
    "inspect_weights",
    "load_compressed",
    "load_tokenizer",
    "check_model_folder",
    "load_weights",
    "build_empty_model",
]


def save_compressed(
    model: nn.Module,
    path: str | Path,
    *,
    tokenizer: Any = None,
    metadata: dict | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Save a (compressed or dense) Hugging Face model atomically, with its manifest in the config.

    ``overwrite`` replaces only a previous output of this project; ``inputs`` are folders the
    destination must not be or contain (see `adasvd_lightning.core.output.check_destination`).
    Under a process group global rank 0 writes and the other ranks return the same path. Under
    DeepSpeed ZeRO-3 the partitioned parameters are gathered first, so call it on every rank there.
    """
    _check_saveable(model)
    with gathered_parameters(model) as writes:
        if writes:
            with atomic_directory(path, overwrite=overwrite, inputs=inputs) as tmp:
                write_compressed(model, tmp, tokenizer=tokenizer, metadata=metadata)
    return Path(path).expanduser().resolve()


def _check_saveable(model: nn.Module) -> None:
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise InvalidInputError("save_compressed needs a Hugging Face PreTrainedModel")


def write_compressed(model: nn.Module, folder: Path, *, tokenizer: Any = None, metadata: dict | None = None) -> None:
    """Write the model (manifest in its config) and tokenizer into ``folder``, an `atomic_directory`."""
    _check_saveable(model)
    manifest = build_manifest(model, **(metadata or {}))
    model.save_pretrained(folder, safe_serialization=True)
    # The manifest goes into config.json in the form transformers' Auto classes open (hf_format).
    hf_format.rewrite_config_file(Path(folder) / "config.json", manifest)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_compressed(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model folder written by :func:`save_compressed`, or any dense causal-LM folder.

    ``dtype`` defaults to the dtype the weights were saved in, so logits after a save→load round trip
    are bit-identical to those before.
    """
    path = Path(path).expanduser()
    config = check_model_folder(path)
    files = _weight_files(path)
    if config.model_type == hf_format.MODEL_TYPE:
        return hf_format.load_folder(path, device=device, dtype=dtype)  # meta device: no dense weights
    manifest = hf_format.manifest_of(config)  # the legacy location (top-level "adasvd") or None
    state = _load_state_dict(files)
    model = build_empty_model(config)
    if manifest:
        apply_manifest(model, manifest)
    saved_dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    model.to(dtype=saved_dtype)
    # The loaded tensors become the parameters (assign): copying them into the empty model would hold
    # the weights twice at the end of loading — 2× the model at the process's memory peak.
    load_weights(model, state, source=str(path), assign=True)
    del state
    model.to(device=device, dtype=dtype or saved_dtype)
    model.eval()
    return model


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model folder (no remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(path).expanduser(), trust_remote_code=False)
    except Exception as exc:
        raise InvalidInputError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
