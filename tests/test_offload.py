"""Block offload gives the in-place result; the phase timer accounts for a run's time."""

import time

import pytest
import torch

from adasvd_lightning import CompressionConfig
from adasvd_lightning.core.errors import InvalidInputError
from adasvd_lightning.core.offload import BlockRunner
from adasvd_lightning.core.profiling import PHASES, PhaseTimer, phase
from conftest import compress_tiny


@pytest.mark.parametrize("method", ["svd-llm", "adasvd", "duo-svd"])
def test_cpu_to_cpu_offload_matches_in_place(method, token_batches, monkeypatch):
    moves = []
    original = BlockRunner.resident

    def counting(self, block):
        moves.append(self.device)
        return original(self, block)

    monkeypatch.setattr(BlockRunner, "resident", counting)
    offloaded, off_report = compress_tiny(method, token_batches, execution_device="cpu")
    assert moves and all(d == torch.device("cpu") for d in moves)
    in_place, report = compress_tiny(method, token_batches)
    assert [m.rank for m in off_report.modules] == [m.rank for m in report.modules]
    for a, b in zip(offloaded.state_dict().values(), in_place.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_execution_device_is_validated():
    with pytest.raises(InvalidInputError, match="execution_device"):
        CompressionConfig(execution_device="not-a-device")
    with pytest.raises(InvalidInputError, match="svd_driver"):
        CompressionConfig(svd_driver="fastest")
    # A device this process cannot use is refused when the config (or the callback) is built.
    with pytest.raises(InvalidInputError, match="execution_device: .*cuda:99"):
        CompressionConfig(execution_device="cuda:99")
    from adasvd_lightning.callbacks import SVDCompression

    with pytest.raises(InvalidInputError, match="cuda:99"):
        SVDCompression(method="svd", ratio=0.4, execution_device="cuda:99")


def test_report_carries_phase_seconds(token_batches):
    _, report = compress_tiny("svd-llm", token_batches)
    phases = report.phase_seconds
    assert {"calibration", "statistics", "whitening", "svd", "refinement"} <= set(phases) <= set(PHASES)
    assert sum(phases.values()) <= report.seconds + 1e-6
    assert report.to_dict()["phase_seconds"] == phases


def test_phases_are_exclusive_and_absorbing():
    with PhaseTimer() as timer:
        with phase("calibration"):
            time.sleep(0.02)
            with phase("statistics"):
                time.sleep(0.03)
        with phase("allocation", absorb=True):
            with phase("svd"):  # charged to allocation
                time.sleep(0.02)
    assert set(timer.seconds) == {"calibration", "statistics", "allocation"}
    assert 0.015 < timer.seconds["calibration"] < 0.05  # the nested statistics time is not in it
    assert timer.seconds["statistics"] >= 0.025
    assert timer.seconds["allocation"] >= 0.015
    with phase("svd"):  # no active timer: a no-op
        pass
    assert "svd" not in timer.seconds
