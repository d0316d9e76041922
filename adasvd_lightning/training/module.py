"""`CausalLMModule`: a LightningModule around any Hugging Face causal LM.

Used to train the reference model and for recovery fine-tuning. Validation reports perplexity as the
exponent of the token-weighted mean NLL, summed in float64 across batches (a mean of per-batch
perplexities would be biased).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn

from ..core.errors import InvalidInputError

__all__ = ["CausalLMModule", "PretrainedCausalLMModule", "warmup_cosine"]


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``floor`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLMModule(L.LightningModule):
    """Next-token training of ``model`` on batches with ``input_ids`` (and optional ``attention_mask``)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        betas: tuple[float, float] = (0.9, 0.95),
    ) -> None:
        super().__init__()
        self.model = model
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.betas = tuple(betas)
        self._val_nll = 0.0
        self._val_tokens = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _loss_terms(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed next-token NLL (fp32) and number of predicted tokens."""
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        logits = self(input_ids, mask)[:, :-1].float()
        targets = input_ids[:, 1:]
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        if mask is not None:
            keep = mask[:, 1:].reshape(-1).to(nll.dtype)
            return (nll * keep).sum(), int(keep.sum())
        return nll.sum(), nll.numel()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        total, tokens = self._loss_terms(batch)
        loss = total / max(1, tokens)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_nll, self._val_tokens = 0.0, 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        total, tokens = self._loss_terms(batch)
        self._val_nll += float(total.double())
        self._val_tokens += tokens

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    # The test loop uses the same token-weighted accumulation, reported as test_loss / test_ppl.
    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    def _log_perplexity(self, prefix: str) -> None:
        stats = torch.tensor([self._val_nll, float(self._val_tokens)], dtype=torch.float64, device=self.device)
        stats = self.trainer.strategy.reduce(stats, reduce_op="sum") if self.trainer.world_size > 1 else stats
        nll, tokens = float(stats[0]), float(stats[1])
        if tokens > 0:
            mean = nll / tokens
            self.log(f"{prefix}_loss", mean, prog_bar=True, sync_dist=False)
            self.log(f"{prefix}_ppl", math.exp(min(mean, 700.0)), prog_bar=True, sync_dist=False)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            (decay if param.ndim >= 2 else no_decay).append(param)
        # Empty groups are left out: with frozen parameters (e.g. only the U factors train) one of the
        # two can be empty, and DeepSpeed drops empty groups, which desynchronises LR schedulers.
        groups = [g for g in ({"params": decay, "weight_decay": self.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=self.learning_rate, betas=self.betas)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.warmup_steps, total // 10 + 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup=warmup, total=total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class PretrainedCausalLMModule(CausalLMModule):
    """`CausalLMModule` built from a model folder, so a YAML recipe can name the model by path.

    Args:
        model_path: a Hugging Face causal-LM folder (dense or written by ``save_compressed``), or
            ``"reference"`` for the embedded reference model (trained once, then cached).
        dtype: weight dtype: ``auto`` (as saved), ``float32``, ``bfloat16`` or ``float16``.
        learning_rate / weight_decay / warmup_steps / betas: as `CausalLMModule`.

    The weights are read with safetensors and never run remote code (``trust_remote_code`` stays off).
    """

    def __init__(
        self,
        model_path: str = "reference",
        *,
        dtype: str = "auto",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        betas: tuple[float, float] = (0.9, 0.95),
    ) -> None:
        from ..core.serialization import load_compressed
        from ..workflows import resolve_model

        dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise InvalidInputError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
        path = resolve_model(model_path)
        # load_compressed returns an eval-mode model; Lightning switches modes per loop from train mode.
        model = load_compressed(path, dtype=dtypes[dtype]).train()
        super().__init__(model, learning_rate=learning_rate, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, betas=betas)
        self.model_path = str(path)
        self.save_hyperparameters()
