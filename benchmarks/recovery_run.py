"""One recovery run (launched by benchmarks/recovery.py; Lightning re-runs it for rank 1).

    python benchmarks/recovery_run.py MODEL OUT STAGE TRAINABLE STEPS COMPRESS(0/1) METHOD RATIO
"""

import sys

import lightning as L
import torch

from adasvd_lightning import load_compressed, load_tokenizer
from adasvd_lightning.callbacks import SVDCompression, TrainableParameters
from adasvd_lightning.core.distributed import shutdown
from adasvd_lightning.display import quiet_libraries
from adasvd_lightning.core.blocks import block_loader
from adasvd_lightning.core.corpus import embedded_corpus_path
from adasvd_lightning.training.module import CausalLMModule
from adasvd_lightning.training.strategies import CPUDeepSpeedStrategy


def main(model_dir, out, stage, trainable, steps, compress, method, ratio) -> None:
    quiet_libraries()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    tokenizer = load_tokenizer(model_dir)
    module = CausalLMModule(load_compressed(model_dir).train(), learning_rate=5e-4, warmup_steps=10)
    callbacks = []
    if compress:
        callbacks.append(SVDCompression(method=method, ratio=ratio, calibration_batches=4, show_progress=False))
    callbacks.append(TrainableParameters(trainable))
    data = block_loader(tokenizer, embedded_corpus_path("train"), seq_len=256, batch_size=4, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(stage=stage), max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0,
                        callbacks=callbacks)
    trainer.fit(module, train_dataloaders=data)
    trainer.save_checkpoint(out)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), a[3], int(a[4]), a[5] == "1", a[6], float(a[7]))
    shutdown()
