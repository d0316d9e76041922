"""Run by tests/test_distributed.py: an ordinary Lightning script with DDP on 2 CPU processes + SVDCompression.

Lightning's subprocess launcher re-runs this file for rank 1. Every rank saves its model's state dict.
"""

import math
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, sys.argv[2])  # tests/ (for conftest.tiny_model)
from conftest import tiny_model  # noqa: E402

from adasvd_lightning.callbacks import SVDCompression  # noqa: E402
from adasvd_lightning.training.module import CausalLMModule  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    ids = torch.randint(0, 128, (32, 32), generator=torch.Generator().manual_seed(0))
    loader = DataLoader([{"input_ids": row} for row in ids], batch_size=4)
    module = CausalLMModule(tiny_model("llama").train(), learning_rate=1e-3)
    callback = SVDCompression(method="svd-llm", ratio=0.5, calibration_batches=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback])
    trainer.fit(module, train_dataloaders=loader)
    # Validation under DDP: padded rows (attention_mask 0) give the ranks different token counts, so
    # only a token-weighted reduction over all processes equals the single-process value.
    mask = (torch.arange(32) < torch.tensor([32, 8, 20, 4, 32, 16, 2, 30])[:, None]).long()
    val = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(8)]
    ppl = trainer.validate(module, dataloaders=DataLoader(val, batch_size=2), verbose=False)[0]["val_ppl"]
    with torch.no_grad():
        terms = [module._loss_terms({k: v[None] for k, v in row.items()}) for row in val]
    expected = math.exp(float(sum(t for t, _ in terms)) / sum(n for _, n in terms))
    torch.save({"state": module.model.state_dict(), "tokens": callback.report.calibration_tokens,
                "after_setup": callback.report.parameters_after, "val_ppl": ppl, "expected_ppl": expected},
               f"{out_dir}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
