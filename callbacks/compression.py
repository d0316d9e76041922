"""`SVDCompression`: SVD compression of the LightningModule's model at a chosen point of training.

When:
  * ``at="setup"`` (default) — before training. ``setup`` runs after the data module is set up (so the
    train dataloader can supply calibration batches) but before the strategy wraps the model and before
    optimizers exist, so DDP/DeepSpeed and the optimizer see the final, factorized parameters. This is
    the only point supported under multi-process strategies for now.
  * ``at="step"`` / ``at="epoch"`` with ``schedule=[(point, ratio), ...]`` — after global step N, or at the
    end of epoch N (0-based ``current_epoch``). Several pairs make a progressive schedule
    (e.g. 20% → 40% → 60%); each stage re-compresses the current factors to the new ratio
    (``restart="factors"``, default) or compresses the dense weights (as they were at the first stage)
    again (``restart="dense"``, which discards what the factors learned between stages). After a
    stage the optimizers and LR schedulers are rebuilt on the new parameters: optimizer state (e.g.
    Adam moments) starts fresh, and step-interval schedulers are fast-forwarded to the current step
    (exact for ``LambdaLR``-style schedules that depend only on the step).
  * ``at="fit_end"`` — once training ends (compress-after-training).

Resume: the factorized structure (manifest: rank and shape of every factorized module) and the list of
completed stages are saved in the callback's state in every checkpoint. Lightning loads model weights
*before* it restores callback state, but it calls the LightningModule's ``on_load_checkpoint`` first;
the callback chains its own step in front of that hook and rebuilds the checkpoint's structure, so the
saved factors load into modules of the right shape. (The callback cannot see ``ckpt_path`` in
``setup``, so a resumed ``at="setup"`` run still compresses once before the checkpoint's structure
replaces the result.)
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from adasvd_lightning.core.config import CompressionConfig
from adasvd_lightning.core.distributed import world
from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.core.merging import check_min_flop_saving, merge_and_record
from adasvd_lightning.core.pipeline import compress_model
from adasvd_lightning.core.report import CompressionReport
from adasvd_lightning.core.serialization import apply_manifest, build_manifest
from adasvd_lightning.core.surgery import find_targets, replace_module
from adasvd_lightning.display import compression_progress

__all__ = ["SVDCompression", "POINTS"]


POINTS = ("setup", "step", "epoch", "fit_end")


class SVDCompression(Callback):
    """Factorize the model's linear layers at ``setup``, at steps/epochs, or at the end of training.

    Args:
        method: compression preset (``svd``, ``asvd``, ``svd-llm``, ``adasvd``, ``duo-svd``, …).
        ratio: fraction of each target matrix's parameters removed, in (0, 1) (single-stage points).
        at: ``"setup"``, ``"step"``, ``"epoch"`` or ``"fit_end"`` (see module docstring).
        schedule: for ``at="step"``/``"epoch"``: (point, ratio) pairs, points and ratios increasing.
        calibration_batches: how many batches each rank draws for calibration statistics. Default
            ``None``: a dedicated calibration loader (this argument, or the data module's
            ``calibration_dataloader()``) is used whole, split between the ranks; the train loader
            gives 16 batches per rank.
        calibration_dataloader: where to draw them from; default: the data module's
            ``calibration_dataloader()`` if it has one, else the train dataloader.
        model_attr: attribute of the LightningModule holding the model to compress (default
            ``"model"``); when the module has no such attribute, the LightningModule itself is used.
        include / exclude: regular expressions selecting target linears by full module name.
        propagation: ``"compressed"`` (sequential, default) or ``"original"`` calibration inputs.
        method_options: overrides of the preset's strategies and knobs (see ``MethodSpec``).
        restart: where later schedule stages start: ``"factors"`` (current factors) or ``"dense"``.
        execution_device: move one decoder block at a time to this device for compression while the
            model stays where it is (``CompressionConfig.execution_device``); default: in place.
        svd_driver: ``"auto"`` (default), ``"gram"`` or ``"svd"`` (``CompressionConfig.svd_driver``).
        statistics_dtype: ``"float64"`` (default) or ``"float32"`` Gram products of the calibration
            statistics (``CompressionConfig.statistics_dtype``; the sums stay float64).
        decomposition_threads: CPU threads of each eigh/SVD/Cholesky (default 1; ``None`` = torch's;
            ``CompressionConfig.decomposition_threads``).
        merge_unprofitable: after each stage, merge factorized layers saving less than this fraction of
            their multiply-adds back to dense (they would not run faster; e.g. 0.15). Default: keep all.
        show_progress: progress of calibration and per-block decomposition on global rank 0 (a
            transient rich bar before training on a terminal; plain log lines otherwise, so it never
            competes with Lightning's progress bar).
    """

    def __init__(
        self,
        method: str = "svd-llm",
        ratio: float = 0.4,
        *,
        at: str = "setup",
        schedule: Sequence[tuple[int, float]] | None = None,
        calibration_batches: int | None = None,
        calibration_dataloader: Iterable | None = None,
        model_attr: str = "model",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        propagation: str = "compressed",
        method_options: dict | None = None,
        restart: str = "factors",
        execution_device: str | None = None,
        svd_driver: str = "auto",
        statistics_dtype: str = "float64",
        decomposition_threads: int | None = 1,
        merge_unprofitable: float | None = None,
        show_progress: bool = True,
    ) -> None:
        super().__init__()
        # Validate everything at construction: a bad ratio or method fails before the Trainer starts.
        self.config = CompressionConfig(
            method=method, ratio=ratio, include=include, exclude=exclude, propagation=propagation,
            method_options=method_options or {}, execution_device=execution_device, svd_driver=svd_driver,
            statistics_dtype=statistics_dtype, decomposition_threads=decomposition_threads,
        )
        if at not in POINTS:
            raise InvalidInputError(f"at must be one of {', '.join(POINTS)}, got {at!r}")
        self.at = at
        self.stages = self._validate_schedule(at, schedule, self.config.ratio)
        if calibration_batches is not None and calibration_batches < 1:
            raise InvalidInputError(f"calibration_batches must be >= 1, got {calibration_batches}")
        self.calibration_batches = calibration_batches
        self.calibration_dataloader = calibration_dataloader
        self.model_attr = model_attr
        if restart not in ("factors", "dense"):
            raise InvalidInputError(f"restart must be 'factors' or 'dense', got {restart!r}")
        self.restart = restart
        self.merge_unprofitable = None if merge_unprofitable is None else check_min_flop_saving(merge_unprofitable)
        self.show_progress = show_progress
        self._dense_modules: dict[str, nn.Module] = {}
        self.reports: list[CompressionReport] = []
        self.completed: list[int] = []  # schedule points already applied
        self._manifest: dict | None = None
        self._model_config: dict | None = None

    @staticmethod
    def _validate_schedule(at: str, schedule, ratio: float) -> list[tuple[int, float]]:
        if at in ("setup", "fit_end"):
            if schedule:
                raise InvalidInputError(f"schedule is only used with at='step' or at='epoch', not at={at!r}")
            return [(0, ratio)]
        if not schedule:
            raise InvalidInputError(f"at={at!r} needs schedule=[({at} N, ratio), ...]")
        stages = []
        for item in schedule:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise InvalidInputError(f"schedule entries are ({at}, ratio) pairs, got {item!r}")
            point, r = item
            if isinstance(point, bool) or not isinstance(point, int) or point < 0:
                raise InvalidInputError(f"schedule {at} must be a non-negative integer, got {point!r}")
            CompressionConfig(ratio=r)  # same ratio validation as everywhere
            stages.append((point, float(r)))
        for (p0, r0), (p1, r1) in zip(stages, stages[1:]):
            if p1 <= p0:
                raise InvalidInputError(f"schedule {at}s must increase, got {p0} then {p1}")
            if r1 <= r0:
                raise InvalidInputError(f"schedule ratios must increase (each stage compresses further), got {r0} then {r1}")
        return stages

    @property
    def report(self) -> CompressionReport | None:
        """The most recent stage's report."""
        return self.reports[-1] if self.reports else None

    def target_module(self, pl_module: L.LightningModule) -> nn.Module:
        module = getattr(pl_module, self.model_attr, None)
        return module if isinstance(module, nn.Module) else pl_module

    def _calibration_source(self, trainer: L.Trainer) -> tuple[Iterable | None, bool]:
        """The loader to calibrate on, and whether it is a dedicated calibration loader."""
        if self.calibration_dataloader is not None:
            return self.calibration_dataloader, True
        datamodule = trainer.datamodule
        if datamodule is not None and callable(getattr(datamodule, "calibration_dataloader", None)):
            return datamodule.calibration_dataloader(), True
        if trainer.state.fn == "fit":
            return trainer.fit_loop._data_source.dataloader(), False
        # validate / test: no train loader is attached, but the data module (or model) can make one.
        source = datamodule if datamodule is not None else trainer.lightning_module
        make = getattr(source, "train_dataloader", None)
        return (make() if callable(make) else None), False

    def _draw_batches(self, trainer: L.Trainer) -> list[Any]:
        try:
            loader, dedicated = self._calibration_source(trainer)
        except NotImplementedError:  # a LightningModule without train_dataloader
            loader, dedicated = None, False
        if loader is None:
            raise InvalidInputError(
                "SVDCompression needs calibration data: pass calibration_dataloader, or use a data module "
                "with calibration_dataloader() or train_dataloader()"
            )
        # In ``setup`` the loader has no distributed sampler yet: under a process group each rank takes
        # every world-th batch, so the ranks calibrate on disjoint shards whose statistics the core sums.
        rank, world_size = world()
        count = self.calibration_batches or (None if dedicated else 16)
        stop = count * world_size if count is not None else None
        drawn = list(itertools.islice(iter(loader), stop))
        # Every rank draws the same batches, so all of them reach the same verdict (no rank is left
        # waiting in a collective for a peer that raised).
        if len(drawn) < world_size:
            raise InvalidInputError(
                f"calibration needs at least one batch per process: got {len(drawn)} batch(es) for "
                f"{world_size} process(es); draw more calibration samples or use a smaller batch size"
            )
        return drawn[rank::world_size]

    # -- hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # validate / test / predict: only at="setup" applies (compress, then evaluate the result);
        # the training points have nothing to do outside fit.
        if stage != "fit" and self.at != "setup":
            return
        self._chain_checkpoint_restore(pl_module)
        model = self.target_module(pl_module)
        find_targets(model, self.config.selector)  # fail on patterns matching nothing before calibration
        if stage == "fit":
            self._check_points_fit(trainer)
        if self.at == "setup" and not self.reports:
            self._run_stage(trainer, pl_module, 0, self.config.ratio, rebuild_optimizers=False)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = self.target_module(pl_module)
        self._manifest = build_manifest(model)
        config = getattr(model, "config", None)
        if hasattr(config, "to_json_string"):
            self._model_config = json.loads(config.to_json_string(use_diff=False))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.at == "step":
            self._maybe_run(trainer, pl_module, trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at == "epoch":
            self._maybe_run(trainer, pl_module, trainer.current_epoch)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at == "fit_end" and not self.reports:
            self._run_stage(trainer, pl_module, 0, self.config.ratio, rebuild_optimizers=False)

    # -- stages --------------------------------------------------------------------------------------
    def _check_points_fit(self, trainer: L.Trainer) -> None:
        if self.at not in ("step", "epoch"):
            return
        if trainer.world_size > 1:
            raise InvalidInputError(
                f"at={self.at!r} changes the model during training, which multi-process strategies do not "
                "support yet; use at='setup' with DDP/DeepSpeed"
            )
        self.check_schedule_reached(max_steps=trainer.max_steps, max_epochs=trainer.max_epochs)

    def check_schedule_reached(self, *, max_steps: int | None, max_epochs: int | None) -> None:
        """Refuse a schedule point the trainer never reaches (also used on recipes before any work)."""
        if self.at not in ("step", "epoch"):
            return
        last = self.stages[-1][0]
        limit = max_steps if self.at == "step" else max_epochs
        if limit is not None and limit >= 0 and last >= limit:
            name = "max_steps" if self.at == "step" else "max_epochs"
            raise InvalidInputError(f"schedule {self.at} {last} is never reached: the trainer stops at {name}={limit}")

    def _maybe_run(self, trainer: L.Trainer, pl_module: L.LightningModule, point: int) -> None:
        for stage_point, ratio in self.stages:
            if stage_point == point and point not in self.completed:
                self._run_stage(trainer, pl_module, point, ratio, rebuild_optimizers=True)

    def _run_stage(self, trainer, pl_module, point: int, ratio: float, *, rebuild_optimizers: bool) -> None:
        model = self.target_module(pl_module)
        config = dataclasses.replace(self.config, ratio=ratio)
        self._prepare_restart(model, config)
        batches = self._draw_batches(trainer) if config.spec.needs_calibration else None
        # A live bar only before training starts (Lightning's bar owns the terminal during training).
        live = self.show_progress and trainer.is_global_zero and not rebuild_optimizers
        with compression_progress(live) as progress:
            report = compress_model(model, config, batches, progress=progress)
        if self.merge_unprofitable is not None:
            merge_and_record(model, report, min_flop_saving=self.merge_unprofitable)
        self.reports.append(report)
        self.completed.append(point)
        self._manifest = build_manifest(model)
        if rebuild_optimizers:
            self._rebuild_optimizers(trainer)
        if self.show_progress:  # Lightning's own INFO channel: shown by default, rank 0 only
            rank_zero_info(
                f"adasvd: compressed {len(report.modules)} matrices with {config.method} at {self.at} {point}: "
                f"{report.parameters_before:,} -> {report.parameters_after:,} parameters "
                f"({report.achieved_ratio:.2%} of target weights removed) in {report.seconds:.1f}s"
            )
        metrics = {
            "compression/parameters": float(report.parameters_after),
            "compression/achieved_ratio": report.achieved_ratio,
            "compression/seconds": report.seconds,
        }
        metrics.update({
            f"compression/error/{m.name}": m.relative_error for m in report.modules if m.relative_error is not None
        })
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _prepare_restart(self, model: nn.Module, config: CompressionConfig) -> None:
        """First stage: remember the dense targets (restart="dense"); later stages: put them back."""
        if self.restart != "dense":
            return
        if not self._dense_modules:
            for _, _, targets in find_targets(model, config.selector):
                self._dense_modules.update({name: copy.deepcopy(m).cpu() for name, m in targets.items()})
            return
        device = next(model.parameters()).device
        for name, module in self._dense_modules.items():
            replace_module(model, name, copy.deepcopy(module).to(device))

    @staticmethod
    def _rebuild_optimizers(trainer: L.Trainer) -> None:
        """New optimizers/schedulers over the new parameters; schedulers fast-forwarded to now."""
        trainer.strategy.setup_optimizers(trainer)
        for config in trainer.lr_scheduler_configs:
            done = trainer.global_step if config.interval == "step" else trainer.current_epoch
            scheduler = config.scheduler
            if done > 0 and hasattr(scheduler, "last_epoch"):
                scheduler.last_epoch = done - 1
                with warnings.catch_warnings():
                    # A fast-forward, not a training step: PyTorch's "step() before optimizer.step()"
                    # warning does not apply (no schedule value is skipped).
                    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                    scheduler.step()

    # -- checkpoints ---------------------------------------------------------------------------------
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
        self._manifest = manifest

    def state_dict(self) -> dict:
        """Plain types only, so checkpoints load with ``weights_only=True``.

        The model config (when the target is a Hugging Face model) lets ``adasvd export`` rebuild the
        architecture from a sharded checkpoint alone.
        """
        return {
            "manifest": self._manifest,
            "model_config": self._model_config,
            "completed": list(self.completed),
            "method": self.config.method,
            "achieved_ratio": self.report.achieved_ratio if self.report else None,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.completed = list(state_dict.get("completed", []))
