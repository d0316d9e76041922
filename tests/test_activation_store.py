"""Calibration activations kept in files: the same bits as in memory, nothing left behind, clear refusals."""

import errno
import os
import warnings

import pytest
import torch

from adasvd_lightning import CompressionConfig, CompressionWarning, compress_model
from adasvd_lightning.core.activation_store import ActivationStore
from adasvd_lightning.core.errors import InvalidInputError
from conftest import compress_tiny, tiny_model


def _resident_file_kb() -> int:
    """Resident pages of file mappings: RssFile, plus RssShmem where the folder is on tmpfs."""
    with open("/proc/self/status") as status:
        fields = {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith("Rss")}
    return fields.get("RssFile", 0) + fields.get("RssShmem", 0)


# svd-llm-w: one stream, sequential; svd: one pass (outputs replace inputs); svd-llm: two streams and
# staged passes; adasvd: an adaCR allocation pass; duo-svd: probes and the allocation's dense passes.
@pytest.mark.parametrize("method", ["svd-llm-w", "svd", "svd-llm", "adasvd", "duo-svd"])
def test_activations_in_files_give_the_in_memory_result_bit_for_bit(method, token_batches, tmp_path, monkeypatch):
    kept = []
    original = ActivationStore.keep

    def counting(self, tensor):
        stored = original(self, tensor)
        kept.append(self.on_disk)
        return stored

    monkeypatch.setattr(ActivationStore, "keep", counting)
    on_disk, disk_report = compress_tiny(method, token_batches, activation_dir=str(tmp_path))
    assert kept and all(kept)  # every stored batch went to a file
    kept.clear()
    in_memory, report = compress_tiny(method, token_batches)
    assert kept and not any(kept)
    assert [m.rank for m in disk_report.modules] == [m.rank for m in report.modules]
    for (name, a), b in zip(on_disk.state_dict().items(), in_memory.state_dict().values()):
        assert torch.equal(a, b), name
    assert list(tmp_path.iterdir()) == []  # the files were never visible in the folder after the run


def test_a_stored_tensor_is_file_backed_released_and_kept_unchanged(tmp_path):
    store = ActivationStore(tmp_path)
    source = torch.randn(64, 1024, 64)  # 16 MiB
    before = _resident_file_kb()
    stored = store.keep(source)
    assert list(tmp_path.iterdir()) == []  # unlinked as soon as it was mapped
    assert stored.device.type == "cpu" and stored.shape == source.shape
    # Its pages were handed back after the copy: the 16 MiB are not resident in this process.
    assert _resident_file_kb() - before < 4 * 1024
    assert torch.equal(stored, source)  # read back from the page cache / file: the same bits
    assert _resident_file_kb() - before >= 12 * 1024
    store.release(stored)
    assert _resident_file_kb() - before < 4 * 1024
    assert torch.equal(stored, source)
    half = store.keep(source.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.equal(half, source.to(torch.bfloat16))


def test_without_unnamed_files_a_named_one_is_unlinked_once_mapped(tmp_path, monkeypatch):
    import adasvd_lightning.core.activation_store as store_module

    made = []
    original = store_module.tempfile.mkstemp

    def named(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.delattr(os, "O_TMPFILE", raising=False)  # as on macOS, or a file system without it
    monkeypatch.setattr(store_module.tempfile, "mkstemp", named)
    source = torch.randn(8, 32, 16)
    stored = ActivationStore(tmp_path).keep(source)
    assert len(made) == 1 and not os.path.exists(made[0][1]) and list(tmp_path.iterdir()) == []
    assert torch.equal(stored, source)


def test_release_never_touches_memory_the_store_did_not_map(tmp_path):
    store = ActivationStore(tmp_path)
    ordinary = torch.randn(1 << 20)  # MADV_DONTNEED on it would zero it
    copy = ordinary.clone()
    store.release(ordinary)
    store.release(ordinary[1024:])
    store.release_all()
    assert torch.equal(ordinary, copy)
    in_memory = ActivationStore()
    assert in_memory.keep(ordinary) is ordinary and not in_memory.on_disk


def test_activation_dir_is_checked_when_the_config_is_built(tmp_path):
    with pytest.raises(InvalidInputError, match="activation_dir .* is not an existing folder"):
        CompressionConfig(activation_dir=str(tmp_path / "missing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="not an existing folder"):
        CompressionConfig(activation_dir=str(tmp_path / "file"))
    assert CompressionConfig(activation_dir=str(tmp_path)).activation_dir == str(tmp_path)


def test_a_full_folder_is_one_clear_error_and_leaves_nothing(tmp_path, token_batches, monkeypatch):
    # The disk filling up is simulated at the system call, the one place it shows.
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidInputError, match="activation_dir .* is full: a batch of calibration activations"):
        compress_model(model, CompressionConfig(method="svd-llm-w", ratio=0.4, activation_dir=str(tmp_path)),
                       token_batches)
    assert list(tmp_path.iterdir()) == []
    # Refused during calibration capture: no block was compressed.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_folder_without_room_for_the_passes_is_refused_before_the_first_block(tmp_path, token_batches,
                                                                                monkeypatch):
    import adasvd_lightning.core.activation_store as store_module

    monkeypatch.setattr(store_module, "_free_bytes", lambda folder: 1024)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidInputError, match="has 0 MiB free, and this run will keep about"):
        compress_model(model, CompressionConfig(method="svd-llm", ratio=0.4, activation_dir=str(tmp_path)),
                       token_batches)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert list(tmp_path.iterdir()) == []


def test_activations_larger_than_the_available_memory_are_said_before_the_first_block(token_batches, tmp_path,
                                                                                     monkeypatch):
    import adasvd_lightning.core.activation_store as store_module

    # svd-llm holds one more stream than the captured one (the dense stream) plus a batch: 3 × 2 KiB here.
    def compress(**config):
        compress_model(tiny_model("llama"), CompressionConfig(method="svd-llm", ratio=0.4, **config), token_batches)

    monkeypatch.setattr(store_module, "available_memory", lambda: 4096)
    with pytest.warns(CompressionWarning, match="more calibration activations, and 0.0 GiB of memory are "
                                                "available: pass activation_dir"):
        compress()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressionWarning)
        compress(activation_dir=str(tmp_path))  # in files: nothing to say
        monkeypatch.setattr(store_module, "available_memory", lambda: 1 << 40)
        compress()
