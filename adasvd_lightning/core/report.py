"""What a compression run did, per module and in total (plain data, JSON-ready)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["ModuleReport", "CompressionReport"]


@dataclass
class ModuleReport:
    """One target matrix. ``rank`` is None when the matrix was left dense (``skipped`` says why)."""

    name: str
    out_features: int
    in_features: int
    params_before: int
    params_after: int
    rank: int | None = None
    relative_error: float | None = None  # ‖(W − W′)X‖_F / ‖W X‖_F on the calibration inputs
    whitening: str | None = None
    skipped: str | None = None


@dataclass
class CompressionReport:
    method: str
    ratio: float
    modules: list[ModuleReport] = field(default_factory=list)
    parameters_before: int = 0  # whole model, unique parameters
    parameters_after: int = 0
    seconds: float = 0.0
    calibration_tokens: int = 0

    @property
    def linear_parameters_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def linear_parameters_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the target linears' parameters removed (skipped matrices count as kept)."""
        before = self.linear_parameters_before
        return 1.0 - self.linear_parameters_after / before if before else 0.0

    @property
    def model_ratio(self) -> float:
        """Fraction of the whole model's parameters removed (embeddings and head included)."""
        return 1.0 - self.parameters_after / self.parameters_before if self.parameters_before else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            linear_parameters_before=self.linear_parameters_before,
            linear_parameters_after=self.linear_parameters_after,
            achieved_ratio=self.achieved_ratio,
            model_ratio=self.model_ratio,
        )
        return out
