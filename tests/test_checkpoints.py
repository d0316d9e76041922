"""Every way back out of a post-compression checkpoint, and the callback's explicit decisions."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from adasvd_lightning import LowRankLinear, count_parameters
from adasvd_lightning.callbacks import SVDCompression
from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.training.module import CausalLMModule
from conftest import tiny_model


def _loader(n=16, seq=16):
    ids = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=4)


def _trainer(callbacks=(), steps=3, **kwargs):
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks), **kwargs)


class UserModule(L.LightningModule):
    """A user's own module: no adasvd code, no on_load_checkpoint, model under ``self.net``."""

    def __init__(self, seed=0):
        super().__init__()
        self.net = tiny_model("llama", seed=seed).train()

    def training_step(self, batch, batch_idx):
        return self.net(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.net(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss)

    test_step = validation_step

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.fixture(scope="module")
def compressed_ckpt(tmp_path_factory):
    """A checkpoint written after mid-training compression of a user's module (+ its val loss)."""
    path = tmp_path_factory.mktemp("ckpt") / "after.ckpt"
    module = UserModule()
    trainer = _trainer([SVDCompression(method="svd", at="step", schedule=[(1, 0.5)], model_attr="net",
                                       show_progress=False)])
    trainer.fit(module, train_dataloaders=_loader())
    trainer.save_checkpoint(path)
    loss = _trainer().validate(module, dataloaders=_loader(), verbose=False)[0]["val_loss"]
    return path, loss, count_parameters(module.net), module.net


@pytest.mark.parametrize("fn", ["validate", "test"])
def test_validate_and_test_from_a_post_compression_checkpoint(compressed_ckpt, fn):
    path, loss, params, _ = compressed_ckpt
    fresh = UserModule(seed=5)  # dense, other weights: the checkpoint must win
    callback = SVDCompression(method="svd", ratio=0.3, model_attr="net", show_progress=False)
    result = getattr(_trainer([callback]), fn)(fresh, dataloaders=_loader(), ckpt_path=path, verbose=False)[0]
    assert result["val_loss"] == pytest.approx(loss, rel=1e-6)
    assert count_parameters(fresh.net) == params and callback.reports == []


def test_load_from_checkpoint_of_the_library_module_needs_no_callback(tmp_path):
    module = CausalLMModule(tiny_model("llama").train())
    trainer = _trainer([SVDCompression(method="svd", ratio=0.5, show_progress=False)], steps=2)
    trainer.fit(module, train_dataloaders=_loader())
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    loaded = CausalLMModule.load_from_checkpoint(tmp_path / "c.ckpt", model=tiny_model("llama", seed=3))
    assert sum(isinstance(m, LowRankLinear) for m in loaded.model.modules()) == 14
    state = module.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    # And trainer.test(ckpt_path=...) of a dense fresh module, no callback at all.
    result = _trainer().test(CausalLMModule(tiny_model("llama", seed=4)), dataloaders=_loader(),
                             ckpt_path=tmp_path / "c.ckpt", verbose=False)[0]
    assert result["test_ppl"] > 1


def test_setup_compresses_only_in_fit_unless_asked():
    module = UserModule()
    before = count_parameters(module.net)
    plain = SVDCompression(method="svd", ratio=0.5, model_attr="net", show_progress=False)
    _trainer([plain]).validate(module, dataloaders=_loader(), verbose=False)
    assert count_parameters(module.net) == before and plain.reports == []
    asked = SVDCompression(method="svd", ratio=0.5, model_attr="net", show_progress=False, compress_evaluation=True)
    _trainer([asked]).test(module, dataloaders=_loader(), verbose=False)
    assert count_parameters(module.net) == asked.report.parameters_after < before


def test_resumed_setup_run_skips_compression_and_a_dense_checkpoint_is_refused(tmp_path):
    module = UserModule()
    first = SVDCompression(method="svd", ratio=0.5, model_attr="net", show_progress=False)
    trainer = _trainer([first], steps=2)
    trainer.fit(module, train_dataloaders=_loader())
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    resumed = SVDCompression(method="svd-llm", ratio=0.5, model_attr="net", show_progress=False)
    fresh = UserModule(seed=2)
    _trainer([resumed], steps=4).fit(fresh, train_dataloaders=_loader(), ckpt_path=tmp_path / "c.ckpt")
    assert resumed.reports == [] and count_parameters(fresh.net) == first.report.parameters_after

    dense = _trainer(steps=1)
    dense.fit(UserModule(), train_dataloaders=_loader())
    dense.save_checkpoint(tmp_path / "dense.ckpt")
    late = SVDCompression(method="svd", ratio=0.5, model_attr="net", show_progress=False)
    with pytest.raises(InvalidInputError, match="holds no compressed model"):
        _trainer([late], steps=2).fit(UserModule(), train_dataloaders=_loader(), ckpt_path=tmp_path / "dense.ckpt")
    assert late.reports == []


def test_missing_model_attr_is_an_error_not_the_whole_module():
    with pytest.raises(InvalidInputError, match="has no module attribute 'model'"):
        _trainer([SVDCompression(method="svd", show_progress=False)]).fit(UserModule(), train_dataloaders=_loader())
    whole = SVDCompression(method="svd", ratio=0.5, model_attr=None, show_progress=False)
    _trainer([whole], steps=1).fit(UserModule(), train_dataloaders=_loader())
    names = [m.name for m in whole.report.modules]  # named from the LightningModule itself, as asked
    assert len(names) == 14 and all(n.startswith("net.model.layers.") for n in names)


def test_export_reads_an_ordinary_ckpt_file(compressed_ckpt, tmp_path):
    from adasvd_lightning import load_compressed
    from test_cli import last_json, run

    path, _, params, net = compressed_ckpt
    ids = next(iter(_loader()))["input_ids"]
    with torch.no_grad():
        expected = net.eval()(ids).logits
    # model_attr "net" comes from the callback's state; the architecture from the stored config.
    result = run("export", "--checkpoint", str(path), "--out", str(tmp_path / "c"), "--json")
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["out"] == str((tmp_path / "c").resolve())
    model = load_compressed(tmp_path / "c")
    assert count_parameters(model) == params
    result = run("export", "--checkpoint", str(path), "--out", str(tmp_path / "d"), "--dense")
    assert result.returncode == 0, result.stderr
    dense = load_compressed(tmp_path / "d")
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules()) and count_parameters(dense) > params
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
        assert torch.allclose(dense(ids).logits, expected, atol=1e-4)


def test_export_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    from test_cli import run

    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.ckpt")
    result = run("export", "--checkpoint", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "not a Lightning checkpoint" in result.stderr
    assert not (tmp_path / "o").exists()


def test_densify_multiplies_the_factors_back():
    from adasvd_lightning import CompressionConfig, compress_model, densify

    for family in ("llama", "gpt2"):
        model = tiny_model(family)
        compress_model(model, CompressionConfig(method="svd", ratio=0.5), None)
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            before = model(ids).logits
            assert densify(model) is model
            after = model(ids).logits
        assert not any(isinstance(m, LowRankLinear) for m in model.modules())
        assert count_parameters(model) == count_parameters(tiny_model(family))
        assert torch.allclose(before, after, atol=1e-5)
