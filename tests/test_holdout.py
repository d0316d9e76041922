"""Held-out calibration sequences: chosen by content, so every process and every batching agree."""

import warnings

import pytest
import torch

from adasvd_lightning.core.holdout import heldout_rows


def _rows(count: int, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50_000, (count, length), generator=torch.Generator().manual_seed(seed))


def test_the_choice_depends_on_each_sequence_alone():
    ids = _rows(64)
    whole = heldout_rows(ids, 0.25)
    # Any batching and order (e.g. the shards of a distributed run) holds out the same sequences.
    parts = torch.cat([heldout_rows(ids[i:i + 5], 0.25) for i in range(0, 64, 5)])
    assert torch.equal(whole, parts)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(heldout_rows(ids[order], 0.25), whole[order])
    assert torch.equal(heldout_rows({"input_ids": ids}, 0.25), whole)


def test_about_the_fraction_is_held_out():
    ids = _rows(4000)
    for fraction in (0.1, 0.25, 0.5):
        share = float(heldout_rows(ids, fraction).float().mean())
        assert abs(share - fraction) < 0.03
    assert heldout_rows(ids, 0.0) is None


def test_padding_does_not_change_the_choice():
    ids = _rows(32, length=12)
    mask = torch.ones_like(ids)
    mask[:, 9:] = 0
    padded = ids.clone()
    padded[:, 9:] = 0
    a = heldout_rows({"input_ids": ids, "attention_mask": mask}, 0.25)
    b = heldout_rows({"input_ids": padded, "attention_mask": mask}, 0.25)
    assert torch.equal(a, b) and torch.equal(a, heldout_rows(ids[:, :9], 0.25))


def test_out_of_range_fraction_is_refused():
    with pytest.raises(ValueError, match="held-out fraction"):
        heldout_rows(_rows(4), 1.0)


def test_compression_reports_the_held_out_sequences_and_warns_when_there_are_none():
    from adasvd_lightning import CompressionConfig, CompressionWarning, compress_model

    from conftest import tiny_model

    batches = [_rows(4, 16, seed) % 128 for seed in range(4)]
    expected = int(sum(int(heldout_rows(b, 0.25).sum()) for b in batches))
    assert 0 < expected < 16
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)  # some held out: no warning
        report = compress_model(tiny_model("llama"), CompressionConfig(method="svd-llm", ratio=0.5), batches)
    assert report.heldout_sequences == expected
    # Only the residual writers chase the dense outputs (`core.residual`): they are the ones validated.
    writers = [m for m in report.modules if m.compensated]
    assert len(writers) == 4 and not any(m.heldout_error is not None for m in report.modules if not m.compensated)
    assert all(m.heldout_error is not None and m.heldout_error <= m.heldout_error_start for m in writers)
    # ... and no chosen step raises a writer's plain (unweighted) held-out output error (`core.plain_guard`).
    assert all(0 < m.heldout_plain_error <= m.heldout_plain_error_start for m in writers)
    assert all(m.heldout_plain_error is None for m in report.modules if not m.compensated)
    # A calibration set whose only sequence is not held out: said, and every step is taken unvalidated.
    alone = next(r for r in (_rows(1, 16, seed) % 128 for seed in range(100)) if not heldout_rows(r, 0.25).any())
    with pytest.warns(CompressionWarning, match="0 of the 1 calibration sequences were held out"):
        report = compress_model(tiny_model("llama"), CompressionConfig(method="svd-llm", ratio=0.5), [alone])
    assert report.heldout_sequences == 0 and all(m.heldout_error is None for m in report.modules)
