"""Statistics update speed: float64 vs float32 Gram products (`CompressionConfig.statistics_dtype`).

    python benchmarks/statistics_speed.py                       # n = 1024 and 2816, 8192 tokens per update
    python benchmarks/statistics_speed.py --widths 4096 --tokens 4096

Times one `InputStatistics.add` (H += XᵀX, single stream) and one `add_pair` (H_cc and H_oc, paired
refinement statistics) of a float32 activation batch, as the block hooks call them, best of ``--repeats``.
With float32 products the running sums are still float64, so the difference is the GEMMs' precision
only. Prints a Markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

from adasvd_lightning.core.statistics import InputStatistics  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def best_seconds(fn: Callable[[], None], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up (the least disturbed by the shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def update_seconds(width: int, tokens: int, dtype: torch.dtype, paired: bool, repeats: int) -> float:
    """Seconds of one statistics update of ``tokens`` float32 activations of width ``width``."""
    g = torch.Generator().manual_seed(0)
    x, x_original = torch.randn(tokens, width, generator=g), torch.randn(tokens, width, generator=g)
    stats = InputStatistics.empty(width, product_dtype=dtype)
    return best_seconds(lambda: stats.add_pair(x_original, x) if paired else stats.add(x), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", nargs="+", type=int, default=[1024, 2816])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per update")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"Machine: {machine()}; {args.tokens} tokens per update, best of {args.repeats}\n")
    print("| n | update | float64 s | float32 s | speed-up |")
    print("|---:|---|---:|---:|---:|")
    for width in args.widths:
        for paired in (False, True):
            seconds = {name: update_seconds(width, args.tokens, dtype, paired, args.repeats)
                       for name, dtype in DTYPES.items()}
            label = "add_pair (H_cc, H_oc)" if paired else "add (H)"
            print(f"| {width} | {label} | {seconds['float64']:.3f} | {seconds['float32']:.3f} | "
                  f"{seconds['float64'] / seconds['float32']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
