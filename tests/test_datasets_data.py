"""Recovery data through `datasets`: packing, splits, and a validation perplexity."""

import math

import lightning as L
import torch

from adasvd_lightning import load_compressed, load_tokenizer
from adasvd_lightning.training.datasets_data import CausalLMDataModule, pack_blocks
from adasvd_lightning.training.module import CausalLMModule


def test_pack_blocks_concatenates_and_drops_the_remainder():
    out = pack_blocks({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]}, 4)
    assert out == {"input_ids": [[1, 2, 3, 4], [5, 6, 7, 8]]}


def test_data_module_on_local_files_and_validation_ppl(tiny_reference, tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("".join(f"line {i} of the recovery corpus .\n" for i in range(400)))
    tokenizer = load_tokenizer(tiny_reference)
    data = CausalLMDataModule(tokenizer, train_files=[train], seq_len=32, batch_size=4, val_fraction=0.1,
                              cache_dir=str(tmp_path / "cache"))
    data.setup("fit")
    total = len(tokenizer("".join(f"line {i} of the recovery corpus .\n" for i in range(400)),
                          add_special_tokens=False)["input_ids"])
    assert len(data.train_set) + len(data.val_set) == total // 32
    assert abs(len(data.val_set) - 0.1 * (total // 32)) <= 1
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long

    module = CausalLMModule(load_compressed(tiny_reference).train())
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=3)
    trainer.fit(module, datamodule=data)
    ppl = float(trainer.validate(module, datamodule=data, verbose=False)[0]["val_ppl"])
    assert math.isfinite(ppl) and 1.0 < ppl < 2 * len(tokenizer)
