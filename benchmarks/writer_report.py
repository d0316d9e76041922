"""Per-writer refinement report on a real model: which compensation steps validated, and what they did.

    python benchmarks/writer_report.py --model /path/to/hf-folder --method svd-llm --ratio 0.4 --samples 32 --seed 1

One run of `real_models.py`'s protocol (calibration: ``--samples`` random windows × ``--seq-len`` tokens
of the embedded training split, seed ``--seed``; perplexity on the first 24 × 512 tokens of the embedded
test split), in this process, printing for every compensated target (a residual writer,
`core.residual`) the refinement steps it kept, its relative error on the held-out sequences before and
after them (on the residual's scale, as the validation scores it), the same for its plain output error
(which a step must not raise, `core.plain_guard`), and its relative error on all calibration tokens. Comparing two runs (e.g. ``--samples 32`` vs ``64``) shows which writers' decisions
changed: BENCHMARKS.md ("Calibration tokens") has the case that motivated it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_run_arguments, method_config  # noqa: E402
from real_models import one  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face causal-LM folder")
    add_run_arguments(parser, samples=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the run's row as JSON here")
    args = parser.parse_args()
    if not 0 < args.ratio < 1 or args.samples < 1 or args.seq_len < 2:
        parser.error("ratio must be in (0, 1); samples >= 1; seq-len >= 2")
    method_config(args.method, args.ratio)  # an unknown preset fails here, before any model work

    from adasvd_lightning import CompressionConfig
    from adasvd_lightning.core.errors import InvalidInputError
    from adasvd_lightning.core.serialization import check_model_folder

    folder = Path(args.model).expanduser()
    try:
        check_model_folder(folder)
    except InvalidInputError as error:
        parser.error(str(error))
    row = one(str(folder), args.method, args.ratio, args.samples, args.seq_len, 24, 512,
              CompressionConfig.statistics_dtype, args.seed)
    print(f"{args.method} {args.ratio:.0%} {args.samples}×{args.seq_len} seed {args.seed}: ppl {row['perplexity']:.2f}")
    print(f"{'writer':<40} {'steps':>5} {'held-out start':>15} {'after':>8} {'plain start':>12} {'after':>8} "
          f"{'calib':>8}")

    def fmt(value: float | None) -> str:
        return "–" if value is None else f"{value:.4f}"

    for r in row["writers"]:
        print(f"{r['name']:<40} {r['steps']:>5} {fmt(r['heldout_start']):>15} {fmt(r['heldout_after']):>8} "
              f"{fmt(r.get('plain_start')):>12} {fmt(r.get('plain_after')):>8} {fmt(r['error']):>8}")
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], **row}, indent=2))


if __name__ == "__main__":
    main()
