"""Compression methods as compositions of small strategies, and the named presets.

A method = (whitening, allocation, factorization form, refinement), all sharing the same block-by-block
pipeline, statistics, rank arithmetic and module surgery, so comparisons isolate the method itself.

* whitening — how a matrix is measured before truncation:
  ``none`` (plain SVD), ``activation-scale`` (ASVD: input channels scaled by (mean |x_j|)^α),
  ``truncation-aware`` (SVD-LLM: Cholesky of H = XXᵀ with a fallback chain).
* allocation — how the parameter budget is split between matrices (:mod:`.allocation`):
  ``uniform``, ``adacr`` (AdaSVD), ``grouped-loss`` (SVD-LLM V2), ``module-kl`` (Duo-SVD, exact
  probes), ``module-kl-fisher`` (its second-order estimate, :mod:`.fisher`), ``sensitivity-ppl`` (ASVD-style).
* form — ``low-rank`` or ``column-preserving`` (Duo-SVD, :mod:`.columns`).
* refinement — ``none``, ``closed-form`` (SVD-LLM's U update), ``adacomp`` (AdaSVD's alternating U/Vᵀ
  refinement), ``optimal`` (the limit of that alternation in closed form: the rank-r minimiser of the
  output error against the dense model, one SVD of the whitened target G·L⁻ᵀ), all against the dense
  model's outputs in exact Gram form (:mod:`.refinement`).
* propagation — which inputs block i+1 is calibrated on: ``compressed`` (the outputs of the already
  compressed blocks: SVD-LLM's sequential scheme) or ``original`` (the dense model's activations, as
  ASVD collects them). ``original`` runs each block once; ``compressed`` runs it a second time,
  compressed, to produce the next block's inputs, and fits each block to the inputs it will see.

Presets (see the README's method table for sources and knobs):

| preset       | whitening        | allocation              | form              | refinement  | propagation |
|--------------|------------------|-------------------------|-------------------|-------------|-------------|
| `svd`        | none             | uniform                 | low-rank          | none        | original    |
| `asvd`       | activation-scale | uniform                 | low-rank          | none        | original    |
| `svd-llm`    | truncation-aware | uniform                 | low-rank          | closed-form | compressed  |
| `svd-llm-w`  | truncation-aware | uniform                 | low-rank          | none        | compressed  |
| `svd-llm-v2` | truncation-aware | grouped-loss            | low-rank          | none        | compressed  |
| `adasvd`     | truncation-aware | adacr                   | low-rank          | adacomp     | compressed  |
| `duo-svd`    | truncation-aware | module-kl-fisher (tail) | column-preserving | none        | compressed  |
| `adasvd-duo` | truncation-aware | module-kl-fisher        | column-preserving | closed-form | compressed  |

The module-KL presets estimate each module's KL cost table (``module-kl-fisher``: an output-Fisher
estimate read off one whitened SVD per target). ``duo-svd`` also probes a module once, at its deepest
candidate (``fisher_scale=tail``, on the first 4 probe sequences: ``tail_sequences``), to lift the rows
that leave the estimate's quadratic regime — only the modules the knapsack would cut below their
baseline, where a lift can change the allocation (121 of 210 on SmolLM2-135M at 40 %, the same
allocation as probing all of them). A probe runs the rest of the model as the allocation's baseline
leaves it, uncompensated, which is what ``duo-svd`` ships. ``adasvd-duo`` takes the estimate alone: its
U-step refits each block's residual writers to the dense outputs, and the writer absorbs most of what a
deep truncation of the targets it reads costs. On SmolLM2-135M, with gate_proj at 10 % of its
parameters, down_proj at 60 % and the rest of the model dense, down_proj's U-step takes the KL that
truncation adds from 0.14 to 0.023 (block 17) and from 0.32 to 0.052 (block 6), where the tail probes
had lifted those rows to 15–23× their estimate. The estimate alone reads 36.75 / 70.80 / 109.56 at
20 / 40 / 60 % against 37.30 / 71.63 / 124.06 with the tail, in 0.7 of its time; tail probes that refit
the writer (tried ad hoc) read 73.17 / 114.06 at 40 / 60 % (BENCHMARKS.md, "Tail probes overstate what
a compensated preset pays").
Why not the exhaustive probes (``allocation=module-kl``: every candidate of every module, 2,100
suffix forwards and about 5 hours for SmolLM2-135M on one CPU core)? On SmolLM2-135M at 40 % their
complete table gave the worst allocation of the three: ``duo-svd`` 90.30 and ``adasvd-duo`` 105.67,
against 77.76 and 72.32 with the tail on all 16 probe sequences, 78.35 and 71.63 on the first 4 (the
estimate alone: 103.90 and 70.80). Its attention rows are mostly probe noise at
4,096 probe tokens, which a knapsack takes at face value. On the reference model the exhaustive probes
are better (``adasvd-duo`` 77.35 vs 82.14 at 40 %), but that model is trained on its own calibration
text. Both remain options (BENCHMARKS.md, "The exhaustive module-KL table on SmolLM2-135M").
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

import torch

from .errors import InvalidInputError
from .statistics import InputStatistics
from .whitening import DiagonalWhitening, IdentityWhitening, Whitening, compute_whitening, overwrote

__all__ = ["MethodSpec", "PRESETS", "get_method", "WHITENINGS", "ALLOCATIONS", "FORMS", "REFINEMENTS",
           "PROPAGATIONS"]

WHITENINGS = ("none", "activation-scale", "truncation-aware")
ALLOCATIONS = ("uniform", "adacr", "grouped-loss", "module-kl", "module-kl-fisher", "sensitivity-ppl")
FORMS = ("low-rank", "column-preserving")
REFINEMENTS = ("none", "closed-form", "adacomp", "optimal")
FISHER_SCALES = ("probed", "tail", "none")
PROPAGATIONS = ("compressed", "original")


def _choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidInputError(f"unknown {field} {value!r}{hint}; choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class MethodSpec:
    """One compression method: its strategies and their knobs.

    Knobs:
        asvd_alpha: ASVD's activation exponent α.
        adacomp_iterations / adacomp_tolerance: τ and the relative early-stop threshold of adaComp.
        adacr_min_retention: adaCR's minimum retention ratio mrr as a fraction of the target retention
            trr (mrr = adacr_min_retention · trr); the paper's value is not public.
        column_min_gain: Duo-SVD keeps a column split only if the error drops by more than this.
        sensitivity_candidates: candidate retentions probed by module-kl / sensitivity-ppl (or estimated
            by module-kl-fisher).
        sensitivity_batches: calibration batches used for the sensitivity probes (module-kl-fisher: for
            its backward passes).
        fisher_samples: module-kl-fisher's label draws per sequence (one backward each) for the
            expectation over the model's own predictions in the Fisher information.
        fisher_scale: ``none`` — module-kl-fisher uses the estimate alone; ``probed`` — it measures each
            module's KL at two candidates (its lowest and highest retention, with the other targets at
            their uniform baseline, as the exact probes do) and scales the estimate's two sides to them
            (closer to the probes on the reference model, worse on SmolLM2-135M: BENCHMARKS.md);
            ``tail`` — it probes each module once, at its deepest truncation, and lifts the rows whose
            probe exceeds the estimate by a fourth-order term fitted to it (`planning.tail_row`).
        tail_tolerance: a ``tail`` probe reads the probe sequences one at a time and, when this is
            positive, stops once the standard error of its mean is at most this share of the larger of
            the mean and the estimate it is compared with (after at least `planning.TAIL_MIN_SEQUENCES`).
            0 (the default) reads them all: on SmolLM2-135M a probe's standard error at all 16
            sequences is still 25 % of that (median), and 0.1 read 4 % fewer sequences for a 0.6 %
            worse perplexity (BENCHMARKS.md, "Cheaper tail probes").
        tail_sequences: the most probe sequences a ``tail`` probe reads (the first ones; under a process
            group rounded up to a whole step of one sequence per process); 0 reads them all. `duo-svd`
            reads 4. A lift matters where a deep truncation costs several times its estimate,
            and there every sequence shows it: on SmolLM2-135M the 8 MLP probes that average 9–23× their
            estimate are at least 3× above it on each of the 16 probe sequences. At 40 % the first four
            sequences give `duo-svd` 78.35 (`adasvd-duo` with the tail: 71.63) against 77.76 and 72.32
            with all 16, for a quarter of the probes' time (BENCHMARKS.md, "Tail probes on four sequences").
        heldout_fraction: share of the calibration sequences held out to choose how many refinement
            steps to take (closed-form / adaComp, `core.refinement.validated_steps`; for ``optimal``:
            whether to take it; `core.holdout`); 0 trusts every step. The held-out sequences still count in every statistic of the final fit.
        propagation: the method's calibration scheme across blocks (module docstring);
            `CompressionConfig.propagation` overrides it. A refinement fits against the dense model's
            outputs on the compressed stream's inputs, so it pairs the two streams only under
            ``compressed``; under ``original`` both are the dense model's and it has no mismatch to
            correct.
    """

    name: str
    whitening: str = "truncation-aware"
    allocation: str = "uniform"
    form: str = "low-rank"
    refinement: str = "none"
    source: str = ""
    asvd_alpha: float = 0.5
    adacomp_iterations: int = 10
    adacomp_tolerance: float = 1e-4
    adacr_min_retention: float = 0.5
    column_min_gain: float = 0.01
    sensitivity_candidates: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    sensitivity_batches: int = 2
    fisher_samples: int = 1
    fisher_scale: str = "none"
    tail_tolerance: float = 0.0
    tail_sequences: int = 0
    heldout_fraction: float = 0.25
    propagation: str = "compressed"

    def __post_init__(self) -> None:
        _choice("whitening", self.whitening, WHITENINGS)
        _choice("allocation", self.allocation, ALLOCATIONS)
        _choice("form", self.form, FORMS)
        _choice("refinement", self.refinement, REFINEMENTS)
        _choice("propagation", self.propagation, PROPAGATIONS)
        if not 0.0 < self.asvd_alpha <= 2.0:
            raise InvalidInputError(f"asvd_alpha must be in (0, 2], got {self.asvd_alpha}")
        if self.adacomp_iterations < 1 or not 0 <= self.adacomp_tolerance < math.inf:
            raise InvalidInputError(
                f"adacomp_iterations must be >= 1 and adacomp_tolerance a finite number >= 0, got "
                f"{self.adacomp_iterations}, {self.adacomp_tolerance}"
            )
        if not 0.0 <= self.adacr_min_retention <= 1.0:
            raise InvalidInputError(f"adacr_min_retention must be in [0, 1], got {self.adacr_min_retention}")
        if not 0.0 <= self.column_min_gain < 1.0:
            raise InvalidInputError(f"column_min_gain must be in [0, 1), got {self.column_min_gain}")
        try:
            cands = tuple(float(c) for c in self.sensitivity_candidates)
        except (TypeError, ValueError):
            raise InvalidInputError(f"sensitivity_candidates must be numbers, got {self.sensitivity_candidates!r}") from None
        if not cands or any(not 0.0 < c <= 1.0 for c in cands):
            raise InvalidInputError("sensitivity_candidates must be retentions in (0, 1]")
        object.__setattr__(self, "sensitivity_candidates", cands)
        if self.sensitivity_batches < 1:
            raise InvalidInputError("sensitivity_batches must be >= 1")
        if self.fisher_samples < 1:
            raise InvalidInputError("fisher_samples must be >= 1")
        _choice("fisher_scale", self.fisher_scale, FISHER_SCALES)
        if not 0.0 <= self.tail_tolerance < math.inf:
            raise InvalidInputError(f"tail_tolerance must be a finite number >= 0, got {self.tail_tolerance}")
        if self.tail_tolerance > 0.0 and self.fisher_scale != "tail":
            # Said rather than ignored: only tail probes stop early.
            raise InvalidInputError(f"tail_tolerance={self.tail_tolerance} needs fisher_scale 'tail', "
                                    f"got {self.fisher_scale!r}")
        if self.tail_sequences < 0:
            raise InvalidInputError(f"tail_sequences must be >= 0 (0: all), got {self.tail_sequences}")
        if self.tail_sequences > 0 and self.fisher_scale != "tail":
            raise InvalidInputError(f"tail_sequences={self.tail_sequences} needs fisher_scale 'tail', "
                                    f"got {self.fisher_scale!r}")
        if self.fisher_scale != "none" and self.allocation != "module-kl-fisher":
            # Said rather than ignored: only the estimated table has a scale to set.
            raise InvalidInputError(f"fisher_scale={self.fisher_scale!r} needs allocation 'module-kl-fisher', "
                                    f"got {self.allocation!r}")
        if self.allocation == "module-kl-fisher" and self.whitening != "truncation-aware":
            # The closed form reads (W − W′)H(W − W′)ᵀ off the SVD of W·L with L Lᵀ = H; other
            # whitenings truncate a different matrix.
            raise InvalidInputError("allocation 'module-kl-fisher' needs whitening 'truncation-aware', got "
                                    f"{self.whitening!r}")
        if not 0.0 <= self.heldout_fraction <= 0.5:
            raise InvalidInputError(f"heldout_fraction must be in [0, 0.5], got {self.heldout_fraction}")

    @property
    def validates_refinement(self) -> bool:
        """Whether the refinement's step count is chosen on held-out calibration sequences."""
        return self.refinement != "none" and self.heldout_fraction > 0.0

    @property
    def probes(self) -> bool:
        """Whether the allocation measures modules with sensitivity probes (`core.planning`)."""
        return self.allocation in ("module-kl", "sensitivity-ppl") or (
            self.allocation == "module-kl-fisher" and self.fisher_scale != "none")

    @property
    def needs_calibration(self) -> bool:
        return (
            self.whitening != "none"
            or self.allocation != "uniform"
            or self.form != "low-rank"
            or self.refinement != "none"
        )

    def with_overrides(self, overrides: dict | None) -> "MethodSpec":
        """A copy with some strategies/knobs replaced (unknown keys are an error)."""
        if not overrides:
            return self
        names = {f.name for f in dataclasses.fields(self)} - {"name", "source"}
        for key in overrides:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise InvalidInputError(f"unknown method option {key!r}{hint}; options: {', '.join(sorted(names))}")
        fields = {f.name: f for f in dataclasses.fields(self)}
        for key, value in overrides.items():
            default = getattr(self, key)
            ok = (
                isinstance(value, str) if isinstance(default, str)
                else isinstance(value, (list, tuple)) if isinstance(default, tuple)
                else isinstance(value, int) and not isinstance(value, bool) if isinstance(default, int)
                else isinstance(value, (int, float)) and not isinstance(value, bool)
            )
            if not ok:
                raise InvalidInputError(
                    f"method option {key!r} expects {type(default).__name__} (field type {fields[key].type}), "
                    f"got {value!r}"
                )
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        if overrides.get("allocation", "module-kl-fisher") != "module-kl-fisher" and "fisher_scale" not in overrides:
            # The preset's scale belongs to its estimated table: another allocation has none to scale
            # (a fisher_scale given with it is still refused in __post_init__).
            overrides["fisher_scale"] = "none"
        if overrides.get("fisher_scale", self.fisher_scale) != "tail" and "tail_sequences" not in overrides:
            overrides["tail_sequences"] = 0  # the preset's cap belongs to its tail probes, as above
        return dataclasses.replace(self, name=f"{self.name}+custom", **overrides)

    def make_whitening(
        self, stats: InputStatistics | None, *, damping: float, columns: torch.Tensor | None = None,
        overwrite: bool = False,
    ) -> Whitening:
        """The whitening transform for one matrix (restricted to input ``columns`` when given).

        ``overwrite``: nothing reads H after this, so its Cholesky factor may take H's storage; the
        statistics then release H (`InputStatistics.release_gram`), as its factor now stands in for it.
        """
        if self.whitening == "none":
            return IdentityWhitening()
        if stats is None:
            raise RuntimeError(f"method {self.name!r} needs calibration statistics")
        if self.whitening == "activation-scale":
            scale = stats.mean_abs.clamp_min(1e-8).pow(self.asvd_alpha)
            return DiagonalWhitening(scale=scale if columns is None else scale[columns])
        if columns is not None:
            return compute_whitening(stats.gram[columns][:, columns], damping=damping,
                                     product_dtype=stats.product_dtype)
        gram = stats.gram
        whitening = compute_whitening(gram, damping=damping, product_dtype=stats.product_dtype,
                                      overwrite=overwrite and stats.normalized)
        if overwrote(whitening, gram):
            stats.release_gram()
        return whitening


PRESETS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        # Plain SVD reads no data: calibration only measures its errors for the report, so one pass.
        MethodSpec("svd", whitening="none", propagation="original", source="plain truncated SVD (baseline)"),
        # ASVD scales channels by activations collected on the original model in one pass.
        MethodSpec("asvd", whitening="activation-scale", propagation="original",
                   source="ASVD (Yuan et al., 2023), alpha = 0.5"),
        MethodSpec("svd-llm", refinement="closed-form",
                   source="SVD-LLM (Wang et al., 2024): truncation-aware whitening + closed-form U update"),
        # SVD-LLM's own code profiles the whitening on the original model; the sequential scheme costs a
        # second pass per block but gave 116.0 instead of 142.4 on SmolLM2-135M at 40 % (BENCHMARKS.md).
        MethodSpec("svd-llm-w", source="SVD-LLM whitening only (no parameter update)"),
        MethodSpec("svd-llm-v2", allocation="grouped-loss",
                   source="SVD-LLM V2 (Wang et al., 2025): loss-based ratios within same-type groups"),
        MethodSpec("adasvd", allocation="adacr", refinement="adacomp",
                   source="AdaSVD (Li et al., 2025): adaComp alternating refinement + adaCR layer ratios"),
        MethodSpec("duo-svd", allocation="module-kl-fisher", fisher_scale="tail", tail_sequences=4,
                   form="column-preserving",
                   source="Duo-SVD / CPSVD (arXiv 2510.19385): column preservation + module-level KL budget"),
        # Our combination. Measured on the reference model (BENCHMARKS.md): module-level KL allocation
        # beats adaCR's block heuristic by a wide margin, and adaComp's V-steps (which solve against the
        # n×n input Gram matrix) generalise slightly worse than its U-step alone (r×r solves), so the
        # combination keeps Duo-SVD's allocation and columns and adds the U-step compensation.
        # The estimate alone, no tail probes: a probe measures a truncation through uncompensated
        # writers, and this preset's U-steps absorb most of what it measures (module docstring).
        MethodSpec("adasvd-duo", allocation="module-kl-fisher",
                   form="column-preserving", refinement="closed-form",
                   source="this project: Duo-SVD columns + module-KL budget + error-compensating U update"),
    )
}


def get_method(name: str) -> MethodSpec:
    """Look up a preset by name; unknown names get a did-you-mean message."""
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidInputError(f"unknown method {name!r}{hint}; available: {', '.join(PRESETS)}") from None
