"""Block-by-block compression of a model.

1. Run the model up to its first decoder block on the calibration batches and keep that block's inputs.
2. Allocation: split the parameter budget between the target matrices (uniform, or a strategy that
   first makes one dense pass over the blocks to measure importances, spectra or sensitivities).
3. For each block, in order:
   * stream the Gram statistics of its target linears' inputs. With a refinement strategy, the block
     is run on both streams — the dense model's hidden states through the dense block and the
     compressed prefix's through the block as compressed so far — and the cross Gram H_oc is
     accumulated too, so factors can be fitted to the dense targets. That happens one input stage at a
     time (q/k/v, then o_proj, gate/up, down_proj), each after the earlier stages were replaced, so
     every target is fitted to the inputs it will really receive (`_compress_block_paired`);
   * factor each target at its allocated rank (whitening, then optionally column preservation and
     adaComp / closed-form refinement) and swap in the factorized module. Factors that read no data
     (plain SVD) are built first instead, and the block's pass only measures their output errors
     (`_factor_then_measure`);
   * run the block again to produce the next block's inputs (``propagation="compressed"``: SVD-LLM's
     sequential scheme), or, with ``"original"``, let the statistics pass's dense outputs replace the
     inputs batch by batch (one pass per block, one copy of the activations);
   * free the block's statistics: at most one block's statistics are alive at a time.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .budget import MatrixShape, budget_for_ratio
from .calibration import BlockInput, ProgressEvent, ProgressFn, StopForward, capture_block_inputs, first_sequences
from .columns import ColumnSplit, column_preserving_factorize
from .config import CompressionConfig
from .distributed import all_reduce_sum, share_module, world
from .factorization import LowRankFactors, factorize, factorize_output_gram, output_gram, saves_parameters
from .linalg import decomposition_threads, use_gram
from .lowrank import ColumnPreservingLinear, LowRankLinear
from .methods import MethodSpec
from .offload import BlockRunner
from .output_error import ProjectionErrorMeter, projection_error_from_outputs
from .params import count_parameters
from .planning import PlanContext, plan_ranks
from .profiling import PhaseTimer, active_timer, phase
from .holdout import heldout_rows
from .residual import ResidualWriter, find_residual_writers
from .runtime import release_free_heap
from .inplace_cholesky import rebuild_from_factor
from .refinement import (GramStatistics, RefinementTarget, adacomp, balance_factors, complement, objective,
                         optimal_factors, u_step, validated_steps)
from .report import CompressionReport, ModuleReport
from .statistics import BlockStatistics, InputStatistics
from .surgery import find_decoder_blocks, find_targets, linear_bias, linear_shape, linear_weight, replace_module
from .whitening import (CholeskyWhitening, DiagonalWhitening, IdentityWhitening, Whitening, compute_whitening,
                        overwrote)
from .writer_heldout import HeldoutScorer, WriterHeldout

__all__ = ["CompressionWarning", "BlockInput", "ProgressEvent", "ProgressFn", "capture_block_inputs", "compress_model"]


class CompressionWarning(UserWarning):
    """A target matrix was left dense or handled in a degraded way."""




def _output_error(weight: torch.Tensor, approx: torch.Tensor, grams: GramStatistics,
                  target_energy: float | None = None) -> float:
    """‖W′X_c − W X_o‖_F / ‖W X_o‖_F from the Gram matrices.

    ``target_energy`` (‖W X_o‖², measured on the dense outputs) saves the m·n² product that computes it
    from H_oo. Single-stream statistics (one H) take the error form tr(E H Eᵀ), E = W′ − W: no
    cancellation between large terms.
    """
    w, a = weight.to(torch.float64), approx.to(torch.float64)
    den = target_energy if target_energy is not None else grams.target_energy(w)
    if grams.w_h_oc is None and grams.h_cc is grams.h_oc:
        e = a - w
        num = float((e @ grams.h_cc * e).sum())
    else:
        w_h_oc = grams.w_h_oc if grams.w_h_oc is not None else w @ grams.h_oc
        num = float((a @ grams.h_cc * a).sum() - 2 * (w_h_oc * a).sum()) + den
    return _relative(num, den)


#: Rows of W at a time where an m×n float64 temporary is not needed whole.
ROW_BLOCK = 512


def _stored_exactly(dtype: torch.dtype) -> bool:
    """Whether factors stored in ``dtype`` are the computed ones (float32/float64), so a target's error
    can be read off the factorization and H need not be kept to measure the stored module."""
    return dtype in (torch.float32, torch.float64)


def _dropped_relative(factors: LowRankFactors) -> float:
    """‖(W′ − W)·S‖/‖W·S‖ from the singular values of W·S: the dropped σᵢ² against all of them."""
    sigma2 = factors.singular_values.to(torch.float64).square()
    return _relative(float(sigma2[factors.rank:].sum()), float(sigma2.sum()))


def _projected_error(up: torch.Tensor, down: torch.Tensor, grams: GramStatistics,
                     target_energy: float | None) -> float | None:
    """‖(W′ − W)X‖/‖W X‖ for a truncated SVD of W·S, S an invertible column scaling (plain SVD: S = I;
    ASVD: activation scales), from the factors W′ = up·down and single-stream statistics.

    Such a W′ is P·W with P = U_r U_rᵀ an orthogonal projection, so tr(W′HWᵀ) = tr(P·WHWᵀ·P) =
    tr(W′HW′ᵀ) and ‖(W′ − W)X‖² = ‖W X‖² − ‖W′X‖², with ‖W′X‖² = tr((upᵀup)(down·H·downᵀ)): r·n² flops
    instead of the m·n² of the Gram form, i.e. the retention (r(m + n) = ρ·m·n) of its cost. ``None``
    (measure it the long way) without the measured ‖W X‖², with two streams, or for a near-exact fit
    (error below 1 %): ‖W X‖² is summed from float32 rows (~1e-8 relative), and the difference of the
    two energies would lose that many more digits.
    """
    if target_energy is None or target_energy <= 0 or grams.h_oc is None or grams.h_cc is not grams.h_oc:
        return None
    u, d = up.to(torch.float64), down.to(torch.float64)
    kept = float(((u.T @ u) * (d @ grams.h_cc @ d.T)).sum())  # tr(AB) = Σ A∘B for symmetric A, B
    dropped = target_energy - kept
    if dropped < 1e-4 * target_energy:
        return None
    return _relative(dropped, target_energy)


def _whitened_truncation_error(factors: LowRankFactors, whitening: CholeskyWhitening, weight: torch.Tensor) -> float:
    """‖(W′ − W)X‖/‖W X‖ from the whitened SVD: with L Lᵀ = H + s·I, ‖E X‖² = ‖E L‖² − s‖E‖², where
    ‖(W′ − W)L‖² is the sum of the dropped σᵢ² of W·L and ‖W L‖² that of all of them (s = 0: exact
    Cholesky). m·n·r flops for ‖E‖² instead of the m·n² of the Gram form, and no H needed."""
    if not whitening.shift:
        return _dropped_relative(factors)
    sigma2 = factors.singular_values.to(torch.float64).square()
    dropped, energy = float(sigma2[factors.rank:].sum()), float(sigma2.sum())
    # ‖U V − W‖² a row block at a time: the whole m×n error and its square were two float64 copies of W
    # (0.36 GB each at 4096 × 11008) at the run's memory peak.
    up, down = factors.up.to(torch.float64), factors.down.to(torch.float64)
    squared_error = squared_weight = 0.0
    for start in range(0, weight.shape[0], ROW_BLOCK):
        w = weight[start:start + ROW_BLOCK].to(torch.float64)
        squared_error += float((up[start:start + ROW_BLOCK] @ down - w).square().sum())
        squared_weight += float(w.square().sum())
    dropped -= whitening.shift * squared_error
    energy -= whitening.shift * squared_weight
    return _relative(dropped, energy)


def _split_pays_after_compensation(spec: MethodSpec, config: CompressionConfig, weight: torch.Tensor,
                                   stats: InputStatistics, split: ColumnSplit, factors: LowRankFactors,
                                   target_energy: float | None,
                                   plain_rows: WriterHeldout | None = None) -> bool:
    """Whether a compensated writer keeps its column split.

    Duo-SVD chooses the split by the whitened error on the target's own input, ‖(W − W′)X_c‖². A
    compensated residual writer is then fitted to the dense outputs, ‖W′X_c − W X_o‖², and its preserved
    columns are dense weights that no compensation step changes, so a split that wins before the
    compensation can lose after it. That happened on SmolLM2-135M at 60 %: with the Fisher allocation
    21 down_proj took splits, and 20 of them ended with a larger compensated error than the plain
    factorization with the same ranks (BENCHMARKS.md, "Column preservation under compensation").
    So the two forms are compared again, each after its U-step (least squares for the up factor, so
    never worse than its start), on the objective the writer is fitted to (tokens on the residual's
    scale). The split stays if it still wins by ``column_min_gain``.

    Refusing a split is a departure from the method's choice, and like a compensation step
    (`core.plain_guard`) it must not raise the writer's plain held-out output error, where the
    attention-sink tokens, which the residual's scale discounts, dominate. So with ``plain_rows`` (the
    writer's held-out compressed inputs and dense outputs) the split also stays when the plain form's
    plain held-out error is higher than the split's.
    """
    grams = stats.grams()

    def compensated(kept: torch.Tensor, up_factor: torch.Tensor, down_factor: torch.Tensor):
        target = RefinementTarget(weight, grams, kept=kept, damping=config.damping,
                                  target_energy=target_energy)
        down_factor = down_factor.to(torch.float64)
        up_factor = u_step(target, down_factor)
        return objective(target, up_factor, down_factor), up_factor, down_factor

    none = torch.empty(0, dtype=torch.long)
    plain, plain_up, plain_down = compensated(none, factors.up, factors.down)
    with_split, split_up, split_down = compensated(split.kept, split.up, split.down)
    if with_split < (1.0 - spec.column_min_gain) * plain:
        return True
    if plain_rows is None:
        return False
    plain_form = plain_rows.scorer(weight)(plain_up, plain_down)
    split_form = plain_rows.scorer(weight, split.kept)(split_up, split_down)
    return plain_form > split_form


def _gram_replaceable(spec: MethodSpec, stats: InputStatistics | None, weight: torch.Tensor,
                      validation_pending: bool = False) -> bool:
    """Whether a Cholesky factor of H_cc, damped or not, can stand in for H_cc in everything after the
    whitening.

    It gives the report's error and every refinement product (a damped factor's V-steps are ridge
    steps of its shift, `core.refinement`), except for preserved columns (their own Gram blocks),
    bf16/fp16 factors (whose error is measured with H), validation still to come (it fits on H_cc
    minus the held-out part: held-out sums, or held-out rows with ``validation_pending``) and
    single-stream refinement (where H is also H_oc).
    """
    if stats is None or spec.form != "low-rank" or not _stored_exactly(weight.dtype):
        return False
    if spec.refinement == "none":
        return True
    if validation_pending or (stats.heldout is not None and stats.heldout.tokens):
        return False
    return stats.cross_sum is not None


def _factor_replaces_gram(
    spec: MethodSpec, whitening: Whitening, stats: InputStatistics | None, weight: torch.Tensor,
    validation_pending: bool = False,
) -> bool:
    """Whether nothing after this whitening reads H_cc, so it can be freed (`_gram_replaceable`)."""
    return isinstance(whitening, CholeskyWhitening) and _gram_replaceable(spec, stats, weight, validation_pending)


def _may_overwrite_gram(spec: MethodSpec, stats: InputStatistics | None, weight: torch.Tensor,
                        validation_pending: bool = False) -> bool:
    """Whether the whitening may write its Cholesky factor into H's storage (`core.inplace_cholesky`):
    `_gram_replaceable`. The eigen fallback leaves H as it was, and then `_factor_replaces_gram` keeps
    it too."""
    return (stats is not None and stats.gram_sum is not None and spec.whitening == "truncation-aware"
            and _gram_replaceable(spec, stats, weight, validation_pending=validation_pending))


def _takes_output_gram(spec: MethodSpec, config: CompressionConfig, weight_shape: tuple[int, int],
                       refined: bool) -> bool:
    """Whether a target is fitted from G = W·H·Wᵀ (`factorize_output_gram`) instead of a whitening.

    That route is the truncation-aware fit itself for a wide or square W (m ≤ n) and needs neither a
    Cholesky factor nor damping. It is taken where nothing after the truncation reads whitened
    coordinates or blocks of H: no preserved columns (low-rank form), and either no refinement on this
    target (``refined`` False) or the closed-form update, a single U-step, whose products need only
    the start's V·H·Vᵀ (diagonal and known from G's eigen-decomposition, `LowRankFactors.down_gram`)
    and W·H_oc·Vᵀ (`_refined_from_output_gram`). The driver must allow Gram routes
    (``svd_driver="svd"`` keeps LAPACK's SVD of W·L as the reference).
    """
    m, n = weight_shape
    return (spec.whitening == "truncation-aware" and spec.form == "low-rank"
            and (not refined or spec.refinement == "closed-form") and m <= n
            and use_gram(config.torch_compute_dtype, config.svd_driver))


def _relative(squared_error: float, energy: float) -> float:
    return (max(squared_error, 0.0) / energy) ** 0.5 if energy > 0 else float("nan")


def _fit_split_energy(energy: float, tokens: int, heldout_energy: float, heldout_tokens: int) -> float:
    """Mean ‖W X_o‖² per token over the tokens not held out, from the whole's and the held-out mean."""
    return (tokens * energy - heldout_tokens * heldout_energy) / (tokens - heldout_tokens)


@contextmanager
def _fit_split(stats: InputStatistics, kept: torch.Tensor, heldout_energy: float, weight: torch.Tensor,
               damping: float, rows: WriterHeldout | None, score_rows: Callable | None):
    """(fit split's Grams, removed cross part, held-out score, held-out tokens) for the ``with`` body,
    or None.

    A residual writer's held-out tokens are rows or moments (`core.writer_heldout`): the fit split is
    made from them and they score the candidates. Other held-out tokens have their own Gram sums
    (`core.statistics`), whose complement is the fit split and whose objective is the score.
    """
    held = stats.heldout
    if held is None and rows is not None and rows.weighted and score_rows is not None:
        if not 0 < rows.tokens < stats.tokens:
            yield None
            return
        grams = stats.grams()
        with rows.fit_split(grams.h_cc, grams.cross, stats.tokens) as removed:
            yield grams, removed, score_rows, rows.tokens
        return
    if held is None or not 0 < held.tokens < stats.tokens:
        yield None
        return
    with complement(stats.grams(), stats.tokens, held.grams(), held.tokens) as grams:
        check = RefinementTarget(weight, held.grams(), kept=kept, damping=damping, target_energy=heldout_energy)
        yield grams, None, lambda up, down: objective(check, up, down), held.tokens


@contextmanager
def _holdout_targets(
    spec: MethodSpec, config: CompressionConfig, weight: torch.Tensor, stats: InputStatistics, kept: torch.Tensor,
    energy: float | None, heldout_energy: float | None, rank: int, up: torch.Tensor | None, down: torch.Tensor | None,
    shared: dict[int, Whitening] | None = None, rows: WriterHeldout | None = None, score_rows: Callable | None = None,
) -> Iterator[tuple[RefinementTarget, Callable, float, torch.Tensor, torch.Tensor, torch.Tensor | None] | None]:
    """(fit target, held-out score f(U, V), held-out energy, start U, start V, start's V·H_fit·Vᵀ when its
    factorization knows it) for validating a refinement, for the ``with`` body; None: nothing held out.

    Everything that is scored is fitted without the held-out sequences: the start too (the whitened
    rank-r fit of the same columns, recomputed from H_fit), since the start on all tokens has seen the
    held-out text and would be favoured over every step (with another whitening than the truncation-
    aware one, the given start is scored as it is). H_fit is ``stats``' own Grams turned into the fit
    split in place for the body (`_fit_split`), so the whole statistics must not be read inside it.
    ``rows`` / ``score_rows``: a writer's held-out tokens (rows or moments, `core.writer_heldout`) and
    their weighted score.
    ``shared`` caches the fit split's whitening per input (q/k/v, gate/up read the same one) when no
    column is preserved.
    """
    if energy is None or not heldout_energy or stats.gram_sum is None:
        yield None
        return
    with _fit_split(stats, kept, heldout_energy, weight, config.damping, rows, score_rows) as split:
        if split is None:
            yield None
            return
        grams, removed, score, n_held = split
        n = stats.tokens
        fit_energy = _fit_split_energy(energy, n, heldout_energy, n_held)
        key = id(stats) if shared is not None and not kept.numel() else None
        whitening = shared.get(key) if key is not None else None
        down_gram = None
        fit = RefinementTarget(weight, grams, kept=kept, damping=config.damping, target_energy=fit_energy,
                               cross_removed=removed)
        # No column preserved: the rest is all of W, and indexing it would copy it.
        rest = weight if fit.rest.numel() == weight.shape[1] else weight[:, fit.rest]
        if whitening is None and _takes_output_gram(spec, config, tuple(rest.shape), refined=False):
            # The start's truncation-aware fit without the fit split's Cholesky factor (an n×n float64
            # matrix next to both splits' statistics at the widest input's validation: 0.97 GB at n = 11008).
            with phase("svd"):
                start = factorize_output_gram(rest, output_gram(rest, fit.h_rr), rank)
            up, down, down_gram = start.up, start.down, start.down_gram
        elif spec.whitening == "truncation-aware" or up is None:
            with phase("whitening"):
                whitening = whitening or compute_whitening(fit.h_rr, damping=config.damping,
                                                           product_dtype=stats.product_dtype)
            with phase("svd"):
                start = factorize(rest, rank, whitening, driver=config.svd_driver)
            up, down = start.up, start.down
        if key is not None and whitening is not None:
            shared[key] = whitening
        rebuild = False
        if whitening is None and spec.refinement in ("adacomp", "optimal") and not kept.numel():
            # V-steps (or the optimal fit) need H_fit's factor after all. Nothing reads H_fit itself
            # while it serves (the score is the held-out part's), so it is factored in its own
            # storage and rebuilt from the factor before the statistics are made whole again.
            with phase("whitening"):
                whitening = compute_whitening(fit.h_rr, damping=config.damping, product_dtype=stats.product_dtype,
                                              overwrite=True)
            rebuild = overwrote(whitening, grams.h_cc)
            if rebuild:
                fit = dataclasses.replace(fit, stats=dataclasses.replace(grams, h_cc=None))
        if isinstance(whitening, CholeskyWhitening) and not kept.numel():
            # V-steps in the fit split's whitened coordinates: no second (damped) factor of H_fit and
            # no G·H_fit⁻¹ next to the whitening's (at n = 11008: 0.97 GB + m·n·8 bytes less).
            fit = dataclasses.replace(fit, whitening_factor=whitening.factor, whitening_shift=whitening.shift)
        try:
            yield fit, score, heldout_energy, up.to(torch.float64), down.to(torch.float64), down_gram
        finally:
            if rebuild:
                del fit
                with phase("whitening"):
                    rebuild_from_factor(whitening.factor, whitening.shift)


def _validate_refinement(
    spec: MethodSpec, config: CompressionConfig, weight: torch.Tensor, stats: InputStatistics, kept: torch.Tensor,
    energy: float | None, heldout_energy: float | None, rank: int, up: torch.Tensor | None,
    down: torch.Tensor | None, shared: dict[int, Whitening] | None, report: ModuleReport,
    plain_rows: WriterHeldout | None = None,
) -> tuple[int | None, bool]:
    """(validated half-step count, whether the optimal factors validate) on the held-out sequences.

    ``plain_rows``: a residual writer's held-out tokens (rows or moments); a step must then also not
    raise its plain output error (`core.plain_guard`), and with the tokens' weights they are the
    held-out data itself (the weighted score and the fit split, `core.writer_heldout`).
    """
    guard = plain_rows.scorer(weight, kept) if plain_rows is not None else None
    score_rows = guard.weighted if guard is not None and plain_rows.weighted else None
    with phase("refinement", absorb=True), _holdout_targets(spec, config, weight, stats, kept, energy,
                                                            heldout_energy, rank, up, down, shared, plain_rows,
                                                            score_rows) as holdout:
        if spec.refinement == "optimal":
            return None, _optimal_validates(holdout, rank, config.svd_driver, report, guard)
        return _validated_half_steps(spec, holdout, report, guard), True


def _validated_half_steps(spec: MethodSpec, holdout: tuple | None, report: ModuleReport,
                          guard: HeldoutScorer | None = None) -> int | None:
    """The closed-form / adaComp step count chosen on the held-out sequences (`validated_steps`).

    The report gets the held-out relative errors (weighted, and plain with a guard) before refinement
    and after the chosen steps.
    """
    if holdout is None:
        return None
    fit, score, energy, up, down, down_gram = holdout
    best, scores = validated_steps(fit, score, up, down, iterations=spec.adacomp_iterations,
                                   tolerance=spec.adacomp_tolerance, v_steps=spec.refinement == "adacomp",
                                   guard=guard, down_gram=down_gram)
    report.heldout_error_start = _relative(scores[0], energy)
    report.heldout_error = _relative(scores[best], energy)
    if guard is not None:
        report.heldout_plain_error_start, report.heldout_plain_error = guard.relative(0), guard.relative(best)
    return best


def _optimal_validates(holdout: tuple | None, rank: int, driver: str, report: ModuleReport,
                       guard: HeldoutScorer | None = None) -> bool:
    """Whether the optimal factors, fitted without the held-out sequences, beat the start on them
    (and, with a guard, do not raise the plain held-out error)."""
    if holdout is None:
        return True
    fit, score, energy, up, down, _ = holdout
    start = score(up, down)
    plain_start = guard(up, down) if guard is not None else None  # each right after its score: one pass
    opt_up, opt_down, _ = optimal_factors(fit, rank, driver=driver)
    optimal = score(opt_up, opt_down)
    takes = optimal < start
    if guard is not None:
        plain_optimal = guard(opt_up, opt_down)
        takes = takes and plain_optimal <= plain_start
        report.heldout_plain_error_start, report.heldout_plain_error = guard.relative(0), guard.relative(int(takes))
    report.heldout_error_start = _relative(start, energy)
    report.heldout_error = _relative(optimal if takes else start, energy)
    return takes


# ---------------------------------------------------------------------------------------------------
# Per-matrix compression
# ---------------------------------------------------------------------------------------------------


def _factorize_target(
    name: str,
    module: nn.Module,
    rank: int | None,
    ctx: PlanContext,
    input_stats: InputStatistics | None,
    whitenings: dict[int, Whitening] | None = None,
    target_energy: float | None = None,
    last_use: bool = False,
    heldout_energy: float | None = None,
    holdout_cache: dict | None = None,
    compensate: bool = True,
    plain_rows: WriterHeldout | None = None,
) -> tuple[ModuleReport, nn.Module | None]:
    """Factor one target at its allocated rank; returns its report and the new module (None = stays dense).

    ``whitenings`` caches the whitening per statistics object: q/k/v (and gate/up) read the same input,
    so they share one Cholesky factorization instead of computing the identical factor three times.
    ``target_energy`` is ‖W X_o‖² per token measured on the dense outputs (see `BlockStatistics`),
    ``heldout_energy`` the same over the held-out sequences (they validate the refinement's steps;
    ``holdout_cache`` shares their fit split's whitening like ``whitenings``; ``plain_rows``: a residual
    writer's held-out tokens, rows or moments, for the validation and its guard, `core.writer_heldout`).
    ``last_use``: no later target reads these statistics, so H_cc is freed as soon as the whitening's
    Cholesky factor can stand in for it (`_factor_replaces_gram`).
    ``compensate=False`` (a target that does not write into the residual stream, `core.residual`): no
    refinement — the whitened fit to its own compressed input, whose single-stream statistics the
    pipeline collected — and the report measures it on that input, ‖(W′ − W)X_c‖.

    The report's relative output error is read off numbers the factorization already has whenever
    they are exact for the stored module (float32/float64 factors): the final refinement objective
    f = ‖W′X_c − W X_o‖², or — Cholesky whitening without refinement or preserved columns — the dropped
    singular values of W·L (`_whitened_truncation_error`), or — plain and activation-scaled SVD — the
    energy the projection keeps (`_projected_error`, r·n² flops; `projection_error_from_outputs`, m²·r,
    where the pass kept the outputs' Gram instead of H). Otherwise it is computed from the
    Gram matrices (m·n² flops per matrix).
    """
    spec, config = ctx.spec, ctx.config
    out_features, in_features = linear_shape(module)
    bias = linear_bias(module)
    bias_params = bias.numel() if bias is not None else 0
    # Ratios are always relative to the dense matrix, also when re-compressing existing factors.
    dense = out_features * in_features + bias_params
    report = ModuleReport(name=name, out_features=out_features, in_features=in_features,
                          params_before=dense, params_after=count_parameters(module), bias_params=bias_params)
    if rank is None and spec.allocation != "uniform":
        report.skipped = f"kept dense by the {spec.allocation} allocation"
        return report, None
    if rank is None or not saves_parameters(out_features, in_features, rank):
        report.skipped = f"no rank saves parameters for a {out_features}×{in_features} matrix"
        warnings.warn(f"{name}: {report.skipped}; left dense", CompressionWarning, stacklevel=3)
        return report, None

    weight = linear_weight(module).detach()
    key = id(input_stats)
    if spec.refinement != "none" and input_stats is not None:
        report.compensated = compensate
        if not compensate:  # not a residual writer: the whitened fit to its own input, no refinement
            spec = dataclasses.replace(spec, refinement="none")
    if (spec.refinement == "closed-form" and input_stats is not None and input_stats.gram_sum is not None
            and _takes_output_gram(spec, config, (out_features, in_features), refined=True)):
        return _refined_from_output_gram(report, weight, bias, rank, spec, config, input_stats, target_energy,
                                         heldout_energy, plain_rows, last_use)
    if (spec.refinement == "none" and input_stats is not None and input_stats.gram_sum is not None
            and _takes_output_gram(spec, config, (out_features, in_features), refined=False)):
        with phase("svd"):
            gram = output_gram(weight, input_stats.gram, config.torch_compute_dtype)
            if last_use and _stored_exactly(weight.dtype):
                input_stats.release_gram()  # H is read: the eigen-decomposition runs without it
            factors = factorize_output_gram(weight, gram, rank)
            del gram
        return _swap_in(report, weight, bias, factors.up, factors.down, None, "output-gram",
                        _dropped_relative(factors), input_stats, target_energy)
    # No whole copy of W in the compute dtype: the factorization, the refinement's products and the
    # held-out scores convert it a row block at a time (0.36 GB less at 4096 × 11008 in float64).
    # Validation first when it does not need the whole-data factors (the truncation-aware start is
    # refitted on the fit split anyway): then the fit split's factor and the held-out sums are gone
    # before the whole data's factor exists — at the widest input one n×n float64 matrix less at the
    # peak, three once H_cc can be released (`_factor_replaces_gram`).
    validated: tuple[int | None, bool] | None = None
    kept = torch.empty(0, dtype=torch.long)
    if (spec.validates_refinement and spec.whitening == "truncation-aware" and spec.form == "low-rank"
            and input_stats is not None):
        validated = _validate_refinement(spec, config, weight, input_stats, kept, target_energy, heldout_energy, rank,
                                         None, None, holdout_cache, report, plain_rows)
        if last_use:
            if holdout_cache is not None:
                holdout_cache.pop(key, None)
            input_stats.release_heldout()
    # A writer's held-out rows still to validate on need H_cc for the fit split (`core.writer_heldout`).
    pending = (spec.validates_refinement and spec.refinement != "none" and validated is None
               and plain_rows is not None)
    with phase("whitening"):
        if whitenings is not None and key in whitenings:
            whitening = whitenings[key]
        else:
            whitening = spec.make_whitening(input_stats, damping=config.damping,
                                            overwrite=last_use and _may_overwrite_gram(spec, input_stats, weight,
                                                                                       pending))
            if whitenings is not None:
                whitenings[key] = whitening
    kind = whitening.kind
    if last_use and _factor_replaces_gram(spec, whitening, input_stats, weight, pending):
        input_stats.release_gram()
    # The optimal refinement replaces the whitened SVD's factors outright: no need to compute them.
    skip_svd = spec.refinement == "optimal" and spec.form == "low-rank" and input_stats is not None
    factors = None
    if not skip_svd:
        with phase("svd"):
            factors = factorize(weight, rank, whitening, compute_dtype=config.torch_compute_dtype,
                                driver=config.svd_driver, keep_whitened=spec.refinement != "none")
    up, down = (factors.up, factors.down) if factors is not None else (None, None)
    split = None
    if spec.form == "column-preserving" and input_stats is not None:
        with phase("columns", absorb=True):
            split = column_preserving_factorize(
                weight, rank, input_stats.gram,
                lambda cols: spec.make_whitening(input_stats, damping=config.damping, columns=cols),
                base=factors, min_gain=spec.column_min_gain, driver=config.svd_driver,
            )
            if (split is not None and spec.refinement != "none" and factors is not None
                    and not _split_pays_after_compensation(spec, config, weight, input_stats, split, factors,
                                                           target_energy, plain_rows)):
                report.refused_columns = split.kept.numel()
                split = None
        if split is not None:
            up, down, kept = split.up, split.down, split.kept
    known_error: float | None = None  # relative output error, when the factorization already knows it
    if spec.refinement != "none" and input_stats is not None:
        with phase("refinement", absorb=True):
            # A Cholesky whitening factors H_cc (+ its damping shift): refine in whitened coordinates.
            factored = split is None and isinstance(whitening, CholeskyWhitening)
            target = RefinementTarget(weight, input_stats.grams(), kept=kept, damping=config.damping,
                                      target_energy=target_energy,
                                      whitening_factor=whitening.factor if factored else None,
                                      whitening_shift=whitening.shift if factored else 0.0)
            r = rank if up is None else up.shape[1]
            steps, optimal_validates = validated or (None, True)
            if spec.validates_refinement and validated is None:
                steps, optimal_validates = _validate_refinement(spec, config, weight, input_stats, kept, target_energy,
                                                                heldout_energy, r, up, down, holdout_cache, report,
                                                                plain_rows)
            if spec.refinement == "optimal" and optimal_validates:
                up, down, value = optimal_factors(target, r, driver=config.svd_driver)
                report.refinement_steps = 1
            elif spec.refinement == "optimal":  # the held-out sequences prefer the whitened start
                if up is None:
                    with phase("svd"):
                        factors = factorize(weight, r, whitening, compute_dtype=config.torch_compute_dtype,
                                            driver=config.svd_driver)
                    up, down = factors.up, factors.down
                value = objective(target, up.to(torch.float64), down.to(torch.float64))
            else:
                up, down, history = adacomp(
                    target, up, down, iterations=spec.adacomp_iterations, tolerance=spec.adacomp_tolerance,
                    v_steps=spec.refinement == "adacomp", whitened_down=factors.whitened_down if factored else None,
                    max_half_steps=steps,
                )
                report.refinement_steps = len(history) - 1
                value = history[-1]
                known_error = _relative(value, target.target_energy)
                # Nothing reads the statistics, the whitening or the whitened SVD any more: free them
                # before the balance's n×r work (at the widest input H_oc, the factor in H's storage and
                # the whitened factors: 2.3 GB at n = 11008).
                del target
                factors = None
                if last_use and _stored_exactly(weight.dtype):  # the report needs no Gram (`_swap_in`)
                    whitening = None
                    if whitenings is not None:
                        whitenings.pop(key, None)
                    input_stats.release_sums()
                # Refitted factors lose the whitened SVD's √Σ split; the optimal ones have it already.
                up, down = balance_factors(up, down)
            if known_error is None:
                known_error = _relative(value, target.target_energy)
    elif split is None and isinstance(whitening, CholeskyWhitening) and input_stats is not None:
        known_error = _whitened_truncation_error(factors, whitening, weight)
    elif split is None and isinstance(whitening, (IdentityWhitening, DiagonalWhitening)) and input_stats is not None:
        with phase("report"):
            if input_stats.output_sum is not None:  # the pass kept this target's outputs' Gram, not H
                known_error = projection_error_from_outputs(up, input_stats.output_gram)
            else:
                known_error = _projected_error(up, down, input_stats.grams(), target_energy)
    return _swap_in(report, weight, bias, up, down, split, kind, known_error, input_stats, target_energy)


def _refined_from_output_gram(report: ModuleReport, weight: torch.Tensor, bias: torch.Tensor | None, rank: int,
                              spec: MethodSpec, config: CompressionConfig, input_stats: InputStatistics,
                              target_energy: float | None, heldout_energy: float | None,
                              plain_rows: WriterHeldout | None, last_use: bool) -> tuple[ModuleReport, nn.Module]:
    """SVD-LLM's closed-form update from the output-Gram start, validated and fitted without H_cc.

    The truncation-aware start of a wide or square W is G = W·H_cc·Wᵀ's eigen-decomposition
    (`factorize_output_gram`), the same fit as the whitened SVD wherever H_cc is positive definite and
    the exact one where it is singular (the Cholesky route fits H_cc + s·I there). The U-step
    U = W·H_oc·Vᵀ·(V·H_cc·Vᵀ)⁻¹ needs V·H_cc·Vᵀ, which that start knows (diagonal), and W·H_oc·Vᵀ.
    The validation's fit split needs H_cc only as its G too, and that is G less the held-out tokens'
    part, formed from their rows or moments (`fit_split_output_gram`). So once G is formed nothing
    reads H_cc: it is freed (paired statistics; single-stream ones are H_oc too) before either
    eigen-decomposition, and neither a Cholesky factor (n³/3) nor the whitened start V·L (r·n²) is
    computed. At a 4096 × 11008 down_proj, H_cc is 0.97 GB of the run's memory peak.
    """
    dtype, n = config.torch_compute_dtype, input_stats.tokens
    held = plain_rows if (spec.validates_refinement and plain_rows is not None and plain_rows.weighted
                          and input_stats.heldout is None and target_energy is not None and heldout_energy
                          and 0 < plain_rows.tokens < n) else None
    steps = None
    if spec.validates_refinement and held is None:  # held-out Gram sums (or nothing to validate on): as before
        steps, _ = _validate_refinement(spec, config, weight, input_stats, torch.empty(0, dtype=torch.long),
                                        target_energy, heldout_energy, rank, None, None, None, report, plain_rows)
    with phase("svd"):
        gram = output_gram(weight, input_stats.gram, dtype)
        fit_gram = held.fit_split_output_gram(gram, weight, n) if held is not None else None
        if last_use and input_stats.cross_sum is not None and _stored_exactly(weight.dtype):
            input_stats.release_gram()  # nothing below reads H_cc (the report's error is the objective's)
    if held is not None:
        guard = held.scorer(weight)
        fit_energy = _fit_split_energy(target_energy, n, heldout_energy, held.tokens)
        whole = input_stats.grams()
        with phase("refinement", absorb=True), held.fit_split(None, whole.cross, n) as removed:
            fit = RefinementTarget(weight, GramStatistics(h_cc=None, h_oc=whole.h_oc, w_h_oc=whole.w_h_oc),
                                   damping=config.damping, target_energy=fit_energy, cross_removed=removed)
            with phase("svd"):
                start = factorize_output_gram(weight, fit_gram, rank)
            del fit_gram
            steps = _validated_half_steps(spec, (fit, guard.weighted, heldout_energy, start.up.to(torch.float64),
                                                 start.down.to(torch.float64), start.down_gram), report, guard)
            del fit, start
    with phase("svd"):
        factors = factorize_output_gram(weight, gram, rank)
        del gram
    with phase("refinement", absorb=True):
        target = RefinementTarget(weight, input_stats.grams(), damping=config.damping, target_energy=target_energy)
        up, down, history = adacomp(target, factors.up, factors.down, v_steps=False, max_half_steps=steps,
                                    down_gram=factors.down_gram)
        report.refinement_steps = len(history) - 1
        known_error = _relative(history[-1], target.target_energy)
        del target, factors
        if last_use and _stored_exactly(weight.dtype):
            input_stats.release_sums()  # before the balance's n×r work
        up, down = balance_factors(up, down)
    return _swap_in(report, weight, bias, up, down, None, "output-gram", known_error, input_stats, target_energy)


def _swap_in(report: ModuleReport, weight: torch.Tensor, bias: torch.Tensor | None, up: torch.Tensor,
             down: torch.Tensor, split: ColumnSplit | None, kind: str, known_error: float | None,
             input_stats: InputStatistics | None, target_energy: float | None) -> tuple[ModuleReport, nn.Module]:
    """The factorized module in the weight's dtype, and the report's rank, size and output error."""
    with phase("surgery"):
        b = bias.detach() if bias is not None else None
        if split is not None:
            new = ColumnPreservingLinear.from_parts(
                up.to(weight.device), down.to(weight.device), split.kept_weight.to(weight.device),
                split.kept.to(weight.device), split.rest.to(weight.device), b, dtype=weight.dtype,
            )
            report.kept_columns = split.kept.numel()
        else:
            new = LowRankLinear.from_factors(up.to(weight.device), down.to(weight.device), b, dtype=weight.dtype)
    report.rank = new.rank
    report.params_after = count_parameters(new)
    report.whitening = kind
    if input_stats is not None:
        with phase("report"):
            if known_error is not None and _stored_exactly(weight.dtype):
                report.relative_error = known_error
            else:  # e.g. bf16 factors: their rounding is part of the error, so measure the stored module
                report.relative_error = _output_error(weight, new.dense_weight().detach(), input_stats.grams(),
                                                      target_energy)
    return report, new


def _compress_block(
    model: nn.Module,
    block: nn.Module,
    targets: dict[str, nn.Module],
    inputs: list[BlockInput] | None,
    original_hidden: list[torch.Tensor] | None,
    paired: bool,
    ranks: dict[str, int | None],
    ctx: PlanContext,
    runner: BlockRunner,
    report: CompressionReport,
    heldout: list[torch.Tensor | None] | None = None,
) -> bool:
    """Statistics, factorization and surgery of one block; returns whether ``inputs`` already hold the
    next block's inputs.

    ``heldout``: per calibration batch, the sequences held out to validate the refinement (paired).
    Single-stream with ``propagation="original"``: the statistics pass's outputs are the next block's
    inputs, so each batch's output replaces its input as soon as the block has run on it. Nothing after
    the pass reads the block's inputs (the factorization reads the statistics), so no second copy of
    the calibration activations is kept and the block is not run again.

    The block's statistics live only inside this call, so at most one block's Gram matrices exist at
    any time (they are the largest float64 data of a run: n² per distinct linear input).
    """
    stats = None
    advanced = False
    if inputs is not None and paired and not targets:
        with phase("calibration"):  # nothing to compress here, but the dense stream still advances
            for b, inp in enumerate(inputs):
                original_hidden[b] = runner.keep(runner.run(block, inp, original_hidden[b]))
        return False
    if inputs is not None and targets and paired:
        _compress_block_paired(model, block, targets, inputs, original_hidden, ranks, ctx, runner, report, heldout)
        return False
    if inputs is not None and targets and _factors_read_no_data(ctx.spec, targets):
        return _factor_then_measure(model, block, targets, inputs, ranks, ctx, runner, report)
    if inputs is not None and targets:
        stats = BlockStatistics(targets, product_dtype=ctx.config.torch_statistics_dtype,
                                output_gram=_left_projections(ctx.spec, targets))
        advanced = ctx.spec.propagation == "original"
        # Without the outputs (the next block's inputs come from the compressed block's own pass), the
        # pass stops once every target has read its input — unless a target keeps its outputs' Gram.
        inputs_only = not advanced and not stats.keeps_output_grams
        with stats:
            _single_stream_pass(block, inputs, runner, stats, advanced, stop_after=targets if inputs_only else None)
    _factor_and_replace(model, targets, list(targets), stats, ranks, ctx, report)
    return advanced


def _single_stream_pass(block: nn.Module, inputs: list[BlockInput], runner: BlockRunner,
                        observer: BlockStatistics | ProjectionErrorMeter, advance: bool,
                        stop_after: dict[str, nn.Module] | None = None) -> None:
    """One pass of the dense block over every batch with ``observer``'s hooks seeing each batch's token
    mask; with ``advance`` (``propagation="original"``) each output replaces its batch's input at once,
    so no second copy of the activations is kept.

    ``stop_after``: each batch's forward ends as soon as every one of these modules has received its
    input (the observer's pre-hooks, registered earlier, have run), so the block's last target — down_proj
    in a Llama block — and whatever follows it are never computed. Like the staged passes
    (`input_stages`), it assumes that a target reads its input once per forward.
    """
    seen: set[str] = set()

    def arrive(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.add(name)
            if len(seen) == len(stop_after):
                raise StopForward
        return hook

    handles = [module.register_forward_pre_hook(arrive(name)) for name, module in (stop_after or {}).items()]
    try:
        with phase("calibration"):
            for inp in inputs:
                seen.clear()
                with observer.masked(inp.mask):
                    try:
                        out = runner.run(block, inp)
                    except StopForward:
                        continue
                if advance:
                    inp.hidden = runner.keep(out)
                del out
    finally:
        for handle in handles:
            handle.remove()


def _left_projections(spec: MethodSpec, targets: dict[str, nn.Module]) -> list[str]:
    """The targets whose factors will be left projections W′ = U_r U_rᵀ·W (plain or activation-scaled
    SVD, low-rank, unrefined) stored exactly: their report can be read off their outputs' Gram
    (`projection_error_from_outputs`), which `BlockStatistics` keeps for a wide one reading its input
    alone instead of that input's larger H. Nothing else reads those statistics but the activation
    scales. bf16 factors are no projection to the precision needed; they keep H for the Gram form."""
    if spec.whitening not in ("none", "activation-scale") or spec.form != "low-rank" or spec.refinement != "none":
        return []
    return [name for name, module in targets.items() if _stored_exactly(linear_weight(module).dtype)]


def _factors_read_no_data(spec: MethodSpec, targets: dict[str, nn.Module]) -> bool:
    """Whether the targets' factors are the same with or without calibration data (plain SVD), and
    stored exactly (float32/float64), so that the block's pass is needed only for the report's error
    and can read it off the energy the projection keeps (`_factor_then_measure`). In bf16 the Gram form
    stays: rounded factors are no projection to the precision that identity needs."""
    return (spec.whitening == "none" and spec.form == "low-rank" and spec.refinement == "none"
            and all(_stored_exactly(linear_weight(module).dtype) for module in targets.values()))


def _factor_then_measure(model: nn.Module, block: nn.Module, targets: dict[str, nn.Module],
                         inputs: list[BlockInput], ranks: dict[str, int | None], ctx: PlanContext,
                         runner: BlockRunner, report: CompressionReport) -> bool:
    """Plain SVD's block: factor first, then one pass through the dense block measures the factors.

    The factors read no data, so the pass that used to precede them served only the report, through
    a Gram matrix per distinct input (n² flops per token, then r·n² per matrix). Built first, the
    factors let the pass sum the energy each projection keeps (`ProjectionErrorMeter`: r·n + r² flops
    per token), and the modules are swapped in after it. The block's outputs are the dense
    block's, as before, so ``propagation="original"`` still takes them as the next block's inputs.
    Returns whether ``inputs`` now hold the next block's inputs (`_compress_block`).
    """
    built = _factor_and_replace(model, targets, list(targets), None, ranks, ctx, report, swap=False)
    advanced = ctx.spec.propagation == "original"
    with ProjectionErrorMeter({name: (targets[name], new) for name, new in built.items()}) as meter:
        _single_stream_pass(block, inputs, runner, meter, advanced)
    errors = meter.relative_errors()
    module_reports = {module_report.name: module_report for module_report in report.modules[-len(targets):]}
    with phase("surgery"):
        for name, new in built.items():
            module_reports[name].relative_error = errors[name]
            replace_module(model, name, new)
    return advanced


def _factor_and_replace(
    model: nn.Module,
    targets: dict[str, nn.Module],
    names: list[str],
    stats: BlockStatistics | None,
    ranks: dict[str, int | None],
    ctx: PlanContext,
    report: CompressionReport,
    compensated: set[str] | None = None,
    swap: bool = True,
) -> dict[str, nn.Module]:
    """Factor ``names`` (a subset of the block's ``targets``, in order) and swap the results in.

    ``compensated``: with paired statistics, the targets whose refinement may chase the dense outputs
    (the residual writers, `core.residual`); the others keep their start. None: every target.
    ``swap=False``: build the modules (on every process) but leave the dense ones in the model.
    Returns name → new module for the targets that were factorized (the others stay dense).
    """
    if stats is not None:
        stats.all_reduce()
        stats.finalize()
    # Each rank factors its round-robin share of the targets (by their index in the block, so the
    # assignment does not depend on how the block is staged); results are broadcast.
    rank_id, world_size = world()
    index = {name: i for i, name in enumerate(targets)}
    whitenings: dict[int, Whitening] = {}
    holdout_cache: dict[int, Whitening] = {}
    order = _freed_widest_first(names, targets, stats, ctx, compensated)
    # A shared input's statistics and whitening are dropped after the last target this rank factors
    # with them, so later targets run without that group's n² data.
    mine = [name for name in order if index[name] % world_size == rank_id]
    last_use = {stats.leader(name): name for name in mine} if stats is not None else {}
    replaced: dict[str, nn.Module] = {}
    reports: dict[str, ModuleReport] = {}
    for name in order:
        module = targets[name]
        owner = index[name] % world_size
        new, module_report = None, None
        if rank_id == owner:
            input_stats = stats.for_module(name) if stats is not None else None
            energy = stats.target_energy(name) if stats is not None else None
            held_energy = stats.target_energy(name, heldout=True) if stats is not None else None
            last = stats is not None and last_use.get(stats.leader(name)) == name
            compensate = compensated is None or name in compensated
            plain_rows = stats.writer_heldout(name) if stats is not None and compensate else None
            module_report, new = _factorize_target(name, module, ranks[name], ctx, input_stats, whitenings, energy,
                                                   last_use=last, heldout_energy=held_energy,
                                                   holdout_cache=holdout_cache, compensate=compensate,
                                                   plain_rows=plain_rows)
            plain_rows = None
            if last:
                whitenings.pop(id(input_stats), None)
                holdout_cache.pop(id(input_stats), None)
                stats.release(name)
            input_stats = None
        ref = next(module.parameters())
        with phase("surgery"):
            new, module_report = share_module(new, module_report, owner, ref.device, ref.dtype)
            if new is not None:
                new.train(module.training)
                if swap:
                    replace_module(model, name, new)
                replaced[name] = new
        reports[name] = module_report
    report.modules.extend(reports[name] for name in names)  # in the block's order, whatever ran first
    return replaced


def _freed_widest_first(names: list[str], targets: dict[str, nn.Module], stats: BlockStatistics | None,
                        ctx: PlanContext, compensated: set[str] | None) -> list[str]:
    """The order to factor ``names`` in: input groups whose every member takes the output-Gram route
    (`_takes_output_gram`) first, widest input first, then the rest in the block's order.

    Why: all of a block's statistics exist when its first target is factorized. A group on the output-
    Gram route frees its H once the last member's G = W·H·Wᵀ is formed, before that member's eigen-
    decomposition; taking the widest such group first (down_proj: n = 11008 at Llama-7B width, H 970 MB)
    means no decomposition of the block runs while that H is alive. In the block's own order down_proj
    comes last and every other target's decomposition ran next to it. The order depends only on the
    method and the shapes, so every rank walks the same sequence (`share_module`).
    """
    if stats is None:
        return names
    spec, config = ctx.spec, ctx.config
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(stats.leader(name), []).append(name)

    def freed(group: list[str]) -> bool:
        return all(_takes_output_gram(spec, config, linear_shape(targets[name]),
                                      refined=spec.refinement != "none"
                                      and (compensated is None or name in compensated))
                   and _stored_exactly(next(targets[name].parameters()).dtype) for name in group)

    first = sorted((g for g in groups.values() if freed(g)), key=lambda g: -linear_shape(targets[g[0]])[1])
    early = {name for g in first for name in g}
    return [name for g in first for name in g] + [name for name in names if name not in early]


def input_stages(block: nn.Module, targets: dict[str, nn.Module], inp: BlockInput, runner: BlockRunner) -> list[list[str]]:
    """The block's targets grouped by shared input tensor, in the order its forward reaches them.

    Found by running the block on one batch with hooks that record each target's first call and its
    input tensor (targets fed the very same tensor — q/k/v, gate/up — form one stage). The forward
    stops as soon as every target has been called. Targets the forward never reaches come last, each
    on its own (their statistics then report that no input reached them).
    """
    stages: list[list[str]] = []
    inputs: list[torch.Tensor] = []  # held, so no freed buffer is reused and mistaken for a shared input
    seen: set[str] = set()

    def make(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name in seen:
                return
            seen.add(name)
            x = args[0] if args else None
            for stage, first in zip(stages, inputs):
                if x is not None and first is x:
                    stage.append(name)
                    break
            else:
                stages.append([name])
                inputs.append(x)
            if len(seen) == len(targets):
                raise StopForward
        return hook

    handles = [module.register_forward_pre_hook(make(name)) for name, module in targets.items()]
    try:
        runner.run(block, inp)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return stages + [[name] for name in targets if name not in seen]


def _compress_block_paired(
    model: nn.Module,
    block: nn.Module,
    targets: dict[str, nn.Module],
    inputs: list[BlockInput],
    original_hidden: list[torch.Tensor],
    ranks: dict[str, int | None],
    ctx: PlanContext,
    runner: BlockRunner,
    report: CompressionReport,
    heldout: list[torch.Tensor | None] | None = None,
) -> None:
    """Paired statistics and factorization of one block, one input stage at a time; advances the dense stream.

    The compensating refinements fit each target to the dense model's outputs *from the inputs it will
    see in the compressed model*. Inside a block those inputs depend on the targets that run before it:
    o_proj reads the attention of the compressed q/k/v, down_proj the activations of the compressed
    gate/up. So the block is processed in stages (`input_stages`): the statistics of a stage are
    collected with every earlier stage already replaced by its factors (compressed stream) and with the
    dense modules swapped back in (dense stream), then the stage is factorized and swapped in.

    Collecting all of a block's statistics in one pass before any replacement — the compressed stream
    then runs the *dense* q/k/v and gate/up — fits o_proj and down_proj to inputs the compressed model
    never produces: the compensation learnt for them does not transfer to the real inputs and, on a
    real LLM, makes their output error worse than no compensation at all.

    The dense stream's pass stops once the stage's last target has computed its output (the writers'
    dense energy, refinement's ‖Y‖²), except in the last stage, where it runs to the end of the block to
    advance the dense stream; the compressed stream's pass stops before the stage's targets compute.
    """
    stages, writers = _block_structure(block, targets, inputs[0], original_hidden[0], runner)
    if not writers:
        warnings.warn("a decoder block has no target whose output is added to the residual stream (normalised "
                      "before the addition, or parallel attention and MLP?): its targets are fitted without "
                      "compensation", CompressionWarning, stacklevel=4)
    sources = {name: block.get_submodule(w.source) if w.source else None for name, w in writers.items()}
    held_tokens = _heldout_token_count(inputs, heldout) if heldout is not None else None
    dense = dict(targets)
    replaced: dict[str, nn.Module] = {}

    def use(modules: dict[str, nn.Module]) -> None:
        for name, module in modules.items():
            replace_module(model, name, module)

    try:
        for position, stage in enumerate(stages):
            final = position == len(stages) - 1
            stage_targets = {name: targets[name] for name in stage}
            # Only residual writers chase the dense outputs: a stage without one needs no dense pass
            # (except the last, which advances the dense stream) and no cross statistics.
            paired_stage = any(name in writers for name in stage)
            stats = BlockStatistics(stage_targets, product_dtype=ctx.config.torch_statistics_dtype,
                                    holdout=heldout is not None and paired_stage,
                                    residual_sources={n: sources[n] for n in stage if n in sources},
                                    heldout_tokens=held_tokens, shared_input=not paired_stage)
            last = targets[stage[-1]]  # members share one input and run back to back
            # The compressed stream's statistics are inputs only, so its pass stops before the stage's
            # targets compute outputs nobody reads: a stage without a writer before its first target
            # (q/k/v and gate/up, 63 % of a SmolLM2 block's multiply-adds; their reports read spectra,
            # or the Gram), a paired stage before its last, as always (a writer reads its input alone).
            halt = last if paired_stage else targets[stage[0]]

            def stop(module, args, output=None):
                raise StopForward

            with stats, phase("calibration"):
                for b, inp in enumerate(inputs):
                    with stats.masked(inp.mask, heldout[b] if heldout is not None and paired_stage else None,
                                      original_hidden[b]):
                        if paired_stage or final:
                            use({name: dense[name] for name in replaced})
                            stats.mode = "original" if paired_stage else "idle"
                            if final:
                                original_hidden[b] = runner.keep(runner.run(block, inp, original_hidden[b]))
                            else:
                                _run_until(runner, block, inp, last, stop, original_hidden[b])
                            use(replaced)
                        stats.mode = "compressed" if paired_stage else "single"
                        _run_until(runner, block, inp, halt, stop, before=True)
            if final:
                # No later pass runs the dense stream through the stages already replaced, so their
                # dense modules are not kept through the last stage's factorization (q/k/v/o and
                # gate/up at Llama-7B width: 0.63 GB next to down_proj's statistics).
                for name, new in replaced.items():
                    dense.pop(name, None)
                    targets[name] = new  # the block's order (and each target's rank) stays
            replaced.update(_factor_and_replace(model, targets, stage, stats, ranks, ctx, report,
                                                compensated=set(writers)))
    finally:
        use(replaced)  # whatever happened, the block holds the factors computed so far


def _is_paired(spec: MethodSpec) -> bool:
    """Whether a calibrated run keeps the dense stream next to the compressed one (fits to the dense
    outputs on the compressed model's inputs)."""
    return spec.refinement != "none" and spec.propagation == "compressed"


def _heldout_token_count(inputs: list[BlockInput], heldout: list[torch.Tensor | None]) -> int:
    """Held-out tokens over every process's batches (padding excluded): it picks the form a writer's
    held-out data is kept in (`core.writer_heldout.rows_are_smaller`), the same on every process."""
    count = 0
    for inp, rows in zip(inputs, heldout):
        if rows is None or not bool(rows.any()):
            continue
        if inp.mask is not None:
            count += int(inp.mask[rows.to(inp.mask.device)].bool().sum())
        else:
            count += int(rows.sum()) * int(inp.hidden.shape[1])
    return int(all_reduce_sum([float(count)], device=inputs[0].hidden.device)[0])


def _block_structure(block: nn.Module, targets: dict[str, nn.Module], inp: BlockInput, hidden: torch.Tensor,
                     runner: BlockRunner) -> tuple[list[list[str]], dict[str, ResidualWriter]]:
    """(input stages, residual writers) of the dense block, learnt on the first sequence of a batch.

    Both are facts about the block's forward, not about the data, so one sequence tells them as well
    as the batch does, for an eighth of the two block runs (on SmolLM2 these two runs were 13 % of
    `svd-llm`'s time, more than the svd phase). A block that cannot run on the cut input
    (`first_sequences`) is asked again on the whole batch.
    """
    def ask(probe: BlockInput, probe_hidden: torch.Tensor):
        def run() -> torch.Tensor:
            out = runner.run(block, probe, probe_hidden)
            if out.shape[:1] != probe_hidden.shape[:1]:  # an argument the cut missed broadcast the rows back
                raise ValueError(f"the block returned {out.shape[0]} sequences for {probe_hidden.shape[0]}")
            return out

        return input_stages(block, targets, probe, runner), find_residual_writers(block, targets, probe_hidden, run)

    cut = first_sequences(inp, hidden)
    if cut is not None:
        try:
            return ask(*cut)
        except Exception as error:  # noqa: BLE001 — the block reads the batch in a way the cut does not follow
            warnings.warn(f"the block's structure is learnt on the whole first batch, not on one sequence "
                          f"({type(error).__name__}: {error}); same result, more time", CompressionWarning,
                          stacklevel=4)
    return ask(inp, hidden)


def _run_until(runner: BlockRunner, block: nn.Module, inp: BlockInput, module: nn.Module, stop,
               hidden: torch.Tensor | None = None, before: bool = False) -> None:
    """Run ``block`` on a batch until ``module`` has produced its output (the rest of the block is skipped);
    ``before``: until its input hooks have run (registered later, ``stop`` runs after them)."""
    handle = module.register_forward_pre_hook(stop) if before else module.register_forward_hook(stop)
    try:
        runner.run(block, inp, hidden)
    except StopForward:
        pass
    finally:
        handle.remove()


def _heldout_sequences(calibration: Sequence[Any], spec: MethodSpec, report: CompressionReport,
                       device: torch.device) -> list[torch.Tensor | None] | None:
    """Per calibration batch, the sequences held out to validate the refinement (`core.holdout`).

    Counted over all processes; none held out (a tiny calibration set) is said, not silently skipped.
    """
    if not spec.validates_refinement:
        return None
    rows = [heldout_rows(batch, spec.heldout_fraction) for batch in calibration]
    counts = [float(sum(int(r.sum()) for r in rows if r is not None)),
              float(sum(int(r.numel()) for r in rows if r is not None))]
    held, total = (int(v) for v in all_reduce_sum(counts, device=device))
    report.heldout_sequences = held
    if held == 0 or held == total:
        warnings.warn(f"{spec.name}: {held} of the {total} calibration sequences were held out "
                      f"(heldout_fraction {spec.heldout_fraction}), which leaves nothing to validate the refinement "
                      "on or nothing to fit it to; every refinement step is taken unvalidated — use more "
                      "calibration sequences", CompressionWarning, stacklevel=3)
        return None
    return rows


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
    if calibration and spec.refinement != "none" and spec.propagation == "original":
        # Said, not ignored: with both streams the dense model's, the refinement has no earlier
        # blocks' error to compensate; it can only move a damped or column-restricted start.
        warnings.warn(f"refinement {spec.refinement!r} with propagation='original' fits each block to the dense "
                      "model's outputs on the dense model's inputs, where the whitened fit is already optimal; "
                      "use propagation='compressed' for it to compensate the earlier blocks' errors",
                      CompressionWarning, stacklevel=2)
    plan = find_targets(model, config.selector)
    _, blocks = find_decoder_blocks(model)
    shapes = [MatrixShape(name, *linear_shape(m)) for _, _, targets in plan for name, m in targets.items()]
    report = CompressionReport(method=spec.name, ratio=config.ratio, parameters_before=count_parameters(model),
                               budget_parameters=budget_for_ratio(shapes, config.ratio),
                               propagation=spec.propagation if calibration else "")

    was_training = model.training
    model.eval()
    timer = active_timer()
    own_timer = timer is None
    if own_timer:
        timer = PhaseTimer().__enter__()
    before = dict(timer.seconds)
    runner = BlockRunner.for_device(config.execution_device, config.activation_dir)
    threads = decomposition_threads(config.decomposition_threads)
    threads.__enter__()
    try:
        inputs: list[BlockInput] | None = None
        if calibration:
            with phase("calibration"):
                inputs = capture_block_inputs(model, blocks[0], calibration, keep=runner.keep)
            # Refuse (activations in files) or warn about (in memory) what will not fit: an allocation's
            # dense pass holds two more streams than the captured one (its inputs and outputs), the paired
            # dense stream one, and a batch being replaced one batch more.
            captured = [i.hidden.numel() * i.hidden.element_size() for i in inputs]
            streams = 2 if spec.allocation != "uniform" else 1 if _is_paired(spec) else 0
            further = streams * sum(captured) + max(captured)
            runner.store.check_room(further)
            advice = runner.store.memory_advice(further)
            if advice is not None:
                warnings.warn(advice, CompressionWarning, stacklevel=2)
            local_tokens = sum(
                int(i.mask.sum()) if i.mask is not None else i.hidden.shape[:-1].numel() for i in inputs
            )
            report.calibration_tokens = int(all_reduce_sum([float(local_tokens)], device=inputs[0].hidden.device)[0])
            if progress:
                progress(ProgressEvent("calibrate", len(inputs), len(inputs)))
        ctx = PlanContext(model, blocks, plan, shapes, inputs, calibration, spec, config, progress, runner)
        with phase("allocation", absorb=True):
            ranks, report.allocation = plan_ranks(ctx)

        paired = inputs is not None and _is_paired(spec)
        original_hidden = [inp.hidden for inp in inputs] if paired else None
        heldout = _heldout_sequences(calibration, spec, report, inputs[0].hidden.device) if paired else None
        for index, block_name, targets in plan:
            block = blocks[index]
            with runner.resident(block):
                advanced = _compress_block(model, block, targets, inputs, original_hidden, paired,
                                           ranks, ctx, runner, report, heldout)
                if inputs is not None and index + 1 < len(blocks) and not advanced:
                    with phase("calibration"):
                        for inp in inputs:  # one batch at a time: no second full copy
                            inp.hidden = runner.keep(runner.run(block, inp))
            # The plan holds the dense modules it found; once swapped out they must not stay alive,
            # or the run would end holding the dense and the compressed model side by side.
            targets.clear()
            runner.store.release_all()
            release_free_heap()
            if progress:
                progress(ProgressEvent("block", index + 1, len(plan), block_name))
    finally:
        threads.__exit__(None, None, None)
        model.train(was_training)
        if own_timer:
            timer.__exit__(None, None, None)
    report.phase_seconds = {k: v - before.get(k, 0.0) for k, v in timer.seconds.items() if v - before.get(k, 0.0) > 0}
    report.parameters_after = count_parameters(model)
    report.seconds = time.perf_counter() - start
    return report
