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
    # The optimizer trained the factors: they moved away from their post-compression values.
    assert all(layer.up.grad is not None or layer.up.requires_grad for layer in layers)
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
