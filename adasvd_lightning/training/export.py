"""Export a Lightning checkpoint of a compressed run to a model folder.

Two checkpoint kinds are read, neither unpickled with ``weights_only=False``: an ordinary ``.ckpt``
file (single process or DDP: one file holding the full state dict, read by `checkpoints.read_checkpoint`)
and a DeepSpeed ZeRO checkpoint directory (per-rank shards, consolidated by `.zero_checkpoint`). The
compressed structure travels in the checkpoint (the `SVDCompression` callback's state holds the
manifest and the model config); the tokenizer comes from a base model folder, or the folder a recipe
run recorded. The result opens with `load_compressed`, or — with ``dense=True`` — is a plain Hugging
Face folder whose factorized matrices were multiplied back (`core.merging.densify`), for tools that do
not know low-rank modules.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import InvalidInputError
from ..core.hf_format import manifest_of
from ..core.merging import densify
from ..core.output import atomic_directory, check_destination, check_free_space
from ..core.serialization import (
    apply_manifest,
    build_empty_model,
    check_model_folder,
    load_tokenizer,
    load_weights,
    write_compressed,
)
from .checkpoints import compression_state, read_checkpoint
from .zero_checkpoint import consolidate_fp32

__all__ = ["read_training_checkpoint", "export_checkpoint"]


def read_training_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full state dict of the LightningModule, the checkpoint's Lightning client state).

    ``path``: a ``.ckpt`` file, or a DeepSpeed checkpoint directory (``latest`` + shards).
    """
    path = Path(path).expanduser()
    if path.is_file():
        checkpoint = read_checkpoint(path)
        if not isinstance(checkpoint.get("state_dict"), dict):
            raise InvalidInputError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
        return checkpoint["state_dict"], checkpoint
    if not path.is_dir():
        raise InvalidInputError(f"checkpoint {path} does not exist")
    client = read_checkpoint(path)  # checks it is a DeepSpeed directory before the costly merge
    return consolidate_fp32(path), client


def recorded_model_path(client: dict) -> Path | None:
    """The model folder a recipe run started from (``model_path`` in the module's hyperparameters)."""
    value = (client.get("hyper_parameters") or {}).get("model_path")
    path = Path(str(value)) if value else None
    return path if path is not None and (path / "config.json").is_file() else None


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    base_model: str | Path | None = None,
    *,
    model_attr: str | None = None,
    dense: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the model held by a Lightning checkpoint to ``out`` (compressed, or dense with ``dense=True``).

    The architecture comes from the model config the callback stored in the checkpoint, or from
    ``base_model`` (a model folder, which also supplies the tokenizer). Without ``base_model`` the
    tokenizer comes from the folder a recipe run recorded as ``model_path``, when it still exists.
    ``model_attr`` (the LightningModule attribute holding the model) defaults to the one the callback
    recorded, else ``"model"``.
    """
    inputs = [checkpoint] + ([base_model] if base_model is not None else [])
    check_destination(out, overwrite=overwrite, inputs=inputs)
    config = check_model_folder(base_model) if base_model is not None else None
    state, client = read_training_checkpoint(checkpoint)
    callback_state = compression_state(client) or {}
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
    attr = model_attr if model_attr is not None else callback_state.get("model_attr") or "model"
    prefix = f"{attr}."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise InvalidInputError(f"no parameters under '{attr}.' in the checkpoint; pass the right --model-attr")
    model = build_empty_model(config)
    if manifest:
        apply_manifest(model, manifest)
    load_weights(model, weights, source=f"checkpoint {checkpoint}")
    if dense:
        densify(model)
    model.eval()
    tokenizer_source = base_model if base_model is not None else recorded_model_path(client)
    tokenizer = load_tokenizer(tokenizer_source) if tokenizer_source is not None else None
    with atomic_directory(out, overwrite=overwrite, inputs=inputs) as tmp:
        state_bytes = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
        check_free_space(tmp, sum(state_bytes.values()) + (1 << 20))
        write_compressed(model, tmp, tokenizer=tokenizer,
                         metadata={"exported_from": str(Path(checkpoint).expanduser().resolve())})
    return Path(out).expanduser().resolve()
