"""Text corpora: the embedded WikiText-2 files, tokenization, evaluation windows, calibration samples."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .errors import InvalidInputError

__all__ = [
    "EMBEDDED_SPLITS",
    "embedded_corpus_path",
    "resolve_text_path",
    "read_text",
    "tokenize_text",
    "sample_calibration_windows",
    "added_bos_token_id",
    "cut_windows",
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


def added_bos_token_id(tokenizer) -> int | None:
    """The beginning-of-sequence id the tokenizer puts in front of text, or None if it adds none.

    Read off the tokenizer's behaviour (encode a word with and without special tokens), not off
    ``bos_token``: many tokenizers define a BOS token they never add (GPT-2, SmolLM2), while Llama-style
    ones add it to every text and their models were trained to see it first. Windows of such models
    start with it (see `cut_windows`).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    added = len(with_special) > len(plain) and with_special[0] == bos and plain[:1] != [bos]
    return int(bos) if added else None


def _window_text(seq_len: int, bos_token_id: int | None) -> int:
    """Text tokens per window: one position goes to BOS when the model expects it."""
    return seq_len - 1 if bos_token_id is not None else seq_len


def _with_bos(windows: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    if bos_token_id is None:
        return windows
    column = torch.full((windows.shape[0], 1), bos_token_id, dtype=windows.dtype)
    return torch.cat([column, windows], dim=1)


def cut_windows(token_ids: torch.Tensor, seq_len: int, bos_token_id: int | None = None,
                max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` positions (the final partial one dropped).

    With ``bos_token_id`` each window is BOS followed by the next ``seq_len − 1`` text tokens, so the
    model sees text start the way it was trained to; BOS is position 0, which is never scored.
    """
    text = _window_text(seq_len, bos_token_id)
    n = token_ids.numel() // text
    if max_windows is not None:
        n = min(n, max_windows)
    return _with_bos(token_ids[: n * text].view(n, text), bos_token_id)


def sample_calibration_windows(
    token_ids: torch.Tensor, samples: int, seq_len: int, seed: int, bos_token_id: int | None = None
) -> torch.Tensor:
    """``samples`` random windows of ``seq_len`` positions (samples × seq_len), reproducible by ``seed``.

    With ``bos_token_id`` each window is BOS + ``seq_len − 1`` text tokens (see `cut_windows`).
    """
    if samples < 1 or seq_len < 2:
        raise InvalidInputError(f"need samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    text = _window_text(seq_len, bos_token_id)
    if token_ids.numel() < text + 1:
        raise InvalidInputError(
            f"calibration text has {token_ids.numel()} tokens, fewer than one window of {seq_len}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - text, (samples,), generator=generator)
    return _with_bos(torch.stack([token_ids[s : s + text] for s in starts.tolist()]), bos_token_id)
