"""Run by tests/test_mid_training_ddp.py: a progressive schedule *during* training, DDP on 2 CPU processes.

Modes: ``ddp`` (2 processes, batch 4 per rank), ``single`` (1 process, batch 8: the same samples per
step), ``resume`` (2 processes, continue the ``ddp`` run's checkpoint written after the last stage);
``zero2`` / ``zero2-resume`` and ``zero3`` / ``zero3-resume``: the same two with DeepSpeed ZeRO-2 / ZeRO-3
(`CPUDeepSpeedStrategy`; ZeRO-3 weights are gathered from their shards before they are recorded).
A ``-sgd`` suffix (``single-sgd``, ``zero3-sgd``, ``zero3-resume-sgd``) trains with plain SGD instead of
AdamW (`SGDModule`); ``-fitend`` (``single-fitend-sgd``, ``zero3-fitend-sgd``) compresses once, at the end
of fit, instead of following the schedule.
Lightning's subprocess launcher re-runs this file for rank 1. Every rank saves its weights and losses.
"""

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, sys.argv[2])  # tests/ (for conftest.tiny_model)
from conftest import tiny_model  # noqa: E402

from adasvd_lightning.callbacks import SVDCompression  # noqa: E402
from adasvd_lightning.core.distributed import gathered_parameters, shutdown  # noqa: E402
from adasvd_lightning.training.module import CausalLMModule  # noqa: E402
from adasvd_lightning.training.strategies import CPUDeepSpeedStrategy  # noqa: E402

SCHEDULE = [(2, 0.3), (4, 0.5)]


def samples() -> list[dict]:
    """Learnable sequences: arithmetic progressions of tokens with random starts and strides."""
    g = torch.Generator().manual_seed(0)
    start, stride = torch.randint(0, 128, (32, 1), generator=g), torch.randint(1, 4, (32, 1), generator=g)
    return [{"input_ids": row} for row in (start + stride * torch.arange(16)) % 128]


class Data(L.LightningDataModule):
    """Unshuffled shards (rank r: samples r, r + world, ...): the union of the ranks' k-th batches of 4
    is the single process's k-th batch of 8, so both runs take the same gradient steps."""

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(samples()[rank::world], batch_size=8 // world)


def whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, gathered from their ZeRO-3 shards where partitioned (all ranks must call it)."""
    with gathered_parameters(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Losses(L.Callback):
    """Each step's loss; the weights right after the first and the last stage (listed after `SVDCompression`)."""

    def __init__(self):
        self.values, self.after_first, self.after_stage = [], None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))
        if trainer.global_step == SCHEDULE[0][0]:
            self.after_first = whole_state(pl_module.model)
        if trainer.global_step == SCHEDULE[-1][0]:
            self.after_stage = whole_state(pl_module.model)


class SGDModule(CausalLMModule):
    """Plain SGD: no optimizer state, so DeepSpeed's fresh state after each stage changes nothing and a
    DeepSpeed run must follow the single process through every stage. Two groups (weight decay on
    matrices only), so each new factor must also land in its weight's group for the runs to agree."""

    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        return torch.optim.SGD([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                               lr=0.5)


def main(out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    calibration = DataLoader(samples()[:16], batch_size=4)  # 4 batches: 2 per rank under DDP, 4 in one process
    parts = mode.split("-")
    kind, resume, sgd = parts[0], "resume" in parts, "sgd" in parts
    model = tiny_model("llama").train()
    module = SGDModule(model) if sgd else CausalLMModule(model, learning_rate=1e-2, warmup_steps=1)
    if "fitend" in parts:  # one compression once training ends, instead of the schedule
        callback = SVDCompression(method="svd-llm", at="fit_end", ratio=0.5, calibration_dataloader=calibration,
                                  show_progress=False)
    else:
        callback = SVDCompression(method="svd-llm", at="step", schedule=SCHEDULE, calibration_dataloader=calibration,
                                  show_progress=False)
    losses = Losses()
    devices = 1 if kind == "single" else 2
    zero = int(kind[4]) if kind.startswith("zero") else None
    strategy = CPUDeepSpeedStrategy(stage=zero) if zero else "ddp" if devices > 1 else "auto"
    if zero == 3:  # partition even this tiny model's weights (DeepSpeed keeps small ones whole on every rank),
        # and split each param group into several ZeRO-3 sub-groups, as a large model's are
        strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        strategy.config["zero_optimization"]["sub_group_size"] = 10_000
    checkpoint = f"{out_dir}/{kind if zero else 'after-stages'}{'-sgd' if sgd else ''}.ckpt"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=8 if resume else 6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, losses],
                        use_distributed_sampler=False)
    trainer.fit(module, datamodule=Data(), ckpt_path=checkpoint if resume else None)
    if devices > 1 and not resume:
        trainer.save_checkpoint(checkpoint)
    # The optimizer holds exactly the model's parameters (DeepSpeed lists them in bit16_groups, or
    # ZeRO-3's fp16_groups).
    groups = [getattr(o, "bit16_groups", None) or getattr(o, "fp16_groups", None) or [g["params"] for g in o.param_groups]
              for o in trainer.optimizers]
    params = {id(p) for o in groups for g in o for p in g}
    torch.save({"state": whole_state(module.model), "losses": losses.values, "after_stage": losses.after_stage,
                "after_first": losses.after_first, "completed": callback.completed,
                "step": trainer.global_step, "reports": [r.parameters_after for r in callback.reports],
                "optimized": all(id(p) in params for p in module.model.parameters()),
                "partitioned": all(p.numel() == 0 for p in module.model.parameters()),
                "groups": sum(len(o) for o in groups)},
               f"{out_dir}/{mode}-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[3])
    shutdown()
