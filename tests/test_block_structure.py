"""The block's structure (input stages, residual writers) is learnt on one sequence of a batch.

`pipeline._block_structure` runs the two structure-finding passes on the first sequence only
(`calibration.first_sequences`); these tests pin that the answer is the whole batch's, for every family,
and that a block the cut cannot follow is asked again on the whole batch.
"""

from __future__ import annotations

import torch
from torch import nn

import pytest

from adasvd_lightning.core.calibration import BlockInput, capture_block_inputs, first_sequences
from adasvd_lightning.core.offload import BlockRunner
from adasvd_lightning.core.pipeline import CompressionWarning, _block_structure, input_stages
from adasvd_lightning.core.residual import find_residual_writers
from adasvd_lightning.core.surgery import find_targets

from conftest import FAMILIES, tiny_model


def _rows_seen(block: nn.Module) -> tuple[list[int], object]:
    rows: list[int] = []
    handle = block.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True)
    return rows, handle


@pytest.mark.parametrize("family", FAMILIES)
def test_structure_from_one_sequence_is_the_whole_batch_structure(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded sequence: the cut must carry the per-sequence masks along
    batch = {"input_ids": ids, "attention_mask": mask}
    _, block_name, targets = find_targets(model)[0]
    block = model.get_submodule(block_name)
    inp = capture_block_inputs(model, block, [batch])[0]
    runner = BlockRunner(None)

    with torch.no_grad():
        whole_stages = input_stages(block, targets, inp, runner)
        whole_writers = find_residual_writers(block, targets, inp.hidden, lambda: runner.run(block, inp))
        rows, handle = _rows_seen(block)
        try:
            stages, writers = _block_structure(block, targets, inp, inp.hidden, runner)
        finally:
            handle.remove()

    assert stages == whole_stages
    assert writers == whole_writers
    assert whole_writers, "every family here has residual writers"
    assert rows == [1, 1], f"the two structure passes should run one sequence each, ran {rows}"


class _PerSequenceScale(nn.Module):
    """A block that reads a per-sequence 1-D tensor the cut leaves whole (it is not ≥ 2-D)."""

    def __init__(self, width: int = 8, strict: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.strict = strict

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.strict and scale.shape[0] != x.shape[0]:
            raise RuntimeError("one scale per sequence")
        r = x * scale[:, None, None]  # without `strict`, a cut x broadcasts back to the whole batch
        return r + self.down(torch.relu(self.up(self.norm(r))))


@pytest.mark.parametrize("strict", [True, False], ids=["raises-on-cut", "broadcasts-on-cut"])
def test_a_block_the_cut_cannot_follow_is_asked_on_the_whole_batch(strict):
    torch.manual_seed(0)
    block = _PerSequenceScale(strict=strict)
    targets = {"up": block.up, "down": block.down}
    x = torch.randn(4, 6, 8)
    inp = BlockInput(hidden=x, args=(torch.tensor([1.0, 2.0, 3.0, 4.0]),), kwargs={}, mask=None)
    assert first_sequences(inp) is not None
    rows, handle = _rows_seen(block)
    try:
        with torch.no_grad(), pytest.warns(CompressionWarning, match="whole first batch"):
            stages, writers = _block_structure(block, targets, inp, x, BlockRunner(None))
    finally:
        handle.remove()
    assert stages == [["up"], ["down"]]
    assert set(writers) == {"down"} and writers["down"].source == "norm"
    assert rows[-2:] == [4, 4], f"the fallback should run the whole batch, ran {rows}"


def test_first_sequences_cuts_batch_tensors_and_keeps_shared_ones():
    hidden = torch.randn(3, 5, 4)
    mask4d = torch.zeros(3, 1, 5, 5)
    rotary = (torch.randn(1, 5, 2), torch.randn(3, 5, 2))
    positions = torch.arange(5)  # 1-D: never cut, even where its length equals the batch size
    inp = BlockInput(hidden=hidden, args=(), kwargs={"attention_mask": mask4d, "position_embeddings": rotary,
                                                      "cache_position": positions, "flag": True},
                     mask=torch.ones(3, 5))
    cut, other = first_sequences(inp, hidden + 1)
    assert cut.hidden.shape == (1, 5, 4) and torch.equal(cut.hidden, hidden[:1])
    assert cut.kwargs["attention_mask"].shape == (1, 1, 5, 5)
    assert cut.kwargs["position_embeddings"][0] is rotary[0]  # broadcast over the batch: kept
    assert cut.kwargs["position_embeddings"][1].shape == (1, 5, 2)
    assert cut.kwargs["cache_position"] is positions and cut.kwargs["flag"] is True
    assert cut.mask.shape == (1, 5)
    assert torch.equal(other, hidden[:1] + 1)
    single = BlockInput(hidden=hidden[:1], args=(), kwargs={}, mask=None)
    assert first_sequences(single) is None  # nothing to cut


def test_paired_passes_compute_only_the_outputs_that_are_read(token_batches):
    """Per block and batch, svd-llm runs each dense writer where its output is a target and never the
    compressed stream's last target of a stage (that stream's statistics are inputs only).

    Rows through down_proj: the dense stream's final pass (every row) plus the structure's
    one-sequence residual run. o_proj: its own dense pass and the final dense pass (every row twice)
    plus one sequence in each structure pass. Before, every compressed pass also ran its stage's
    writer (o_proj +1, down_proj +1 per row) and the structure passes ran whole batches.
    """
    from adasvd_lightning import CompressionConfig, compress_model

    model = tiny_model("llama")
    rows: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if name.endswith(("o_proj", "down_proj")):
            handles.append(module.register_forward_hook(
                lambda m, a, o, n=name: rows.__setitem__(n, rows.get(n, 0) + a[0].shape[0])))
    try:
        compress_model(model, CompressionConfig(method="svd-llm", ratio=0.4), token_batches)
    finally:
        for h in handles:
            h.remove()
    batch_rows = sum(b.shape[0] for b in token_batches)
    assert len(rows) == 4
    for name, count in rows.items():
        assert count == (batch_rows + 1 if name.endswith("down_proj") else 2 * batch_rows + 2), rows
