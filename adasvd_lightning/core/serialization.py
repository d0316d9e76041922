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

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hf_format
from .distributed import gathered_parameters
from .errors import InvalidInputError
from .lowrank import FactorizedLinear, module_from_entry
from .output import atomic_directory
from .surgery import is_linear, linear_shape, replace_module

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

MANIFEST_KEY = "adasvd"
FORMAT_VERSION = 1


def build_manifest(model: nn.Module, **extra: Any) -> dict:
    """Manifest of the model's factorized modules, derived from the modules themselves."""
    modules = {name: m.manifest_entry() for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}
    return {"format_version": FORMAT_VERSION, **extra, "modules": modules}


def apply_manifest(model: nn.Module, manifest: Any) -> None:
    """Give ``model`` the factorized structure a manifest describes (weights uninitialised).

    Every entry is checked against the architecture first, so an edited manifest (a rank of 10¹², a
    string, a wrong ``in_features``) is refused instead of allocating what it asks for.
    """
    if not isinstance(manifest, dict):
        raise InvalidInputError(f"the '{MANIFEST_KEY}' manifest in config.json must be an object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise InvalidInputError(f"unsupported compressed-model format version {version!r} (expected {FORMAT_VERSION})")
    modules = manifest.get("modules", {})
    if not isinstance(modules, dict):
        raise InvalidInputError("the manifest's 'modules' must be an object of module name → entry")
    for name, entry in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise InvalidInputError(f"manifest names module {name!r}, which this architecture does not have") from None
        if not is_linear(old):
            raise InvalidInputError(f"manifest names module {name!r}, which is not a linear layer")
        _check_entry(name, entry, linear_shape(old))
        ref = next(old.parameters(), None)
        new = module_from_entry(entry, device=ref.device if ref is not None else None,
                                dtype=ref.dtype if ref is not None else None)
        replace_module(model, name, new)


def _check_entry(name: str, entry: Any, shape: tuple[int, int]) -> None:
    """A manifest entry describes a factorization of a (out × in) = ``shape`` linear layer."""
    if not isinstance(entry, dict):
        raise InvalidInputError(f"manifest entry of {name} must be an object, got {entry!r}")
    kind = entry.get("kind")
    if kind not in ("low_rank", "column_preserving"):
        raise InvalidInputError(f"unknown module kind {kind!r} for {name} in the manifest")
    keys = ("in_features", "out_features", "rank") + (("kept_columns",) if kind == "column_preserving" else ())
    for key in keys:
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"manifest entry of {name}: {key} must be a positive integer, got {value!r}")
    if not isinstance(entry.get("bias"), bool):
        raise InvalidInputError(f"manifest entry of {name}: bias must be true or false, got {entry.get('bias')!r}")
    out_features, in_features = shape
    if (entry["out_features"], entry["in_features"]) != shape:
        raise InvalidInputError(
            f"manifest entry of {name} says {entry['out_features']}×{entry['in_features']}, but the architecture's "
            f"layer is {out_features}×{in_features}"
        )
    width = in_features - entry.get("kept_columns", 0)
    if width < 1 or entry["rank"] > min(out_features, width):
        raise InvalidInputError(
            f"manifest entry of {name}: rank {entry['rank']} (kept columns {entry.get('kept_columns', 0)}) does not "
            f"fit a {out_features}×{in_features} layer"
        )


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
    """The folder's safetensors files; a shard index may only name plain files inside the folder."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"{index} is not a valid shard index ({type(exc).__name__}: {exc})") from None
        if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise InvalidInputError(f"{index}: 'weight_map' must map tensor names to shard file names")
        root = path.resolve()
        files = []
        for shard in sorted(set(weight_map.values())):
            file = (path / shard).resolve()
            if Path(shard).is_absolute() or file.parent != root:
                raise InvalidInputError(f"{index} names {shard!r}, which is not a file inside {path}; refusing to read it")
            if not file.is_file():
                raise InvalidInputError(f"{index} names {shard!r}, which does not exist")
            files.append(file)
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise InvalidInputError(f"{path} has no safetensors weights (model.safetensors or its index)")


def inspect_weights(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} from the files' headers — cheap, and it rejects truncated or empty files."""
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    found[key] = (tuple(piece.get_shape()), piece.get_dtype())
        except Exception as exc:  # safetensors raises its own error type for corrupt headers
            raise InvalidInputError(
                f"{file} is not a readable safetensors file (truncated or corrupt?): {str(exc).splitlines()[0]}"
            ) from None
    return found


def _load_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the files, each in its own process memory (nothing stays mapped to the files).

    Private copies because `load_compressed` makes these tensors the model's parameters: a tensor
    still backed by a mapping of the user's file would crash the process (SIGBUS) if that file were
    truncated or rewritten in place while the model is alive.
    """
    from safetensors.torch import load_file, safe_open

    inspect_weights(files)
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


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, assign: bool = False) -> None:
    """Load ``state`` into ``model`` exactly: the shapes the architecture expects, finite values, no
    unexpected keys, none missing but tied aliases.

    ``assign``: the state's tensors become the model's parameters and buffers instead of being copied
    into them (no second copy of the weights; the caller must not reuse ``state``'s tensors).
    """
    expected = model.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise InvalidInputError(
                f"{source}: weight {key} has shape {tuple(tensor.shape)}, the architecture expects "
                f"{tuple(expected[key].shape)}"
            )
        if not _finite(tensor):
            raise InvalidInputError(f"{source}: weight {key} holds NaN or infinite values")
    result = model.load_state_dict(state, strict=False, assign=assign)
    if result.unexpected_keys:
        raise InvalidInputError(f"{source}: weights do not match the architecture, unexpected {result.unexpected_keys[:5]}")
    model.tie_weights()
    missing = [k for k in result.missing_keys if not _is_tied_alias(model, k, state)]
    if missing:
        raise InvalidInputError(f"{source}: weights missing for {missing[:5]}")


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN/±Inf: min and max propagate NaN and show an infinity, so one reduction pass (about 8×
    faster than ``isfinite(t).all()``, which writes a bool tensor the size of the weight)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    return all(bool(torch.isfinite(v)) for v in torch.aminmax(tensor))


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
