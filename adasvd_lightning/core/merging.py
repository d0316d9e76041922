"""Merge factorized layers back to dense where the factorization would not run faster.

A rank-r layer replaces one m×n GEMM by two thin ones. It costs r·(m+n) multiply-adds per token
against m·n, so it is only faster when that ratio is clearly below one: two thin GEMMs run at a lower
FLOP rate than one square-ish GEMM, and each call has a fixed overhead. Measured on a 2-core AVX-512
CPU (fp32, 1024–2816-wide matrices, 128–4096 rows): a factorized layer saving 5–10 % of the
multiply-adds ran at 0.8–1.1× the dense speed, at 15 % about break-even (0.95–1.07×), at 20 %
1.05–1.35×, at 60 % 2.2–2.4× (ideal 2.5×). Hence the default threshold of 15 %: below it merging
costs at most 15 % of that layer's weights and loses no speed. Tiny matrices (≤ 512 wide) are
overhead-bound: there even 20–30 % saving measured 0.7–1.1× (bf16 worse), hence ``min_weight_elements``.

Merging back trades memory for speed: the merged layer holds m·n weights again instead of r·(m+n)
— it spends part of the compression budget. That is why nothing calls this automatically: the
compression pipeline's contract is the parameter budget, and the caller decides whether inference
speed is worth the extra weights. The svd preset at a uniform ratio c never produces such layers
(every layer saves exactly c); adaptive rank allocation can (ranks near break-even).

A merged layer is a plain `nn.Linear`, so it simply does not appear in the saved manifest and a
save→load round trip needs nothing special.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import InvalidInputError
from .hf_format import base_model_type
from .lowrank import FactorizedLinear
from .surgery import Conv1D, replace_module

__all__ = [
    "DEFAULT_MIN_FLOP_SAVING",
    "MergeWarning",
    "MergedModule",
    "check_min_flop_saving",
    "densify",
    "flop_saving",
    "merge_to_linear",
    "merge_and_record",
    "merge_unprofitable",
]

#: Measured break-even plus margin: below 15 % saving the two-GEMM path was not reliably faster.
DEFAULT_MIN_FLOP_SAVING = 0.15


class MergeWarning(UserWarning):
    """Factorized layers were replaced by dense ones (the model got larger to get faster)."""


@dataclass
class MergedModule:
    """One layer merged back to dense, and why."""

    name: str
    kind: str
    out_features: int
    in_features: int
    rank: int
    flop_saving: float  # 1 − factorized multiply-adds / dense multiply-adds
    params_before: int  # weights the factorized layer held (bias excluded)
    params_after: int  # m·n
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def uses_conv1d(model: nn.Module) -> bool:
    """Whether the model's dense linears are GPT-2 style `Conv1D`s (weights stored in × out)."""
    # base_model_type: a compressed GPT-2 loaded from a folder has the model type adasvd_lightning.
    return Conv1D is not None and base_model_type(getattr(model, "config", None)) == "gpt2"


def check_min_flop_saving(value: float) -> float:
    """The merge threshold as a float in [0, 1): checked where users set it, before any work."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise InvalidInputError(f"minimum FLOP saving (merge_unprofitable) must be in [0, 1), got {value!r}")
    return float(value)


def flop_saving(module: FactorizedLinear) -> float:
    """Fraction of the dense layer's multiply-adds the factorized layer saves (negative: it costs more)."""
    return 1.0 - module.multiply_adds() / (module.in_features * module.out_features)


def merge_to_linear(module: FactorizedLinear, *, conv1d: bool = False) -> nn.Module:
    """A plain `nn.Linear` applying the same matrix, in the module's dtype and on its device.

    The product is formed in float32 (or float64 for float64 layers) and rounded once, so a bf16
    layer's merged weight is as close to the factorized one as bf16 allows. ``conv1d=True`` builds a
    GPT-2 `Conv1D` (weight stored in × out) instead: a saved GPT-2 folder is rebuilt with `Conv1D`s, and
    an `nn.Linear` weight would load transposed — silently so for square matrices.
    """
    ref = module.up
    compute = torch.float64 if ref.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        weight = module.dense_weight(compute).to(ref.dtype)
        if conv1d:
            linear = Conv1D(module.out_features, module.in_features).to(device=ref.device, dtype=ref.dtype)
            linear.weight.copy_(weight.T)
            linear.bias.copy_(module.bias if module.bias is not None else torch.zeros_like(linear.bias))
        else:
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=ref.device, dtype=ref.dtype)
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
    linear.train(module.training)
    linear.weight.requires_grad_(ref.requires_grad)
    if linear.bias is not None:
        linear.bias.requires_grad_(module.bias.requires_grad)
    return linear


def densify(model: nn.Module) -> nn.Module:
    """Multiply every factorized layer back into a dense one, in place; returns ``model``.

    For tools that do not know low-rank modules (a plain Hugging Face folder, another training stack).
    The model keeps its function (each layer applies the same matrix, rounded once to its dtype) but
    regains the dense parameter count. GPT-2 models get `Conv1D`s back (see `merge_to_linear`).
    """
    conv1d = uses_conv1d(model)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]:
        replace_module(model, name, merge_to_linear(module, conv1d=conv1d))
    return model


def merge_unprofitable(
    model: nn.Module,
    *,
    min_flop_saving: float = DEFAULT_MIN_FLOP_SAVING,
    min_weight_elements: int = 0,
    warn: bool = True,
) -> list[MergedModule]:
    """Replace factorized layers that would not run faster by dense `nn.Linear`s, in place.

    Args:
        model: any module tree holding `FactorizedLinear` layers.
        min_flop_saving: merge a layer whose multiply-add saving ``1 − r·(m+n)/(m·n)`` (column-
            preserving: ``(r·(m+n−k) + m·k)/(m·n)``) is below this. 0 merges only layers that cost
            more than dense.
        min_weight_elements: also merge layers whose dense matrix has fewer than this many elements
            (m·n): per-call overhead dominates tiny GEMMs, so two calls lose to one whatever the
            rank. 0 (default) disables it, because on small models that would undo all compression.
        warn: emit one `MergeWarning` naming how many layers were merged and the weights added.

    Returns:
        The merged layers (empty when none), so callers can put them in a report.
    """
    check_min_flop_saving(min_flop_saving)
    if min_weight_elements < 0:
        raise ValueError(f"min_weight_elements must be >= 0, got {min_weight_elements}")
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    # GPT-2 checkpoints hold Conv1D layers: merged layers must be Conv1Ds again to save and load right.
    conv1d = uses_conv1d(model)
    merged: list[MergedModule] = []
    for name, module in candidates:
        saving = flop_saving(module)
        elements = module.in_features * module.out_features
        if saving < min_flop_saving:
            reason = f"saves {saving:.1%} of the multiply-adds (< {min_flop_saving:.1%})"
        elif elements < min_weight_elements:
            reason = f"{module.out_features}×{module.in_features} is below {min_weight_elements} elements"
        else:
            continue
        factor_params = sum(p.numel() for n, p in module.named_parameters() if n != "bias")
        replace_module(model, name, merge_to_linear(module, conv1d=conv1d))
        merged.append(MergedModule(name, module.kind, module.out_features, module.in_features, module.rank,
                                   saving, factor_params, elements, reason))
    if merged and warn:
        added = sum(m.params_after - m.params_before for m in merged)
        warnings.warn(
            f"merged {len(merged)} of {len(candidates)} factorized layers back to dense because they would "
            f"not run faster ({merged[0].name}: {merged[0].reason}); the model holds {added:,} more weights",
            MergeWarning,
            stacklevel=2,
        )
    return merged


def merge_and_record(model: nn.Module, report, *, min_flop_saving: float = DEFAULT_MIN_FLOP_SAVING) -> list[MergedModule]:
    """`merge_unprofitable` after a compression run, recorded in its `CompressionReport`.

    The report's module entries become dense ("skipped" says why) and its parameter counts are redone,
    so achieved ratios stay honest about the weights the merge added back.
    """
    from .params import count_parameters

    merged = merge_unprofitable(model, min_flop_saving=min_flop_saving, warn=False)
    report.record_merges(merged, count_parameters(model))
    return merged
