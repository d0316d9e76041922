"""The manifest of a compressed model: which modules are factorized, with which shape and rank.

`build_manifest` derives it from the live modules; `apply_manifest` gives a freshly built (often
meta-device) architecture that structure, checking every entry first. Both the transformers quantizer
(`hf_quantizer`) and the non-transformers loading paths (`serialization`, checkpoints) use it, so it
sits below them and imports neither.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import InvalidInputError
from .lowrank import FactorizedLinear, module_from_entry
from .surgery import is_linear, linear_shape, replace_module

__all__ = ["MANIFEST_KEY", "FORMAT_VERSION", "build_manifest", "apply_manifest"]

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
