"""A residual writer's held-out calibration tokens: as rows, or as their moments, whichever is smaller.

Validating a writer's refinement (`core.refinement.validated_steps`) needs three things from the
held-out sequences (`core.holdout`): the statistics *without* them, to fit on (the fit split), the
weighted objective of candidate factors *on* them (the score), and their plain output error (the
guard, `core.plain_guard`). They used to come from two n×n float64 held-out sums per writer, H_cc and
H_oc (1.9 GB at Llama-7B's MLP width, n = 11008, alive next to the whole data's pair at the run's
memory peak, down_proj's validation), *plus* the held-out tokens as float32 rows for the guard.

Everything is a function of the held-out compressed inputs X_c (N_v × n), dense outputs Y = W·X_o
without bias (N_v × m) and each token's residual weight w_t (`core.residual`):

* score: Σ_t w_t ‖U V x_t − y_t‖² / N_v; guard: the same without w_t;
* the fit split's H_cc: (N·H_cc − Σ_t w_t x_t x_tᵀ) / (N − N_v);
* the fit split's H_oc is only ever used as W·H_oc (`core.refinement.RefinementTarget`), and over the
  held-out tokens W·H_oc is Σ_t w_t y_t x_tᵀ — the dense inputs X_o are not needed.

So a writer's held-out tokens go straight into the whole sums during calibration, and one of two
forms carries the rest:

* `HeldoutRows`: X_c, Y and √w as float32 rows, N_v·(n + m + 1)·4 bytes. Scores are one pass over the
  rows (both errors at once); the fit split subtracts X̃ᵀX̃ (X̃ = √w·X_c) in place and its W·H_oc
  correction Ỹᵀ·X̃ (Ỹ = √w·Y) is applied lazily. Small when few tokens are held out.
* `HeldoutMoments`: Σ w x xᵀ, Σ x xᵀ (n × n) and Σ w y xᵀ, Σ y xᵀ (m × n), float64, (2n² + 2mn)·8
  bytes whatever N_v is. Scores are the factored Gram objective. Small when many are held out: the
  rows of 256 × 2048 calibration tokens with a quarter held out are 7.9 GB at down_proj's width, the
  moments 2.7 GB.

`rows_are_smaller` picks the form per writer from the held-out token count, known before calibration.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .factorization import output_gram, times_converted
from .gram import accumulate_cross, accumulate_gram, mirror_lower, token_chunks
from .plain_guard import PlainHeldoutError
from .refinement import GramStatistics, RefinementTarget, objective

__all__ = ["HeldoutRows", "HeldoutMoments", "MomentsScorer", "WriterHeldout", "HeldoutScorer", "complement_rows",
           "rows_are_smaller"]


def rows_are_smaller(tokens: int, in_features: int, out_features: int) -> bool:
    """Whether ``tokens`` held-out rows (float32 X_c, Y, √w) take no more memory than the moments."""
    n, m = in_features, out_features
    return tokens * (n + m + 1) * 4 <= (2 * n * n + 2 * m * n) * 8


def _empty_kept() -> torch.Tensor:
    return torch.empty(0, dtype=torch.long)


@dataclass
class HeldoutRows:
    """A writer's held-out tokens, row for row (float32): compressed inputs X_c (N×n), dense outputs
    W·X_o without bias (N×m) and each token's √(residual weight) (N; None: unweighted)."""

    inputs: torch.Tensor
    outputs: torch.Tensor
    root_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.inputs.ndim != 2 or self.outputs.ndim != 2:
            raise ValueError("held-out inputs and outputs must be matrices of rows")
        rows = self.inputs.shape[0]
        if self.outputs.shape[0] != rows:
            raise RuntimeError(f"{rows} held-out input rows but {self.outputs.shape[0]} output rows")
        if self.root_weights is not None and tuple(self.root_weights.shape) != (rows,):
            raise RuntimeError(f"{rows} held-out rows but {tuple(self.root_weights.shape)} weights")

    @property
    def tokens(self) -> int:
        return self.inputs.shape[0]

    @property
    def weighted(self) -> bool:
        return self.root_weights is not None

    def _weighted(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.root_weights is None else rows * self.root_weights[:, None].to(rows.dtype)

    def scorer(self, weight: torch.Tensor, kept: torch.Tensor | None = None) -> PlainHeldoutError:
        """Plain (recorded) and weighted held-out errors of candidate factors, one pass for both."""
        return PlainHeldoutError(weight, self.inputs, self.outputs, kept=_empty_kept() if kept is None else kept,
                                 root_weights=self.root_weights)

    def fit_split(self, h_cc: torch.Tensor | None, h_oc: torch.Tensor, tokens: int):
        """`complement_rows` of these rows."""
        return complement_rows(h_cc, h_oc, tokens, self)

    def fit_split_output_gram(self, gram: torch.Tensor, weight: torch.Tensor, tokens: int) -> torch.Tensor:
        """The fit split's W·H_cc·Wᵀ from the whole data's ``gram`` (= W·H_cc·Wᵀ, mean over ``tokens``):
        (N·G − Z·Zᵀ)/(N − N_v) with Z = W·X̃ᵀ (m × N_v), so H_cc itself is not needed (a new m×m matrix).

        Z·Zᵀ is summed over row chunks (`token_chunks`): rows are kept up to the size of the moments
        (2.7 GB at down_proj's Llama-7B width), and neither their float64 copy nor all of Z may exist.
        """
        rest = _rest(self.tokens, tokens)
        fit = gram * (tokens / rest)
        start = 0
        for chunk in token_chunks(self.inputs, gram.dtype):
            x = chunk.to(gram.dtype)  # not in place below: float64 rows would be the rows themselves
            if self.root_weights is not None:
                x = x * self.root_weights[start:start + x.shape[0], None].to(x.dtype)
            start += x.shape[0]
            z = times_converted(weight, x.T)
            fit.addmm_(z, z.T, alpha=-1.0 / rest)
        return fit


def _rest(part: int, tokens: int) -> int:
    if not 0 < part < tokens:
        raise ValueError(f"a part of {part} tokens out of {tokens} leaves nothing to fit on")
    return tokens - part


@contextmanager
def complement_rows(h_cc: torch.Tensor | None, h_oc: torch.Tensor, tokens: int,
                    rows: HeldoutRows) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole data's mean Grams turned, in place and for the ``with`` body, into the fit split's:
    H_cc ← (N·H_cc − X̃ᵀX̃)/(N − N_v), H_oc ← N/(N − N_v)·H_oc. Yields the correction (Ỹ/(N − N_v), X̃)
    that every W·H_oc product must subtract as Ỹᵀ·(X̃·R) (`RefinementTarget`'s ``cross_removed``).

    ``tokens`` = N, the whole data's token count (the rows are among them: their weighted products are
    in the sums). Restored on exit, up to a few float64 ulps of (N/(N − N_v))·|H| per entry, like
    `core.refinement.complement`. Nothing may read the Grams as the whole inside the block.
    ``h_cc`` None: H_cc was released (its fit split is only needed as W·H_cc·Wᵀ,
    `HeldoutRows.fit_split_output_gram`); H_oc alone is turned.
    """
    if h_oc is h_cc:
        raise ValueError("held-out rows complement paired statistics (H_oc distinct from H_cc)")
    rest = _rest(rows.tokens, tokens)
    x = rows._weighted(rows.inputs)
    y = rows._weighted(rows.outputs.to(torch.float64)) / rest
    if h_cc is not None:
        h_cc.mul_(tokens / rest)
        accumulate_gram(h_cc, x, alpha=-1.0 / rest)
        mirror_lower(h_cc)
    h_oc.mul_(tokens / rest)
    try:
        yield y, x
    finally:
        if h_cc is not None:
            accumulate_gram(h_cc, x, alpha=1.0 / rest)
            mirror_lower(h_cc)
            h_cc.mul_(rest / tokens)
        h_oc.mul_(rest / tokens)


@dataclass
class HeldoutMoments:
    """A writer's held-out tokens as moments (float64): Σ w x xᵀ and Σ x xᵀ (n×n), Σ w y xᵀ and Σ y xᵀ
    (m×n), Σ w‖y‖² and Σ‖y‖² (``energies``); x the compressed inputs, y the dense outputs W·x_o without
    bias, w the residual weights. Sums while accumulating, means per token after `finalize`."""

    h_weighted: torch.Tensor
    h_plain: torch.Tensor
    c_weighted: torch.Tensor
    c_plain: torch.Tensor
    energies: torch.Tensor
    tokens: int = 0
    product_dtype: torch.dtype = torch.float64
    normalized: bool = False
    _lower_only: bool = field(default=False, repr=False)

    weighted = True

    @classmethod
    def empty(cls, in_features: int, out_features: int, device: torch.device | str = "cpu",
              product_dtype: torch.dtype = torch.float64) -> "HeldoutMoments":
        zeros = dict(dtype=torch.float64, device=device)
        n, m = in_features, out_features
        return cls(torch.zeros(n, n, **zeros), torch.zeros(n, n, **zeros), torch.zeros(m, n, **zeros),
                   torch.zeros(m, n, **zeros), torch.zeros(2, **zeros), product_dtype=product_dtype)

    def add(self, inputs: torch.Tensor, outputs: torch.Tensor, root_weights: torch.Tensor) -> None:
        """Accumulate a batch's held-out tokens: inputs N×n, outputs N×m, √weights N (row for row)."""
        if self.normalized:
            raise RuntimeError("held-out moments were finalized; no more tokens can be added")
        dtype = self.product_dtype
        width = max(inputs.shape[-1], outputs.shape[-1])  # the same rows in all three chunkings
        for x, y, root in zip(token_chunks(inputs, dtype, width=width), token_chunks(outputs, dtype, width=width),
                              token_chunks(root_weights.reshape(-1, 1), dtype, width=width)):
            x, y, root = x.to(dtype), y.to(dtype), root.to(dtype)
            xw, yw = x * root, y * root
            accumulate_gram(self.h_weighted, xw)
            accumulate_gram(self.h_plain, x)
            accumulate_cross(self.c_weighted, yw, xw)
            accumulate_cross(self.c_plain, y, x)
            self.energies += torch.stack([yw.square().sum(), y.square().sum()]).to(torch.float64)
            self.tokens += x.shape[0]
        self._lower_only = True

    def tensors(self) -> list[torch.Tensor]:
        """The sums, for an all-reduce (the token count is reduced apart)."""
        return [self.h_weighted, self.h_plain, self.c_weighted, self.c_plain, self.energies]

    def finalize(self) -> None:
        """Sums → means in place (after any all-reduce)."""
        if self._lower_only:
            mirror_lower(self.h_weighted)
            mirror_lower(self.h_plain)
            self._lower_only = False
        if self.normalized or self.tokens == 0:
            return
        for t in self.tensors():
            t.div_(self.tokens)
        self.normalized = True

    def scorer(self, weight: torch.Tensor, kept: torch.Tensor | None = None) -> "MomentsScorer":
        return MomentsScorer(weight, self, _empty_kept() if kept is None else kept)

    @contextmanager
    def fit_split(self, h_cc: torch.Tensor | None, h_oc: torch.Tensor, tokens: int) -> Iterator[torch.Tensor]:
        """Like `complement_rows`, from the moments: H_cc ← (N·H_cc − N_v·H_w)/(N − N_v) and H_oc scaled,
        in place for the ``with`` body; yields the m×n correction N_v·C_w/(N − N_v) of W·H_oc.
        ``h_cc`` None: released, H_oc alone is turned (`fit_split_output_gram`)."""
        if h_oc is h_cc:
            raise ValueError("held-out moments complement paired statistics (H_oc distinct from H_cc)")
        if not self.normalized:
            raise RuntimeError("held-out moments must be finalized before the fit split is formed")
        part = self.tokens
        rest = _rest(part, tokens)
        if h_cc is not None:
            h_cc.mul_(tokens / rest).sub_(self.h_weighted, alpha=part / rest)
        h_oc.mul_(tokens / rest)
        try:
            yield self.c_weighted * (part / rest)
        finally:
            if h_cc is not None:
                h_cc.add_(self.h_weighted, alpha=part / rest).mul_(rest / tokens)
            h_oc.mul_(rest / tokens)

    def fit_split_output_gram(self, gram: torch.Tensor, weight: torch.Tensor, tokens: int) -> torch.Tensor:
        """The fit split's W·H_cc·Wᵀ from the whole data's ``gram``: (N·G − N_v·W·H_w·Wᵀ)/(N − N_v)."""
        if not self.normalized:
            raise RuntimeError("held-out moments must be finalized before the fit split is formed")
        rest = _rest(self.tokens, tokens)
        fit = gram * (tokens / rest)
        fit.sub_(output_gram(weight, self.h_weighted, gram.dtype), alpha=self.tokens / rest)
        return fit


class MomentsScorer:
    """`PlainHeldoutError`'s interface on `HeldoutMoments`: the factored Gram objective of candidate
    factors on the held-out tokens, plain (``__call__``, recorded in ``values``) and weighted."""

    def __init__(self, weight: torch.Tensor, moments: HeldoutMoments, kept: torch.Tensor) -> None:
        if not moments.normalized:
            raise RuntimeError("held-out moments must be finalized before they score")
        w = weight  # RefinementTarget converts it a row block at a time
        weighted_energy, plain_energy = (float(e) for e in moments.energies)
        self._plain = RefinementTarget(w, GramStatistics(h_cc=moments.h_plain, h_oc=None), kept=kept,
                                       target_energy=plain_energy, w_h_oc=moments.c_plain)
        self._weighted = RefinementTarget(w, GramStatistics(h_cc=moments.h_weighted, h_oc=None), kept=kept,
                                          target_energy=weighted_energy, w_h_oc=moments.c_weighted)
        self.energy = plain_energy
        self.values: list[float] = []

    def __call__(self, up: torch.Tensor, down: torch.Tensor) -> float:
        value = objective(self._plain, up.to(torch.float64), down.to(torch.float64))
        self.values.append(value)
        return value

    def weighted(self, up: torch.Tensor, down: torch.Tensor) -> float:
        return objective(self._weighted, up.to(torch.float64), down.to(torch.float64))

    def relative(self, index: int) -> float:
        """The recorded value ``index`` as a relative error ‖·‖ / ‖W X_o‖."""
        return (max(self.values[index], 0.0) / self.energy) ** 0.5 if self.energy > 0 else float("nan")


#: Either form of a writer's held-out tokens: both have ``tokens``, ``weighted``, ``scorer`` and ``fit_split``.
WriterHeldout = HeldoutRows | HeldoutMoments
#: Their scorers: plain error recorded per call (``values``, ``relative``) and ``weighted``.
HeldoutScorer = PlainHeldoutError | MomentsScorer
