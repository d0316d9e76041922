"""`LowRankLinear`: the module that replaces a dense linear layer after factorization.

y = up(down(x)) + bias, computed as two matmuls so the FLOPs drop with the rank. Parameters are plain
`up` (m×r) and `down` (r×n) tensors on the module itself — not nested `nn.Linear`s — so that surgery
sees one leaf per compressed matrix (re-compression and "train only the factors" both rely on that),
and state-dict keys stay readable: ``…q_proj.up``, ``…q_proj.down``, ``…q_proj.bias``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LowRankLinear"]


class LowRankLinear(nn.Module):
    """Rank-r factorized linear layer y = up·(down·x) + bias."""

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
        kw = {"device": device, "dtype": dtype}
        self.down = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.up = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        nn.init.normal_(self.down, std=in_features**-0.5)
        nn.init.normal_(self.up, std=rank**-0.5)

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

    def dense_weight(self) -> torch.Tensor:
        """The m×n matrix this layer applies (for re-compression, export and error reports)."""
        return self.up @ self.down

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )
