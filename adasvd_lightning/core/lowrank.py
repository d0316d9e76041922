"""Factorized replacements for dense linear layers.

* `LowRankLinear`: y = up·(down·x) + bias — two matmuls, so FLOPs drop with the rank.
* `ColumnPreservingLinear` (Duo-SVD): a few input columns stay dense and exact, the rest is low-rank:
  y = up·(down·x[rest]) + W_keep·x[kept] + bias.

Parameters are plain tensors on the module — not nested `nn.Linear`s — so surgery sees one leaf per
compressed matrix (re-compression and "train only the factors" rely on that) and state-dict keys stay
readable (``…q_proj.up``, ``…q_proj.down``). Column indices are persistent buffers, so they travel in
the safetensors file with the weights.

Forward paths were chosen by measurement (``benchmarks/inference.py``; 2-core AVX-512 CPU, fp32 and
bf16): `LowRankLinear` is one ``F.linear`` chain — it already reaches the FLOP-ideal speed-up, and
``addmm``/``matmul`` spellings measured the same. `ColumnPreservingLinear` is where the time went:
gathering the input's "rest" columns copies almost the whole activation (index_select is
memory-bound and slow, worst in bf16) and adding two GEMM results costs one more pass over the
output. For many tokens it now multiplies the *whole* input by ``down`` scattered into an r × n
matrix with zero columns at the kept positions (r·k extra MACs, a few percent, against a copy of the
activation), gathers only the few kept columns, and accumulates the kept part into the result inside
the second GEMM (``addmm_``, beta = 1). For few tokens (decoding) building that r × n matrix costs
more than the gather, so it keeps the gather path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FactorizedLinear", "LowRankLinear", "ColumnPreservingLinear", "module_from_entry"]


class FactorizedLinear(nn.Module):
    """Common interface of the factorized layers: shape, rank, dense view, manifest entry."""

    in_features: int
    out_features: int
    rank: int
    kind: str = "abstract"

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def multiply_adds(self) -> int:
        """Multiply-adds per input row (one token): what the forward costs next to m·n dense."""
        raise NotImplementedError  # pragma: no cover - interface

    def _make_factors(self, out_features: int, rank: int, width: int, bias: bool, kw: dict) -> None:
        """up (out × r), down (r × width) and bias, initialised so an untrained layer is well scaled."""
        self.down = nn.Parameter(torch.empty(rank, width, **kw))
        self.up = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        nn.init.normal_(self.down, std=width**-0.5)
        nn.init.normal_(self.up, std=rank**-0.5)

    def manifest_entry(self) -> dict:
        return {
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.bias is not None,
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


class LowRankLinear(FactorizedLinear):
    """Rank-r factorized linear layer y = up·(down·x) + bias."""

    kind = "low_rank"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self._make_factors(out_features, rank, in_features, bias, {"device": device, "dtype": dtype})

    @classmethod
    def from_factors(
        cls,
        up: torch.Tensor,
        down: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> "LowRankLinear":
        """Build from computed factors, cast to ``dtype`` (default: the factors' dtype)."""
        dtype = dtype or up.dtype
        module = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None, device=up.device, dtype=dtype)
        with torch.no_grad():
            module.up.copy_(up)
            module.down.copy_(down)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def multiply_adds(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The m×n matrix this layer applies (for re-compression, export, error reports, merging).

        ``dtype`` (e.g. float32) computes the product in that dtype, so merging a bf16 layer back to
        dense rounds once instead of accumulating in bf16.
        """
        if dtype is None:
            return self.up @ self.down
        return self.up.to(dtype) @ self.down.to(dtype)


class ColumnPreservingLinear(FactorizedLinear):
    """Duo-SVD layer: ``kept`` input columns dense, the other columns through a rank-r factor pair."""

    kind = "column_preserving"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        kept_columns: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1 or not 0 < kept_columns < in_features:
            raise ValueError(f"need rank >= 1 and 0 < kept_columns < {in_features}, got {rank}, {kept_columns}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.kept_columns = kept_columns
        kw = {"device": device, "dtype": dtype}
        rest = in_features - kept_columns
        self.register_buffer("kept_index", torch.arange(kept_columns, device=device))
        self.register_buffer("rest_index", torch.arange(kept_columns, in_features, device=device))
        self.kept_weight = nn.Parameter(torch.zeros(out_features, kept_columns, **kw))
        self._make_factors(out_features, rank, rest, bias, kw)

    @classmethod
    def from_parts(
        cls,
        up: torch.Tensor,
        down: torch.Tensor,
        kept_weight: torch.Tensor,
        kept_index: torch.Tensor,
        rest_index: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> "ColumnPreservingLinear":
        dtype = dtype or up.dtype
        n = kept_index.numel() + rest_index.numel()
        module = cls(n, up.shape[0], up.shape[1], kept_index.numel(), bias=bias is not None,
                     device=up.device, dtype=dtype)
        with torch.no_grad():
            module.kept_index.copy_(kept_index)
            module.rest_index.copy_(rest_index)
            module.kept_weight.copy_(kept_weight)
            module.up.copy_(up)
            module.down.copy_(down)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] >= self.rank:
            hidden = F.linear(flat, self.padded_down())
        else:
            hidden = F.linear(flat.index_select(1, self.rest_index), self.down)
        out = F.linear(hidden, self.up, self.bias)
        kept = flat.index_select(1, self.kept_index)
        if out.dtype == kept.dtype == self.kept_weight.dtype:
            # In-place accumulate (beta = 1) instead of `out + …`: one pass over the output fewer.
            out = out.addmm_(kept, self.kept_weight.t())
        else:
            # Under autocast `out` is already in the low dtype; in-place ops are not autocast, the
            # out-of-place addmm is (it casts all three operands).
            out = torch.addmm(out, kept, self.kept_weight.t())
        return out.view(*lead, self.out_features)

    def padded_down(self) -> torch.Tensor:
        """``down`` as an r × in_features matrix with zero columns at the kept positions.

        Multiplying the full input by it equals ``down · x[rest]`` without copying ``x[rest]``.
        Built per call (r·n writes, cheap next to the GEMM) so it is always in sync with ``down``
        and gradients flow to ``down`` through ``index_copy``.
        """
        zeros = self.down.new_zeros(self.rank, self.in_features)
        return zeros.index_copy(1, self.rest_index, self.down)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The m×n matrix this layer applies; ``dtype`` (e.g. float32) is the dtype of the product."""
        up, down, kept = (t if dtype is None else t.to(dtype) for t in (self.up, self.down, self.kept_weight))
        w = up.new_zeros(self.out_features, self.in_features)
        w[:, self.rest_index] = up @ down
        w[:, self.kept_index] = kept
        return w

    def multiply_adds(self) -> int:
        """The layer's own maths (rank part on the rest columns, dense kept part), not the padding."""
        rest = self.in_features - self.kept_columns
        return self.rank * (rest + self.out_features) + self.out_features * self.kept_columns

    def manifest_entry(self) -> dict:
        return {**super().manifest_entry(), "kept_columns": self.kept_columns}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kept_columns={self.kept_columns}"


def module_from_entry(entry: dict, *, device=None, dtype=None) -> FactorizedLinear:
    """An (uninitialised) factorized module with the structure a manifest entry describes."""
    shape = (entry["in_features"], entry["out_features"], entry["rank"])
    if entry["kind"] == LowRankLinear.kind:
        return LowRankLinear(*shape, bias=entry["bias"], device=device, dtype=dtype)
    if entry["kind"] == ColumnPreservingLinear.kind:
        return ColumnPreservingLinear(*shape, entry["kept_columns"], bias=entry["bias"], device=device, dtype=dtype)
    raise ValueError(f"unknown factorized module kind {entry['kind']!r}")
