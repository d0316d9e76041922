"""Which calibration sequences are held out to validate a refinement.

The compensating refinements (closed-form U update, adaComp's alternation) are least-squares fits to
the dense model's outputs. Each step lowers the error on the tokens it was fitted to; whether it also
lowers it on text it has not seen depends on how well those tokens determine the fit: where the
calibration inputs barely excite some directions (few tokens per input feature, near-singular H_cc),
a V-step puts large weights there and the error on new text grows. A held-out part of the calibration
set measures that directly, so the number of steps is chosen on it (early stopping) instead of trusted.

Sequences, not tokens, are held out: tokens of one sequence are strongly correlated, so a token split
would validate on near-copies of the fitted data. The choice is a hash of each sequence's content, not
of its position, so every process of a distributed run and a single-process run on the same text hold
out the very same sequences, however the batches are sharded.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .calibration import normalise_batch

__all__ = ["heldout_rows"]

_SCALE = float(2**64)


def _row_unit(row: torch.Tensor) -> float:
    """A number in [0, 1) fixed by the row's content (platform independent: fixed byte order)."""
    data = row.detach().to("cpu")
    array = data.to(torch.float64).numpy().astype("<f8") if data.is_floating_point() \
        else data.to(torch.int64).numpy().astype("<i8")
    digest = hashlib.blake2b(array.tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / _SCALE


def heldout_rows(batch: Any, fraction: float) -> torch.Tensor | None:
    """Boolean mask over the batch's sequences (rows): True = held out for validation.

    About ``fraction`` of all sequences are held out (each independently, by its content hash); the
    fraction of a small calibration set varies accordingly, and can be zero (then nothing is
    validated: see `BlockStatistics`). Returns None when ``fraction`` is 0 or the batch has no rows.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return None
    positional, kwargs, mask = normalise_batch(batch)
    ids = positional if positional is not None else kwargs["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.ndim < 2:
        return None
    rows = []
    for i in range(ids.shape[0]):
        row = ids[i] if mask is None else ids[i][mask[i].bool()]
        rows.append(_row_unit(row) < fraction)
    return torch.tensor(rows, dtype=torch.bool)
