"""Run by tests/test_deepspeed.py: compress at setup, recover with ZeRO on 2 CPU processes, checkpoint.

Lightning's subprocess launcher re-runs this file for rank 1. Rank 0 saves the trained sharded model's
logits on a fixed batch (ZeRO-3 gathers the shards for the forward pass).
"""

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

from adasvd_lightning import load_compressed, save_compressed
from adasvd_lightning.callbacks import SVDCompression
from adasvd_lightning.core.distributed import shutdown
from adasvd_lightning.training.module import CausalLMModule
from adasvd_lightning.training.strategies import CPUDeepSpeedStrategy


def main(model_dir: str, out_dir: str, stage: int, method: str, resume: bool = False) -> None:
    torch.set_num_threads(1)
    ids = torch.randint(0, 500, (32, 32), generator=torch.Generator().manual_seed(0))
    loader = DataLoader([{"input_ids": r} for r in ids], batch_size=4)
    module = CausalLMModule(load_compressed(model_dir).train(), learning_rate=1e-3)
    callback = SVDCompression(method=method, ratio=0.5, calibration_batches=2, show_progress=False)
    strategy = CPUDeepSpeedStrategy(stage=stage)
    # Partition even this tiny model's parameters, as a real model's are (DeepSpeed keeps parameters
    # below the persistence threshold whole on every rank).
    strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy,
                        max_steps=5 if resume else 3,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    if resume:  # continue the sharded run from its checkpoint: the structure must match the shards
        trainer.fit(module, train_dataloaders=loader, ckpt_path=f"{out_dir}/ckpt")
        if trainer.is_global_zero:
            torch.save({"step": trainer.global_step}, f"{out_dir}/resumed.pt")
        return
    trainer.fit(module, train_dataloaders=loader)
    trainer.save_checkpoint(f"{out_dir}/ckpt")
    # Every rank calls it: under ZeRO-3 the partitioned parameters are gathered, rank 0 writes.
    partitioned = any(p.numel() == 0 for p in module.model.parameters())
    save_compressed(module.model, f"{out_dir}/saved")
    module.eval()
    with torch.no_grad():
        logits = trainer.strategy.model(ids[:2])
    if trainer.is_global_zero:
        torch.save({"logits": logits.float(), "step": trainer.global_step, "partitioned": partitioned},
                   f"{out_dir}/logits.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], resume=len(sys.argv) > 5)
    shutdown()
