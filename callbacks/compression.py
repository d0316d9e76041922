"""`SVDCompression`: SVD compression of the LightningModule's model at a chosen point of training.

When:
  * ``at="setup"`` (default) — before training. ``setup`` runs after the data module is set up (so the
    train dataloader can supply calibration batches) but before the strategy wraps the model and before
    optimizers exist, so DDP/DeepSpeed and the optimizer see the final, factorized parameters. Only
    ``fit`` compresses; ``trainer.validate/test/predict`` on the same trainer evaluate the model as it
    is, unless ``compress_evaluation=True``.
  * ``at="step"`` / ``at="epoch"`` with ``schedule=[(point, ratio), ...]`` — after N completed optimizer
    steps (``global_step == N``) or after N completed epochs (points count from 1 in both cases; the
    end of the epoch whose 0-based ``current_epoch`` is N - 1). Several pairs make a progressive schedule
    (e.g. 20% → 40% → 60%); each stage re-compresses the current factors to the new ratio
    (``restart="factors"``, default) or compresses the dense weights (as they were at the first stage)
    again (``restart="dense"``, which discards what the factors learned between stages). After a
    stage your optimizer and LR scheduler objects stay; only their parameters change: each new factor
    joins the param group of the weight it replaces (same LR, same weight decay), the removed weights'
    optimizer state is dropped and the factors start with fresh state (e.g. Adam moments), while every
    untouched parameter keeps its state. So any scheduler — `ReduceLROnPlateau`, `SequentialLR`,
    `OneCycleLR`, transformers' warm-up schedules — continues exactly as without compression.
    Under DDP every rank calibrates on its shard of the calibration data, the statistics are summed
    across ranks, each matrix is decomposed once and broadcast (identical weights everywhere), and the
    DDP wrapper is rebuilt on the new parameters. Under DeepSpeed ZeRO-1/2/3 the same, and the engine
    is re-initialised on the factorized model (every parameter's optimizer state starts fresh there;
    `training.deepspeed_engine`); under ZeRO-3 every rank gathers the partitioned weights for the
    stage, and the new engine partitions the factors. FSDP refuses these points for now.
  * ``at="fit_end"`` — once training ends (compress-after-training).

Checkpoints: the factorized structure (manifest: rank and shape of every factorized module) and the
list of completed stages are saved in the callback's state in every checkpoint. Lightning loads model
weights *before* it restores callback state, but it calls the LightningModule's ``on_load_checkpoint``
first; the callback chains its own step in front of that hook and rebuilds the checkpoint's structure,
so the saved factors load into modules of the right shape — in ``fit``, ``validate``, ``test`` and
``predict`` with ``ckpt_path=...``. ``MyModule.load_from_checkpoint`` runs no callback: call
`adasvd_lightning.training.checkpoints.restore_structure` in your module's ``on_load_checkpoint``
(the library's `CausalLMModule` does). A run resumed with ``at="setup"`` does not compress again: the
checkpoint already holds the compressed model.
"""

from __future__ import annotations

import copy
import inspect
import dataclasses
import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from adasvd_lightning.core.config import CompressionConfig
from adasvd_lightning.core.distributed import gathered_parameters, world
from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.core.optimizers import swap_parameters
from adasvd_lightning.core.merging import check_min_flop_saving, merge_and_record
from adasvd_lightning.core.pipeline import compress_model
from adasvd_lightning.core.report import CompressionReport
from adasvd_lightning.core.serialization import apply_manifest, build_manifest
from adasvd_lightning.core.surgery import find_targets, replace_module
from adasvd_lightning.display import compression_progress
from adasvd_lightning.training.checkpoints import compression_state, model_of, read_checkpoint, restore_structure
from adasvd_lightning.training.deepspeed_engine import has_engine, reinitialise_engine, release_engine

__all__ = ["SVDCompression", "POINTS"]


POINTS = ("setup", "step", "epoch", "fit_end")
DEFAULT_RATIO = 0.4


def _pending_checkpoint(trainer: L.Trainer) -> str | None:
    """The checkpoint this fit/validate/test will load, seen from ``setup``.

    Lightning restores the checkpoint after ``setup`` and only then records its path, so ``setup``
    reads it from the running ``Trainer._run(model, ckpt_path=...)`` call (read only; a path set as
    ``trainer.ckpt_path`` is used first). None when no checkpoint will be loaded.
    """
    if trainer.ckpt_path:
        return str(trainer.ckpt_path)
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code is L.Trainer._run.__code__ and frame.f_locals.get("self") is trainer:
            path = frame.f_locals.get("ckpt_path")
            return str(path) if path else None
        frame = frame.f_back
    return None


def _read_local(path: str | None) -> dict | None:
    """The checkpoint's contents (weights_only) when ``path`` is local; None without one or when remote."""
    if path is None or not Path(path).expanduser().exists():
        return None
    return read_checkpoint(path)


def _is_ddp(strategy: Strategy) -> bool:
    """Plain DDP (DeepSpeed's strategy subclasses Lightning's DDP one but owns its own engine)."""
    return isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)


class SVDCompression(Callback):
    """Factorize the model's linear layers at ``setup``, at steps/epochs, or at the end of training.

    Args:
        method: compression preset (``svd``, ``asvd``, ``svd-llm``, ``adasvd``, ``duo-svd``, …).
        ratio: fraction of each target matrix's parameters removed, in (0, 1), for ``setup`` and
            ``fit_end`` (default 0.4). Giving it together with ``schedule`` is an error.
        at: ``"setup"``, ``"step"``, ``"epoch"`` or ``"fit_end"`` (see module docstring).
        schedule: for ``at="step"``/``"epoch"``: (point, ratio) pairs, points and ratios increasing.
            Point N means after N completed optimizer steps (``trainer.global_step == N``) or after N
            completed epochs (the end of the epoch whose 0-based ``current_epoch`` is N - 1).
        calibration_batches: how many batches each rank draws for calibration statistics. Default
            ``None``: a dedicated calibration loader (this argument, or the data module's
            ``calibration_dataloader()``) is used whole, split between the ranks; the train loader
            gives 16 batches per rank.
        calibration_dataloader: where to draw them from; default: the data module's
            ``calibration_dataloader()`` if it has one, else the train dataloader.
        model_attr: attribute of the LightningModule holding the model to compress (default
            ``"model"``; ``None``: the LightningModule itself). A missing attribute is an error.
        include / exclude: regular expressions selecting target linears by full module name.
        propagation: ``"compressed"`` (sequential) or ``"original"`` calibration inputs; ``None``
            (default): the method's own (`MethodSpec.propagation`).
        method_options: overrides of the preset's strategies and knobs (see ``MethodSpec``).
        restart: where later schedule stages start: ``"factors"`` (current factors) or ``"dense"``.
        execution_device: move one decoder block at a time to this device for compression while the
            model stays where it is (``CompressionConfig.execution_device``); default: in place.
        svd_driver: ``"auto"`` (default), ``"gram"`` or ``"svd"`` (``CompressionConfig.svd_driver``).
        statistics_dtype: ``"float32"`` (default) or ``"float64"`` Gram products of the calibration
            statistics (``CompressionConfig.statistics_dtype``; the sums stay float64).
        decomposition_threads: CPU threads of each eigh/SVD/Cholesky (default 1; ``None`` = torch's;
            ``CompressionConfig.decomposition_threads``).
        probe_table: a file that keeps the allocation's sensitivity probes as they are measured
            (module-KL allocations that probe, e.g. ``duo-svd``'s), so a run restarted after an
            interruption probes only what is missing (``CompressionConfig.probe_table``). One
            compression per table: not with a schedule of several stages (each stage probes another
            model).
        activation_dir: a folder to keep the calibration activations in, as files that vanish with the
            run, instead of memory (large calibration sets; ``CompressionConfig.activation_dir``).
        merge_unprofitable: after each stage, merge factorized layers saving less than this fraction of
            their multiply-adds back to dense (they would not run faster; e.g. 0.15). Default: keep all.
        show_progress: progress of calibration and per-block decomposition on global rank 0 (a
            transient rich bar before training on a terminal; plain log lines otherwise, so it never
            competes with Lightning's progress bar).
        compress_evaluation: with ``at="setup"``, also compress before ``trainer.validate`` / ``test``
            / ``predict`` (default: only ``fit`` compresses, so evaluating on the same trainer
            measures the model as it is).
    """

    def __init__(
        self,
        method: str = "svd-llm",
        ratio: float | None = None,
        *,
        at: str = "setup",
        schedule: Sequence[tuple[int, float]] | None = None,
        calibration_batches: int | None = None,
        calibration_dataloader: Iterable | None = None,
        model_attr: str | None = "model",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        propagation: str | None = None,
        method_options: dict | None = None,
        restart: str = "factors",
        execution_device: str | None = None,
        svd_driver: str = "auto",
        statistics_dtype: str = "float32",
        decomposition_threads: int | None = 1,
        probe_table: str | None = None,
        activation_dir: str | None = None,
        merge_unprofitable: float | None = None,
        show_progress: bool = True,
        compress_evaluation: bool = False,
    ) -> None:
        super().__init__()
        # Validate everything at construction: a bad ratio or method fails before the Trainer starts.
        if at not in POINTS:
            raise InvalidInputError(f"at must be one of {', '.join(POINTS)}, got {at!r}")
        if schedule and ratio is not None:
            raise InvalidInputError("give either ratio or schedule: with a schedule, each stage's ratio is in it")
        if compress_evaluation and at != "setup":
            raise InvalidInputError(f"compress_evaluation only applies to at='setup', not at={at!r}")
        self.config = CompressionConfig(
            method=method, ratio=DEFAULT_RATIO if ratio is None else ratio, include=include, exclude=exclude, propagation=propagation,
            method_options=method_options or {}, execution_device=execution_device, svd_driver=svd_driver,
            statistics_dtype=statistics_dtype, decomposition_threads=decomposition_threads, probe_table=probe_table,
            activation_dir=activation_dir,
        )
        if probe_table is not None and schedule and len(schedule) > 1:
            raise InvalidInputError(f"probe_table keeps the probes of one compression; this schedule has "
                                    f"{len(schedule)} stages, each probing another model — drop probe_table or "
                                    "use one stage")
        self.at = at
        self.compress_evaluation = compress_evaluation
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
            if isinstance(point, bool) or not isinstance(point, int) or point < 1:
                raise InvalidInputError(
                    f"schedule {at}s count completed {at}s and must be >= 1, got {point!r} "
                    "(to compress before training use at='setup')"
                )
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
        return model_of(pl_module, self.model_attr)

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
        # Every stage: a checkpoint written after compression (fit / validate / test / predict with
        # ckpt_path=...) gets its structure back before its weights load: here already when the path
        # is known (DeepSpeed builds its engine before it restores the checkpoint), and again in the
        # module's on_load_checkpoint, which Lightning calls just before loading the weights.
        self._chain_checkpoint_restore(pl_module)
        model = self.target_module(pl_module)
        path = _pending_checkpoint(trainer)
        client = _read_local(path)
        if client is not None and restore_structure(pl_module, client, model_attr=self.model_attr):
            rank_zero_info(f"adasvd: compressed structure restored from {path}")
        # at="setup" compresses for training only, unless asked (compress_evaluation=True): a
        # validate/test on the same trainer then measures the model as it is (e.g. a dense baseline).
        compresses = self.at == "setup" and (stage == "fit" or self.compress_evaluation)
        if stage != "fit" and not compresses:
            return
        find_targets(model, self.config.selector)  # fail on patterns matching nothing before calibration
        if stage == "fit":
            self._check_points_fit(trainer)
        if not compresses or self.reports:
            return
        if path is None:
            self._run_stage(trainer, pl_module, 0, self.config.ratio, during_training=False)
        elif client is not None and compression_state(client) is None:
            # Compression would run before the checkpoint's weights load, and dense weights do not fit factors.
            raise InvalidInputError(
                f"checkpoint {path} holds no compressed model, and at='setup' compresses before its weights "
                "load; load it first (MyModule.load_from_checkpoint) and fit without ckpt_path, or compress "
                "during training (at='step')"
            )
        else:  # a resumed run: the checkpoint holds the compressed model (a remote one is trusted to)
            rank_zero_info(f"adasvd: resuming from {path}; setup compression skipped")

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
        if self.at == "epoch":  # point N: after N completed epochs (current_epoch counts from 0)
            self._maybe_run(trainer, pl_module, trainer.current_epoch + 1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at == "fit_end" and not self.reports:
            self._run_stage(trainer, pl_module, 0, self.config.ratio, during_training=False)

    # -- stages --------------------------------------------------------------------------------------
    def _check_points_fit(self, trainer: L.Trainer) -> None:
        if self.at not in ("step", "epoch"):
            return
        strategy = trainer.strategy
        if trainer.world_size > 1 and not (_is_ddp(strategy) or isinstance(strategy, DeepSpeedStrategy)):
            raise InvalidInputError(
                f"at={self.at!r} changes the model during training, which {type(strategy).__name__} does not "
                "support yet (DDP and DeepSpeed ZeRO-1/2/3 do); use at='setup' there"
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
                self._run_stage(trainer, pl_module, point, ratio, during_training=True)

    def _run_stage(self, trainer, pl_module, point: int, ratio: float, *, during_training: bool) -> None:
        model = self.target_module(pl_module)
        config = dataclasses.replace(self.config, ratio=ratio)
        before = dict(model.named_parameters())
        batches = self._draw_batches(trainer) if config.spec.needs_calibration else None
        # A running DeepSpeed engine (a step/epoch point, or fit_end) is taken apart first: under
        # ZeRO-3 its hooks would gather and re-partition each module's shards around every forward
        # the calibration runs. It is rebuilt on the compressed model below.
        deepspeed_optimizer = release_engine(trainer.strategy) if has_engine(trainer.strategy) else None
        # A live bar only before training starts (Lightning's bar owns the terminal during training).
        live = self.show_progress and trainer.is_global_zero and not during_training
        # ZeRO-3 keeps a shard of each weight per rank: all ranks gather the whole weights for the
        # stage (calibration reads them, decomposition factors them); the untouched ones go back to
        # their shards afterwards, the new factors stay whole until DeepSpeed partitions them.
        with gathered_parameters(model), compression_progress(live) as progress:
            self._prepare_restart(model, config)
            report = compress_model(model, config, batches, progress=progress)
            if self.merge_unprofitable is not None:
                merge_and_record(model, report, min_flop_saving=self.merge_unprofitable)
        self.reports.append(report)
        self.completed.append(point)
        self._manifest = build_manifest(model)
        after = dict(model.named_parameters())
        if deepspeed_optimizer is not None:
            swap_parameters([deepspeed_optimizer], before, after)
            reinitialise_engine(trainer, deepspeed_optimizer)
        elif during_training:
            self._swap_into_optimizers(trainer, before, after)
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
    def _swap_into_optimizers(trainer: L.Trainer, before: dict, after: dict) -> None:
        """Keep the user's optimizers and schedulers; move the new parameters into their param groups.

        See `core.optimizers.swap_parameters` for the group and state rules. Under DDP the wrapper's
        gradient buckets were built over the old parameters, so it is rebuilt on the new ones (its
        constructor also broadcasts rank 0's parameters, which the compression already made equal).
        (Under DeepSpeed the engine is rebuilt instead: `training.deepspeed_engine`.)
        """
        strategy = trainer.strategy
        swap_parameters(trainer.optimizers, before, after)
        if _is_ddp(strategy) and isinstance(strategy.model, DistributedDataParallel):
            strategy.model = strategy.lightning_module
            strategy.configure_ddp()

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
        if restore_structure(pl_module, checkpoint, model_attr=self.model_attr):
            self._manifest = build_manifest(self.target_module(pl_module))

    def state_dict(self) -> dict:
        """Plain types only, so checkpoints load with ``weights_only=True``.

        The model config (when the target is a Hugging Face model) lets ``adasvd export`` rebuild the
        architecture from a sharded checkpoint alone.
        """
        return {
            "manifest": self._manifest,
            "model_attr": self.model_attr,
            "model_config": self._model_config,
            "completed": list(self.completed),
            "method": self.config.method,
            "achieved_ratio": self.report.achieved_ratio if self.report else None,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.completed = list(state_dict.get("completed", []))
