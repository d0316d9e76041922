"""Terminal display: the summary table and the live progress next to Lightning's RichProgressBar."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar
from rich.console import Console
from torch.utils.data import DataLoader

from adasvd_lightning import display
from adasvd_lightning.callbacks import SVDCompression
from adasvd_lightning.core.config import CompressionConfig
from adasvd_lightning.core.pipeline import compress_model
from adasvd_lightning.training.module import CausalLMModule
from conftest import tiny_model


def _render(renderable) -> str:
    console = Console(width=120, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


def test_summary_table_lists_every_module_and_the_totals(token_batches):
    model = tiny_model("llama")
    report = compress_model(model, CompressionConfig(method="duo-svd", ratio=0.5), token_batches)
    text = _render(display.report_table(report))
    for column in ("module", "shape", "rank", "kept", "params", "rel. err"):
        assert column in text
    assert "modules under model.layers." in text
    assert "0.self_attn.q_proj" in text and "1.mlp.down_proj" in text
    first = report.modules[0]
    assert f"{first.out_features}×{first.in_features}" in text and f"{first.relative_error:.4f}" in text
    assert f"achieved {report.achieved_ratio:.2%}" in text
    assert f"{report.seconds:.1f}s" in text
    assert "refused" not in text  # duo-svd compensates nothing, so no split is refused
    # A refused column split is said in the caption, not only kept in the report.
    report.modules[-1].refused_columns = 7
    caption = " ".join(_render(display.report_table(report)).split())  # the caption wraps with its length
    assert "1 column split(s) refused" in caption
    assert "probe table" not in caption
    # Rows taken from a probe table (`CompressionConfig.probe_table`) are said too.
    report.allocation.update(sensitivity_rows_reused=5, sensitivity_probes=27)
    caption = " ".join(_render(display.report_table(report)).split())
    assert "5 module(s) allocated from the probe table's rows, 27 probes measured" in caption


@pytest.mark.parametrize("at", ["setup", "step"])
def test_live_progress_coexists_with_rich_progress_bar(at, token_batches, monkeypatch, tmp_path):
    # A terminal console, so the transient live bar is really drawn in setup; mid-training stages
    # must not open a second live display while Lightning's RichProgressBar owns the terminal.
    from adasvd_lightning import terminal

    tty = Console(force_terminal=True, file=open(tmp_path / "tty", "w"))
    monkeypatch.setattr(display, "console", tty)
    monkeypatch.setattr(terminal, "console", tty)  # the progress bars' console
    loader = DataLoader([{"input_ids": b[0]} for b in token_batches] * 4, batch_size=2)
    schedule = {"schedule": [(1, 0.5)]} if at == "step" else {"ratio": 0.5}
    callback = SVDCompression(method="svd-llm", at=at, calibration_batches=2, **schedule)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[RichProgressBar(), callback])
    trainer.fit(CausalLMModule(tiny_model("llama").train()), train_dataloaders=loader)
    assert trainer.global_step == 3 and len(callback.reports) == 1
    drawn = (tmp_path / "tty").read_text()
    # setup: the transient bar was drawn before training; step: progress went to plain log lines.
    assert ("calibrate" in drawn) if at == "setup" else drawn == ""
