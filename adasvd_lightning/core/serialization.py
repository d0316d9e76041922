"""Save and load compressed models as Hugging Face-style folders.

A compressed folder is a normal model folder (``config.json``, ``*.safetensors``, tokenizer files)
whose config carries an ``adasvd`` entry: a manifest of every factorized module (rank and shape). The
loader builds the architecture from the config, swaps in empty `LowRankLinear` modules where the
manifest says, and loads the weights — so the same call opens dense folders (no manifest) too.

Writes are atomic: everything is written to a hidden temporary folder beside the destination and
renamed into place only when complete, so an interrupted save never leaves a half-written model.
Weights are read with safetensors only (no pickle).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InvalidInputError
from .lowrank import FactorizedLinear, module_from_entry
from .surgery import replace_module

__all__ = [
    "MANIFEST_KEY",
    "FORMAT_VERSION",
    "build_manifest",
    "apply_manifest",
    "atomic_directory",
    "save_compressed",
    "load_compressed",
    "load_tokenizer",
    "check_model_folder",
    "load_weights",
    "build_empty_model",
]

MANIFEST_KEY = "adasvd"
FORMAT_VERSION = 1


def build_manifest(model: nn.Module, **extra: Any) -> dict:
    """Manifest of the model's factorized modules, derived from the modules themselves."""
    modules = {name: m.manifest_entry() for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    return {"format_version": FORMAT_VERSION, **extra, "modules": modules}


def apply_manifest(model: nn.Module, manifest: dict) -> None:
    """Give ``model`` the factorized structure a manifest describes (weights uninitialised)."""
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise InvalidInputError(f"unsupported compressed-model format version {version!r} (expected {FORMAT_VERSION})")
    for name, entry in manifest.get("modules", {}).items():
        kind = entry.get("kind")
        if kind not in ("low_rank", "column_preserving"):
            raise InvalidInputError(f"unknown module kind {kind!r} for {name} in the manifest")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise InvalidInputError(f"manifest names module {name!r}, which this architecture does not have") from None
        ref = next(old.parameters(), None)
        new = module_from_entry(entry, device=ref.device if ref is not None else None,
                                dtype=ref.dtype if ref is not None else None)
        replace_module(model, name, new)


@contextmanager
def atomic_directory(destination: str | Path, *, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces ``destination``, on failure it is deleted."""
    destination = Path(destination).expanduser().resolve()
    if destination.exists() and not overwrite:
        raise InvalidInputError(f"output folder {destination} already exists (pass overwrite to replace it)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if destination.exists():
        backup = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, backup)
    try:
        os.replace(tmp, destination)
    except BaseException:
        if backup is not None:
            os.replace(backup, destination)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def save_compressed(
    model: nn.Module,
    path: str | Path,
    *,
    tokenizer: Any = None,
    metadata: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a (compressed or dense) Hugging Face model atomically, with its manifest in the config."""
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise InvalidInputError("save_compressed needs a Hugging Face PreTrainedModel")
    manifest = build_manifest(model, **(metadata or {}))
    path = Path(path)
    previous = getattr(model.config, MANIFEST_KEY, None)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        setattr(model.config, MANIFEST_KEY, manifest)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if previous is None:
                delattr(model.config, MANIFEST_KEY)
            else:
                setattr(model.config, MANIFEST_KEY, previous)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path.expanduser().resolve()


def check_model_folder(path: str | Path):
    """Validate a model folder and return its config; bad folders raise `InvalidInputError`."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = Path(path).expanduser()
    if not path.is_dir():
        raise InvalidInputError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise InvalidInputError(f"{path} has no config.json; is it a Hugging Face model folder?")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as exc:  # transformers raises several types for unreadable configs
        raise InvalidInputError(f"cannot read model config in {path}: {str(exc).splitlines()[0]}") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise InvalidInputError(
            f"{path} holds a {config.model_type!r} model, which is not a causal language model"
        )
    return config


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise InvalidInputError(f"{path} has no safetensors weights (model.safetensors or its index)")


def _load_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the files, each in its own process memory (nothing stays mapped to the files).

    Private copies because `load_compressed` makes these tensors the model's parameters: a tensor
    still backed by a mapping of the user's file would crash the process (SIGBUS) if that file were
    truncated or rewritten in place while the model is alive.
    """
    from safetensors.torch import load_file, safe_open

    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file), backend="pread"))  # safetensors >= 0.8: read(), no mapping
        except TypeError:  # older safetensors: copy each tensor out of its memory-mapped view
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key).clone()
    return state


def build_empty_model(config):
    """The architecture of ``config`` with uninitialised weights (they are about to be loaded)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def load_compressed(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model folder written by :func:`save_compressed`, or any dense causal-LM folder.

    ``dtype`` defaults to the dtype the weights were saved in, so logits after a save→load round trip
    are bit-identical to those before.
    """
    path = Path(path).expanduser()
    config = check_model_folder(path)
    manifest = getattr(config, MANIFEST_KEY, None)
    files = _weight_files(path)
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


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, assign: bool = False) -> None:
    """Load ``state`` into ``model`` exactly: no unexpected keys, none missing but tied aliases.

    ``assign``: the state's tensors become the model's parameters and buffers instead of being copied
    into them (no second copy of the weights; the caller must not reuse ``state``'s tensors).
    """
    result = model.load_state_dict(state, strict=False, assign=assign)
    if result.unexpected_keys:
        raise InvalidInputError(f"{source}: weights do not match the architecture, unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    missing = [k for k in result.missing_keys if not _is_tied_alias(model, k, state)]
    if missing:
        raise InvalidInputError(f"{source}: weights missing for {missing[:5]}")


def _is_tied_alias(model: nn.Module, key: str, state: dict) -> bool:
    """True when ``key`` is a parameter that shares storage with a loaded one (tied embeddings)."""
    try:
        param = model.get_parameter(key)
    except AttributeError:
        return False
    for name, other in model.named_parameters(remove_duplicate=False):
        if other is param and name != key and name in state:
            return True
    return False


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a model folder (no remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(path).expanduser(), trust_remote_code=False)
    except Exception as exc:
        raise InvalidInputError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
