"""`CausalLMModule`: a LightningModule around any Hugging Face causal LM.

Used to train the reference model and for recovery fine-tuning. Validation and test report perplexity
as the exponent of the token-weighted mean NLL, accumulated in float64 by a torchmetrics `MeanMetric`
(a mean of per-batch perplexities would be biased), which also reduces it across DDP processes.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

from .checkpoints import restore_structure

__all__ = ["CausalLMModule", "warmup_cosine"]


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
        # Token-weighted mean NLL in float64 (a mean of per-batch perplexities would be biased).
        self.val_nll = MeanMetric().set_dtype(torch.float64)
        self.test_nll = MeanMetric().set_dtype(torch.float64)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint written after compression holds factors: give the model their structure first,
        # so load_from_checkpoint / ckpt_path=... work without the SVDCompression callback.
        restore_structure(self, checkpoint)

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

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_nll.update(*self._nll_and_weight(batch))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.test_nll.update(*self._nll_and_weight(batch))

    def _nll_and_weight(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean NLL of the batch, weighted by its token count (the metric's mean is then per token)."""
        total, tokens = self._loss_terms(batch)
        weight = torch.tensor(float(tokens), dtype=torch.float64, device=total.device)
        return total.double() / weight.clamp(min=1.0), weight

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val", self.val_nll)

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test", self.test_nll)

    def _log_perplexity(self, prefix: str, metric: MeanMetric) -> None:
        # compute() sums the metric's state over processes (torchmetrics' own sync), so under DDP the
        # loss is the token-weighted mean over the whole evaluation set, not a mean of rank means.
        mean = metric.compute()
        metric.reset()
        if torch.isfinite(mean):
            self.log(f"{prefix}_loss", mean.float(), prog_bar=True, sync_dist=False)
            self.log(f"{prefix}_ppl", torch.exp(mean.clamp(max=700.0)).float(), prog_bar=True, sync_dist=False)

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
