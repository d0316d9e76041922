"""Whitening's memory: allocated bytes above the Gram matrix H during `compute_whitening`.

    python benchmarks/whitening_memory.py                 # n = 5504 (h2048's down_proj input)
    python benchmarks/whitening_memory.py --n 2048

The widest input's whitening is where a compression run peaks in memory: H (and, paired, H_oc) are
alive, and the Cholesky factor L (n×n float64) is being made. Anything else of size n² there is
overhead. Two cases: H of full rank (more tokens than features: one Cholesky), and H singular (fewer
tokens than features: the undamped attempt fails and the damped retry runs). Memory is sampled from
glibc's allocation counters (`mallinfo2`) in a thread, so it is live data, not retained pages.

To compare with an earlier version of the package, run this script with ``PYTHONPATH`` pointing at a
checkout of that version (the script itself only needs `compute_whitening`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from compression_speed import _allocated, _PeakSampler  # noqa: E402


def _gram(n: int, tokens: int) -> torch.Tensor:
    """Exactly symmetric mean Gram matrix of ``tokens`` random rows (as the pipeline's statistics are)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    h = x.T @ x / tokens
    return torch.tril(h) + torch.tril(h, -1).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5504)
    args = parser.parse_args()
    import adasvd_lightning
    from adasvd_lightning.core.whitening import compute_whitening

    torch.set_num_threads(2)
    mb = args.n * args.n * 8 / 2**20
    print(f"package: {Path(adasvd_lightning.__file__).parent}")
    print(f"n = {args.n}: one n×n float64 matrix = {mb:.0f} MB\n")
    print("| H | whitening | peak allocated above H, MB | kept after (the factor), MB |")
    print("|---|---|---|---|")
    for label, tokens in (("full rank", 2 * args.n), ("singular", args.n // 2)):
        h = _gram(args.n, tokens)
        with _PeakSampler(interval=0.001) as sampler:
            whitening = compute_whitening(h)
        kept = _allocated() - sampler.alloc_start
        print(f"| {label} ({tokens} tokens) | {whitening.kind} | {(sampler.alloc_peak - sampler.alloc_start) / 2**20:.0f} "
              f"| {kept / 2**20:.0f} |")
        del whitening, h


if __name__ == "__main__":
    main()
