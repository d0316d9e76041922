"""Text corpora: the embedded WikiText-2 files, tokenization, evaluation windows, calibration samples."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .errors import InvalidInputError

__all__ = [
    "TokenBlocks",
    "block_loader",
    "EMBEDDED_SPLITS",
    "embedded_corpus_path",
    "resolve_text_path",
    "read_text",
    "tokenize_text",
    "sample_calibration_windows",
]

#: Embedded WikiText-2 splits. The official train split is not shipped: ``train`` is the release's
#: validation file (training and calibration), ``test`` its test file (evaluation only).
EMBEDDED_SPLITS = {"train": "valid.txt", "test": "test.txt"}


def embedded_corpus_path(split: str) -> Path:
    """Path of an embedded WikiText-2 split (``train`` or ``test``)."""
    if split not in EMBEDDED_SPLITS:
        raise InvalidInputError(f"unknown embedded split {split!r}; choose one of {', '.join(EMBEDDED_SPLITS)}")
    return Path(str(resources.files("adasvd_lightning.data").joinpath("wikitext-2", EMBEDDED_SPLITS[split])))


def resolve_text_path(value: str | Path | None, default_split: str) -> Path:
    """A user-given text file, ``embedded:<split>``, or the embedded default split when None."""
    if value is None:
        return embedded_corpus_path(default_split)
    text = str(value)
    if text.startswith("embedded:"):
        return embedded_corpus_path(text.split(":", 1)[1])
    path = Path(text).expanduser()
    if not path.is_file():
        raise InvalidInputError(f"text file not found: {path}")
    return path


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path} is not UTF-8 text: {exc}") from None
    if not text.strip():
        raise InvalidInputError(f"{path} contains no text")
    return text


def tokenize_text(tokenizer, text: str, *, chunk_lines: int = 2000) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D LongTensor, without special tokens.

    The text is tokenized in chunks of whole lines (no model-length warnings, bounded memory); chunk
    boundaries fall on newlines, where BPE tokenizers do not merge across anyway.
    """
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for start in range(0, len(lines), chunk_lines):
        chunk = "".join(lines[start : start + chunk_lines])
        ids.extend(tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def sample_calibration_windows(token_ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` random windows of ``seq_len`` tokens (samples × seq_len), reproducible by ``seed``."""
    if samples < 1 or seq_len < 2:
        raise InvalidInputError(f"need samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    if token_ids.numel() < seq_len + 1:
        raise InvalidInputError(
            f"calibration text has {token_ids.numel()} tokens, fewer than one window of {seq_len}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seq_len, (samples,), generator=generator)
    return torch.stack([token_ids[s : s + seq_len] for s in starts.tolist()])


class TokenBlocks(torch.utils.data.Dataset):
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


def block_loader(tokenizer, path: str | Path, *, seq_len: int, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled (seeded) training blocks of one whole text file, as the reference build trains on.

    A plain loader, not a data module: the reference build and the benchmarks that reproduce its
    setting need exactly this stream; user-facing training data is `CausalLMDataModule`.
    """
    blocks = TokenBlocks(tokenize_text(tokenizer, read_text(path)), seq_len)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(blocks, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True)
