"""`SVDCompression`: compress the LightningModule's model before training starts.

Compression happens in the callback's ``setup`` hook. That point is chosen on purpose: it runs after the
data module is set up (so the trainer's train dataloader can supply calibration batches) but before the
strategy wraps the model and before optimizers are created, so DDP/DeepSpeed and the optimizer see the
final, factorized parameters and nothing has to be rebuilt.

Resume: the factorized structure (the manifest: rank and shape of every factorized module) is saved in
the callback's state in every checkpoint. Lightning loads model weights *before* it restores callback
state, but it calls the LightningModule's ``on_load_checkpoint`` first; the callback therefore chains
its own step in front of that hook, rebuilding the checkpoint's structure so the saved factors load into
modules of the right shape. (The callback cannot see ``ckpt_path`` in ``setup``, so a resumed run still
calibrates and compresses once before the checkpoint's structure replaces the result.)
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn

from adasvd_lightning.core.config import CompressionConfig
from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.core.pipeline import compress_model
from adasvd_lightning.core.report import CompressionReport
from adasvd_lightning.core.serialization import apply_manifest, build_manifest
from adasvd_lightning.core.surgery import find_targets

__all__ = ["SVDCompression"]

log = logging.getLogger("adasvd_lightning")


class SVDCompression(Callback):
    """Factorize the model's linear layers at ``setup`` (before training).

    Args:
        method: compression preset (``svd``, ``asvd``, ``svd-llm``, ``adasvd``, ``duo-svd``, …).
        ratio: fraction of each target matrix's parameters removed, in (0, 1).
        calibration_batches: how many batches to draw for calibration statistics.
        calibration_dataloader: where to draw them from; default: the trainer's train dataloader.
        model_attr: attribute of the LightningModule holding the model to compress (default
            ``"model"``); when the module has no such attribute, the LightningModule itself is used.
        include / exclude: regular expressions selecting target linears by full module name.
        propagation: ``"compressed"`` (sequential, default) or ``"original"`` calibration inputs.
        method_options: overrides of the preset's strategies and knobs (see ``MethodSpec``).
    """

    def __init__(
        self,
        method: str = "svd-llm",
        ratio: float = 0.4,
        *,
        calibration_batches: int = 16,
        calibration_dataloader: Iterable | None = None,
        model_attr: str = "model",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        propagation: str = "compressed",
        method_options: dict | None = None,
    ) -> None:
        super().__init__()
        # Validate everything at construction: a bad ratio or method fails before the Trainer starts.
        self.config = CompressionConfig(
            method=method, ratio=ratio, include=include, exclude=exclude, propagation=propagation,
            method_options=method_options or {},
        )
        if calibration_batches < 1:
            raise InvalidInputError(f"calibration_batches must be >= 1, got {calibration_batches}")
        self.calibration_batches = calibration_batches
        self.calibration_dataloader = calibration_dataloader
        self.model_attr = model_attr
        self.report: CompressionReport | None = None
        self._manifest: dict | None = None
        self._restored_state: dict | None = None

    def target_module(self, pl_module: L.LightningModule) -> nn.Module:
        module = getattr(pl_module, self.model_attr, None)
        return module if isinstance(module, nn.Module) else pl_module

    def _draw_batches(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Any]:
        loader = self.calibration_dataloader
        if loader is None:
            loader = trainer.fit_loop._data_source.dataloader()
        if loader is None:
            raise InvalidInputError("SVDCompression needs a train dataloader or calibration_dataloader for calibration")
        batches = list(itertools.islice(iter(loader), self.calibration_batches))
        if not batches:
            raise InvalidInputError("the calibration dataloader yielded no batches")
        return batches

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._chain_checkpoint_restore(pl_module)
        if self.report is not None:
            return
        model = self.target_module(pl_module)
        find_targets(model, self.config.selector)  # fail on patterns matching nothing before calibration
        batches = self._draw_batches(trainer, pl_module) if self.config.spec.needs_calibration else None
        self.report = compress_model(model, self.config, batches)
        log.info(
            "compressed %d matrices with %s: %d -> %d parameters (%.2f%% of target weights removed) in %.1fs",
            len(self.report.modules), self.config.method, self.report.parameters_before,
            self.report.parameters_after, 100 * self.report.achieved_ratio, self.report.seconds,
        )
        metrics = {
            "compression/parameters": float(self.report.parameters_after),
            "compression/achieved_ratio": self.report.achieved_ratio,
            "compression/seconds": self.report.seconds,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # -- checkpoints --------------------------------------------------------------------------------
    def _chain_checkpoint_restore(self, pl_module: L.LightningModule) -> None:
        """Run `_restore_structure` before the module's own ``on_load_checkpoint`` (once per module)."""
        if getattr(pl_module, "_adasvd_restore_chained", False):
            return
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict) -> None:
            self._restore_structure(pl_module, checkpoint)
            original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]
        pl_module._adasvd_restore_chained = True

    def _restore_structure(self, pl_module: L.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        manifest = (state or {}).get("manifest")
        if not manifest:
            return
        model = self.target_module(pl_module)
        if build_manifest(model)["modules"] != manifest["modules"]:
            apply_manifest(model, manifest)

    def state_dict(self) -> dict:
        """Plain types only, so checkpoints load with ``weights_only=True``."""
        if self.report is None:
            return {}
        return {
            "manifest": self._manifest,
            "method": self.config.method,
            "ratio": self.config.ratio,
            "achieved_ratio": self.report.achieved_ratio,
        }

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The structure that training (and every checkpoint) will use.
        self._manifest = build_manifest(self.target_module(pl_module))

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_state = dict(state_dict)
