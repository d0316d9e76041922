"""Dense export: multiply factorized layers back into the dense modules their architecture expects.

For tools that only take dense weights (llama.cpp converters, serving stacks, anything that reads a
plain Hugging Face folder). The result has the compressed model's *function* (each dense matrix is
the product the factorized layer applied) but not its size or speed.

Which dense module goes where is read off the architecture, not a per-model list: the base model is
built once on the meta device (no memory) and each factorized module is replaced by a module of the
class found at the same name — `nn.Linear` for most families, transformers' ``Conv1D`` (weights
stored transposed) for GPT-2 and its relatives.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import InvalidInputError
from .lowrank import FactorizedLinear
from .surgery import Conv1D, replace_module

__all__ = ["densify", "export_dense"]


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Replace every factorized module of ``model`` by its dense equivalent, in place; returns ``model``.

    Save the result with `save_compressed` (or use `export_dense`): with nothing factorized left it
    writes a plain Hugging Face folder of the base architecture.
    """
    factorized = [(n, m) for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    if not factorized:
        return model
    reference = _meta_architecture(model)
    for name, module in factorized:
        template = reference.get_submodule(name) if reference is not None else None
        replace_module(model, name, _dense_module(module, template))
    return model


def _meta_architecture(model: nn.Module) -> nn.Module | None:
    """The dense architecture of ``model`` built on the meta device, or None for a non-HF model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(type(model), "_from_config"):
        return None
    with torch.device("meta"):
        return type(model)._from_config(config)


def _dense_module(module: FactorizedLinear, template: nn.Module | None) -> nn.Module:
    weight = module.dense_weight()
    bias = module.bias
    if Conv1D is not None and isinstance(template, Conv1D):
        dense = Conv1D(module.out_features, module.in_features).to(device=weight.device, dtype=weight.dtype)
        dense.weight.copy_(weight.T)
        dense.bias.copy_(bias if bias is not None else torch.zeros_like(dense.bias))
        return dense
    if template is not None and not isinstance(template, nn.Linear):
        raise InvalidInputError(f"cannot densify into a {type(template).__name__}: no dense rule for that module type")
    has_bias = template.bias is not None if template is not None else bias is not None
    dense = nn.Linear(module.in_features, module.out_features, bias=has_bias, device=weight.device, dtype=weight.dtype)
    dense.weight.copy_(weight)
    if has_bias:
        dense.bias.copy_(bias if bias is not None else torch.zeros_like(dense.bias))
    return dense


def export_dense(folder: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a compressed model folder's dense equivalent to ``out`` (a plain Hugging Face folder).

    The tokenizer is copied when the folder has one. The output is written atomically; an existing
    ``out`` is replaced only with ``overwrite``. Needs the dense model's memory (that is the point).
    """
    from .serialization import load_compressed, load_tokenizer, save_compressed

    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise InvalidInputError(f"output folder {out} already exists (use --overwrite to replace it)")
    model = densify(load_compressed(folder))
    has_tokenizer = any((Path(folder).expanduser() / name).is_file()
                        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tokenizer = load_tokenizer(folder) if has_tokenizer else None
    return save_compressed(model, out, tokenizer=tokenizer, overwrite=overwrite)
