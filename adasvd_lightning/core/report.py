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
    params_before: int  # the dense matrix (m·n) plus its bias, also when re-compressing factors
    params_after: int  # what the module holds after this run (unchanged if skipped)
    bias_params: int = 0  # biases are kept as they are; ratios are over the weight matrices
    rank: int | None = None
    kept_columns: int = 0  # input columns preserved dense (column-preserving form)
    # A compensated writer's column split that lowered the whitened error but lost to the plain
    # factorization once both were compensated: the columns it would have kept (0 = none refused).
    refused_columns: int = 0
    # ‖W′X_c − W X_o‖_F / ‖W X_o‖_F on the calibration data (X_c = X_o without paired statistics; a
    # target that is not compensated measures ‖(W′ − W)X_c‖ on its own compressed input X_c)
    relative_error: float | None = None
    whitening: str | None = None
    refinement_steps: int = 0
    # Held-out validation of the refinement (``heldout_fraction``): relative output error on the held-out
    # sequences at the start (no refinement) and after the chosen number of steps, fitted without them.
    heldout_error_start: float | None = None
    heldout_error: float | None = None
    # The same for a residual writer's plain (unweighted) output error, which a step must not raise
    # (`core.plain_guard`); None for other targets.
    heldout_plain_error_start: float | None = None
    heldout_plain_error: float | None = None
    # Paired refinement: whether the target was fitted to the dense outputs (a residual writer,
    # `core.residual`; its errors are then weighted by the residual's scale) or kept its start.
    compensated: bool | None = None
    skipped: str | None = None


@dataclass
class CompressionReport:
    method: str
    ratio: float
    modules: list[ModuleReport] = field(default_factory=list)
    # Which inputs each block was calibrated on (and its errors measured on): "original" / "compressed".
    propagation: str = ""
    parameters_before: int = 0  # whole model, unique parameters
    parameters_after: int = 0
    seconds: float = 0.0
    calibration_tokens: int = 0
    heldout_sequences: int = 0  # calibration sequences held out to validate the refinement's steps
    budget_parameters: int = 0  # weights the target linears may keep: ⌊(1 − c)·Σ m·n⌋
    allocation: dict = field(default_factory=dict)  # strategy diagnostics (importances, …)
    # Exclusive wall seconds per pipeline phase (:mod:`.profiling`): where the time of ``seconds`` went.
    phase_seconds: dict = field(default_factory=dict)
    # Factorized layers merged back to dense after compression (:mod:`.merging`): they would not run faster.
    merged: list = field(default_factory=list)

    def record_merges(self, merged: list, parameters_after: int) -> None:
        """Account for layers `merge_unprofitable` turned back into dense matrices (ratios stay honest)."""
        by_name = {m.name: m for m in self.modules}
        for item in merged:
            module = by_name.get(item.name)
            if module is not None:
                module.params_after = item.params_after + module.bias_params
                module.rank, module.kept_columns = None, 0
                module.skipped = item.reason
            self.merged.append(asdict(item))
        self.parameters_after = parameters_after

    @property
    def linear_parameters_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def linear_parameters_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    @property
    def _weights_before(self) -> int:
        return sum(m.params_before - m.bias_params for m in self.modules)

    @property
    def _weights_after(self) -> int:
        return sum(m.params_after - m.bias_params for m in self.modules)

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the target matrices' weights removed (biases excluded; skipped matrices count as kept)."""
        before = self._weights_before
        return 1.0 - self._weights_after / before if before else 0.0

    @property
    def budget_deviation(self) -> float:
        """(kept weights − budget) / budget over the target matrices (≤ 0: within budget)."""
        b = self.budget_parameters
        return (self._weights_after - b) / b if b else 0.0

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
            budget_deviation=self.budget_deviation,
        )
        return out
