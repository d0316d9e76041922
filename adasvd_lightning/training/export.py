"""Export a DeepSpeed ZeRO checkpoint of a compressed model to a model folder.

A ZeRO checkpoint is a directory of per-rank shards. The compressed structure travels in it (the
`SVDCompression` callback's state holds the manifest); the architecture and tokenizer come from the
base model folder the run started from. The result opens with `load_compressed`, or — with
``dense=True`` — is a plain Hugging Face folder whose factorized matrices were multiplied back, for
tools that do not know low-rank modules. No file of the checkpoint is unpickled with
``weights_only=False`` (see `.zero_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import InvalidInputError
from ..core.lowrank import FactorizedLinear
from ..core.output import atomic_directory, check_destination, check_free_space
from ..core.serialization import (
    MANIFEST_KEY,
    build_empty_model,
    apply_manifest,
    check_model_folder,
    load_tokenizer,
    load_weights,
    write_compressed,
)
from ..core.surgery import Conv1D, replace_module
from .zero_checkpoint import consolidate_fp32, read_client_state

__all__ = ["read_zero_checkpoint", "export_zero_checkpoint"]


def read_zero_checkpoint(checkpoint_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(consolidated fp32 state dict, the `SVDCompression` state or {}) of a Lightning ZeRO checkpoint."""
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    client = read_client_state(checkpoint_dir)
    state = consolidate_fp32(checkpoint_dir)
    for value in (client.get("callbacks") or {}).values():
        if isinstance(value, dict) and value.get("manifest"):
            return state, value
    return state, {}


def recorded_model_path(checkpoint_dir: str | Path) -> Path | None:
    """The model folder a recipe run started from (``model_path`` in the module's hyperparameters)."""
    client = read_client_state(Path(checkpoint_dir).expanduser())
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
    inputs = [checkpoint_dir] + ([base_model] if base_model is not None else [])
    check_destination(out, overwrite=overwrite, inputs=inputs)
    config = check_model_folder(base_model) if base_model is not None else None
    state, callback_state = read_zero_checkpoint(checkpoint_dir)
    # The structure: from SVDCompression's state, else from a compressed base folder's config (a run
    # that fine-tuned an already compressed model).
    manifest = callback_state.get("manifest") or getattr(config, MANIFEST_KEY, None)
    if config is None:
        stored = callback_state.get("model_config")
        if not stored:
            raise InvalidInputError("the checkpoint stores no model config; pass --base-model with the original folder")
        from transformers import AutoConfig

        stored = dict(stored)
        config = AutoConfig.for_model(stored.pop("model_type"), **stored)
    prefix = f"{model_attr}."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise InvalidInputError(f"no parameters under '{model_attr}.' in the checkpoint; pass the right --model-attr")
    model = build_empty_model(config)
    if manifest:
        apply_manifest(model, manifest)
    load_weights(model, weights, source=f"checkpoint {checkpoint_dir}")
    if dense:
        _densify(model)
    model.eval()
    tokenizer_source = base_model if base_model is not None else recorded_model_path(checkpoint_dir)
    tokenizer = load_tokenizer(tokenizer_source) if tokenizer_source is not None else None
    with atomic_directory(out, overwrite=overwrite, inputs=inputs) as tmp:
        state_bytes = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
        check_free_space(tmp, sum(state_bytes.values()) + (1 << 20))
        write_compressed(model, tmp, tokenizer=tokenizer,
                         metadata={"exported_from": str(Path(checkpoint_dir).expanduser().resolve())})
    return Path(out).expanduser().resolve()


@torch.no_grad()
def _densify(model: torch.nn.Module) -> None:
    """Multiply factorized modules back into dense `nn.Linear`s (or GPT-2 `Conv1D`s)."""
    config_model_type = getattr(getattr(model, "config", None), "model_type", "")
    for name, module in list(model.named_modules()):
        if not isinstance(module, FactorizedLinear):
            continue
        weight = module.dense_weight()
        bias = module.bias
        if config_model_type == "gpt2" and Conv1D is not None:
            dense = Conv1D(module.out_features, module.in_features)
            dense.weight.copy_(weight.T)
            dense.bias.copy_(bias if bias is not None else torch.zeros(module.out_features))
        else:
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=bias is not None,
                                    dtype=weight.dtype)
            dense.weight.copy_(weight)
            if bias is not None:
                dense.bias.copy_(bias)
        replace_module(model, name, dense)
