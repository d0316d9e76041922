"""Validated configuration of one compression run."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from .activation_store import check_activation_dir
from .errors import InvalidInputError
from .linalg import SVD_DRIVERS
from .methods import PROPAGATIONS, MethodSpec, get_method
from .offload import usable_device
from .probe_table import check_table_path
from .surgery import TargetSelector

__all__ = ["CompressionConfig", "PROPAGATIONS"]
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class CompressionConfig:
    """What to compress and how.

    Attributes:
        method: preset name (see :mod:`adasvd_lightning.core.methods`).
        ratio: compression ratio c in (0, 1): fraction of each target matrix's parameters removed.
        include / exclude: regular expressions on full module names selecting the target linears
            (default: every linear inside the decoder blocks).
        propagation: which inputs block i+1 is calibrated on. ``None`` (default): the method's own
            scheme (`MethodSpec.propagation`). ``"compressed"`` (SVD-LLM's sequential update) feeds it the
            outputs of the already compressed blocks, so each block is fitted to the inputs it will
            really see, at the price of a second, compressed pass through every block; ``"original"``
            (``svd``, which reads data only for its report, and ``asvd``, as its paper calibrates) uses
            the dense model's activations, one pass per block.
        damping: relative damping of the Cholesky retry (× mean diagonal of H). Only where a factor is
            formed: wide or square targets without preserved columns, and without refinement or with only
            the closed-form U update, are fitted from W·H·Wᵀ, which needs no factor and is exact for a
            singular H (report: `output-gram`). Where a damped factor serves adaComp's V-steps, they are
            ridge steps of its shift (`core.refinement`).
        compute_dtype: precision of the decompositions (``float64`` is the safe default).
        method_options: overrides of the preset's strategies and knobs, e.g.
            ``{"refinement": "adacomp", "adacomp_iterations": 5}`` (see `MethodSpec`).
        execution_device: block offload (:mod:`.offload`). ``None`` (default) compresses the model
            where it is. A device (``"cuda"``, ``"cuda:1"``, ``"cpu"``) keeps the model and the calibration
            activations where they are (typically host memory) and moves one decoder block at a time
            there for its statistics, factorization and propagation, so the device only ever holds one
            block. Results equal the in-place run up to the device's arithmetic. The allocation
            probes of ``module-kl`` / ``sensitivity-ppl`` and the backward pass of ``module-kl-fisher``
            run the whole model and stay where it is.
        svd_driver: how truncated SVDs are computed (:mod:`.linalg`). ``"auto"`` (default) and
            ``"gram"`` take the eigen-decomposition of the smaller Gram matrix when that is accurate for
            the kept rank (float64) and LAPACK's SVD otherwise; ``"svd"`` always uses LAPACK's SVD (the
            reference path, several times slower on CPU; same factors to round-off).
        statistics_dtype: precision of each calibration chunk's Gram products xᵀx (and x_oᵀx_c); the
            running sums are float64 either way (:mod:`.statistics`). ``"float32"`` (default): on
            SmolLM2-135M at 40 % it moved svd-llm-w's, svd-llm's and adasvd's perplexity by ≤ 0.003 %
            relative while the statistics phase took 0.71–0.77× the time on CPU (float64 GEMM runs at
            1/2 of float32 speed there, 1/32–1/64 on consumer GPUs; BENCHMARKS.md, "Statistics
            precision on a real model"). The rounding it adds to H's null space (fewer tokens than
            features) is covered by the damped whitening's shift (`whitening.rounding_shift`).
            ``"float64"`` forms the products exactly as the sums (the reference path). The products
            follow the process's float32 matmul setting: after
            ``torch.set_float32_matmul_precision("high")`` a GPU forms them in TF32 (~1e-3 relative).
        decomposition_threads: CPU threads of each LAPACK decomposition (eigh, SVD, Cholesky) during the
            run; products and forwards keep torch's setting. ``1`` (default): these decompositions are
            chains of matrix-vector steps, each a parallel region that waits for every thread, so on
            cores shared with other processes extra threads made them 5–100× slower
            (:mod:`.linalg`), while on idle cores they gain little below a few thousand columns.
            ``None`` uses torch's thread count (worth it on a dedicated many-core node with hidden sizes
            of several thousand). No effect on GPU decompositions.
        probe_table: a file that keeps the sensitivity probes' rows as they are measured (``module-kl``,
            ``sensitivity-ppl``, and ``module-kl-fisher`` with ``fisher_scale="probed"``; other allocations
            probe nothing, so it is refused there). A run given the file of an interrupted one reuses its
            rows and probes only the rest; a file measured on another model, calibration set or
            configuration is refused and left alone (:mod:`.probe_table`). ``None`` (default): no file.
        activation_dir: a folder to keep the calibration activations in, as files, instead of memory
            (:mod:`.activation_store`). They are the one part of a run's memory that grows with the
            calibration set (Llama-2-7B at 524,288 tokens: 8 GiB per float32 stream, two streams for the
            methods fitted to the dense outputs); in files, resident memory holds one batch of them at a
            time and the kernel's page cache the rest, as memory allows. Same numbers, bit for bit. The
            files never appear in the folder (Linux) or are removed as soon as they are opened, so
            nothing is left there after the run, however it ends; a folder without room for the streams
            the run's passes will hold (up to two more than the captured one) is refused before the
            first block. The model must be on the CPU (with ``execution_device`` to run blocks
            elsewhere). ``None`` (default): in memory, with a `CompressionWarning` before the first
            block when the streams will outgrow the memory available.
    """

    method: str = "svd-llm"
    ratio: float = 0.4
    include: Sequence[str] | None = None
    exclude: Sequence[str] = field(default_factory=tuple)
    propagation: str | None = None
    damping: float = 1e-6
    compute_dtype: str = "float64"
    method_options: dict = field(default_factory=dict)
    execution_device: str | None = None
    svd_driver: str = "auto"
    statistics_dtype: str = "float32"
    decomposition_threads: int | None = 1
    probe_table: str | None = None
    activation_dir: str | None = None

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
        if self.propagation is not None:
            if self.propagation not in PROPAGATIONS:
                raise InvalidInputError(f"propagation must be one of {PROPAGATIONS}, got {self.propagation!r}")
            option = self.method_options.get("propagation", self.propagation)
            if option != self.propagation:
                raise InvalidInputError(f"propagation={self.propagation!r} contradicts the method option "
                                        f"propagation={option!r}; give one of them")
        if not self.damping >= 0.0:
            raise InvalidInputError(f"damping must be >= 0, got {self.damping}")
        if self.compute_dtype not in _DTYPES:
            raise InvalidInputError(f"compute_dtype must be one of {tuple(_DTYPES)}, got {self.compute_dtype!r}")
        if isinstance(self.include, str) or isinstance(self.exclude, str):
            raise InvalidInputError("include/exclude must be lists of patterns, not a single string")
        self.include = list(self.include) if self.include is not None else None
        self.exclude = list(self.exclude)
        TargetSelector(self.include, self.exclude)  # validates the regular expressions
        if self.svd_driver not in SVD_DRIVERS:
            raise InvalidInputError(f"svd_driver must be one of {SVD_DRIVERS}, got {self.svd_driver!r}")
        if self.statistics_dtype not in _DTYPES:
            raise InvalidInputError(
                f"statistics_dtype must be one of {tuple(_DTYPES)} (precision of the calibration Gram "
                f"products), got {self.statistics_dtype!r}"
            )
        if self.decomposition_threads is not None and (
            isinstance(self.decomposition_threads, bool) or not isinstance(self.decomposition_threads, int)
            or self.decomposition_threads < 1
        ):
            raise InvalidInputError(
                f"decomposition_threads must be a positive integer or None, got {self.decomposition_threads!r}"
            )
        if self.execution_device is not None:
            try:
                usable_device(self.execution_device)
            except InvalidInputError as exc:
                raise InvalidInputError(f"execution_device: {exc}") from None
            self.execution_device = str(self.execution_device)
        if self.probe_table is not None:
            spec = self.spec
            if not spec.probes:
                raise InvalidInputError(f"probe_table keeps sensitivity probes, and allocation {spec.allocation!r}"
                                        + (" with fisher_scale='none'" if spec.allocation == "module-kl-fisher" else "")
                                        + " probes nothing; drop probe_table")
            self.probe_table = str(check_table_path(self.probe_table))
        if self.activation_dir is not None:
            self.activation_dir = str(check_activation_dir(self.activation_dir))

    @property
    def spec(self) -> MethodSpec:
        """The method with its options, and ``propagation`` when the config sets it (the one place the
        pipeline reads the scheme from)."""
        spec = get_method(self.method).with_overrides(self.method_options)
        if self.propagation is not None and self.propagation != spec.propagation:
            spec = dataclasses.replace(spec, propagation=self.propagation)
        return spec

    @property
    def selector(self) -> TargetSelector:
        return TargetSelector(self.include, self.exclude)

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return _DTYPES[self.compute_dtype]

    @property
    def torch_statistics_dtype(self) -> torch.dtype:
        return _DTYPES[self.statistics_dtype]

    def to_dict(self) -> dict:
        return asdict(self)
