"""Token-block datasets and a small data module over text files (the embedded corpus by default)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..core.corpus import read_text, resolve_text_path, tokenize_text

__all__ = ["TokenBlocks", "TextBlocksDataModule", "ResumableShuffleLoader"]


class TokenBlocks(Dataset):
    """A token stream packed into non-overlapping blocks of ``seq_len`` (the remainder is dropped)."""

    def __init__(self, token_ids: torch.Tensor, seq_len: int) -> None:
        if token_ids.numel() < seq_len:
            raise ValueError(f"{token_ids.numel()} tokens are fewer than one block of {seq_len}")
        n = token_ids.numel() // seq_len
        self.blocks = token_ids[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index]}


class ResumableShuffleLoader(DataLoader):
    """A shuffling `DataLoader` whose batch order survives a checkpoint taken mid-epoch.

    Same order as ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed),
    drop_last=True)`` — each epoch's permutation comes from one generator that carries on across
    epochs. Lightning saves `state_dict` in its checkpoints (the loader implements its ``_Stateful``
    protocol): the generator state at the start of the current epoch and the step count then. On
    resume the epoch's permutation is drawn again from that state and the batches already trained on
    (steps since the epoch began, read from ``steps()`` = the trainer's ``global_step``) are skipped,
    so a resumed run sees exactly the batches an uninterrupted one would have.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, steps: Callable[[], int]) -> None:
        super().__init__(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                         generator=torch.Generator().manual_seed(seed))
        self._steps = steps
        self._epoch_start: tuple[torch.Tensor, int] | None = None
        self._resume_from: tuple[torch.Tensor, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        if self._resume_from is not None:
            (state, start_step), self._resume_from = self._resume_from, None
            self.generator.set_state(state)
        else:
            state, start_step = self.generator.get_state(), self._steps()
        self._epoch_start = (state, start_step)
        iterator = super().__iter__()
        for _ in range(self._steps() - start_step):  # batches the checkpointed run already trained on
            next(iterator)
        return iterator

    def state_dict(self) -> dict[str, Any]:
        if self._epoch_start is None:
            return {}
        state, start_step = self._epoch_start
        return {"generator_state": state.clone(), "epoch_start_step": start_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._resume_from = (state_dict["generator_state"], int(state_dict["epoch_start_step"]))


class TextBlocksDataModule(L.LightningDataModule):
    """Train/validation blocks from local text files (default: the embedded WikiText-2 splits).

    The training stream is shuffled with a seeded generator, so runs are reproducible, and resumable
    mid-epoch from a checkpoint (`ResumableShuffleLoader`).
    """

    def __init__(
        self,
        tokenizer,
        *,
        train_file: str | Path | None = None,
        val_file: str | Path | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
        seed: int = 0,
        max_val_blocks: int | None = 64,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.train_path = resolve_text_path(train_file, "train")
        self.val_path = resolve_text_path(val_file, "test")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.max_val_blocks = max_val_blocks
        self.train_set: TokenBlocks | None = None
        self.val_set: TokenBlocks | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = TokenBlocks(tokenize_text(self.tokenizer, read_text(self.train_path)), self.seq_len)
            val = TokenBlocks(tokenize_text(self.tokenizer, read_text(self.val_path)), self.seq_len)
            if self.max_val_blocks is not None:
                val.blocks = val.blocks[: self.max_val_blocks]
            self.val_set = val

    def train_dataloader(self) -> DataLoader:
        return ResumableShuffleLoader(self.train_set, batch_size=self.batch_size, seed=self.seed,
                                      steps=lambda: self.trainer.global_step if self.trainer is not None else 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
