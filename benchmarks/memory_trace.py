"""Where a compression's host memory peaks: live bytes and RSS per (target, phase), sampled in a thread.

    python benchmarks/memory_trace.py --model /work/cache/smollm2-135m --method svd-llm --samples 16
    python benchmarks/memory_trace.py --hidden 4096 --blocks 2 --method svd-llm --samples 8   # Llama-7B width

A thread samples glibc's allocated bytes (`mallinfo2`: the live data) and the resident set size every
10 ms while `compress_model` runs, and keeps the largest value seen for each (target being factorized,
phase stack) pair; "-" is outside any target's factorization (calibration passes, statistics), and a
refinement's validation on held-out tokens runs under its own "validation" phase, apart from the main
fit. Both
are printed over the values at the start of the run, i.e. over the loaded model and the calibration
ids. The difference between them is memory glibc keeps after a free (fragmentation, its caches).

`--hidden` builds `compression_speed.py`'s synthetic Llama (MLP 2.6875 × hidden, vocabulary 4096,
random ids); `--model` loads a folder and the embedded calibration text. Run it with
``OMP_NUM_THREADS=1``; `--out NAME` writes the rows to ``benchmarks/results/NAME``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, add_run_arguments, machine, run_config  # noqa: E402
from compression_speed import BATCH, SYNTH_VOCAB, _allocated, _PeakSampler, _rss, _synthetic  # noqa: E402


class _Trace(_PeakSampler):
    """`compression_speed`'s sampler, keeping the peak live bytes and RSS (over the start) per
    (target being factorized, phase stack) instead of one peak."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(interval)
        self.target = "-"
        self.peaks: dict[tuple[str, str], list[float]] = {}

    def _loop(self) -> None:
        from adasvd_lightning.core import profiling

        while not self._stop.is_set():
            timer = profiling.active_timer()
            stack = "/".join(name for name, *_ in timer._stack) if timer is not None else ""
            allocated = (_allocated() - self.alloc_start) / 2**20
            rss = (_rss() - self.start) / 2**20
            peak = self.peaks.setdefault((self.target, stack), [0.0, 0.0])
            peak[0], peak[1] = max(peak[0], allocated), max(peak[1], rss)
            self._stop.wait(self.interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a local Hugging Face causal-LM folder")
    source.add_argument("--hidden", type=int, help="a synthetic Llama of this width (random weights)")
    parser.add_argument("--blocks", type=int, default=2, help="decoder blocks of the synthetic model")
    add_run_arguments(parser, samples=16)
    parser.add_argument("--top", type=int, default=20, help="(target, phase) rows printed, largest first")
    parser.add_argument("--out", help="write the rows to benchmarks/results/OUT (JSON)")
    args = parser.parse_args()
    if _allocated() is None:
        sys.exit("error: this trace needs glibc ≥ 2.33 (mallinfo2)")
    config = run_config(parser, args)

    import torch

    from adasvd_lightning import compress_model
    from adasvd_lightning.core import pipeline, profiling
    from adasvd_lightning.core.runtime import release_free_heap

    if args.model:
        from adasvd_lightning import load_compressed, load_tokenizer
        from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

        folder = Path(args.model).expanduser()
        model = load_compressed(folder)
        batches = calibration_batches(load_tokenizer(folder), CalibrationSpec(None, samples=args.samples,
                                                                              seq_len=args.seq_len))
    else:
        model = _synthetic(args.hidden, args.blocks)
        ids = torch.randint(0, SYNTH_VOCAB, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
        batches = list(ids.split(BATCH))
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    gc.collect()
    release_free_heap()

    trace = _Trace()
    factorize = pipeline._factorize_target

    def traced(name, *a, **kw):  # which target is being factorized, for the sampler
        trace.target = name
        try:
            return factorize(name, *a, **kw)
        finally:
            trace.target = "-"

    validate = pipeline._validate_refinement

    def validation(*a, **kw):  # a refinement's validation on held-out tokens, apart from its main fit
        with profiling.phase("validation"):
            return validate(*a, **kw)

    pipeline._factorize_target, pipeline._validate_refinement = traced, validation
    warnings.simplefilter("ignore")
    try:
        with trace:
            start = time.perf_counter()
            report = compress_model(model, config, batches)
            seconds = time.perf_counter() - start
    finally:
        pipeline._factorize_target, pipeline._validate_refinement = factorize, validate
    rows = sorted(({"target": t, "phase": p, "allocated_mb": a, "rss_mb": r} for (t, p), (a, r) in trace.peaks.items()),
                  key=lambda row: -row["allocated_mb"])
    name = args.model or f"synthetic h{args.hidden}×{args.blocks}"
    print(f"{name}, {args.method} {args.ratio:.0%}, {args.samples} × {args.seq_len}: {seconds:.1f} s, model "
          f"{model_mb:.0f} MB; phases " + ", ".join(f"{k} {v:.1f}" for k, v in report.phase_seconds.items() if v >= 0.05))
    top_rss = max(rows, key=lambda row: row["rss_mb"])
    print(f"peak over the start: allocated {rows[0]['allocated_mb']:.0f} MB at {rows[0]['target']} "
          f"[{rows[0]['phase']}], RSS {top_rss['rss_mb']:.0f} MB at {top_rss['target']} [{top_rss['phase']}]")
    print("| target | phase | allocated MB | RSS MB |\n|---|---|---|---|")
    for row in rows[:args.top]:
        print(f"| {row['target']} | {row['phase'] or '-'} | {row['allocated_mb']:.0f} | {row['rss_mb']:.0f} |")
    if args.out:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / args.out).write_text(json.dumps({"argv": sys.argv[1:], "machine": machine(), "seconds": seconds,
                                                    "model_mb": model_mb, "phases": report.phase_seconds,
                                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
