"""Take a running DeepSpeed engine apart and build a new one when the model's parameters change mid-training.

A compression stage replaces dense weights by factors. DeepSpeed's engine cannot follow: it flattened
the optimizer's groups into fp32 partitions and hooked every parameter (ZeRO-2: gradient hooks; ZeRO-3:
per-module forward/backward hooks that gather and release each module's shards). So a stage runs as

1. `release_engine` — the user's torch optimizer gets its groups back as lists of model parameters
   (ZeRO-1/2: ``bit16_groups``, one per group; ZeRO-3: ``fp16_groups``, sub-groups mapped to their
   group by ``sub_group_to_group_id``), its state is cleared (it lives in flat partitions that will
   not match the new model), and the engine releases its hooks. From here on the model is a plain
   module again, whose ZeRO-3 parameters are still partitioned but no longer gathered and released
   behind the caller's back;
2. the caller changes the model — under ZeRO-3 inside `core.distributed.gathered_parameters`, so
   calibration and decomposition see whole weights, and every rank ends with the same factors;
3. `reinitialise_engine` — ``deepspeed.initialize`` runs again through the strategy, as Lightning runs
   it at the start of fit, with the same optimizer and LR scheduler objects. Under ZeRO-3 DeepSpeed
   partitions the parameters it finds unpartitioned (the new factors, `DeepSpeedZeRoOffload.
   _convert_to_zero_parameters`) and adopts the partitioned ones as they are.

The LR schedule continues (same scheduler object); every parameter's optimizer state starts fresh.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import nn
from torch.optim import Optimizer

__all__ = ["has_engine", "user_param_lists", "release_engine", "reinitialise_engine"]


def has_engine(strategy: Any) -> bool:
    """Whether ``strategy`` runs a DeepSpeed training engine now (from the start of fit until it ends)."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return False
    import deepspeed  # installed: the strategy needs it

    return isinstance(strategy.model, deepspeed.DeepSpeedEngine) and strategy.model.optimizer is not None


def user_param_lists(engine_optimizer: Any) -> tuple[Optimizer, list[list[nn.Parameter]]]:
    """The user's torch optimizer inside a DeepSpeed engine's optimizer, and each of its groups' model parameters.

    Only the parameters the engine optimizes (those with ``requires_grad`` when it was built) are
    listed, in the group's order.
    """
    optimizer = getattr(engine_optimizer, "optimizer", engine_optimizer)
    if hasattr(engine_optimizer, "sub_group_to_group_id"):  # ZeRO-3: groups split into sub-groups
        lists: list[list[nn.Parameter]] = [[] for _ in optimizer.param_groups]
        for index, params in enumerate(engine_optimizer.fp16_groups):
            lists[engine_optimizer.sub_group_to_group_id[index]].extend(params)
        return optimizer, lists
    if hasattr(engine_optimizer, "bit16_groups"):  # ZeRO-1/2: one flat group per param group
        return optimizer, [list(params) for params in engine_optimizer.bit16_groups]
    return optimizer, [list(group["params"]) for group in optimizer.param_groups]


def release_engine(strategy: Any) -> Optimizer:
    """Tear down ``strategy``'s DeepSpeed engine; return the user's optimizer, listing model parameters again."""
    engine = strategy.model
    optimizer, lists = user_param_lists(engine.optimizer)
    if len(lists) != len(optimizer.param_groups):
        raise RuntimeError(f"DeepSpeed optimizer holds {len(lists)} groups for {len(optimizer.param_groups)} param groups")
    for group, params in zip(optimizer.param_groups, lists):
        group["params"] = params
    optimizer.state.clear()
    engine.destroy()
    return optimizer


def reinitialise_engine(trainer: Any, optimizer: Optimizer) -> None:
    """A new engine over the (changed) LightningModule, with ``optimizer`` and the trainer's LR scheduler."""
    strategy = trainer.strategy
    configs = trainer.lr_scheduler_configs
    scheduler = configs[0].scheduler if configs else None
    engine, engine_optimizer = strategy._setup_model_and_optimizer(strategy.lightning_module, optimizer, scheduler)
    strategy.optimizers = [engine_optimizer]
    engine.lr_scheduler = None  # Lightning steps the scheduler itself (as in DeepSpeedStrategy)
    strategy.model = engine
