"""Swap a model's replaced parameters inside an existing optimizer (torch only).

Compressing mid-training replaces dense weights by new factor parameters. Rebuilding the optimizer
would lose what the user configured in it — per-group learning rates and weight decay, and every LR
scheduler bound to it (a scheduler's state is not a function of the step alone: `ReduceLROnPlateau`
tracks metrics, `SequentialLR` / `ChainedScheduler` hold children, `CosineAnnealingLR` updates
recursively). So the optimizer object stays and only its parameter lists change:

* a new parameter joins the param group of the parameter it replaces: the removed parameter with the
  same full name (a bias, or ``up`` when factors are re-compressed), else the replaced module's removed
  parameter (its dense ``weight``, or its factors when a merge turns them back into a weight). So a
  factor keeps its weight's LR and weight decay, and a bias stays in the no-decay group;
* a new parameter whose replaced module was frozen (not in any group) stays out of the optimizer, and
  frozen;
* optimizer state (e.g. Adam moments): removed parameters' state is dropped (it refers to a matrix that
  no longer exists and its shape does not fit the factors); new parameters start with fresh state, as
  the optimizer creates it lazily on their first step; untouched parameters keep theirs.
"""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

__all__ = ["ParameterSwap", "swap_parameters"]


class ParameterSwap:
    """What `swap_parameters` did: counts of parameters removed, added and left out (frozen)."""

    def __init__(self) -> None:
        self.removed = 0
        self.added = 0
        self.frozen = 0


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def swap_parameters(
    optimizers: list[Optimizer],
    before: dict[str, nn.Parameter],
    after: dict[str, nn.Parameter],
) -> ParameterSwap:
    """Replace in ``optimizers`` the parameters of ``before`` that are gone from ``after`` by the new ones.

    ``before`` / ``after`` are ``named_parameters()`` of the same model taken before and after the
    change; parameters are matched by identity, so untouched ones keep their groups and state.
    """
    result = ParameterSwap()
    kept = {id(p) for p in after.values()}
    removed = {name: p for name, p in before.items() if id(p) not in kept}
    old = {id(p) for p in before.values()}
    added = {name: p for name, p in after.items() if id(p) not in old}
    if not removed and not added:
        return result
    # Where each removed parameter lived: (optimizer, group).
    home: dict[int, tuple[Optimizer, dict]] = {}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                home[id(p)] = (optimizer, group)
    by_module: dict[str, list[nn.Parameter]] = {}
    for name, p in removed.items():
        by_module.setdefault(_module_of(name), []).append(p)
    # Plan every placement first, so an error leaves the optimizers untouched. A new parameter takes
    # the place of the one it replaces in its group's list, so the group's order stays the model's
    # order: an optimizer built afresh on the compressed model (a resumed run) lists the parameters
    # the same way, and its saved state loads position by position.
    anchored: dict[int, list[nn.Parameter]] = {}
    for name, p in added.items():
        replaced = removed.get(name)
        candidates = ([replaced] if replaced is not None else []) + by_module.get(_module_of(name), [])
        anchor = next((c for c in candidates if id(c) in home), None)
        if anchor is not None:
            anchored.setdefault(id(anchor), []).append(p)
        elif candidates:  # it replaces a parameter outside the optimizer: it stays out (and frozen if that was)
            p.requires_grad_(any(c.requires_grad for c in candidates))
            result.frozen += 1
        else:
            raise ValueError(f"new parameter {name!r} replaces no parameter of the model; cannot place it in a param group")
    gone = {id(p) for p in removed.values()}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if not any(id(q) in gone for q in group["params"]):
                continue
            params = []
            for q in group["params"]:
                if id(q) not in gone:
                    params.append(q)
                    continue
                params.extend(anchored.get(id(q), []))
                optimizer.state.pop(q, None)
                result.removed += 1
            group["params"] = params
    result.added = sum(len(v) for v in anchored.values())
    return result
