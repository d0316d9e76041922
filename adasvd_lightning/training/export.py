"""Export a DeepSpeed ZeRO checkpoint of a compressed model to a model folder.

A ZeRO checkpoint is a directory of per-rank shards. The compressed structure travels in it (the
`SVDCompression` callback's state holds the manifest); the architecture and tokenizer come from the
base model folder the run started from. The result opens with `load_compressed`, or — with
``dense=True`` — is a plain Hugging Face folder whose factorized matrices were multiplied back, for
tools that do not know low-rank modules.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import InvalidInputError
from ..core.dense import densify
from ..core.hf_format import manifest_of
from ..core.serialization import (
    build_empty_model,
    apply_manifest,
    check_model_folder,
    load_tokenizer,
    load_weights,
    save_compressed,
)

__all__ = ["read_zero_checkpoint", "export_zero_checkpoint"]


def read_zero_checkpoint(checkpoint_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(consolidated fp32 state dict, the `SVDCompression` state or {}) of a Lightning ZeRO checkpoint."""
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    shards = sorted((checkpoint_dir / "checkpoint").glob("*model_states.pt"))
    if not (checkpoint_dir / "latest").is_file() or not shards:
        raise InvalidInputError(f"{checkpoint_dir} is not a DeepSpeed checkpoint directory (no 'latest' / shards)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    client = torch.load(shards[0], map_location="cpu", weights_only=True)
    for value in (client.get("callbacks") or {}).values():
        if isinstance(value, dict) and value.get("manifest"):
            return state, value
    return state, {}


def recorded_model_path(checkpoint_dir: str | Path) -> Path | None:
    """The model folder a recipe run started from (``model_path`` in the module's hyperparameters)."""
    shards = sorted((Path(checkpoint_dir).expanduser() / "checkpoint").glob("*model_states.pt"))
    if not shards:
        return None
    client = torch.load(shards[0], map_location="cpu", weights_only=True)
    value = (client.get("hyper_parameters") or {}).get("model_path")
    path = Path(str(value)) if value else None
    return path if path is not None and (path / "config.json").is_file() else None


def export_zero_checkpoint(
    checkpoint_dir: str | Path,
    out: str | Path,
    base_model: str | Path | None = None,
    *,
    model_attr: str = "model",
    dense: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the model held by a ZeRO checkpoint to ``out`` (compressed, or dense with ``dense=True``).

    The architecture comes from the model config the callback stored in the checkpoint, or from
    ``base_model`` (a model folder, which also supplies the tokenizer). Without ``base_model`` the
    tokenizer comes from the folder a recipe run recorded as ``model_path``, when it still exists.
    """
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise InvalidInputError(f"output folder {out} already exists (use --overwrite to replace it)")
    config = check_model_folder(base_model) if base_model is not None else None
    state, callback_state = read_zero_checkpoint(checkpoint_dir)
    # The structure: from SVDCompression's state, else from a compressed base folder's config (a run
    # that fine-tuned an already compressed model).
    manifest = callback_state.get("manifest") or manifest_of(config)
    if config is None:
        stored = callback_state.get("model_config")
        if not stored:
            raise InvalidInputError("the checkpoint stores no model config; pass --base-model with the original folder")
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        # from_dict, not AutoConfig.for_model: a compressed model's stored config (model type
        # adasvd_lightning) is read as its base architecture's config by the registered class.
        if stored.get("model_type") not in CONFIG_MAPPING:
            raise InvalidInputError(f"the checkpoint's model type {stored.get('model_type')!r} is unknown to transformers")
        config = CONFIG_MAPPING[stored["model_type"]].from_dict(dict(stored))
    prefix = f"{model_attr}."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise InvalidInputError(f"no parameters under '{model_attr}.' in the checkpoint; pass the right --model-attr")
    model = build_empty_model(config)
    if manifest:
        apply_manifest(model, manifest)
    load_weights(model, weights, source=f"checkpoint {checkpoint_dir}")
    if dense:
        densify(model)
    model.eval()
    tokenizer_source = base_model if base_model is not None else recorded_model_path(checkpoint_dir)
    tokenizer = load_tokenizer(tokenizer_source) if tokenizer_source is not None else None
    return save_compressed(model, out, tokenizer=tokenizer, overwrite=overwrite,
                           metadata={"exported_from": str(Path(checkpoint_dir).expanduser().resolve())})
