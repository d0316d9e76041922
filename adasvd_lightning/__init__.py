"""adasvd-lightning: SVD low-rank compression of causal language models.

The top-level namespace re-exports the torch-only core; the Lightning layer lives in
:mod:`adasvd_lightning.training` and :mod:`adasvd_lightning.callbacks`.

The re-exports are resolved on first use (PEP 562 ``__getattr__``), not at import: the ``adasvd``
command imports this package before it parses its arguments, and ``adasvd --help`` or a mistyped flag
must answer without loading torch and transformers (seconds on a busy machine).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name → core module that defines it
_EXPORTS = {
    "CompressionConfig": "config",
    "embedded_corpus_path": "corpus",
    "sample_calibration_windows": "corpus",
    "tokenize_text": "corpus",
    "AdaSVDError": "errors",
    "InvalidInputError": "errors",
    "PerplexityResult": "evaluation",
    "evaluate_perplexity": "evaluation",
    "factorize": "factorization",
    "rank_for_ratio": "factorization",
    "LowRankLinear": "lowrank",
    "MergeWarning": "merging",
    "merge_unprofitable": "merging",
    "densify": "merging",
    "export_dense": "dense",
    "PRESETS": "methods",
    "get_method": "methods",
    "count_parameters": "params",
    "CompressionWarning": "pipeline",
    "compress_model": "pipeline",
    "CompressionReport": "report",
    "ModuleReport": "report",
    "load_compressed": "serialization",
    "load_tokenizer": "serialization",
    "save_compressed": "serialization",
    "compute_whitening": "whitening",
}

__all__ = sorted(_EXPORTS)


def _register_with_transformers() -> None:
    """Compressed folders open with transformers' Auto classes and pipelines once this package is
    imported (core/hf_format.py). Importing transformers here would cost seconds, so the registration
    runs when transformers' AutoConfig module is imported — at once if it already is."""
    from .core import hf_format

    hf_format.register_when_transformers_loads()


_register_with_transformers()


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".core.{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .core.config import CompressionConfig
    from .core.corpus import embedded_corpus_path, sample_calibration_windows, tokenize_text
    from .core.dense import export_dense
    from .core.errors import AdaSVDError, InvalidInputError
    from .core.evaluation import PerplexityResult, evaluate_perplexity
    from .core.factorization import factorize, rank_for_ratio
    from .core.lowrank import LowRankLinear
    from .core.merging import MergeWarning, densify, merge_unprofitable
    from .core.methods import PRESETS, get_method
    from .core.params import count_parameters
    from .core.pipeline import CompressionWarning, compress_model
    from .core.report import CompressionReport, ModuleReport
    from .core.serialization import load_compressed, load_tokenizer, save_compressed
    from .core.whitening import compute_whitening
