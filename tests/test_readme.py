"""The README's tour snippets run as written (the tiny reference model stands in for `reference`)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_tour_step_1_then_step_3(tiny_reference, tmp_path, monkeypatch):
    blocks = python_blocks()
    train = next(b for b in blocks if "SVDCompression(method=" in b and "trainer.fit(module" in b)
    load = next(b for b in blocks if 'ada.load_compressed("compressed")' in b)
    monkeypatch.chdir(tmp_path)
    # Same code; only the model, the sizes and the step count are shrunk for a 2-core CI machine.
    train = (train.replace('"reference"', repr(str(tiny_reference))).replace("seq_len=256", "seq_len=32")
             .replace("max_steps=100", "max_steps=3, logger=False, enable_checkpointing=False, limit_val_batches=2"))
    scope: dict = {}
    exec(compile(train, "README step 1", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.global_step == 3
    report = trainer.callbacks[0].report
    assert abs(report.achieved_ratio - 0.4) < 0.01
    exec(compile(load, "README step 3", "exec"), scope)
    assert scope["ada"].count_parameters(scope["model"]) == report.parameters_after
