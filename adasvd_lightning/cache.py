"""Where the project keeps what it builds or downloads: ``$ADASVD_CACHE`` (default ``~/.cache/adasvd-lightning``).

Standard library only, so the CLI can point `datasets` at it before anything heavy is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "datasets_cache_dir"]


def cache_root() -> Path:
    return Path(os.environ.get("ADASVD_CACHE", Path.home() / ".cache" / "adasvd-lightning")).expanduser()


def datasets_cache_dir() -> Path:
    """`datasets`' Arrow caches live under the project's cache, not ``~/.cache/huggingface``."""
    return cache_root() / "datasets"
