"""adasvd-lightning: SVD low-rank compression of causal language models.

The top-level namespace re-exports the torch-only core; the Lightning layer lives in
:mod:`adasvd_lightning.training` and :mod:`adasvd_lightning.callbacks`.
"""

from __future__ import annotations

from .core.config import CompressionConfig
from .core.corpus import embedded_corpus_path, sample_calibration_windows, tokenize_text
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

__version__ = "0.1.0"

__all__ = [
    "AdaSVDError",
    "CompressionConfig",
    "CompressionReport",
    "CompressionWarning",
    "InvalidInputError",
    "LowRankLinear",
    "MergeWarning",
    "ModuleReport",
    "PRESETS",
    "PerplexityResult",
    "compress_model",
    "compute_whitening",
    "count_parameters",
    "densify",
    "embedded_corpus_path",
    "evaluate_perplexity",
    "factorize",
    "get_method",
    "load_compressed",
    "load_tokenizer",
    "merge_unprofitable",
    "rank_for_ratio",
    "sample_calibration_windows",
    "save_compressed",
    "tokenize_text",
]
