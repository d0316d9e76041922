"""Named compression methods (presets).

A method decides how each matrix is measured before truncation — here, the whitening transform built
from the calibration statistics. Every preset shares the same block-by-block pipeline, rank arithmetic
and module surgery, so comparisons between them isolate the method itself.

| preset    | whitening                                   | source                                  |
|-----------|---------------------------------------------|-----------------------------------------|
| `svd`     | none (plain truncated SVD of W)             | baseline                                |
| `asvd`    | diagonal, (mean |x_j|)^α with α = 0.5       | ASVD, Yuan et al. 2023                  |
| `svd-llm` | Cholesky of H = XXᵀ (fallback chain)        | SVD-LLM, Wang et al. 2024 (truncation-aware whitening) |
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .errors import InvalidInputError
from .statistics import InputStatistics
from .whitening import DiagonalWhitening, IdentityWhitening, Whitening, compute_whitening

__all__ = ["MethodSpec", "PRESETS", "get_method", "WHITENINGS"]

WHITENINGS = ("none", "activation-scale", "truncation-aware")


@dataclass(frozen=True)
class MethodSpec:
    """One compression method: a name, its whitening, and where it comes from."""

    name: str
    whitening: str
    source: str
    asvd_alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.whitening not in WHITENINGS:
            raise InvalidInputError(f"unknown whitening {self.whitening!r}; choose one of {', '.join(WHITENINGS)}")

    @property
    def needs_calibration(self) -> bool:
        return self.whitening != "none"

    def make_whitening(self, stats: InputStatistics | None, *, damping: float) -> Whitening:
        """The whitening transform for one matrix given its input statistics."""
        if self.whitening == "none":
            return IdentityWhitening()
        if stats is None:
            raise RuntimeError(f"method {self.name!r} needs calibration statistics")
        if self.whitening == "activation-scale":
            scale = stats.mean_abs.clamp_min(1e-8).pow(self.asvd_alpha)
            return DiagonalWhitening(scale=scale)
        return compute_whitening(stats.gram, damping=damping)


PRESETS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("svd", "none", "plain truncated SVD (baseline)"),
        MethodSpec("asvd", "activation-scale", "ASVD (Yuan et al., 2023), alpha = 0.5"),
        MethodSpec("svd-llm", "truncation-aware", "SVD-LLM (Wang et al., 2024), truncation-aware whitening"),
    )
}


def get_method(name: str) -> MethodSpec:
    """Look up a preset by name; unknown names get a did-you-mean message."""
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidInputError(
            f"unknown method {name!r}{hint}; available: {', '.join(PRESETS)}"
        ) from None
