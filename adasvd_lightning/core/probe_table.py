"""The sensitivity probes' rows on disk, so a long module-KL allocation survives an interruption.

The exhaustive module-KL allocation (Duo-SVD) measures every target at every candidate retention: on
SmolLM2-135M 2,100 suffix forwards, about five hours on one CPU core, and far more on a 7B model. Each
module's row is final the moment it is measured (the other targets sit at their uniform baseline), so
it can be kept: `ProbeTable` appends one JSON line per module to a file, and a run pointed at the same
file takes the rows it finds and probes only the rest.

A row is only reused where it would be measured again to the same numbers. The file's first line
holds a fingerprint of everything a probe reads (`fingerprint`): every parameter and buffer of the
model, the calibration batches of every process, the settings the probes depend on (allocation,
whitening, candidates, probe batches, ratio, target selection, numerics; `core.planning` lists them)
and the library's version (another release may probe differently).
A file written for anything else is refused with one line, and never changed.

The file is written so an interruption cannot leave it unusable: the header goes in atomically (a
temporary file renamed over the path), each row is one appended line, flushed and synced, and a last
line cut off mid-write is dropped when the file is next opened.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InvalidInputError

__all__ = ["ProbeTable", "fingerprint", "check_table_path"]

FORMAT = "adasvd-lightning probe table 1"


def check_table_path(path: str | os.PathLike) -> Path:
    """The table's path, checked before any work: a file (or nothing yet) in an existing folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise InvalidInputError(f"probe table {p} is a folder; give a file path")
    if not p.parent.is_dir():
        raise InvalidInputError(f"probe table {p}: its folder {p.parent} does not exist")
    return p


def _tensor_bytes(t: torch.Tensor):
    """The tensor's bytes as a buffer (no copy for a contiguous CPU tensor)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def _batch_tensors(batch: Any) -> Iterable[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for key in sorted(batch):
            yield from _batch_tensors(batch[key])
    elif isinstance(batch, (list, tuple)):
        for item in batch:
            yield from _batch_tensors(item)


def fingerprint(model: nn.Module, calibration: Sequence[Any], settings: dict, *,
                gather: Callable[[bytes], list[bytes]] | None = None) -> str:
    """SHA-256 of what the probes read: the model's tensors, the calibration batches and ``settings``.

    ``gather`` (processes of a group: each holds its own calibration shard) turns this process's digest
    of its batches into every process's, in rank order, so all of them agree on one fingerprint.
    """
    model_hash = hashlib.sha256()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        model_hash.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        model_hash.update(_tensor_bytes(tensor))
    data_hash = hashlib.sha256()
    for batch in calibration:
        for tensor in _batch_tensors(batch):
            data_hash.update(f"{tuple(tensor.shape)}:{tensor.dtype};".encode())
            data_hash.update(_tensor_bytes(tensor))
    data = data_hash.digest()
    if gather is not None:
        data = b"".join(gather(data))
    whole = hashlib.sha256()
    whole.update(FORMAT.encode())
    whole.update(_library_version().encode())  # another release may probe differently
    whole.update(model_hash.digest())
    whole.update(data)
    whole.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return whole.hexdigest()


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adasvd-lightning")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class ProbeTable:
    """Rows already measured (module name → values per candidate, None where nothing was probed) and
    the file new rows go to. Only a writer (global rank 0) appends; the others just read."""

    def __init__(self, path: Path, rows: dict[str, list[float | None]], writer: bool) -> None:
        self.path = path
        self.rows = rows
        self.writer = writer

    @classmethod
    def open(cls, path: str | os.PathLike, fingerprint: str, *, writer: bool = True) -> "ProbeTable":
        """Read the table at ``path`` (its fingerprint must be ``fingerprint``), or start one there."""
        p = check_table_path(path)
        if not p.exists():
            if writer:
                _write_atomically(p, [_header(fingerprint)])
            return cls(p, {}, writer)
        with open(p, "rb") as handle:  # the first line alone decides, whatever else the file is
            first = handle.readline(4096)
        try:
            header = json.loads(first.decode("utf-8")) if first.endswith(b"\n") else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise InvalidInputError(f"{p} is not a probe table written by adasvd-lightning; it is left alone — "
                                    "give another path")
        if header.get("fingerprint") != fingerprint:
            raise InvalidInputError(f"probe table {p} was measured for another model, calibration set or "
                                    "configuration; it is left alone — delete it or give another path")
        lines = p.read_text(encoding="utf-8", errors="replace").split("\n")
        complete, cut = lines[:-1], lines[-1]  # a last line without its newline was cut off mid-write
        rows: dict[str, list[float | None]] = {}
        for number, line in enumerate(complete[1:], start=2):
            try:
                entry = json.loads(line)
                rows[str(entry["module"])] = [None if v is None else float(v) for v in entry["values"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise InvalidInputError(f"probe table {p}: line {number} is damaged; delete the file to "
                                        "measure again") from None
        if cut and writer:
            _write_atomically(p, complete)  # drop the interrupted row; it is measured again
        return cls(p, rows, writer)

    def row(self, name: str) -> list[float | None] | None:
        return self.rows.get(name)

    def record(self, name: str, values: Sequence[float | None]) -> None:
        """Keep a measured row: in memory, and (writer) as one synced line at the end of the file."""
        values = [None if v is None else float(v) for v in values]
        self.rows[name] = values
        if not self.writer:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"module": name, "values": values}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _header(fingerprint: str) -> str:
    return json.dumps({"format": FORMAT, "fingerprint": fingerprint})


def _write_atomically(path: Path, lines: list[str]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write("".join(line + "\n" for line in lines))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
