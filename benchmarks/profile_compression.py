"""Where a compression's time goes, function by function: cProfile around `compress_model`.

    python benchmarks/profile_compression.py --model /work/cache/smollm2-135m --method svd-llm \
        --samples 16 --seq-len 256

Prints the run's per-phase seconds and the functions with the most own time and the most cumulative
time (torch kernels appear as ``built-in method torch._C...``). Run it with ``OMP_NUM_THREADS=1`` next
to nothing else: the profile is of one process, and its absolute seconds are the machine's.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_run_arguments, run_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face causal-LM folder")
    add_run_arguments(parser, samples=16)
    parser.add_argument("--top", type=int, default=35, help="functions listed per ordering")
    args = parser.parse_args()
    config = run_config(parser, args)

    from adasvd_lightning import compress_model, load_compressed, load_tokenizer
    from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

    folder = Path(args.model).expanduser()
    model = load_compressed(folder)
    batches = calibration_batches(load_tokenizer(folder), CalibrationSpec(None, samples=args.samples,
                                                                          seq_len=args.seq_len))
    warnings.simplefilter("ignore")
    profile = cProfile.Profile()
    profile.enable()
    report = compress_model(model, config, batches)
    profile.disable()
    print(f"{args.method} {args.ratio:.0%}, {args.samples} × {args.seq_len}: {report.seconds:.1f} s; phases "
          + ", ".join(f"{k} {v:.1f}" for k, v in report.phase_seconds.items()))
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
