"""Parameter budgets: turning desired per-matrix retentions into integer ranks that meet a budget.

Every allocation strategy produces *desired* retentions (fractions of each matrix's parameters to keep);
this module turns them into ranks so that the summed parameters of the target matrices land on the
budget (1 − c)·Σ m·n as closely as integer ranks allow — never above it. Flooring every matrix
independently can undershoot a small model's budget by a percent or more; the leftover is handed out
one rank at a time to the matrices whose flooring lost the most.

A matrix whose rank would not save parameters (r·(m+n) ≥ m·n) is kept dense and costs m·n. A budget
below rank 1 everywhere (a ratio such as 0.999) cannot be met: the ranks stop at 1 and a
`BudgetWarning` says what ratio that reaches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from .factorization import saves_parameters

__all__ = ["BudgetWarning", "MatrixShape", "rank_cost", "ranks_for_budget", "budget_for_ratio", "total_cost"]


class BudgetWarning(UserWarning):
    """The requested compression ratio cannot be reached with integer ranks ≥ 1."""


@dataclass(frozen=True)
class MatrixShape:
    name: str
    out_features: int
    in_features: int

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def rank_params(self) -> int:
        """Parameters one rank costs in factorized form."""
        return self.out_features + self.in_features

    @property
    def max_useful_rank(self) -> int:
        """Largest rank that still saves parameters."""
        return math.ceil(self.dense_params / self.rank_params) - 1


def rank_cost(shape: MatrixShape, rank: int | None) -> int:
    """Parameters of ``shape`` at ``rank`` (``None`` = dense)."""
    if rank is None or not saves_parameters(shape.out_features, shape.in_features, rank):
        return shape.dense_params
    return rank * shape.rank_params


def total_cost(shapes: Sequence[MatrixShape], ranks: dict[str, int | None]) -> int:
    return sum(rank_cost(s, ranks.get(s.name)) for s in shapes)


def budget_for_ratio(shapes: Sequence[MatrixShape], ratio: float) -> int:
    """Parameters the target matrices may keep at compression ratio ``ratio``."""
    return math.floor((1.0 - ratio) * sum(s.dense_params for s in shapes))


def ranks_for_budget(
    shapes: Sequence[MatrixShape], retentions: dict[str, float], budget: int
) -> dict[str, int | None]:
    """Integer ranks (``None`` = keep dense) from desired retentions, filled up to ``budget``.

    1. Retention ≥ what the break-even rank allows → dense; otherwise r = ⌊ρ·m·n/(m+n)⌋ (≥ 1).
    2. If that overshoots the budget (dense choices, the rank-1 floor), shave ranks from the matrices
       furthest above their desired size until it fits.
    3. Spend what remains one rank at a time on the matrices with the largest rounding loss.
    """
    ranks: dict[str, int | None] = {}
    desired: dict[str, float] = {}
    for s in shapes:
        rho = max(0.0, retentions[s.name])
        desired[s.name] = rho * s.dense_params / s.rank_params  # fractional rank
        r = max(1, math.floor(desired[s.name] + 1e-9))
        ranks[s.name] = None if r > s.max_useful_rank else r
    cost = total_cost(shapes, ranks)

    # 2. over budget: reduce the matrices furthest above their desired rank (dense ones first).
    while cost > budget:
        candidates = [
            s for s in shapes
            if (ranks[s.name] is None and s.max_useful_rank >= 1) or (ranks[s.name] or 0) > 1
        ]
        if not candidates:  # every matrix at rank 1: the budget is infeasible; return the smallest model
            dense = sum(s.dense_params for s in shapes)
            warnings.warn(
                f"the compression ratio cannot be met: rank 1 in every target matrix already keeps {cost:,} of "
                f"their {dense:,} parameters (budget {budget:,}), so the ratio reached is "
                f"{1 - cost / dense:.2%}", BudgetWarning, stacklevel=2,
            )
            break
        s = max(candidates, key=lambda s: (ranks[s.name] is None, _rank_of(s, ranks) - desired[s.name]))
        ranks[s.name] = s.max_useful_rank if ranks[s.name] is None else ranks[s.name] - 1
        cost = total_cost(shapes, ranks)

    # 3. under budget: round up, one rank at a time, the matrices whose flooring lost the most
    #    (never past ⌈desired⌉, so no matrix grows beyond what its retention asked for).
    while True:
        best = None
        for s in shapes:
            r = ranks[s.name]
            if r is None or r + 1 > min(s.max_useful_rank, math.ceil(desired[s.name] - 1e-9)):
                continue
            if cost + s.rank_params > budget:
                continue
            deficit = (desired[s.name] - r) / max(desired[s.name], 1e-12)
            if best is None or deficit > best[0]:
                best = (deficit, s)
        if best is None:
            break
        ranks[best[1].name] += 1
        cost += best[1].rank_params
    return ranks


def _rank_of(shape: MatrixShape, ranks: dict[str, int | None]) -> float:
    r = ranks[shape.name]
    return shape.dense_params / shape.rank_params if r is None else r
