"""Multi-process compression helpers (torch.distributed only; works with gloo on CPU and NCCL on GPU).

Under a process group every rank calibrates on its own data shard. What must agree is made to agree:

* calibration statistics are summed across ranks (`all_reduce_statistics`), so every rank sees the
  statistics of the union of the shards — the same numbers a single process would compute over all of
  the data, up to summation order;
* each target matrix is decomposed by one owner rank (round-robin) and the resulting module — its
  structure, parameters and buffers — is broadcast (`share_module`), so all ranks end with
  bit-identical weights and the decomposition work is split.

Without an initialised process group (or with one rank) every helper is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .lowrank import FactorizedLinear, module_from_entry

__all__ = ["world", "is_distributed", "all_reduce_sum", "all_reduce_tensor", "all_gather_rows", "all_reduce_statistics",
           "broadcast_object", "share_module", "shutdown", "gathered_parameters"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_reduce_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a list of scalars over ranks (float64)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place (returned for chaining); no-op without a process group."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's (k_i × w) rows, concatenated in rank order on every rank (k_i may differ, even be 0).

    Padded to the largest k_i for one fixed-size all_gather, then trimmed; without a process group
    the rows come back as they are.
    """
    if not is_distributed():
        return rows
    counts = [int(c) for c in per_rank_counts(rows.shape[0], rows.device)]
    padded = rows.new_zeros((max(counts), rows.shape[1]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def per_rank_counts(value: int, device: torch.device | str = "cpu") -> list[int]:
    """Each rank's ``value``, on every rank, in rank order."""
    t = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    t[dist.get_rank()] = value
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_statistics(stats: dict[str, Any]) -> None:
    """Sum `InputStatistics` (Gram, cross-Gram, output Gram, abs sums, token counts) over ranks, in place."""
    if not is_distributed():
        return
    for name in sorted(stats):  # same order on every rank
        s = stats[name]
        for t in (s.gram_sum, s.abs_sum, s.cross_sum, s.output_sum):
            if t is not None:
                dist.all_reduce(t)
        s.tokens = int(all_reduce_sum([float(s.tokens)], device=s.abs_sum.device)[0])


def broadcast_object(payload: Any, src: int = 0) -> Any:
    """``src``'s picklable ``payload`` on every rank (the others pass anything); as is without a group."""
    if not is_distributed():
        return payload
    box = [payload if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def share_module(module: nn.Module | None, payload: Any, owner: int, device: torch.device,
                 dtype: torch.dtype) -> tuple[nn.Module | None, Any]:
    """Broadcast a freshly built factorized module (or None = left dense) and a picklable payload.

    The owner passes its module and payload; the other ranks pass ``None`` and receive a module of the
    same structure with the owner's exact parameters and buffers.
    """
    if not is_distributed():
        return module, payload
    rank = dist.get_rank()
    entry, payload = broadcast_object(
        (module.manifest_entry() if isinstance(module, FactorizedLinear) else None, payload), owner)
    if entry is None:
        return None, payload
    if rank != owner:
        module = module_from_entry(entry, device=device, dtype=dtype)
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=owner)
    return module, payload


@contextmanager
def gathered_parameters(model: nn.Module) -> Iterator[bool]:
    """Make every parameter whole for the duration; yields whether this process should write files.

    Under a process group only global rank 0 writes (ranks hold the same model; several writers of one
    folder would collide). DeepSpeed ZeRO-3 keeps only a shard of each parameter on each rank (the
    local tensor is empty): saving it would write empty tensors, so the shards are gathered first —
    a collective, so under ZeRO-3 every rank must enter together. Without partitioned parameters this
    costs nothing.
    """
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield world()[0] == 0
        return
    import deepspeed  # only reached for a model that DeepSpeed partitioned

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield world()[0] == 0


def shutdown() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy it.

    A process that exits while a peer is still inside a collective (or while gloo's threads are alive)
    can abort with "terminate called without an active exception" *after* the work succeeded; every
    multi-process entry point calls this last.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
