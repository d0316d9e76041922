"""`CPUDeepSpeedStrategy`: Lightning's DeepSpeed strategy, usable on CPU processes (gloo).

DeepSpeed 0.19 runs ZeRO-2/3 on CPU (``DS_ACCELERATOR=cpu``), but Lightning's `DeepSpeedStrategy`
refuses non-CUDA accelerators in ``setup_environment``, validates CUDA device indices in
``setup_distributed`` and passes ``root_device.index`` (None on CPU) to ``deepspeed.initialize``. This
subclass lifts exactly those three restrictions, so the sharded recovery path can be tested for real in
CI and used by CPU users. On GPUs use Lightning's own strategy.
"""

from __future__ import annotations

import argparse
import os

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.fabric.utilities.seed import reset_seed

__all__ = ["CPUDeepSpeedStrategy"]


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed (ZeRO stage 2/3) on CPU processes; all other behaviour is Lightning's."""

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args, **kwargs) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        # Skip DeepSpeedStrategy's CUDA-only check; keep everything DDP sets up.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # As DeepSpeedStrategy.setup_distributed, minus the CUDA device-index validation.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            # CPU devices have no index: give DeepSpeed the local rank instead of None.
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=model_parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer
