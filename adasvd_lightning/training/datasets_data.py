"""`CausalLMDataModule`: recovery fine-tuning data from local text files through 🤗 `datasets`.

Text files are read with the `text` builder (no hub access), tokenized in batches, concatenated and
packed into fixed-length blocks (no padding, every token is trained on), and split into train and
validation blocks — by the files given, or by a seeded random fraction of the training blocks. The
embedded WikiText-2 training split is the default. `datasets` caches the processed blocks, so a second
run over the same files starts immediately.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from ..core.corpus import resolve_text_path
from ..core.errors import InvalidInputError

__all__ = ["CausalLMDataModule", "pack_blocks"]

TOKENIZE_LINES = 2000  # lines per tokenizer call (as `tokenize_text`)
PACK_CHUNKS = 64  # tokenized chunks concatenated per packing batch (the remainder of each is dropped)


def pack_blocks(batch: dict, seq_len: int) -> dict:
    """Concatenate tokenized texts and cut them into blocks of ``seq_len`` (the remainder is dropped)."""
    ids = [token for row in batch["input_ids"] for token in row]
    usable = len(ids) - len(ids) % seq_len
    return {"input_ids": [ids[i : i + seq_len] for i in range(0, usable, seq_len)]}


class CausalLMDataModule(L.LightningDataModule):
    """Packed causal-LM blocks from local text files (default: the embedded training split).

    Args:
        tokenizer: a Hugging Face tokenizer, or the path of a folder holding one (``"reference"``: the
            embedded reference model's). Recipes link it to the model's path.
        train_files: text files for training (default: embedded WikiText-2 training split).
        val_files: text files for validation; default: ``val_fraction`` of the training blocks.
        test_files: text files for ``trainer.test`` (default: the validation blocks).
        seq_len / batch_size: block length and batch size.
        val_fraction: share of training blocks held out when no ``val_files`` are given.
        seed: seed of the split, of the shuffling and of the calibration sample.
        calibration_samples: blocks in `calibration_dataloader` — random training blocks (seeded), the
            SVD-LLM / AdaSVD protocol of N random windows of ``seq_len`` tokens. `SVDCompression` uses
            all of them when the data module provides this loader.
        cache_dir: where `datasets` keeps its processed files (default: ``datasets/`` under the
            project's cache, ``$ADASVD_CACHE``, not ``~/.cache/huggingface``).
    """

    def __init__(
        self,
        tokenizer: Any = "reference",
        *,
        train_files: Sequence[str | Path] | None = None,
        val_files: Sequence[str | Path] | None = None,
        test_files: Sequence[str | Path] | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        seed: int = 0,
        calibration_samples: int = 64,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if seq_len < 2 or batch_size < 1:
            raise InvalidInputError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise InvalidInputError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if calibration_samples < 1:
            raise InvalidInputError(f"calibration_samples must be >= 1, got {calibration_samples}")
        if isinstance(tokenizer, (str, Path)) and str(tokenizer) != "reference":  # a model folder
            from ..workflows import check_seq_len

            check_seq_len(Path(tokenizer).expanduser(), seq_len)  # before any tokenizing or training
        self.tokenizer = tokenizer
        self.train_files = [str(resolve_text_path(f, "train")) for f in (train_files or [None])]
        self.val_files = [str(resolve_text_path(f, "test")) for f in val_files] if val_files else None
        self.test_files = [str(resolve_text_path(f, "test")) for f in test_files] if test_files else None
        self.seq_len, self.batch_size, self.val_fraction, self.seed = seq_len, batch_size, val_fraction, seed
        self.calibration_samples = calibration_samples
        self.cache_dir = cache_dir
        self.train_set = self.val_set = self.test_set = None
        self._all_train = None

    def _tokenizer(self):
        """The tokenizer object; a path (or ``"reference"``) is loaded on first use."""
        if isinstance(self.tokenizer, (str, Path)):
            from ..core.serialization import load_tokenizer
            from .reference import resolve_model

            self.tokenizer = load_tokenizer(resolve_model(self.tokenizer))
        return self.tokenizer

    def _blocks(self, files: list[str]):
        import datasets

        from ..cache import datasets_cache_dir

        # `datasets` draws `Generating split` / `Map` bars per call; ours are seconds of caching that
        # say nothing to a user, so they are off for these calls only (a user's global setting stays).
        bars_were_on = not datasets.utils.are_progress_bars_disabled()
        datasets.utils.disable_progress_bars()
        try:
            raw = datasets.load_dataset("text", data_files={"data": files}, keep_linebreaks=True,
                                        cache_dir=self.cache_dir or str(datasets_cache_dir()))["data"]
            tokenizer = self._tokenizer()
            # Lines are tokenized in chunks of 2,000 joined lines — exactly as `core.corpus.tokenize_text`
            # does — so blocks of the embedded test split are the windows `adasvd evaluate` scores, and a
            # recipe's val_ppl equals the evaluate command's perplexity.
            tokenized = raw.map(
                lambda b: {"input_ids": [tokenizer("".join(b["text"]), add_special_tokens=False, verbose=False)["input_ids"]]},
                batched=True, batch_size=TOKENIZE_LINES, remove_columns=["text"],
            )
            blocks = tokenized.map(pack_blocks, batched=True, batch_size=PACK_CHUNKS, fn_kwargs={"seq_len": self.seq_len})
        finally:
            if bars_were_on:
                datasets.utils.enable_progress_bars()
        if len(blocks) == 0:
            raise InvalidInputError(f"{files} hold fewer tokens than one block of {self.seq_len}")
        return blocks

    def _train_blocks(self):
        """All blocks of the training files, before any validation split (cached)."""
        if self._all_train is None:
            self._all_train = self._blocks(self.train_files)
        return self._all_train

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = self._train_blocks()
        if self.val_files:
            val = self._blocks(self.val_files)
        else:
            split = train.train_test_split(test_size=self.val_fraction, seed=self.seed)
            train, val = split["train"], split["test"]
        self.train_set = train.with_format("torch")
        self.val_set = val.with_format("torch")
        self.test_set = self._blocks(self.test_files).with_format("torch") if self.test_files else self.val_set

    def train_dataloader(self) -> DataLoader:
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)

    def calibration_dataloader(self) -> DataLoader:
        """``calibration_samples`` random training blocks (with replacement only if there are fewer).

        Drawn from all training blocks, before the validation split, so the sample depends only on the
        training files, ``seq_len``, ``calibration_samples`` and ``seed``.
        """
        import torch

        blocks = self._train_blocks()
        generator = torch.Generator().manual_seed(self.seed)
        n = len(blocks)
        if self.calibration_samples <= n:
            index = torch.randperm(n, generator=generator)[: self.calibration_samples]
        else:
            index = torch.randint(0, n, (self.calibration_samples,), generator=generator)
        subset = blocks.select(sorted(index.tolist())).with_format("torch")
        return DataLoader(subset, batch_size=self.batch_size)
