"""`TrainableParameters`: choose what recovery fine-tuning updates after compression.

Modes:
  * ``"all"`` — every parameter (plain fine-tuning of the compressed model);
  * ``"factors"`` — only the factorized modules (their ``up``/``down`` factors, preserved columns and
    biases); embeddings, norms, the head and matrices left dense are frozen;
  * ``"up"`` / ``"down"`` — only the ``up`` (U) or ``down`` (Vᵀ) factors. SVD-LLM's sequential recovery
    is two runs: ``"up"`` first, then ``"down"`` starting from the first run's exported model.

Applied in ``setup``, after any `SVDCompression` listed before it and before the strategy builds its
optimizer (DeepSpeed only hands ``requires_grad`` parameters to its optimizer, so this must happen
before ``deepspeed.initialize``).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.core.lowrank import FactorizedLinear

__all__ = ["TrainableParameters", "TRAINABLE_MODES"]

TRAINABLE_MODES = ("all", "factors", "up", "down")


class TrainableParameters(Callback):
    def __init__(self, mode: str = "factors") -> None:
        super().__init__()
        if mode not in TRAINABLE_MODES:
            raise InvalidInputError(f"mode must be one of {', '.join(TRAINABLE_MODES)}, got {mode!r}")
        self.mode = mode

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.mode == "all":
            return
        for param in pl_module.parameters():
            param.requires_grad_(False)
        factorized = [m for m in pl_module.modules() if isinstance(m, FactorizedLinear)]
        if not factorized:
            raise InvalidInputError(f"mode={self.mode!r} needs a compressed model, but it has no factorized modules")
        for module in factorized:
            for name, param in module.named_parameters(recurse=False):
                if self.mode == "factors" or name == self.mode:
                    param.requires_grad_(True)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in pl_module.parameters())
        rank_zero_info(f"adasvd: training {trainable:,} of {total:,} parameters ({self.mode})")
