"""Allocation strategies: how a compression budget is split between matrices.

All of them return desired per-matrix *retentions* (or ranks) that
:func:`adasvd_lightning.core.budget.ranks_for_budget` turns into integer ranks meeting the budget.

* ``uniform`` — every matrix keeps 1 − c.
* ``adacr`` (AdaSVD) — per-decoder-block importance from how much the block changes its input,
  I = 1 − mean cos(h_in, h_out) over calibration tokens, normalised to mean 1; block retention
  ρ_l = mrr + I_l·(trr − mrr), clamped to [ε, 1] with a common shift found by bisection so the
  parameter-weighted mean retention is exactly trr again after clamping.
* ``grouped-loss`` (SVD-LLM V2) — within each group of same-type matrices (all ``q_proj``s, …), ranks
  that minimise the summed *normalised* truncation loss Σ_i Σ_{k>r_i} σ_ik²/‖W_i S_i‖², given the group's
  budget; a greedy merge of the sorted spectra is optimal since every rank of a group costs the same.
* ``module-kl`` / ``sensitivity-ppl`` (Duo-SVD / ASVD) — a measured cost table (KL or perplexity
  increase when one module alone moves to each candidate retention) and a multiple-choice knapsack
  solved exactly by dynamic programming under the parameter budget.
* ``module-kl-fisher`` — the same table and knapsack, with the KL costs estimated to second order from
  the output Fisher diagonal and the whitened spectrum instead of measured (:mod:`.fisher`).
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Sequence

import torch

from .budget import MatrixShape

__all__ = [
    "uniform_retentions",
    "block_importance",
    "adacr_block_retentions",
    "group_key",
    "grouped_loss_ranks",
    "knapsack",
]


def uniform_retentions(shapes: Sequence[MatrixShape], ratio: float) -> dict[str, float]:
    return {s.name: 1.0 - ratio for s in shapes}


def block_importance(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
    """(Σ over tokens of 1 − cos(h_in, h_out), token count) for one batch (sum, so batches add up)."""
    cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
    if mask is not None and tuple(mask.shape) == tuple(cos.shape):
        cos = cos[mask.to(cos.device).bool()]
    return float((1.0 - cos).sum()), cos.numel()


def adacr_block_retentions(
    importances: Sequence[float], block_params: Sequence[int], target_retention: float, min_retention: float
) -> list[float]:
    """Per-block retentions ρ_l = mrr + I_l·(trr − mrr) with the budget re-met after clamping.

    Args:
        importances: raw importance per block (any positive scale; normalised to mean 1 here).
        block_params: dense parameters of each block's target matrices (weights of the budget).
        target_retention: trr = 1 − c.
        min_retention: mrr (< trr).
    """
    imp = torch.tensor([max(float(i), 0.0) for i in importances], dtype=torch.float64)
    weights = torch.tensor(block_params, dtype=torch.float64)
    if imp.sum() <= 0:
        imp = torch.ones_like(imp)
    imp = imp / imp.mean()
    raw = min_retention + imp * (target_retention - min_retention)
    lo_clip, hi_clip = 1e-3, 1.0
    target = target_retention * float(weights.sum())

    def kept(shift: float) -> float:
        return float((raw + shift).clamp(lo_clip, hi_clip).mul(weights).sum())

    lo, hi = -1.0 - float(raw.max()), 1.0 + float(raw.max())
    for _ in range(200):  # bisection: kept() is monotone in the shift
        mid = 0.5 * (lo + hi)
        if kept(mid) > target:
            hi = mid
        else:
            lo = mid
    return (raw + lo).clamp(lo_clip, hi_clip).tolist()


_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def group_key(name: str) -> str:
    """Module type of a target: its name with the block index wildcarded (``model.layers.*.mlp.up_proj``)."""
    return _BLOCK_INDEX.sub(".*.", name, count=1)


def grouped_loss_ranks(
    shapes: Sequence[MatrixShape], spectra: dict[str, torch.Tensor], ratio: float
) -> dict[str, float]:
    """Retentions from normalised truncation loss within same-type groups (see module docstring)."""
    groups: dict[str, list[MatrixShape]] = {}
    for s in shapes:
        groups.setdefault(group_key(s.name), []).append(s)
    retentions: dict[str, float] = {}
    for members in groups.values():
        budget = (1.0 - ratio) * sum(s.dense_params for s in members)
        ranks = {s.name: 0 for s in members}
        energy = {}
        heap: list[tuple[float, str]] = []
        for s in members:
            sq = spectra[s.name].double().square()
            energy[s.name] = sq / sq.sum().clamp_min(1e-300)
            heapq.heappush(heap, (-float(energy[s.name][0]) / s.rank_params, s.name))
        by_name = {s.name: s for s in members}
        spent = 0.0
        while heap:
            gain, name = heapq.heappop(heap)
            s = by_name[name]
            if spent + s.rank_params > budget:
                continue
            spent += s.rank_params
            ranks[name] += 1
            nxt = ranks[name]
            if nxt < min(len(energy[name]), s.max_useful_rank):
                heapq.heappush(heap, (-float(energy[name][nxt]) / s.rank_params, name))
        # What no whole rank of this group could use is spread as fractional rank, so the global
        # rounding step (ranks_for_budget) can still spend it where a rank fits.
        share = (budget - spent) / len(members)
        for s in members:
            retentions[s.name] = (max(ranks[s.name], 1) * s.rank_params + share) / s.dense_params
    return retentions


def knapsack(options: Sequence[Sequence[tuple[int, float]]], budget: int, *, resolution: int = 4096) -> list[int]:
    """Multiple-choice knapsack: one option (cost, value) per item, Σ cost ≤ budget, Σ value minimal.

    Costs are quantised to ``budget / resolution`` units, rounded *up*, so the returned choice never
    exceeds the true budget (exact when costs are multiples of the unit). Returns the chosen option
    index per item; raises ValueError if even the cheapest choices do not fit.
    """
    unit = max(1, math.ceil(budget / resolution))
    cap = budget // unit
    # best[b]: least value of the items so far within b units. One vectorised step per item and option
    # (a Python loop over the budget took seconds per call, and the lazy tail allocation calls it per
    # round). Ties keep the earliest option, then the smallest budget, as a scalar loop would.
    best = torch.full((cap + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    choices: list[torch.Tensor] = []
    for item in options:
        new = torch.full((cap + 1,), math.inf, dtype=torch.float64)
        pick = torch.full((cap + 1,), -1, dtype=torch.long)
        for k, (cost, value) in enumerate(item):
            units = math.ceil(cost / unit)
            if units > cap:
                continue
            trial = torch.full((cap + 1,), math.inf, dtype=torch.float64)
            trial[units:] = best[: cap + 1 - units] + value
            better = trial < new
            new = torch.where(better, trial, new)
            pick = torch.where(better, torch.full_like(pick, k), pick)
        best = new
        choices.append(pick)
    end = int(torch.argmin(best))
    if best[end] == math.inf:
        raise ValueError("no combination of options fits the budget")
    picked: list[int] = []
    b = end
    for item, pick in zip(reversed(options), reversed(choices)):
        k = int(pick[b])
        picked.append(k)
        b -= math.ceil(item[k][0] / unit)
    return picked[::-1]
