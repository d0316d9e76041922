"""The compressed folder's ``config.json`` format: plain data, no torch, no transformers.

``model_type`` is ``adasvd_lightning`` (so tools without this package refuse the folder) and
``quantization_config`` carries the manifest with ``quant_method`` ``adasvd`` and the base
architecture's ``base_model_type`` — `hf_format` explains why. These names and the config rewriting
sit at the bottom of the layers: `hf_quantizer`, `hf_format`, `serialization` and `merging` all read
them, and importing this module costs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "MODEL_TYPE",
    "QUANT_METHOD",
    "LEGACY_MANIFEST_KEY",
    "base_model_type",
    "manifest_of",
    "compressed_config_dict",
    "rewrite_config_file",
]

MODEL_TYPE = "adasvd_lightning"
QUANT_METHOD = "adasvd"
# The manifest's pre-transformers-integration location: a top-level "adasvd" key on a base config.
LEGACY_MANIFEST_KEY = "adasvd"


def base_model_type(config: Any) -> str | None:
    """The architecture's model type: ``llama`` for a compressed Llama, whose own type is ours."""
    model_type = getattr(config, "model_type", None)
    if model_type != MODEL_TYPE:
        return model_type
    base = next((c for c in type(config).__mro__ if getattr(c, "model_type", MODEL_TYPE) != MODEL_TYPE), None)
    return base.model_type if base is not None else None


def manifest_of(config: Any) -> dict | None:
    """The factorization manifest a config carries, or None for a dense model.

    Reads ``quantization_config`` (this format) and the legacy top-level ``adasvd`` key, so folders
    written before the transformers integration still load with `load_compressed`.
    """
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD:
        return {k: v for k, v in quant.items() if k not in ("quant_method", "base_model_type")}
    legacy = getattr(config, LEGACY_MANIFEST_KEY, None)
    return legacy or None


def compressed_config_dict(config_dict: dict, manifest: dict) -> dict:
    """``config_dict`` (as ``save_pretrained`` wrote it) in the compressed folder format.

    With factorized modules in ``manifest`` the model type becomes ``adasvd_lightning`` and the
    manifest moves into ``quantization_config``; without any, the config is the plain base config
    (a densified model is an ordinary Hugging Face folder again).
    """
    out = dict(config_dict)
    out.pop(LEGACY_MANIFEST_KEY, None)
    quant = out.get("quantization_config")
    ours = isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD
    base_type = quant["base_model_type"] if out.get("model_type") == MODEL_TYPE and ours else out["model_type"]
    if ours:
        del out["quantization_config"]
    out["model_type"] = base_type
    architectures = out.get("architectures") or []
    out["architectures"] = [a.removeprefix("AdaSVD") for a in architectures]
    if manifest.get("modules"):
        out["model_type"] = MODEL_TYPE
        out["quantization_config"] = {"quant_method": QUANT_METHOD, "base_model_type": base_type, **manifest}
    return out


def rewrite_config_file(path: str | Path, manifest: dict) -> None:
    """Rewrite a just-saved ``config.json`` into the compressed folder format (see above)."""
    path = Path(path)
    config_dict = json.loads(path.read_text())
    path.write_text(json.dumps(compressed_config_dict(config_dict, manifest), indent=2, sort_keys=True) + "\n")
