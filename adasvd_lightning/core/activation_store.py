"""Calibration activations kept in files instead of memory (``CompressionConfig.activation_dir``).

The calibration hidden states are the one part of a run's memory that grows with the calibration set:
one float32 stream of Llama-7B width at 524,288 tokens is 8 GiB, and the methods fitted to the dense
model's outputs keep two. The model, one block's statistics and one factorization do not grow with
the tokens, so with enough calibration data the activations decide whether a run fits.

With a folder given, every stored batch of hidden states becomes a tensor mapped from its own file in
that folder (``torch.from_file`` with shared pages). On Linux the file never has a name (``O_TMPFILE``);
elsewhere it is removed from the folder as soon as it is mapped. So nothing is left behind however the
run ends — an interrupt, a crash, ``kill -9`` — and the disk space returns to the system when the
tensor is freed. Every reader keeps working on an
ordinary CPU tensor; only the pages it touches are read in. After a batch has been written or run, its
pages are handed back (``madvise(MADV_DONTNEED)``): on a shared file mapping that drops them from the
process's resident memory, while the data stay in the file and the kernel's page cache, which it
writes out and evicts under memory pressure instead of running out of memory. The numbers are the
same bits as in memory: the file holds the tensor's bytes unchanged.

Space is reserved with ``posix_fallocate`` when a batch is stored, so a full disk is one clear
`InvalidInputError` rather than a ``SIGBUS`` on the first write into a sparse page.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
import weakref
from pathlib import Path

import torch

from .errors import InvalidInputError

__all__ = ["ActivationStore", "available_memory", "check_activation_dir"]

_MADV_DONTNEED = 4  # the same value on Linux and macOS
_PREFIX = "adasvd-activations-"


def check_activation_dir(folder: str | os.PathLike) -> Path:
    """The folder as a `Path`, refused with one line where activations cannot be kept in it."""
    if os.name != "posix" or not hasattr(os, "posix_fallocate"):
        raise InvalidInputError("activation_dir needs shared file mappings and posix_fallocate (Linux); keep "
                                "the activations in memory (activation_dir=None) on this system")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise InvalidInputError(f"activation_dir {str(path)!r} is not an existing folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InvalidInputError(f"activation_dir {str(path)!r} is not writable")
    return path


class ActivationStore:
    """Where a run keeps its calibration hidden states: memory (``folder=None``) or files in ``folder``.

    In memory, `keep` returns its argument and `release` does nothing, so the pipeline runs exactly as
    without a store.
    """

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.folder = check_activation_dir(folder) if folder is not None else None
        # The mappings `keep` made, by storage address: only those may be released (MADV_DONTNEED
        # on ordinary memory would zero it).
        self._kept: dict[int, weakref.ref] = {}
        self._libc = ctypes.CDLL(None, use_errno=True) if self.folder is not None else None

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s values in the store: itself in memory, else a CPU copy mapped from a new file."""
        if self.folder is None:
            return tensor
        if tensor.device.type != "cpu":
            raise InvalidInputError(f"activation_dir keeps host activations, but a batch is on {tensor.device}: "
                                    "keep the model on the CPU and set execution_device to run blocks there")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            return tensor.clone()
        fd, name = _unnamed_file(self.folder)
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    free = _free_bytes(self.folder)
                    raise InvalidInputError(
                        f"activation_dir {str(self.folder)!r} is full: a batch of calibration activations needs "
                        f"{nbytes / 2**20:.0f} MiB and {free / 2**20:.0f} MiB are free; free space there or "
                        "choose another folder") from None
                raise
            path = name if name is not None else f"/proc/self/fd/{fd}"
            stored = torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype)
        finally:
            os.close(fd)  # the mapping keeps the file's data
            if name is not None:
                os.unlink(name)  # mapped (or failed): the folder never keeps it
        stored = stored.view(tensor.shape).copy_(tensor)
        self._kept[stored.untyped_storage().data_ptr()] = weakref.ref(stored)
        self.release(stored)
        return stored

    def release(self, tensor: torch.Tensor | None) -> None:
        """Hand the resident pages of a tensor `keep` made (or a view of one) back to the kernel; its data
        stay in the file. Any other tensor is left alone."""
        if self.folder is None or tensor is None:
            return
        storage = tensor.untyped_storage()
        ref = self._kept.get(storage.data_ptr())
        if ref is None or ref() is None:
            return
        if storage.nbytes() and self._libc.madvise(ctypes.c_void_p(storage.data_ptr()),
                                                   ctypes.c_size_t(storage.nbytes()), _MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed on a stored activation")

    def release_all(self) -> None:
        """`release` every stored tensor still alive (after passes whose readers touched them)."""
        for address, ref in list(self._kept.items()):
            tensor = ref()
            if tensor is None:
                del self._kept[address]
            else:
                self.release(tensor)

    def memory_advice(self, nbytes: int) -> str | None:
        """Why to keep the activations in files, when in memory their further ``nbytes`` exceed the memory
        available now (the run would be killed or swap); None otherwise, or when they already are."""
        available = available_memory()
        if self.folder is not None or available is None or nbytes <= available:
            return None
        return (f"this run will hold about {nbytes / 2**30:.1f} GiB more calibration activations, and "
                f"{available / 2**30:.1f} GiB of memory are available: pass activation_dir (CLI "
                "--activation-dir) to keep them in files, or calibrate on fewer tokens")

    def check_room(self, nbytes: int) -> None:
        """Refuse, before the expensive work, a run whose further activations will not fit the folder."""
        if self.folder is None:
            return
        free = _free_bytes(self.folder)
        if free < nbytes:
            raise InvalidInputError(
                f"activation_dir {str(self.folder)!r} has {free / 2**20:.0f} MiB free, and this run will keep "
                f"about {nbytes / 2**20:.0f} MiB more calibration activations there; free space or choose "
                "another folder")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations without swapping (Linux's ``MemAvailable``), or None
    where the system does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _unnamed_file(folder: Path) -> tuple[int, str | None]:
    """A new file in ``folder`` open for reading and writing, and its name if it has one.

    Linux's ``O_TMPFILE`` makes a file that never has a name, so not even a kill at the wrong instant can
    leave it in the folder; elsewhere (or on a file system without it) a named temporary file is made,
    and the caller unlinks it as soon as it is mapped.
    """
    flag = getattr(os, "O_TMPFILE", None)
    if flag is not None and os.path.isdir("/proc/self/fd"):
        try:
            return os.open(folder, flag | os.O_RDWR, 0o600), None
        except OSError:
            pass
    return tempfile.mkstemp(prefix=_PREFIX, dir=folder)


def _free_bytes(folder: Path) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize
