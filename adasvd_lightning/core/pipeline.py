"""Block-by-block compression of a model.

1. Run the model up to its first decoder block on the calibration batches and keep that block's inputs.
2. Allocation: split the parameter budget between the target matrices (uniform, or a strategy that
   first makes one dense pass over the blocks to measure importances, spectra or sensitivities).
3. For each block, in order:
   * stream the Gram statistics of its target linears' inputs. With a refinement strategy, the dense
     block is run on both streams — the dense model's hidden states and the compressed prefix's — and
     the cross Gram H_oc is accumulated too, so factors can be fitted to the dense targets;
   * factor each target at its allocated rank (whitening, then optionally column preservation and
     adaComp / closed-form refinement) and swap in the factorized module;
   * run the block again to produce the next block's inputs (``propagation="compressed"``: SVD-LLM's
     sequential scheme) or reuse the dense outputs (``"original"``);
   * free the block's statistics: at most one block's statistics are alive at a time.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .allocation import (
    adacr_block_retentions,
    block_importance,
    grouped_loss_ranks,
    knapsack,
    uniform_retentions,
)
from .budget import MatrixShape, budget_for_ratio, rank_cost, ranks_for_budget
from .columns import column_preserving_factorize
from .config import CompressionConfig
from .factorization import LowRankFactors, factorize, saves_parameters
from .lowrank import ColumnPreservingLinear, LowRankLinear
from .methods import MethodSpec
from .params import count_parameters
from .refinement import GramStatistics, RefinementTarget, adacomp, balance_factors
from .report import CompressionReport, ModuleReport
from .statistics import BlockStatistics, InputStatistics
from .surgery import find_decoder_blocks, find_targets, linear_bias, linear_shape, linear_weight, replace_module

__all__ = ["CompressionWarning", "BlockInput", "ProgressEvent", "capture_block_inputs", "compress_model"]


class CompressionWarning(UserWarning):
    """A target matrix was left dense or handled in a degraded way."""


@dataclass
class BlockInput:
    """Everything one calibration batch passes into a decoder block."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    mask: torch.Tensor | None


@dataclass
class ProgressEvent:
    """Reported to the optional progress callback (the display lives in the upper layers)."""

    stage: str  # "calibrate" | "allocate" | "block"
    completed: int
    total: int
    detail: str = ""


ProgressFn = Callable[[ProgressEvent], None]


class _StopForward(Exception):
    pass


def _normalise_batch(batch: Any) -> tuple[Any, dict, torch.Tensor | None]:
    """(positional input, keyword inputs, token mask) for one calibration batch."""
    if isinstance(batch, torch.Tensor):
        return batch, {}, None
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError("a calibration batch dict needs an 'input_ids' entry")
        kwargs = {"input_ids": batch["input_ids"]}
        mask = batch.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = mask
        return None, kwargs, mask
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], {}, None
    raise TypeError(f"unsupported calibration batch type {type(batch).__name__}")


def _forward_kwargs(model: nn.Module) -> dict:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _model_forward(model: nn.Module, batch: Any) -> Any:
    positional, kwargs, _ = _normalise_batch(batch)
    device = _model_device(model)
    extra = _forward_kwargs(model)
    if positional is not None:
        return model(_to(positional, device), **extra)
    return model(**_to(kwargs, device), **extra)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Iterable[Any]) -> list[BlockInput]:
    """Run ``model`` on each batch only until ``block`` is called, and keep what it receives."""
    captured: list[BlockInput] = []
    current_mask: list[torch.Tensor | None] = [None]

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append(BlockInput(hidden=hidden, args=rest, kwargs=kwargs, mask=current_mask[0]))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            _, _, mask = _normalise_batch(batch)
            current_mask[0] = mask.to(_model_device(model)) if mask is not None else None
            try:
                _model_forward(model, batch)
            except _StopForward:
                continue
            raise RuntimeError("the model finished its forward pass without calling the first decoder block")
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, inp: BlockInput, hidden: torch.Tensor | None = None) -> torch.Tensor:
    out = block(inp.hidden if hidden is None else hidden, *inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _output_error(weight: torch.Tensor, approx: torch.Tensor, grams: GramStatistics) -> float:
    """‖W′X_c − W X_o‖_F / ‖W X_o‖_F from the Gram matrices."""
    w, a = weight.to(torch.float64), approx.to(torch.float64)
    num = (a @ grams.h_cc * a).sum() - 2 * (w @ grams.h_oc * a).sum() + (w @ grams.h_oo * w).sum()
    den = (w @ grams.h_oo * w).sum()
    return float(num.clamp_min(0.0) / den) ** 0.5 if den > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------
# Allocation
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Context:
    model: nn.Module
    blocks: nn.ModuleList
    plan: list[tuple[int, str, dict[str, nn.Module]]]
    shapes: list[MatrixShape]
    inputs: list[BlockInput] | None
    calibration: Sequence[Any] | None
    spec: MethodSpec
    config: CompressionConfig
    progress: ProgressFn | None


def _dense_pass(ctx: _Context, visit: Callable[[int, dict, list, list, BlockStatistics | None], None], *,
                statistics: bool) -> None:
    """Run the dense blocks over the calibration inputs once, calling ``visit`` per block."""
    hidden = [inp.hidden for inp in ctx.inputs]
    for index, block_name, targets in ctx.plan:
        block = ctx.blocks[index]
        stats = BlockStatistics(targets) if statistics and targets else None
        outputs = []
        if stats is not None:
            stats.__enter__()
        try:
            for inp, h in zip(ctx.inputs, hidden):
                if stats is not None:
                    with stats.masked(inp.mask):
                        outputs.append(_run_block(block, inp, h))
                else:
                    outputs.append(_run_block(block, inp, h))
        finally:
            if stats is not None:
                stats.remove()
        visit(index, targets, hidden, outputs, stats)
        hidden = outputs
        if ctx.progress:
            ctx.progress(ProgressEvent("allocate", index + 1, len(ctx.plan), block_name))


def _allocate_adacr(ctx: _Context) -> tuple[dict[str, float], dict]:
    importances: list[float] = []

    def visit(index, targets, hidden, outputs, stats):
        total, count = 0.0, 0
        for inp, h_in, h_out in zip(ctx.inputs, hidden, outputs):
            s, c = block_importance(h_in, h_out, inp.mask)
            total, count = total + s, count + c
        importances.append(total / max(count, 1))

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


def _dense_factorizations(ctx: _Context, keep_factors: bool) -> dict[str, tuple]:
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


def _allocate_grouped_loss(ctx: _Context) -> tuple[dict[str, float], dict]:
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
        out = _model_forward(model, batch)
        logits = (out.logits if hasattr(out, "logits") else out).float()
        logp = torch.log_softmax(logits, dim=-1)
        if kind == "module-kl":
            ref = reference[i]
            total += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
            count += ref.shape[0] * ref.shape[1]
        else:
            ids = _normalise_batch(batch)
            ids = (ids[0] if ids[0] is not None else ids[1]["input_ids"]).to(logp.device)
            nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            total += float(nll.double().sum())
            count += nll.numel()
    mean = total / max(count, 1)
    return mean if kind == "module-kl" else float(torch.tensor(mean).exp())


def _allocate_sensitivity(ctx: _Context) -> tuple[dict[str, float], dict]:
    """Duo-SVD module-level allocation: per-module cost table at candidate retentions + knapsack."""
    kind = ctx.spec.allocation
    cache = _dense_factorizations(ctx, keep_factors=True)
    batches = list(ctx.calibration)[: ctx.spec.sensitivity_batches]
    model = ctx.model
    reference = None
    if kind == "module-kl":
        reference = []
        for batch in batches:
            out = _model_forward(model, batch)
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


def _allocate(ctx: _Context) -> tuple[dict[str, int | None], dict]:
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


# ---------------------------------------------------------------------------------------------------
# Per-matrix compression
# ---------------------------------------------------------------------------------------------------


def _compress_target(
    model: nn.Module,
    name: str,
    module: nn.Module,
    rank: int | None,
    ctx: _Context,
    input_stats: InputStatistics | None,
) -> ModuleReport:
    spec, config = ctx.spec, ctx.config
    out_features, in_features = linear_shape(module)
    bias = linear_bias(module)
    bias_params = bias.numel() if bias is not None else 0
    before = count_parameters(module)
    report = ModuleReport(name=name, out_features=out_features, in_features=in_features,
                          params_before=before, params_after=before, bias_params=bias_params)
    if rank is None or not saves_parameters(out_features, in_features, rank):
        report.skipped = (
            f"no rank saves parameters for a {out_features}×{in_features} matrix at its allocated retention"
        )
        if rank is not None or spec.allocation == "uniform":
            warnings.warn(f"{name}: {report.skipped}; left dense", CompressionWarning, stacklevel=3)
        return report

    weight = linear_weight(module).detach()
    w64 = weight.to(config.torch_compute_dtype)
    whitening = spec.make_whitening(input_stats, damping=config.damping)
    factors = factorize(w64, rank, whitening, compute_dtype=config.torch_compute_dtype)
    up, down = factors.up, factors.down
    kept = torch.empty(0, dtype=torch.long)
    split = None
    if spec.form == "column-preserving" and input_stats is not None:
        split = column_preserving_factorize(
            w64, rank, input_stats.gram,
            lambda cols: spec.make_whitening(input_stats, damping=config.damping, columns=cols),
            base=factors, min_gain=spec.column_min_gain,
        )
        if split is not None:
            up, down, kept = split.up, split.down, split.kept
    if spec.refinement != "none" and input_stats is not None:
        target = RefinementTarget(w64.to(torch.float64), input_stats.grams(), kept=kept, damping=config.damping)
        up, down, history = adacomp(
            target, up, down, iterations=spec.adacomp_iterations, tolerance=spec.adacomp_tolerance,
            v_steps=spec.refinement == "adacomp",
        )
        report.refinement_steps = len(history) - 1
        up, down = balance_factors(up, down)

    b = bias.detach() if bias is not None else None
    if split is not None:
        new = ColumnPreservingLinear.from_parts(
            up.to(weight.device), down.to(weight.device), split.kept_weight.to(weight.device),
            split.kept.to(weight.device), split.rest.to(weight.device), b, dtype=weight.dtype,
        )
        report.kept_columns = split.kept.numel()
    else:
        new = LowRankLinear.from_factors(up.to(weight.device), down.to(weight.device), b, dtype=weight.dtype)
    new.train(module.training)
    replace_module(model, name, new)
    report.rank = new.rank
    report.params_after = count_parameters(new)
    report.whitening = whitening.kind
    if input_stats is not None:
        report.relative_error = _output_error(weight, new.dense_weight().detach(), input_stats.grams())
    return report


@torch.no_grad()
def compress_model(
    model: nn.Module,
    config: CompressionConfig,
    calibration: Sequence[Any] | None = None,
    *,
    progress: ProgressFn | None = None,
) -> CompressionReport:
    """Compress ``model`` in place and return a report.

    Args:
        model: a Hugging Face causal LM or any `nn.Module` with linear layers.
        config: method (strategies), ratio and targets.
        calibration: batches (LongTensor B×T, dicts with ``input_ids``/``attention_mask``, or plain
            input tensors for non-LM modules). Required by data-aware methods; optional for ``svd``
            (given, it adds measured errors to the report).
    """
    start = time.perf_counter()
    spec = config.spec
    if spec.needs_calibration and not calibration:
        raise ValueError(f"method {spec.name!r} needs calibration batches")
    plan = find_targets(model, config.selector)
    _, blocks = find_decoder_blocks(model)
    shapes = [MatrixShape(name, *linear_shape(m)) for _, _, targets in plan for name, m in targets.items()]
    report = CompressionReport(method=spec.name, ratio=config.ratio, parameters_before=count_parameters(model),
                               budget_parameters=budget_for_ratio(shapes, config.ratio))

    was_training = model.training
    model.eval()
    try:
        inputs: list[BlockInput] | None = None
        if calibration:
            inputs = capture_block_inputs(model, blocks[0], calibration)
            report.calibration_tokens = sum(
                int(i.mask.sum()) if i.mask is not None else i.hidden.shape[:-1].numel() for i in inputs
            )
            if progress:
                progress(ProgressEvent("calibrate", len(inputs), len(inputs)))
        ctx = _Context(model, blocks, plan, shapes, inputs, calibration, spec, config, progress)
        ranks, report.allocation = _allocate(ctx)

        paired = inputs is not None and spec.refinement != "none" and config.propagation == "compressed"
        original_hidden = [inp.hidden for inp in inputs] if paired else None
        for index, block_name, targets in plan:
            block = blocks[index]
            stats = None
            dense_outputs = None
            if inputs is not None and targets:
                stats = BlockStatistics(targets)
                dense_outputs = []
                with stats:
                    for b, inp in enumerate(inputs):
                        with stats.masked(inp.mask):
                            if paired:
                                stats.mode = "original"
                                dense_outputs.append(_run_block(block, inp, original_hidden[b]))
                                stats.mode = "compressed"
                                _run_block(block, inp)
                            else:
                                dense_outputs.append(_run_block(block, inp))
            for name, module in targets.items():
                input_stats = stats.for_module(name) if stats is not None else None
                report.modules.append(_compress_target(model, name, module, ranks[name], ctx, input_stats))
            del stats
            if inputs is not None and index + 1 < len(blocks):
                if paired:
                    original_hidden = dense_outputs
                if config.propagation == "compressed" or dense_outputs is None:
                    new_hidden = [_run_block(block, inp) for inp in inputs]
                else:
                    new_hidden = dense_outputs
                for inp, h in zip(inputs, new_hidden):
                    inp.hidden = h
            if progress:
                progress(ProgressEvent("block", index + 1, len(plan), block_name))
    finally:
        model.train(was_training)
    report.parameters_after = count_parameters(model)
    report.seconds = time.perf_counter() - start
    return report
