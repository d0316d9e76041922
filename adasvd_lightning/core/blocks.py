"""Packed token blocks and the seeded, resumable shuffling loader the reference build trains on.

Torch only (Lightning checkpoints the loader through its duck-typed ``state_dict`` /
``load_state_dict`` protocol, so nothing here imports Lightning). User-facing training data is
`adasvd_lightning.training.datasets_data.CausalLMDataModule`; this stream exists because the reference
build and the benchmarks that reproduce its setting need exactly it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .corpus import read_text, tokenize_text
from .errors import InvalidInputError

__all__ = ["TokenBlocks", "ResumableShuffleLoader", "block_loader"]


class TokenBlocks(Dataset):
    """A token stream packed into non-overlapping blocks of ``seq_len`` (the remainder is dropped)."""

    def __init__(self, token_ids: torch.Tensor, seq_len: int) -> None:
        if token_ids.numel() < seq_len:
            raise InvalidInputError(f"{token_ids.numel()} tokens are fewer than one block of {seq_len}")
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


def block_loader(tokenizer, path: str | Path, *, seq_len: int, batch_size: int, seed: int,
                 steps: Callable[[], int] = lambda: 0) -> ResumableShuffleLoader:
    """Shuffled (seeded) training blocks of one whole text file, resumable mid-epoch.

    ``steps`` returns the optimizer steps taken so far (the trainer's ``global_step``); it only
    matters when the loader resumes from a checkpoint.
    """
    blocks = TokenBlocks(tokenize_text(tokenizer, read_text(path)), seq_len)
    return ResumableShuffleLoader(blocks, batch_size=batch_size, seed=seed, steps=steps)
