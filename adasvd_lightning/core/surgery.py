"""Model surgery: find decoder blocks and their linear layers, read weights, swap modules.

Works on any causal LM whose decoder blocks sit in one `nn.ModuleList` (LLaMA, Mistral, Qwen2, OPT,
GPT-2, …) and on plain `nn.Module`s. GPT-2's `Conv1D` stores its weight transposed (in × out); every
accessor here returns the conventional out × in matrix so the maths never sees the difference.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InvalidInputError
from .lowrank import FactorizedLinear

try:  # transformers is optional for plain nn.Module use
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers always installed with the package
    Conv1D = None  # type: ignore[assignment,misc]

__all__ = [
    "TargetSelector",
    "is_linear",
    "linear_shape",
    "linear_weight",
    "linear_bias",
    "find_decoder_blocks",
    "find_targets",
    "replace_module",
]


def is_linear(module: nn.Module) -> bool:
    """Linear-like leaves we can factorize: `nn.Linear`, GPT-2 `Conv1D`, and already-factorized layers."""
    return isinstance(module, (nn.Linear, FactorizedLinear)) or (Conv1D is not None and isinstance(module, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like module."""
    if isinstance(module, (nn.Linear, FactorizedLinear)):
        return module.out_features, module.in_features
    if Conv1D is not None and isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    raise TypeError(f"not a linear-like module: {type(module).__name__}")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The out × in matrix the module applies (a dense product for a `LowRankLinear`)."""
    if isinstance(module, FactorizedLinear):
        return module.dense_weight()
    if isinstance(module, nn.Linear):
        return module.weight
    if Conv1D is not None and isinstance(module, Conv1D):
        return module.weight.T
    raise TypeError(f"not a linear-like module: {type(module).__name__}")


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Locate the list of decoder blocks.

    Preference: a `ModuleList` whose length equals ``config.num_hidden_layers`` (the Hugging Face
    convention); otherwise the longest `ModuleList` whose items contain linear layers. A model without
    such a list (a plain MLP) is treated as one block: the model itself.
    """
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if any(is_linear(m) for m in module[0].modules()):
                candidates.append((name, module))
    if expected is not None:
        for name, module in candidates:
            if len(module) == expected:
                return name, module
    if candidates:
        return max(candidates, key=lambda item: len(item[1]))
    return "", nn.ModuleList([model])


@dataclass
class TargetSelector:
    """Which linear layers inside the decoder blocks get compressed.

    Patterns are regular expressions searched (``re.search``) in the full module name, e.g.
    ``model.layers.3.self_attn.q_proj``. No ``include`` means every linear inside the blocks;
    ``exclude`` wins over ``include``. Embeddings and the output head are outside the blocks and are
    never touched.
    """

    include: Sequence[str] | None = None
    exclude: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for pattern in list(self.include or []) + list(self.exclude):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InvalidInputError(f"invalid target pattern {pattern!r}: {exc}") from None

    def matches(self, name: str) -> bool:
        if any(re.search(p, name) for p in self.exclude):
            return False
        return self.include is None or any(re.search(p, name) for p in self.include)


def find_targets(
    model: nn.Module, selector: TargetSelector | None = None
) -> list[tuple[int, str, dict[str, nn.Module]]]:
    """Per decoder block: (block index, block name, {full module name: module}) of matching linears.

    Raises `InvalidInputError` when nothing matches, so a typo in a pattern fails before calibration.
    """
    selector = selector or TargetSelector()
    prefix, blocks = find_decoder_blocks(model)
    result = []
    for index, block in enumerate(blocks):
        block_name = f"{prefix}.{index}" if prefix else (str(index) if len(blocks) > 1 else "")
        targets = {}
        for sub_name, module in block.named_modules():
            if not sub_name or not is_linear(module):
                continue
            full = f"{block_name}.{sub_name}" if block_name else sub_name
            if selector.matches(full):
                targets[full] = module
        result.append((index, block_name, targets))
    if not any(targets for _, _, targets in result):
        raise InvalidInputError(
            f"no linear layer matches the target patterns (include={list(selector.include or []) or 'all'}, "
            f"exclude={list(selector.exclude)}) inside the decoder blocks at {prefix or '<model>'!r}"
        )
    return result


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Swap the submodule at dotted path ``name`` for ``new``; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
