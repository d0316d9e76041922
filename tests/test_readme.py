"""The README's tour snippets run as written (the tiny reference model stands in for `reference`)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_tour_step_1_then_step_3(tiny_reference, tmp_path, monkeypatch):
    from adasvd_lightning import embedded_corpus_path

    blocks = python_blocks()
    train = next(b for b in blocks if "SVDCompression(method=" in b and "trainer.fit(module" in b)
    load = next(b for b in blocks if 'ada.load_compressed("compressed")' in b)
    monkeypatch.chdir(tmp_path)
    # The user's own text file: a slice of the embedded training split.
    (tmp_path / "train.txt").write_text(embedded_corpus_path("train").read_text()[:60_000])
    # Same code; only the model folder and the step count are changed for a 2-core CI machine.
    assert '"path/to/llama-or-qwen-folder"' in train and "max_steps=100" in train
    train = (train.replace('"path/to/llama-or-qwen-folder"', repr(str(tiny_reference)))
             .replace("max_steps=100", "max_steps=3, logger=False, enable_checkpointing=False"))
    scope: dict = {}
    exec(compile(train, "README step 1", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.global_step == 3
    report = trainer.callbacks[0].report
    assert abs(report.achieved_ratio - 0.4) < 0.01
    exec(compile(load, "README step 3", "exec"), scope)
    assert scope["ada"].count_parameters(scope["model"]) == report.parameters_after


def test_restore_structure_snippet_makes_load_from_checkpoint_work(tmp_path):
    """The README's `on_load_checkpoint` snippet, on a user's module, after a compressed fit."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from adasvd_lightning.callbacks import SVDCompression
    from conftest import tiny_model

    snippet = next(b for b in python_blocks() if "restore_structure(self, checkpoint)" in b)
    scope: dict = {"L": L}
    exec(compile(snippet, "README restore", "exec"), scope)

    class Module(scope["MyModule"]):
        def __init__(self):
            super().__init__()
            self.model = tiny_model("llama").train()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))
    module = Module()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SVDCompression(method="svd", ratio=0.5, show_progress=False)])
    trainer.fit(module, DataLoader([{"input_ids": r} for r in ids], batch_size=4))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    loaded = Module.load_from_checkpoint(tmp_path / "c.ckpt")
    expected = module.model.state_dict()
    assert loaded.model.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.model.state_dict().items())
