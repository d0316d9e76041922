"""Validated configuration of one compression run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from .errors import InvalidInputError
from .methods import MethodSpec, get_method
from .surgery import TargetSelector

__all__ = ["CompressionConfig", "PROPAGATIONS"]

PROPAGATIONS = ("compressed", "original")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class CompressionConfig:
    """What to compress and how.

    Attributes:
        method: preset name (see :mod:`adasvd_lightning.core.methods`).
        ratio: compression ratio c in (0, 1): fraction of each target matrix's parameters removed.
        include / exclude: regular expressions on full module names selecting the target linears
            (default: every linear inside the decoder blocks).
        propagation: which inputs block i+1 is calibrated on. ``"compressed"`` (default, SVD-LLM's
            sequential scheme) feeds it the outputs of the already compressed blocks, so each block is
            fitted to the inputs it will really see; ``"original"`` uses the dense model's activations.
        damping: relative damping of the Cholesky retry (× mean diagonal of H).
        compute_dtype: precision of the decompositions (``float64`` is the safe default).
        method_options: overrides of the preset's strategies and knobs, e.g.
            ``{"refinement": "adacomp", "adacomp_iterations": 5}`` (see `MethodSpec`).
    """

    method: str = "svd-llm"
    ratio: float = 0.4
    include: Sequence[str] | None = None
    exclude: Sequence[str] = field(default_factory=tuple)
    propagation: str = "compressed"
    damping: float = 1e-6
    compute_dtype: str = "float64"
    method_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.method_options, dict):
            raise InvalidInputError("method_options must be a mapping of MethodSpec fields to values")
        self.method_options = dict(self.method_options)
        get_method(self.method).with_overrides(self.method_options)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise InvalidInputError(f"ratio must be a number in (0, 1), got {self.ratio!r}")
        if not 0.0 < float(self.ratio) < 1.0:
            raise InvalidInputError(
                f"ratio must be in (0, 1) (fraction of parameters removed), got {self.ratio}"
            )
        self.ratio = float(self.ratio)
        if self.propagation not in PROPAGATIONS:
            raise InvalidInputError(f"propagation must be one of {PROPAGATIONS}, got {self.propagation!r}")
        if not self.damping >= 0.0:
            raise InvalidInputError(f"damping must be >= 0, got {self.damping}")
        if self.compute_dtype not in _DTYPES:
            raise InvalidInputError(f"compute_dtype must be one of {tuple(_DTYPES)}, got {self.compute_dtype!r}")
        if isinstance(self.include, str) or isinstance(self.exclude, str):
            raise InvalidInputError("include/exclude must be lists of patterns, not a single string")
        self.include = list(self.include) if self.include is not None else None
        self.exclude = list(self.exclude)
        TargetSelector(self.include, self.exclude)  # validates the regular expressions

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method).with_overrides(self.method_options)

    @property
    def selector(self) -> TargetSelector:
        return TargetSelector(self.include, self.exclude)

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return _DTYPES[self.compute_dtype]

    def to_dict(self) -> dict:
        return asdict(self)
