"""`SVDCompression` inside an ordinary Lightning training script."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from adasvd_lightning import LowRankLinear, count_parameters
from adasvd_lightning.callbacks import SVDCompression
from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.training.module import CausalLMModule
from conftest import tiny_model


def _loader(n=32, seq=32, seed=0):
    ids = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=4)


def _trainer(callbacks, steps=6):
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


def test_compress_at_setup_then_train():
    module = CausalLMModule(tiny_model("llama").train(), learning_rate=1e-3)
    before = count_parameters(module.model)
    callback = SVDCompression(method="svd-llm", ratio=0.5, calibration_batches=2)
    trainer = _trainer([callback])
    trainer.fit(module, train_dataloaders=_loader())
    assert trainer.global_step == 6
    report = callback.report
    assert report.calibration_tokens == 2 * 4 * 32
    assert count_parameters(module.model) == report.parameters_after
    assert before - report.parameters_after == report.linear_parameters_before - report.linear_parameters_after
    assert 0.5 <= report.achieved_ratio < 0.52
    layers = [m for m in module.model.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == 14
    # Backpropagation reached every factor of every compressed layer during training.
    assert all(layer.up.grad is not None and layer.down.grad is not None for layer in layers)
    loss = module._loss_terms({"input_ids": next(iter(_loader()))["input_ids"]})[0]
    assert torch.isfinite(loss)


def test_factors_are_what_the_optimizer_updates():
    module = CausalLMModule(tiny_model("llama").train(), learning_rate=1e-2)
    callback = SVDCompression(method="svd", ratio=0.5)
    snapshot = {}

    class Snap(L.Callback):
        def on_train_start(self, trainer, pl_module):
            snapshot["up"] = pl_module.model.model.layers[0].mlp.up_proj.up.detach().clone()

    _trainer([callback, Snap()], steps=3).fit(module, train_dataloaders=_loader())
    after = module.model.model.layers[0].mlp.up_proj.up.detach()
    assert not torch.equal(snapshot["up"], after)


def test_bad_arguments_fail_at_construction():
    with pytest.raises(InvalidInputError):
        SVDCompression(ratio=1.2)
    with pytest.raises(InvalidInputError):
        SVDCompression(method="nope")


def test_patterns_matching_nothing_fail_before_training():
    module = CausalLMModule(tiny_model("llama"))
    with pytest.raises(InvalidInputError, match="no linear layer matches"):
        _trainer([SVDCompression(include=["does_not_exist"])]).fit(module, train_dataloaders=_loader())


def test_resume_restores_the_compressed_structure_before_the_weights(tmp_path):
    module = CausalLMModule(tiny_model("llama").train(), learning_rate=1e-3)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[SVDCompression(method="svd-llm", ratio=0.5, calibration_batches=2)])
    trainer.fit(module, train_dataloaders=_loader())
    ckpt = tmp_path / "after-compression.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    ranks = {n: m.rank for n, m in module.model.named_modules() if isinstance(m, LowRankLinear)}

    # A fresh process would build a fresh dense model; a different seed and a different ratio make the
    # setup-time compression disagree with the checkpoint, which must win.
    fresh = CausalLMModule(tiny_model("llama", seed=9).train(), learning_rate=1e-3)
    seen = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["state"] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
            seen["step"] = trainer.global_step

    resumed = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[SVDCompression(method="svd-llm", ratio=0.3, calibration_batches=2), Capture()])
    resumed.fit(fresh, train_dataloaders=_loader(), ckpt_path=ckpt)
    assert seen["step"] == 4 and resumed.global_step == 6
    assert {n: m.rank for n, m in fresh.model.named_modules() if isinstance(m, LowRankLinear)} == ranks
    assert seen["state"].keys() == saved.keys()
    assert all(torch.equal(seen["state"][k], saved[k]) for k in saved)
    loss = fresh._loss_terms({"input_ids": next(iter(_loader()))["input_ids"]})[0]
    assert torch.isfinite(loss)
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    assert any("manifest" in v for v in state.values())


def test_users_training_script_plus_one_line_compresses_after_epoch_2_of_3():
    module = CausalLMModule(tiny_model("llama").train(), learning_rate=1e-3)
    before = count_parameters(module.model)
    snapshots = {}

    class Watch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            snapshots[trainer.current_epoch] = count_parameters(pl_module.model)

    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        callbacks=[Watch(), SVDCompression(at="epoch", schedule=[(2, 0.5)],
                                                           calibration_batches=2)])
    trainer.fit(module, train_dataloaders=_loader())  # 8 batches per epoch
    assert trainer.global_step == 24
    assert snapshots[0] == snapshots[1] == before  # compressed after 2 completed epochs
    assert snapshots[2] < before
    report = trainer.callbacks[1].report
    assert before - snapshots[2] == report.linear_parameters_before - report.linear_parameters_after
    assert 0.5 <= report.achieved_ratio < 0.51
    # The rebuilt optimizer trains the factors during epoch 2.
    layer = module.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, LowRankLinear) and layer.up.grad is not None
    loss = module._loss_terms({"input_ids": next(iter(_loader()))["input_ids"]})[0]
    assert torch.isfinite(loss)


def test_progressive_schedule_compresses_in_stages():
    module = CausalLMModule(tiny_model("llama").train(), learning_rate=1e-3)
    callback = SVDCompression(method="svd-llm", at="step", schedule=[(2, 0.2), (4, 0.4), (6, 0.6)],
                              calibration_batches=2)
    _trainer([callback], steps=8).fit(module, train_dataloaders=_loader())
    assert callback.completed == [2, 4, 6]
    achieved = [r.achieved_ratio for r in callback.reports]
    assert [round(a, 1) for a in achieved] == [0.2, 0.4, 0.6]
    after = [r.parameters_after for r in callback.reports]
    assert after[0] > after[1] > after[2] == count_parameters(module.model)
    # Later stages re-compress the factors of earlier ones (same modules, smaller ranks).
    mlp = module.model.model.layers[1].mlp
    assert all(isinstance(m, LowRankLinear) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert mlp.up_proj.rank == callback.reports[2].modules[-2].rank


@pytest.mark.parametrize("kwargs,message", [
    (dict(at="step", schedule=[(4, 0.4), (2, 0.6)]), "must increase"),
    (dict(at="step", schedule=[(2, 0.6), (4, 0.4)]), "ratios must increase"),
    (dict(at="step", schedule=[(2, 1.4)]), "ratio must be in"),
    (dict(at="epoch"), "needs schedule"),
    (dict(at="step", schedule=[(0, 0.4)]), "must be >= 1"),
    (dict(at="step", ratio=0.4, schedule=[(2, 0.4)]), "either ratio or schedule"),
    (dict(at="step", schedule=[(2, 0.4)], compress_evaluation=True), "only applies to at='setup'"),
    (dict(at="setup", schedule=[(1, 0.4)]), "only used with"),
    (dict(at="sometimes"), "at must be one of"),
    (dict(method="duo-svd", at="step", schedule=[(2, 0.2), (4, 0.4)], probe_table="probes.jsonl"),
     "this schedule has 2 stages"),
])
def test_bad_schedules_fail_at_construction(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        SVDCompression(**kwargs)


def test_schedule_beyond_max_steps_fails_before_training():
    module = CausalLMModule(tiny_model("llama").train())
    trainer = _trainer([SVDCompression(at="step", schedule=[(2, 0.2), (50, 0.4)])], steps=10)
    with pytest.raises(InvalidInputError, match="never reached"):
        trainer.fit(module, train_dataloaders=_loader())
    assert trainer.global_step == 0


def test_restart_from_dense_recompresses_the_original_weights():
    from adasvd_lightning.core.factorization import factorize

    module = CausalLMModule(tiny_model("llama").train(), learning_rate=1e-2)
    callback = SVDCompression(method="svd", at="step", schedule=[(2, 0.2), (4, 0.6)], restart="dense",
                              show_progress=False)
    seen = {}

    class Before(L.Callback):  # listed before SVDCompression: sees the dense weights of stage 1
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                seen["original"] = pl_module.model.model.layers[0].mlp.up_proj.weight.detach().clone()

    class After(L.Callback):  # listed after it: sees stage 2's fresh factors
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                layer = pl_module.model.model.layers[0].mlp.up_proj
                seen["rank"], seen["dense"] = layer.rank, layer.dense_weight().detach().double()

    _trainer([Before(), callback, After()], steps=6).fit(module, train_dataloaders=_loader())
    # Stage 2 starts from the dense weights of stage 1, not from the trained stage-1 factors: it
    # equals a fresh plain-SVD factorization of those weights at stage 2's rank.
    expected = factorize(seen["original"], seen["rank"]).dense()
    assert torch.allclose(seen["dense"], expected, atol=1e-6)
    assert callback.completed == [2, 4]


def test_mid_training_stage_with_bf16_mixed_clipping_and_a_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = CausalLMModule(tiny_model("llama").train(), learning_rate=1e-3)
    callback = SVDCompression(method="adasvd", at="step", schedule=[(3, 0.5)], calibration_batches=2,
                              show_progress=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=6, precision="bf16-mixed", gradient_clip_val=0.5,
                        logger=CSVLogger(tmp_path, name="run"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=_loader())
    assert trainer.global_step == 6 and callback.completed == [3]
    # Factors stay fp32 master weights under bf16 autocast, and the rebuilt optimizer holds them.
    layer = module.model.model.layers[1].self_attn.o_proj
    assert isinstance(layer, LowRankLinear) and layer.up.dtype == torch.float32
    params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(layer.up) in params and id(layer.down) in params
    metrics = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    header = metrics.splitlines()[0]
    assert "compression/achieved_ratio" in header and "train_loss" in header
    assert "compression/error/model.layers.0.self_attn.q_proj" in header


def test_plain_lightning_module_with_linear_layers():
    class Regressor(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=g), torch.randn(64, 8, generator=g)
    loader = DataLoader(list(zip(x, y)), batch_size=8)
    module = Regressor()
    callback = SVDCompression(method="svd-llm", ratio=0.5, model_attr="net", calibration_batches=4,
                              show_progress=False)
    _trainer([callback], steps=4).fit(module, train_dataloaders=loader)
    assert isinstance(module.net[0], LowRankLinear) and isinstance(module.net[2], LowRankLinear)
    assert callback.report.calibration_tokens == 4 * 8


@pytest.mark.parametrize("mode", ["factors", "up", "down"])
def test_trainable_parameters_select_what_recovery_updates(mode):
    from adasvd_lightning.callbacks import TrainableParameters

    module = CausalLMModule(tiny_model("llama").train(), learning_rate=1e-2)
    before = {k: v.detach().clone() for k, v in module.model.named_parameters()}
    trainer = _trainer([SVDCompression(ratio=0.5, calibration_batches=2, show_progress=False),
                        TrainableParameters(mode)], steps=2)
    snapshot = {}

    class Snap(L.Callback):
        def on_train_start(self, trainer, pl_module):
            snapshot.update({k: v.detach().clone() for k, v in pl_module.model.named_parameters()})

    trainer.callbacks.append(Snap())
    trainer.fit(module, train_dataloaders=_loader())
    changed = {k for k, v in module.model.named_parameters() if not torch.equal(v, snapshot[k])}
    assert changed
    if mode == "factors":
        assert all(k.endswith((".up", ".down")) for k in changed)
    else:
        assert all(k.endswith(f".{mode}") for k in changed)
    assert torch.equal(module.model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_trainable_rejects_unknown_mode_and_dense_models():
    from adasvd_lightning.callbacks import TrainableParameters

    with pytest.raises(InvalidInputError):
        TrainableParameters("lora")
    module = CausalLMModule(tiny_model("llama").train())
    with pytest.raises(InvalidInputError, match="no factorized modules"):
        _trainer([TrainableParameters("up")]).fit(module, train_dataloaders=_loader())
