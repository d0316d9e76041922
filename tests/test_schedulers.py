"""Item: LR schedulers after a mid-training stage keep the schedule they would follow without compression.

The callback keeps the user's optimizer and scheduler objects and swaps the new factors into the param
group of the weight each replaces, so every scheduler's state survives the stage.
"""

import lightning as L
import pytest
import torch
from torch.optim import lr_scheduler as S
from torch.utils.data import DataLoader

from adasvd_lightning import LowRankLinear
from adasvd_lightning.callbacks import SVDCompression
from adasvd_lightning.training.module import CausalLMModule
from conftest import tiny_model

STEPS, STAGE = 7, 3


def _loader():
    ids = torch.randint(0, 128, (28, 16), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=4)


def _transformers(kind):
    def make(opt):
        from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

        fn = get_linear_schedule_with_warmup if kind == "linear" else get_cosine_schedule_with_warmup
        return fn(opt, num_warmup_steps=2, num_training_steps=STEPS)
    return make


SCHEDULERS = {
    "LambdaLR": lambda o: S.LambdaLR(o, lambda s: 1 / (1 + s)),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda s: 0.8),
    "StepLR": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.2, total_iters=5),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.7),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=6, power=2.0),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=6),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3),
    "CyclicLR": lambda o: S.CyclicLR(o, base_lr=1e-4, max_lr=1e-2, step_size_up=2),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=1e-2, total_steps=STEPS),
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=2), S.CosineAnnealingLR(o, T_max=5)], milestones=[2]),
    "ChainedScheduler": lambda o: S.ChainedScheduler(
        [S.ExponentialLR(o, gamma=0.9), S.MultiStepLR(o, milestones=[2, 4], gamma=0.5)]),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, patience=1, factor=0.5),
    "transformers-linear-warmup": _transformers("linear"),
    "transformers-cosine-warmup": _transformers("cosine"),
}


def test_every_public_torch_scheduler_is_covered():
    public = {n for n, v in vars(S).items() if isinstance(v, type) and issubclass(v, S.LRScheduler)
              and v is not S.LRScheduler and not n.startswith("_")} | {"ReduceLROnPlateau"}
    assert public <= set(SCHEDULERS), public - set(SCHEDULERS)


class Module(CausalLMModule):
    """A user's module: two param groups with their own LR and weight decay, any scheduler, per step."""

    def __init__(self, make_scheduler):
        super().__init__(tiny_model("llama").train())
        self.make_scheduler = make_scheduler

    def training_step(self, batch, batch_idx):
        self.log("constant", 1.0)  # ReduceLROnPlateau's metric: plateaus identically with and without
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1, "lr": 2e-3},
                                            {"params": no_decay, "weight_decay": 0.0, "lr": 1e-3}])
        scheduler = self.make_scheduler(self.optimizer)
        return {"optimizer": self.optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "monitor": "constant"}}


class Record(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        groups = trainer.optimizers[0].param_groups
        self.lrs.append([(g["lr"], g.get("betas")) for g in groups])


def _run(make_scheduler, compress: bool):
    module = Module(make_scheduler)
    record = Record()
    callbacks = [record] + ([SVDCompression(method="svd", at="step", schedule=[(STAGE, 0.5)], show_progress=False)]
                            if compress else [])
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=_loader())
    return module, trainer, record.lrs


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_after_a_stage_equals_the_uncompressed_schedule(name):
    _, _, expected = _run(SCHEDULERS[name], compress=False)
    module, trainer, got = _run(SCHEDULERS[name], compress=True)
    assert trainer.global_step == STEPS
    assert got == expected  # LR (and cycled betas) of both groups at every step, bit for bit
    # The user's objects survived the stage.
    assert trainer.optimizers[0] is module.optimizer
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is module.optimizer


def test_factors_join_their_weights_group_and_state_is_fresh_only_for_them():
    module, trainer, _ = _run(SCHEDULERS["StepLR"], compress=True)
    decay, no_decay = module.optimizer.param_groups
    factors = [p for m in module.model.modules() if isinstance(m, LowRankLinear) for p in (m.up, m.down)]
    assert len(factors) == 28
    ids = {id(p) for p in decay["params"]}
    assert all(id(p) in ids for p in factors) and decay["weight_decay"] == 0.1
    assert all(p.ndim < 2 for p in no_decay["params"])
    # Exactly the model's parameters, each once.
    held = [id(p) for g in module.optimizer.param_groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in module.model.parameters())
    # Adam state: untouched parameters kept counting from step 0; factors started fresh at the stage.
    state = module.optimizer.state
    assert int(state[module.model.model.embed_tokens.weight]["step"]) == STEPS
    assert all(int(state[p]["step"]) == STEPS - STAGE for p in factors)
    assert len(state) == len(held)  # no state left for the removed dense weights
