"""Planning: measure what an allocation strategy needs and turn it into per-matrix ranks.

The strategies themselves are pure functions in :mod:`.allocation`; this module runs the model to feed
them — one dense pass over the blocks for block importances (adaCR) or whitened spectra (grouped-loss),
and per-module output-sensitivity probes (module-kl / sensitivity-ppl) — and rounds the result to ranks
that meet the parameter budget (:mod:`.budget`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .allocation import adacr_block_retentions, block_importance, grouped_loss_ranks, knapsack, uniform_retentions
from .budget import MatrixShape, budget_for_ratio, rank_cost, ranks_for_budget
from .calibration import BlockInput, ProgressEvent, ProgressFn, model_forward, normalise_batch, run_block
from .config import CompressionConfig
from .distributed import all_reduce_sum
from .factorization import LowRankFactors, saves_parameters
from .lowrank import LowRankLinear
from .methods import MethodSpec
from .statistics import BlockStatistics
from .surgery import linear_bias, linear_weight, replace_module

__all__ = ["PlanContext", "plan_ranks"]




@dataclass
class PlanContext:
    model: nn.Module
    blocks: nn.ModuleList
    plan: list[tuple[int, str, dict[str, nn.Module]]]
    shapes: list[MatrixShape]
    inputs: list[BlockInput] | None
    calibration: Sequence[Any] | None
    spec: MethodSpec
    config: CompressionConfig
    progress: ProgressFn | None


def _dense_pass(ctx: PlanContext, visit: Callable[[int, dict, list, list, BlockStatistics | None], None], *,
                statistics: bool) -> None:
    """Run the dense blocks over the calibration inputs once, calling ``visit`` per block."""
    hidden = [inp.hidden for inp in ctx.inputs]
    for index, block_name, targets in ctx.plan:
        block = ctx.blocks[index]
        stats = BlockStatistics(targets) if statistics and targets else None
        outputs = []
        with stats if stats is not None else nullcontext():
            for inp, h in zip(ctx.inputs, hidden):
                with stats.masked(inp.mask) if stats is not None else nullcontext():
                    outputs.append(run_block(block, inp, h))
        if stats is not None:
            stats.all_reduce()
        visit(index, targets, hidden, outputs, stats)
        hidden = outputs
        if ctx.progress:
            ctx.progress(ProgressEvent("allocate", index + 1, len(ctx.plan), block_name))


def _allocate_adacr(ctx: PlanContext) -> tuple[dict[str, float], dict]:
    importances: list[float] = []

    def visit(index, targets, hidden, outputs, stats):
        total, count = 0.0, 0
        for inp, h_in, h_out in zip(ctx.inputs, hidden, outputs):
            s, c = block_importance(h_in, h_out, inp.mask)
            total, count = total + s, count + c
        total, count = all_reduce_sum([total, float(count)], device=hidden[0].device)
        importances.append(total / max(count, 1.0))

    _dense_pass(ctx, visit, statistics=False)
    block_of = {name: index for index, _, targets in ctx.plan for name in targets}
    block_params = [sum(s.dense_params for s in ctx.shapes if block_of[s.name] == i) for i in range(len(ctx.plan))]
    trr = 1.0 - ctx.config.ratio
    mrr = ctx.spec.adacr_min_retention * trr
    used = [i for i, p in enumerate(block_params) if p > 0]
    block_rho = adacr_block_retentions([importances[i] for i in used], [block_params[i] for i in used], trr, mrr)
    rho_of = dict(zip(used, block_rho))
    retentions = {s.name: rho_of[block_of[s.name]] for s in ctx.shapes}
    return retentions, {"block_importance": importances, "block_retention": [rho_of.get(i) for i in range(len(ctx.plan))]}


def _dense_factorizations(ctx: PlanContext, keep_factors: bool) -> dict[str, tuple]:
    """Whitened SVD of every target under dense-model statistics: name → (singular values, (whitening, U, Vh))."""
    result: dict[str, tuple] = {}

    def visit(index, targets, hidden, outputs, stats):
        for name, module in targets.items():
            whitening = ctx.spec.make_whitening(stats.for_module(name) if stats else None, damping=ctx.config.damping)
            a = whitening.whiten(linear_weight(module).detach().to(torch.float64))
            u, s, vh = torch.linalg.svd(a, full_matrices=False)
            result[name] = (s, (whitening, u, vh) if keep_factors else None)

    _dense_pass(ctx, visit, statistics=ctx.spec.whitening != "none")
    return result


def _allocate_grouped_loss(ctx: PlanContext) -> tuple[dict[str, float], dict]:
    spectra = {name: s for name, (s, _) in _dense_factorizations(ctx, keep_factors=False).items()}
    return grouped_loss_ranks(ctx.shapes, spectra, ctx.config.ratio), {}


def _factors_at(cached: tuple, rank: int) -> LowRankFactors:
    whitening, u, vh = cached[1]
    s = cached[0]
    root = s[:rank].sqrt()
    return LowRankFactors(up=u[:, :rank] * root, down=whitening.unwhiten(root[:, None] * vh[:rank]), singular_values=s)


def _sensitivity_metric(model: nn.Module, batches: Sequence[Any], reference: list[torch.Tensor] | None, kind: str) -> float:
    """Mean KL(dense ‖ current) over tokens (``module-kl``) or calibration perplexity (``sensitivity-ppl``)."""
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        out = model_forward(model, batch)
        logits = (out.logits if hasattr(out, "logits") else out).float()
        logp = torch.log_softmax(logits, dim=-1)
        if kind == "module-kl":
            ref = reference[i]
            total += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
            count += ref.shape[0] * ref.shape[1]
        else:
            ids = normalise_batch(batch)
            ids = (ids[0] if ids[0] is not None else ids[1]["input_ids"]).to(logp.device)
            nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            total += float(nll.double().sum())
            count += nll.numel()
    total, count = all_reduce_sum([total, float(count)], device=_device_of(model))
    mean = total / max(count, 1.0)
    return mean if kind == "module-kl" else float(torch.tensor(mean).exp())


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _allocate_sensitivity(ctx: PlanContext) -> tuple[dict[str, float], dict]:
    """Duo-SVD module-level allocation: per-module cost table at candidate retentions + knapsack."""
    kind = ctx.spec.allocation
    cache = _dense_factorizations(ctx, keep_factors=True)
    batches = list(ctx.calibration)[: ctx.spec.sensitivity_batches]
    model = ctx.model
    reference = None
    if kind == "module-kl":
        reference = []
        for batch in batches:
            out = model_forward(model, batch)
            reference.append(torch.log_softmax((out.logits if hasattr(out, "logits") else out).float(), dim=-1))
    modules = {name: module for _, _, targets in ctx.plan for name, module in targets.items()}
    uniform = ranks_for_budget(ctx.shapes, uniform_retentions(ctx.shapes, ctx.config.ratio),
                               budget_for_ratio(ctx.shapes, ctx.config.ratio))

    def swapped(shape: MatrixShape, rank: int | None) -> nn.Module:
        module = modules[shape.name]
        if rank is None or not saves_parameters(shape.out_features, shape.in_features, rank):
            return module
        f = _factors_at(cache[shape.name], rank)
        bias = linear_bias(module)
        dtype = linear_weight(module).dtype
        return LowRankLinear.from_factors(f.up, f.down, bias.detach() if bias is not None else None, dtype=dtype)

    base_modules = {s.name: swapped(s, uniform[s.name]) for s in ctx.shapes}
    options: list[list[tuple[int, float]]] = []
    option_ranks: list[list[int | None]] = []
    try:
        for s in ctx.shapes:
            replace_module(model, s.name, base_modules[s.name])
        baseline = _sensitivity_metric(model, batches, reference, kind)
        for i, s in enumerate(ctx.shapes):
            row, row_ranks = [], []
            for rho in ctx.spec.sensitivity_candidates:
                rank = None if rho >= 1.0 else max(1, int(rho * s.dense_params / s.rank_params))
                if rank is not None and rank > s.max_useful_rank:
                    rank = None
                replace_module(model, s.name, swapped(s, rank))
                row.append((rank_cost(s, rank), _sensitivity_metric(model, batches, reference, kind) - baseline))
                row_ranks.append(rank)
            replace_module(model, s.name, base_modules[s.name])
            options.append(row)
            option_ranks.append(row_ranks)
            if ctx.progress:
                ctx.progress(ProgressEvent("sensitivity", i + 1, len(ctx.shapes), s.name))
    finally:
        for name, module in modules.items():
            replace_module(model, name, module)
    budget = budget_for_ratio(ctx.shapes, ctx.config.ratio)
    picked = knapsack(options, budget)
    # Candidate retentions are coarse (0.1 steps): spread what the knapsack left unspent evenly over the
    # factorized matrices, so the final rounding (ranks_for_budget) can still use it.
    leftover = budget - sum(row[k][0] for row, k in zip(options, picked))
    factorized = [s for s, k, ranks in zip(ctx.shapes, picked, option_ranks) if ranks[k] is not None]
    spare = leftover / max(1, sum(s.dense_params for s in factorized))
    retentions = {}
    for s, k, ranks in zip(ctx.shapes, picked, option_ranks):
        rank = ranks[k]
        retentions[s.name] = 1.0 if rank is None else rank * s.rank_params / s.dense_params + spare
    return retentions, {"sensitivity_baseline": baseline, "sensitivity": {s.name: [v for _, v in row] for s, row in zip(ctx.shapes, options)}}


def plan_ranks(ctx: PlanContext) -> tuple[dict[str, int | None], dict]:
    allocation = ctx.spec.allocation
    if allocation != "uniform" and ctx.inputs is None:
        raise ValueError(f"allocation {allocation!r} needs calibration batches")
    if allocation == "uniform":
        retentions, info = uniform_retentions(ctx.shapes, ctx.config.ratio), {}
    elif allocation == "adacr":
        retentions, info = _allocate_adacr(ctx)
    elif allocation == "grouped-loss":
        retentions, info = _allocate_grouped_loss(ctx)
    else:
        retentions, info = _allocate_sensitivity(ctx)
    ranks = ranks_for_budget(ctx.shapes, retentions, budget_for_ratio(ctx.shapes, ctx.config.ratio))
    return ranks, info
