"""Token-block datasets and a small data module over text files (the embedded corpus by default)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..core.corpus import read_text, resolve_text_path, tokenize_text

__all__ = ["TokenBlocks", "TextBlocksDataModule"]


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


class TextBlocksDataModule(L.LightningDataModule):
    """Train/validation blocks from local text files (default: the embedded WikiText-2 splits).

    The training stream is shuffled with a seeded generator, so runs are reproducible.
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
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
