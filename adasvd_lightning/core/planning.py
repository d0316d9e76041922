"""Planning: measure what an allocation strategy needs and turn it into per-matrix ranks.

The strategies themselves are pure functions in :mod:`.allocation`; this module runs the model to feed
them — one dense pass over the blocks for block importances (adaCR) or whitened spectra (grouped-loss),
per-module output-sensitivity probes (module-kl / sensitivity-ppl), or one backward pass for their
second-order estimate (module-kl-fisher, :mod:`.fisher`) — and rounds the result to ranks that meet the
parameter budget (:mod:`.budget`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allocation import adacr_block_retentions, block_importance, grouped_loss_ranks, knapsack, uniform_retentions
from .budget import MatrixShape, budget_for_ratio, rank_cost, ranks_for_budget
from .calibration import BlockInput, ProgressEvent, ProgressFn, model_forward, normalise_batch
from .config import CompressionConfig
from .distributed import all_gather_rows, all_reduce_sum, broadcast_object, per_rank_counts, world
from .errors import InvalidInputError
from .factorization import LowRankFactors, output_gram, saves_parameters
from .fisher import output_fisher, sequences, truncation_kl
from .linalg import gram_singular_values, singular_values, thin_svd, use_gram
from .lowrank import LowRankLinear
from .methods import MethodSpec
from .offload import BlockRunner
from .probe_table import ProbeTable, fingerprint
from .reference_kl import DenseReference
from .replay import PrefixReplay
from .statistics import BlockStatistics
from .surgery import linear_bias, linear_weight, replace_module
from .whitening import Whitening

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
    runner: BlockRunner = field(default_factory=BlockRunner)


def _dense_block(ctx: PlanContext, index: int, targets: dict[str, nn.Module], hidden: list[torch.Tensor],
                 statistics: bool) -> tuple[list[torch.Tensor], BlockStatistics | None]:
    """Run block ``index`` (as it currently is) on ``hidden``: its outputs and, optionally, statistics."""
    block = ctx.blocks[index]
    dtype = ctx.config.torch_statistics_dtype
    stats = BlockStatistics(targets, product_dtype=dtype) if statistics and targets else None
    outputs = []
    with ctx.runner.resident(block), stats if stats is not None else nullcontext():
        for inp, h in zip(ctx.inputs, hidden):
            with stats.masked(inp.mask) if stats is not None else nullcontext():
                outputs.append(ctx.runner.keep(ctx.runner.run(block, inp, h)))
    if stats is not None:
        stats.all_reduce()
        stats.finalize()
    return outputs, stats


def _dense_pass(ctx: PlanContext, visit: Callable[[int, dict, list, list, BlockStatistics | None], None], *,
                statistics: bool) -> None:
    """Run the dense blocks over the calibration inputs once, calling ``visit`` per block."""
    hidden = [inp.hidden for inp in ctx.inputs]
    for index, block_name, targets in ctx.plan:
        outputs, stats = _dense_block(ctx, index, targets, hidden, statistics)
        visit(index, targets, hidden, outputs, stats)
        del stats  # one block's statistics at a time
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


def _whitened(ctx: PlanContext, module: nn.Module, stats: BlockStatistics | None, name: str):
    whitening = ctx.spec.make_whitening(stats.for_module(name) if stats else None, damping=ctx.config.damping)
    return whitening, whitening.whiten(linear_weight(module).detach().to(torch.float64))


def _whitened_svd(ctx: PlanContext, module: nn.Module, stats: BlockStatistics | None, name: str, rank: int) -> tuple:
    """(singular values, (whitening, U[:, :rank], Vh[:rank])) of W·S under the dense model's statistics."""
    whitening, a = _whitened(ctx, module, stats, name)
    u, s, vh = thin_svd(a, rank, driver=ctx.config.svd_driver)
    return s, (whitening, u, vh)


def whitened_spectrum(weight: torch.Tensor, gram: torch.Tensor | None, config: CompressionConfig,
                      whitening: Callable[[], Whitening]) -> torch.Tensor:
    """The singular values of W·S, descending; S is the method's whitening (``whitening()`` makes it).

    A wide or square W under the truncation-aware whitening (``gram`` = its input's H) takes them from
    G = W·H·Wᵀ: W·S·(W·S)ᵀ = G for every S with S·Sᵀ = H, so the eigenvalues of G are the σ² and no
    factor of H is needed. That drops the n³/3 Cholesky and the m·n² product W·L from five of a Llama
    block's seven targets, and is exact where H is singular (the Cholesky route damps H there). A tall
    W, another whitening or a driver that rules out the Gram route (``svd_driver="svd"``) takes the
    spectrum of the whitened matrix W·S.
    """
    dtype = config.torch_compute_dtype
    out_features, in_features = weight.shape
    if gram is not None and out_features <= in_features and use_gram(dtype, config.svd_driver):
        return gram_singular_values(output_gram(weight, gram, dtype))
    return singular_values(whitening().whiten(weight.to(torch.float64)), driver=config.svd_driver)


def _dense_spectra(ctx: PlanContext) -> dict[str, torch.Tensor]:
    """Whitened singular values of every target under dense-model statistics (`whitened_spectrum`).

    A whitening is made once per distinct input (q/k/v and gate/up share theirs), and only if a target
    reading that input needs one.
    """
    result: dict[str, torch.Tensor] = {}
    spec, config = ctx.spec, ctx.config

    def visit(index, targets, hidden, outputs, stats):
        whitenings: dict[int, Whitening] = {}

        def shared(input_stats) -> Whitening:
            if id(input_stats) not in whitenings:
                whitenings[id(input_stats)] = spec.make_whitening(input_stats, damping=config.damping)
            return whitenings[id(input_stats)]

        for name, module in targets.items():
            input_stats = stats.for_module(name) if stats is not None else None
            gram = input_stats.gram if spec.whitening == "truncation-aware" and input_stats is not None else None
            result[name] = whitened_spectrum(linear_weight(module).detach(), gram, config,
                                             lambda: shared(input_stats))

    _dense_pass(ctx, visit, statistics=spec.whitening != "none")
    return result


def _allocate_grouped_loss(ctx: PlanContext) -> tuple[dict[str, float], dict]:
    return grouped_loss_ranks(ctx.shapes, _dense_spectra(ctx), ctx.config.ratio), {}


def _factors_at(cached: tuple, rank: int) -> LowRankFactors:
    whitening, u, vh = cached[1]
    s = cached[0]
    root = s[:rank].sqrt()
    return LowRankFactors(up=u[:, :rank] * root, down=whitening.unwhiten(root[:, None] * vh[:rank]), singular_values=s)


def _lowrank_module(module: nn.Module, factors: LowRankFactors) -> nn.Module:
    bias = linear_bias(module)
    return LowRankLinear.from_factors(factors.up, factors.down, bias.detach() if bias is not None else None,
                                      dtype=linear_weight(module).dtype)


def _usable(shape: MatrixShape, rank: int | None) -> int | None:
    """``rank`` where a factorization at it saves parameters, else None (the module stays dense)."""
    return rank if rank is not None and saves_parameters(shape.out_features, shape.in_features, rank) else None


def _fisher_costs(ctx: PlanContext, fisher: tuple[dict[str, torch.Tensor], int], module: nn.Module,
                  stats: BlockStatistics | None, name: str, ranks: list[int | None], top: int
                  ) -> tuple[list[float], tuple | None]:
    """The Fisher estimate of the KL (`truncation_kl`) at each of ``ranks`` (None: dense), and the
    whitened SVD up to ``top`` it was read from (`_whitened_svd`'s form; None when ``top`` is 0)."""
    if not top:
        return [0.0] * len(ranks), None
    whitening, a = _whitened(ctx, module, stats, name)
    u, s, vh = thin_svd(a, top, driver=ctx.config.svd_driver)
    costs = truncation_kl(fisher[0][name], fisher[1], a, u, s, ranks)
    return costs, (s, (whitening, u, vh))


def _logits(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's next-token logits for ``batch`` (B×T×V, float32)."""
    out = model_forward(model, batch)
    return (out.logits if hasattr(out, "logits") else out).float()


def _log_probs(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's log-probabilities over the vocabulary for ``batch`` (float32)."""
    return torch.log_softmax(_logits(model, batch), dim=-1)


def _stored_row(table: ProbeTable | None, name: str, candidates: int) -> list[float | None] | None:
    """``name``'s row in the probe table, or None; a row for another candidate count is refused."""
    stored = table.row(name) if table is not None else None
    if stored is not None and len(stored) != candidates:
        raise InvalidInputError(f"probe table {table.path}: {name} has {len(stored)} values for "
                                f"{candidates} candidates; delete the file to measure again")
    return stored


def _sensitivity_metric(model: nn.Module, batches: Sequence[Any], reference: list[DenseReference] | None, kind: str,
                        replay: PrefixReplay | None = None) -> float:
    """Mean KL(dense ‖ current) over tokens (``module-kl``) or calibration perplexity (``sensitivity-ppl``).

    With an active ``replay`` the blocks before its replay point return cached outputs (same logits).
    """
    total, count = 0.0, 0
    for i, batch in enumerate(batches):
        if replay is not None:
            replay.batch = i
        if kind == "module-kl":
            ref = reference[i]
            total += ref.kl_sum(_logits(model, batch))
            count += ref.tokens
        else:
            logp = _log_probs(model, batch)  # the logits are freed: at a 49k vocabulary, 0.4 GB per 8 × 256 batch
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


def _candidate_rank(shape: MatrixShape, rho: float) -> int | None:
    rank = None if rho >= 1.0 else max(1, int(rho * shape.dense_params / shape.rank_params))
    return None if rank is not None and rank > shape.max_useful_rank else rank


def _allocate_sensitivity(ctx: PlanContext, fisher: tuple[dict[str, torch.Tensor], int] | None = None
                          ) -> tuple[dict[str, float], dict]:
    """Duo-SVD module-level allocation: per-module cost table at candidate retentions + knapsack.

    Memory-bounded: the probes need every module at its uniform-rank baseline plus, for the module being
    probed, its factors at each candidate rank. Instead of caching the full whitened SVD of every
    target (three float64 n×n-sized matrices each: several times the model), the baseline modules are
    built in a first dense pass (model dtype, rank r only), and the candidates' SVDs are recomputed
    block by block in a second dense pass interleaved with the probes, so at most one block's
    statistics and one module's SVD are alive. The numbers are the same as with a full cache: the
    same statistics, the same decompositions, the same probe order. Probes of block i replay the
    baseline prefix's cached output (:mod:`.replay`) and compute only blocks i… and the head.

    With ``fisher`` (output Fisher sums and their token count, `output_fisher`; ``fisher_scale="probed"``)
    only the lowest and the highest retention are probed and each side of the baseline of the Fisher
    estimate (:func:`.fisher.truncation_kl`) is scaled to its probe (`probed_row`). ``"tail"`` has its own
    route (`_allocate_tail`).
    """
    kind = ctx.spec.allocation if fisher is None else "module-kl"
    batches = list(ctx.calibration)[: ctx.spec.sensitivity_batches]
    model = ctx.model
    whiten = ctx.spec.whitening != "none"
    modules = {name: module for _, _, targets in ctx.plan for name, module in targets.items()}
    shape_of = {s.name: s for s in ctx.shapes}
    uniform = ranks_for_budget(ctx.shapes, uniform_retentions(ctx.shapes, ctx.config.ratio),
                               budget_for_ratio(ctx.shapes, ctx.config.ratio))

    table = _open_probe_table(ctx)  # before anything is replaced: the fingerprint reads the dense model
    if fisher is None and table is not None and all(table.row(s.name) is not None for s in ctx.shapes):
        return _allocate_from_table(ctx, table)
    base_modules: dict[str, nn.Module] = {}

    def build_baseline(index, targets, hidden, outputs, stats):
        for name, module in targets.items():
            rank = uniform[name]
            if _usable(shape_of[name], rank):
                cached = _whitened_svd(ctx, module, stats, name, rank)
                base_modules[name] = _lowrank_module(module, _factors_at(cached, rank))
            else:
                base_modules[name] = module

    _dense_pass(ctx, build_baseline, statistics=whiten)
    reference = None
    if kind == "module-kl":
        reference = []
        for batch in batches:
            reference.append(DenseReference.of(_logits(model, batch)))

    options: list[list[tuple[int, float]]] = []
    option_ranks: list[list[int | None]] = []
    estimates: dict[str, list[float]] = {}
    probes = reused = 0
    done = 0
    try:
        for s in ctx.shapes:
            replace_module(model, s.name, base_modules[s.name])
        baseline = _sensitivity_metric(model, batches, reference, kind)
        replay = PrefixReplay(model, ctx.blocks, batches)
        hidden = [inp.hidden for inp in ctx.inputs]
        for index, block_name, targets in ctx.plan:
            replay.advance(index)  # blocks < index are at their baseline: probes rerun only the suffix
            # This block's dense statistics: its dense linears go back in for the statistics pass only
            # (earlier blocks' outputs in ``hidden`` are already the dense model's).
            for name, module in targets.items():
                replace_module(model, name, module)
            # A block whose every row is in the table needs its statistics only for the Fisher estimate.
            measured = table is not None and fisher is None and all(table.row(name) is not None for name in targets)
            hidden, stats = _dense_block(ctx, index, targets, hidden, whiten and not measured)
            for name in targets:
                replace_module(model, name, base_modules[name])
            for name, module in targets.items():
                shape = shape_of[name]
                cached = None
                ranks = [_candidate_rank(shape, rho) for rho in ctx.spec.sensitivity_candidates]
                base = _usable(shape, uniform[name])
                top = max((r for r in ranks + [base] if _usable(shape, r)), default=0)
                probe_at = range(len(ranks))
                if fisher is not None:
                    estimate, cached = _fisher_costs(ctx, fisher, module, stats, name,
                                                     [_usable(shape, r) for r in ranks] + [base], top)
                    estimate = [e - estimate[-1] for e in estimate[:-1]]
                    estimates[name] = estimate
                    probe_at = probed_candidates(estimate, ctx.spec.fisher_scale)
                row, row_ranks = [], []
                stored = _stored_row(table, name, len(ranks))
                reused += stored is not None
                for i, rank in enumerate(ranks):
                    value = None
                    if stored is not None:
                        value = stored[i] if i in probe_at else None
                    elif i in probe_at:
                        if _usable(shape, rank):
                            cached = cached or _whitened_svd(ctx, module, stats, name, top)
                            candidate = _lowrank_module(module, _factors_at(cached, rank))
                        else:
                            candidate = module
                        replace_module(model, name, candidate)
                        with replay.active():
                            value = _sensitivity_metric(model, batches, reference, kind, replay) - baseline
                        probes += 1
                    row.append((rank_cost(shape, rank), value))
                    row_ranks.append(rank)
                if table is not None and stored is None:
                    table.record(name, [value for _, value in row])
                if fisher is not None:
                    row = list(zip([c for c, _ in row], probed_row(estimates[name], [v for _, v in row])))
                replace_module(model, name, base_modules[name])
                del cached
                options.append(row)
                option_ranks.append(row_ranks)
                done += 1
                if ctx.progress:
                    ctx.progress(ProgressEvent("sensitivity", done, len(ctx.shapes), name))
            del stats
    finally:
        for name, module in modules.items():
            replace_module(model, name, module)
    info = {"sensitivity_baseline": baseline, "sensitivity_probes": probes, "sensitivity_rows_reused": reused,
            "sensitivity": {s.name: [v for _, v in row] for s, row in zip(ctx.shapes, options)}}
    if fisher is not None:
        info.update(fisher_tokens=fisher[1], fisher_estimate=estimates)
    return _knapsack_retentions(ctx, options, option_ranks), info


def _allocate_tail(ctx: PlanContext, fisher: tuple[dict[str, torch.Tensor], int]) -> tuple[dict[str, float], dict]:
    """``module-kl-fisher`` with ``fisher_scale="tail"``: the Fisher estimate, lifted (`tail_row`) by one
    probe at the deepest candidate of each module *whose lift can change the allocation*.

    A lift only raises the costs below a module's baseline rank, so it matters only for the modules the
    knapsack cuts below their baseline. The probes therefore run in rounds: knapsack over the rows known
    so far (estimate, or lifted where probed), probe the modules it cuts below the baseline that are not
    yet probed, repeat until it cuts no unprobed module there. The result is the allocation with every
    module probed: its choice costs the same under the fully lifted table (its unprobed modules sit where
    no lift applies), and that table is nowhere cheaper than the partly lifted one it minimised. On
    SmolLM2-135M at 40 % three rounds probe 121 of the 210 modules (BENCHMARKS.md, "Cheaper tail probes").

    One dense pass with statistics gives each module's whitened SVD up to the largest rank its row needs,
    its estimate, its baseline module and its probe candidate (both in the model dtype); the SVDs are not
    kept. Probes replay the baseline prefix (:mod:`.replay`) and rerun only the suffix and the head.
    """
    batches = list(ctx.calibration)[: ctx.spec.sensitivity_batches]
    model = ctx.model
    modules = {name: module for _, _, targets in ctx.plan for name, module in targets.items()}
    block_of = {name: index for index, _, targets in ctx.plan for name in targets}
    shape_of = {s.name: s for s in ctx.shapes}
    budget = budget_for_ratio(ctx.shapes, ctx.config.ratio)
    uniform = ranks_for_budget(ctx.shapes, uniform_retentions(ctx.shapes, ctx.config.ratio), budget)
    table = _open_probe_table(ctx)  # before anything is replaced: the fingerprint reads the dense model
    ranks_of: dict[str, list[int | None]] = {}
    estimates: dict[str, list[float]] = {}
    base_modules: dict[str, nn.Module] = {}
    candidates: dict[str, tuple[int, nn.Module]] = {}  # probe index and module, where there is a tail

    def visit(index, targets, hidden, outputs, stats):
        for name, module in targets.items():
            shape = shape_of[name]
            ranks = [_candidate_rank(shape, rho) for rho in ctx.spec.sensitivity_candidates]
            base = _usable(shape, uniform[name])
            top = max((r for r in ranks + [base] if _usable(shape, r)), default=0)
            estimate, cached = _fisher_costs(ctx, fisher, module, stats, name,
                                             [_usable(shape, r) for r in ranks] + [base], top)
            estimate = [e - estimate[-1] for e in estimate[:-1]]
            ranks_of[name], estimates[name] = ranks, estimate
            base_modules[name] = module if base is None else _lowrank_module(module, _factors_at(cached, base))
            for i in probed_candidates(estimate, "tail"):  # e > 0: a usable rank below the baseline
                candidates[name] = (i, _lowrank_module(module, _factors_at(cached, ranks[i])))
            del cached

    _dense_pass(ctx, visit, statistics=ctx.spec.whitening != "none")
    measured: dict[str, float] = {}
    read: dict[str, int] = {}  # sequences each probe read
    probe: _TailProbe | None = None
    probes = reused = rounds = 0

    def options_now() -> list[list[tuple[int, float]]]:
        options = []
        for s in ctx.shapes:
            row = estimates[s.name]
            if s.name in measured:
                row = tail_row(row, [measured[s.name] if i == candidates[s.name][0] else None for i in range(len(row))])
            options.append([(rank_cost(s, r), v) for r, v in zip(ranks_of[s.name], row)])
        return options

    try:
        while True:
            options = options_now()
            picked = knapsack(options, budget)
            wanted = [s.name for s, k in zip(ctx.shapes, picked)
                      if s.name in candidates and s.name not in measured and estimates[s.name][k] > 0.0]
            if not wanted:
                break
            rounds += 1
            missing = []
            for name in wanted:
                stored = _stored_row(table, name, len(ranks_of[name]))
                if stored is not None and stored[candidates[name][0]] is not None:
                    measured[name] = stored[candidates[name][0]]
                    reused += 1
                else:
                    missing.append(name)
            if not missing:
                continue
            if probe is None:
                probe = _TailProbe(model, ctx.blocks, batches, base_modules, ctx.spec.tail_tolerance,
                                   ctx.spec.tail_sequences)
            probe.rewind()
            planned = probes + len(missing)
            for name in sorted(missing, key=block_of.__getitem__):
                index, candidate = candidates[name]
                measured[name], read[name] = probe.measure(block_of[name], name, candidate, estimates[name][index])
                probes += 1
                if table is not None:
                    table.record(name, [measured[name] if i == index else None for i in range(len(ranks_of[name]))])
                if ctx.progress:
                    ctx.progress(ProgressEvent("sensitivity", probes, planned, name))
    finally:
        for name, module in modules.items():
            replace_module(model, name, module)
    baseline = probe.baseline if probe is not None else None
    info = {"sensitivity_baseline": baseline, "sensitivity_probes": probes, "sensitivity_rows_reused": reused,
            "sensitivity_rounds": rounds, "sensitivity_probed": sorted(measured, key=list(modules).index),
            "sensitivity_probe_values": {name: measured[name] for name in read}, "sensitivity_probe_sequences": read,
            "sensitivity": {s.name: [v for _, v in row] for s, row in zip(ctx.shapes, options)},
            "fisher_tokens": fisher[1], "fisher_estimate": estimates}
    return _knapsack_retentions(ctx, options, [ranks_of[s.name] for s in ctx.shapes]), info


#: The fewest probe sequences a ``tail`` probe reads before its standard error may stop it: the error of
#: a standard error from fewer is itself too large to trust.
TAIL_MIN_SEQUENCES = 4


class _TailProbe:
    """Tail probes, one sequence at a time: KL(dense ‖ model with one module at its probe candidate) −
    KL(dense ‖ baseline), averaged over the probe tokens read so far.

    Sequences run one at a time, in order, each paired with its baseline KL, and the prefix before the
    probed block is replayed per sequence (:mod:`.replay`). With a positive
    `MethodSpec.tail_tolerance` a probe stops once its standard error is within that share of the
    cost it decides (a 10 % error moves the row's lift by about as much, against lifts of up to 29× on
    SmolLM2-135M); on SmolLM2 the paired per-sequence differences are too noisy for that rule to save
    much (BENCHMARKS.md, "Cheaper tail probes"). `MethodSpec.tail_sequences` caps the reads instead
    (the presets: the first 4), and only those sequences get a reference and a replayed prefix. Under a
    process group each step reads one sequence per process and the sums are all-reduced, so every
    process stops at the same step.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, batches: Sequence[Any],
                 base_modules: dict[str, nn.Module], tolerance: float, limit: int = 0) -> None:
        self.model, self.base_modules, self.tolerance = model, base_modules, tolerance
        self.units = [seq for batch in batches for seq in sequences(batch)]
        self.device = _device_of(model)
        processes = world()[1]
        counts = per_rank_counts(len(self.units), self.device) if processes > 1 else [len(self.units)]
        self.steps = max(int(c) for c in counts)
        if limit > 0:  # `MethodSpec.tail_sequences`: whole steps of one sequence per process
            self.steps = min(self.steps, -(-limit // processes))
            # Sequences no probe reads need no reference, no baseline KL and no replayed prefix.
            self.units = self.units[: self.steps]
        self.reference = []
        for unit in self.units:  # the dense model's distributions (nothing is replaced yet)
            self.reference.append(DenseReference.of(_logits(model, unit)))
        for name, module in base_modules.items():
            replace_module(model, name, module)
        self.replay = PrefixReplay(model, blocks, self.units)
        self.base_kl = [self._kl(i) for i in range(len(self.units))]
        total, tokens = all_reduce_sum([sum(k for k, _ in self.base_kl), float(sum(t for _, t in self.base_kl))],
                                       device=self.device)
        self.baseline = total / max(tokens, 1.0)

    def rewind(self) -> None:
        """Replay from the first block again (a new round of probes starts at any block)."""
        self.replay = PrefixReplay(self.model, self.replay.blocks, self.units)

    def _kl(self, i: int, replay: bool = False) -> tuple[float, float]:
        """(Σ over unit ``i``'s tokens of KL(dense ‖ current model), its token count)."""
        if replay:
            self.replay.batch = i
        ref = self.reference[i]
        return ref.kl_sum(_logits(self.model, self.units[i])), float(ref.tokens)

    def measure(self, block: int, name: str, candidate: nn.Module, estimate: float) -> tuple[float, int]:
        """(the probe's mean KL increase, the sequences it read on all processes) for module ``name``
        (in block ``block``) replaced by ``candidate``; ``estimate``: the row's estimate there."""
        self.replay.advance(block)  # blocks before it at their baseline: rerun only the suffix
        replace_module(self.model, name, candidate)
        count = total = tokens = first = second = 0.0
        try:
            with self.replay.active():
                for step in range(self.steps):
                    local = [0.0] * 5
                    if step < len(self.units):
                        kl, t = self._kl(step, replay=True)
                        diff = (kl - self.base_kl[step][0]) / t
                        local = [1.0, kl - self.base_kl[step][0], t, diff, diff * diff]
                    n, d, t, s1, s2 = all_reduce_sum(local, device=self.device)
                    count, total, tokens, first, second = count + n, total + d, tokens + t, first + s1, second + s2
                    mean = total / max(tokens, 1.0)
                    if self.tolerance > 0.0 and count >= TAIL_MIN_SEQUENCES:
                        variance = max(second - first * first / count, 0.0) / (count - 1.0)
                        if (variance / count) ** 0.5 <= self.tolerance * max(mean, estimate):
                            break
        finally:
            replace_module(self.model, name, self.base_modules[name])
        return total / max(tokens, 1.0), int(count)


def _allocate_from_table(ctx: PlanContext, table: ProbeTable) -> tuple[dict[str, float], dict]:
    """The knapsack over a probe table that holds every module's row: no baseline, no pass, no probe.

    The rows are what `_allocate_sensitivity` would measure (same model, calibration and settings: the
    table's fingerprint), each at the same candidate ranks, so the allocation is the one a probing run
    makes; only the baseline's own KL, which no row needs, is not known (``sensitivity_baseline``).
    """
    options, option_ranks = [], []
    for shape in ctx.shapes:
        ranks = [_candidate_rank(shape, rho) for rho in ctx.spec.sensitivity_candidates]
        stored = _stored_row(table, shape.name, len(ranks))
        options.append([(rank_cost(shape, rank), value) for rank, value in zip(ranks, stored)])
        option_ranks.append(ranks)
        if ctx.progress:
            ctx.progress(ProgressEvent("sensitivity", len(options), len(ctx.shapes), shape.name))
    info = {"sensitivity_baseline": None, "sensitivity_probes": 0, "sensitivity_rows_reused": len(ctx.shapes),
            "sensitivity": {s.name: [v for _, v in row] for s, row in zip(ctx.shapes, options)}}
    return _knapsack_retentions(ctx, options, option_ranks), info


#: What a probe row depends on besides the model and the calibration batches: the settings
#: `_allocate_sensitivity` reads (baseline ranks, whitening, candidate factors, probe batches). The
#: form, the refinement and the propagation are not among them — the probes truncate with plain
#: whitened SVDs — so `duo-svd` and `adasvd-duo` share a table. A setting the probes come to read must
#: be added here, or a table measured without it would be reused.
_PROBED_CONFIG = ("ratio", "include", "exclude", "damping", "compute_dtype", "svd_driver", "statistics_dtype")
_PROBED_SPEC = ("whitening", "asvd_alpha", "allocation", "sensitivity_candidates", "sensitivity_batches",
                "fisher_samples", "fisher_scale", "tail_tolerance", "tail_sequences")


def _open_probe_table(ctx: PlanContext) -> ProbeTable | None:
    """The run's `ProbeTable` (``CompressionConfig.probe_table``), or None.

    Its fingerprint covers the model, the calibration and the settings in ``_PROBED_CONFIG`` and
    ``_PROBED_SPEC``.

    Under a process group every process fingerprints its own calibration shard and the digests are
    gathered, so the fingerprint covers all of them; global rank 0 reads (or starts) the file and
    passes its rows — or the reason it refused the file — to the others, so every process skips the
    same probes (they are collectives) and all of them stop on a refused file.
    """
    if ctx.config.probe_table is None:
        return None
    rank, world_size = world()
    device = _device_of(ctx.model)

    def gather(digest: bytes) -> list[bytes]:
        rows = all_gather_rows(torch.tensor(list(digest), dtype=torch.float64, device=device)[None])
        return [bytes(int(b) for b in row.tolist()) for row in rows]

    config = ctx.config.to_dict()
    settings = {key: config[key] for key in _PROBED_CONFIG}
    settings.update({key: getattr(ctx.spec, key) for key in _PROBED_SPEC}, processes=world_size)
    key = fingerprint(ctx.model, ctx.calibration, settings, gather=gather if world_size > 1 else None)
    table, refused = None, None
    if rank == 0:
        try:
            table = ProbeTable.open(ctx.config.probe_table, key)
        except InvalidInputError as error:
            refused = str(error)
    if world_size > 1:
        rows, refused = broadcast_object((table.rows if table is not None else None, refused), 0)
        if rank != 0 and refused is None:
            table = ProbeTable(Path(ctx.config.probe_table), rows, writer=False)
    if refused is not None:
        raise InvalidInputError(refused)
    return table


def probed_candidates(estimate: Sequence[float], scale: str = "probed") -> set[int]:
    """The candidates `_allocate_sensitivity` probes for a Fisher-estimated row: ``probed`` — the first and
    the last whose estimate is not zero (zero = the baseline rank itself, or a candidate that cannot be
    used); ``tail`` — the first (the deepest truncation) if it truncates beyond the baseline."""
    moving = [i for i, e in enumerate(estimate) if e != 0.0]
    if scale == "tail":
        return {moving[0]} if moving and estimate[moving[0]] > 0.0 else set()
    return {moving[0], moving[-1]} if moving else set()


def tail_row(estimate: Sequence[float], measured: Sequence[float | None]) -> list[float]:
    """A module's cost row from its Fisher estimate and one probe at its deepest truncation (``tail``).

    The estimate is the second-order term of the KL in the module's output change; near the baseline
    rank, where the knapsack decides, it holds. A deep truncation can leave that regime — on
    SmolLM2-135M the exhaustive probes put the gate/up projections of blocks 0, 6, 13, 16 and 17 at 10 %
    retention 9–29× above the estimate, while the median MLP row was 1.7× (BENCHMARKS.md, "The
    exhaustive module-KL table") — and a quadratic row then lets the knapsack cut them far too deep.
    The next even term of the expansion is fourth order in the output change, i.e. the estimate
    squared, so each candidate below the baseline gets e + b·e², with b fitted to the probe
    (e_p + b·e_p² = measured) and vanishing near the baseline where e is small. A probe at or below the
    estimate leaves the row as estimated: at a few thousand tokens the probes of cheap modules are noise
    of either sign (68 of the first 73 attention rows measured on SmolLM2 rise with the retention
    somewhere), and scaling a row down to such a probe — what ``probed`` does — hands the knapsack free
    truncations. Candidates above the baseline keep the estimate.
    """
    probe = next(((e, m) for e, m in zip(estimate, measured) if m is not None and e > 0.0), None)
    curve = 0.0 if probe is None or probe[1] <= probe[0] else (probe[1] - probe[0]) / probe[0] ** 2
    return [e + curve * e * e if e > 0.0 else e for e in estimate]


def probed_row(estimate: Sequence[float], measured: Sequence[float | None]) -> list[float]:
    """A module's cost row from its Fisher estimate and the probes measured at some of its candidates.

    On the reference model the estimate gets a row's shape right — it follows the module's own whitened
    spectrum — but not its size: the probes measure each module with every other target already
    truncated, and that context amplifies some modules' costs several times more than others' (the
    dense-model expansion cannot see it). So each side of the baseline is scaled to the probe measured
    on it (on SmolLM2-135M this did worse than the estimate alone: BENCHMARKS.md): the candidates that truncate
    further (estimate > 0) by measured/estimated at the lowest, those that restore rank (estimate < 0) at
    the highest. A ratio of opposite sign (the probe found the other direction helps) scales that side to
    zero, which is what the measured point says at its own candidate. Probed candidates keep their
    measured value.
    """
    scales = {}
    for side in (1.0, -1.0):
        pairs = [(e, m) for e, m in zip(estimate, measured) if m is not None and e * side > 0]
        if pairs:
            e, m = pairs[0] if side > 0 else pairs[-1]
            scales[side] = max(m / e, 0.0)
    row = []
    for e, m in zip(estimate, measured):
        if m is not None:
            row.append(m)
        elif e == 0.0:
            row.append(0.0)
        else:
            row.append(e * scales.get(1.0 if e > 0 else -1.0, 1.0))
    return row


def _knapsack_retentions(ctx: PlanContext, options: list[list[tuple[int, float]]],
                         option_ranks: list[list[int | None]]) -> dict[str, float]:
    """Retentions from a per-module cost table (one row per ``ctx.shapes`` entry) under the budget."""
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
    return retentions


def _allocate_fisher(ctx: PlanContext) -> tuple[dict[str, float], dict]:
    """``module-kl-fisher``: the module-KL cost table estimated to second order (:mod:`.fisher`).

    With ``fisher_scale="probed"`` the estimate gives each row's shape and two exact probes
    per module its size (`_allocate_sensitivity`, `probed_row`); with ``"tail"`` one probe per module
    lifts the rows that leave the quadratic regime (`tail_row`); with ``"none"`` (the default) the
    estimate alone:

    One backward pass per probe sequence over the dense model gives every target's output Fisher
    diagonal; one dense pass with statistics gives each target's whitened SVD (up to the largest rank
    the table needs), from which every candidate's cost is a cumulative sum. Costs are relative to the
    module's uniform-rank baseline, as in the exact probes' table (a constant per module, so the
    knapsack's choice does not depend on it), and go through the same knapsack.
    """
    batches = list(ctx.calibration)[: ctx.spec.sensitivity_batches]
    modules = {name: module for _, _, targets in ctx.plan for name, module in targets.items()}
    fisher, tokens = output_fisher(ctx.model, ctx.blocks[0], modules, batches, samples=ctx.spec.fisher_samples)
    if ctx.spec.fisher_scale == "tail":
        return _allocate_tail(ctx, (fisher, tokens))
    if ctx.spec.fisher_scale == "probed":
        return _allocate_sensitivity(ctx, (fisher, tokens))
    shape_of = {s.name: s for s in ctx.shapes}
    uniform = ranks_for_budget(ctx.shapes, uniform_retentions(ctx.shapes, ctx.config.ratio),
                               budget_for_ratio(ctx.shapes, ctx.config.ratio))
    rows: dict[str, tuple[list[tuple[int, float]], list[int | None]]] = {}
    baseline_total = 0.0

    def visit(index, targets, hidden, outputs, stats):
        nonlocal baseline_total
        for name, module in targets.items():
            shape = shape_of[name]
            ranks = [_usable(shape, _candidate_rank(shape, rho)) for rho in ctx.spec.sensitivity_candidates]
            base = _usable(shape, uniform[name])
            top = max((r for r in ranks + [base] if r is not None), default=0)
            costs, _ = _fisher_costs(ctx, (fisher, tokens), module, stats, name, ranks + [base], top)
            baseline_total += costs[-1]
            rows[name] = ([(rank_cost(shape, r), c - costs[-1]) for r, c in zip(ranks, costs)], ranks)

    _dense_pass(ctx, visit, statistics=True)
    options = [rows[s.name][0] for s in ctx.shapes]
    option_ranks = [rows[s.name][1] for s in ctx.shapes]
    return _knapsack_retentions(ctx, options, option_ranks), {
        "fisher_baseline_kl": baseline_total, "fisher_tokens": tokens,
        "sensitivity": {s.name: [v for _, v in row] for s, row in zip(ctx.shapes, options)}}


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
    elif allocation == "module-kl-fisher":
        retentions, info = _allocate_fisher(ctx)
    else:
        retentions, info = _allocate_sensitivity(ctx)
    ranks = ranks_for_budget(ctx.shapes, retentions, budget_for_ratio(ctx.shapes, ctx.config.ratio))
    return ranks, info
