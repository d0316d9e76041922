"""The probe table: a module-KL allocation resumes from the rows an interrupted run kept, and reuses
nothing that was measured for another run."""

import json
import warnings

import pytest
import torch

from adasvd_lightning import CompressionConfig, CompressionWarning, compress_model
from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.core.probe_table import FORMAT, ProbeTable
from conftest import tiny_model

# The exhaustive probes (the presets estimate their table and probe once per module).
_OPTIONS = {"allocation": "module-kl", "sensitivity_candidates": [0.3, 0.7, 1.0]}


def _run(batches, table=None, ratio=0.4, method="duo-svd", **options):
    model = tiny_model("llama")
    config = CompressionConfig(method=method, ratio=ratio, method_options={**_OPTIONS, **options},
                               probe_table=str(table) if table is not None else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressionWarning)
        report = compress_model(model, config, batches)
    with torch.no_grad():
        logits = model(batches[0]).logits
    return report, logits


def _lines(path):
    return path.read_text().splitlines()


def test_a_resumed_allocation_probes_only_the_missing_rows_and_gives_the_same_model(tmp_path, token_batches):
    reference, reference_logits = _run(token_batches)
    table = tmp_path / "probes.jsonl"
    full, full_logits = _run(token_batches, table)
    lines = _lines(table)
    assert json.loads(lines[0])["format"] == FORMAT and len(lines) == 1 + 14  # header + one row per target
    assert full.allocation["sensitivity_probes"] == 14 * 3 and full.allocation["sensitivity_rows_reused"] == 0
    assert full.allocation["sensitivity"] == reference.allocation["sensitivity"]
    torch.testing.assert_close(full_logits, reference_logits, rtol=0, atol=0)

    # Interrupted after five rows, the sixth cut off mid-write.
    table.write_text("\n".join(lines[:6]) + "\n" + lines[6][: len(lines[6]) // 2])
    resumed, resumed_logits = _run(token_batches, table)
    assert resumed.allocation["sensitivity_rows_reused"] == 5
    assert resumed.allocation["sensitivity_probes"] == 9 * 3
    assert [m.rank for m in resumed.modules] == [m.rank for m in reference.modules]
    assert [m.kept_columns for m in resumed.modules] == [m.kept_columns for m in reference.modules]
    torch.testing.assert_close(resumed_logits, reference_logits, rtol=0, atol=0)
    assert _lines(table) == lines  # the cut row was dropped and measured again

    again, _ = _run(token_batches, table)
    assert again.allocation["sensitivity_probes"] == 0 and again.allocation["sensitivity_rows_reused"] == 14
    assert again.allocation["sensitivity"] == reference.allocation["sensitivity"]


def test_a_complete_table_allocates_without_any_pass_or_probe(tmp_path, token_batches, monkeypatch):
    from adasvd_lightning.core import planning

    table = tmp_path / "probes.jsonl"
    measured, measured_logits = _run(token_batches, table)
    passes = []
    original = planning._dense_pass

    def counting(*args, **kwargs):
        passes.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(planning, "_dense_pass", counting)
    reused, reused_logits = _run(token_batches, table)
    assert passes == [] and reused.allocation["sensitivity_probes"] == 0
    assert reused.allocation["sensitivity_rows_reused"] == 14 and reused.allocation["sensitivity_baseline"] is None
    assert measured.allocation["sensitivity_baseline"] is not None
    assert reused.allocation["sensitivity"] == measured.allocation["sensitivity"]
    assert [m.rank for m in reused.modules] == [m.rank for m in measured.modules]
    torch.testing.assert_close(reused_logits, measured_logits, rtol=0, atol=0)


def test_a_table_of_another_run_or_not_a_table_is_refused_and_left_alone(tmp_path, token_batches):
    table = tmp_path / "probes.jsonl"
    _run(token_batches, table)
    before = table.read_bytes()
    for change in (dict(ratio=0.5), dict(sensitivity_batches=1)):
        with pytest.raises(InvalidInputError, match="measured for another model, calibration set or configuration"):
            _run(token_batches, table, **change)
        assert table.read_bytes() == before
    other_batches = [b.flip(1) for b in token_batches]
    with pytest.raises(InvalidInputError, match="another model, calibration set"):
        _run(other_batches, table)
    assert table.read_bytes() == before

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(InvalidInputError, match="not a probe table written by adasvd-lightning"):
        _run(token_batches, notes)
    assert notes.read_text() == "my notes\n"


def test_presets_that_differ_only_after_the_allocation_share_a_table(tmp_path, token_batches):
    """duo-svd and adasvd-duo probe the same truncations (their compensation comes after the allocation):
    one table serves both, and adasvd-duo allocates from it exactly as from its own probes."""
    table = tmp_path / "probes.jsonl"
    _run(token_batches, table, method="duo-svd")
    shared, _ = _run(token_batches, table, method="adasvd-duo")
    own, _ = _run(token_batches, method="adasvd-duo")
    assert shared.allocation["sensitivity_rows_reused"] == 14 and shared.allocation["sensitivity_probes"] == 0
    assert shared.allocation["sensitivity"] == own.allocation["sensitivity"]
    assert [m.rank for m in shared.modules] == [m.rank for m in own.modules]


def test_probe_table_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(InvalidInputError, match="probes nothing"):
        CompressionConfig(method="svd-llm", probe_table=str(tmp_path / "t"))
    with pytest.raises(InvalidInputError, match="fisher_scale='none' probes nothing"):
        CompressionConfig(method="duo-svd", method_options={"fisher_scale": "none"},
                          probe_table=str(tmp_path / "t"))
    with pytest.raises(InvalidInputError, match="fisher_scale='none' probes nothing"):
        CompressionConfig(method="adasvd-duo", probe_table=str(tmp_path / "t"))  # the preset's estimate alone
    with pytest.raises(InvalidInputError, match="is a folder"):
        CompressionConfig(method="duo-svd", probe_table=str(tmp_path))
    with pytest.raises(InvalidInputError, match="does not exist"):
        CompressionConfig(method="duo-svd", probe_table=str(tmp_path / "missing" / "t"))
    config = CompressionConfig(method="adasvd-duo", method_options={"allocation": "module-kl-fisher",
                                                                    "fisher_scale": "probed"},
                               probe_table=str(tmp_path / "t"))
    assert config.probe_table == str(tmp_path / "t")


def test_a_damaged_row_is_an_error_not_a_silent_remeasure(tmp_path):
    path = tmp_path / "t.jsonl"
    ProbeTable.open(path, "abc")
    with open(path, "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(InvalidInputError, match="line 2 is damaged"):
        ProbeTable.open(path, "abc")


def test_the_fisher_scaled_allocation_resumes_its_two_probes_per_module(tmp_path, token_batches):
    """module-kl-fisher with fisher_scale=probed measures two candidates per module; the table keeps
    them (None elsewhere) and a second run scales the same estimates to the same probes."""
    table = tmp_path / "probes.jsonl"
    options = dict(allocation="module-kl-fisher", fisher_scale="probed")
    first, first_logits = _run(token_batches, table, method="adasvd-duo", **options)
    rows = [json.loads(line)["values"] for line in _lines(table)[1:]]
    assert len(rows) == 14 and all(sum(v is not None for v in row) <= 2 for row in rows)
    assert first.allocation["sensitivity_probes"] == sum(v is not None for row in rows for v in row) > 0
    again, again_logits = _run(token_batches, table, method="adasvd-duo", **options)
    assert again.allocation["sensitivity_probes"] == 0 and again.allocation["sensitivity_rows_reused"] == 14
    assert again.allocation["sensitivity"] == first.allocation["sensitivity"]
    torch.testing.assert_close(again_logits, first_logits, rtol=0, atol=0)


def test_only_the_first_line_of_a_foreign_file_is_read(tmp_path):
    """A big binary file given by mistake is refused from its first line, and left as it is."""
    path = tmp_path / "weights.bin"
    data = bytes(range(256)) * 4096
    path.write_bytes(data)
    with pytest.raises(InvalidInputError, match="not a probe table"):
        ProbeTable.open(path, "abc")
    assert path.read_bytes() == data
