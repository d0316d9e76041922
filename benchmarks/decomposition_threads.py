"""Where the svd phase's time goes on a real model: each decomposition path × thread count, timed on the
real whitened matrices of the first blocks.

    python benchmarks/decomposition_threads.py --model /path/to/llama-folder --blocks 2
    python benchmarks/decomposition_threads.py --model DIR --no-write      # print only

The first ``--blocks`` decoder blocks are compressed with ``svd-llm`` (no refinement) on a few calibration
windows; every (weight, rank, whitening) the pipeline factors is kept and then factored again by each
path, interleaved (path × threads, then the next matrix), so machine noise hits all paths alike:

* ``auto``  — this package's default: eigen-decomposition of the smaller Gram matrix (`linalg.thin_svd`),
* ``svd``   — LAPACK's divide-and-conquer SVD of the whitened matrix (the reference path),

each with 1 thread and with torch's thread count (``decomposition_threads`` = 1 / None). Wall and CPU
seconds are summed over all matrices; accuracy is the largest singular-value difference (relative to
σ₁) and the largest relative difference of the rank-r truncation error against the reference path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write_section  # noqa: E402

PATHS = (("auto", 1), ("auto", None), ("svd", 1), ("svd", None))


def _capture(model_dir: str, blocks: int, samples: int, seq_len: int) -> list:
    """(float64 weight, rank, whitening) of every target the pipeline factors in the first blocks."""
    from adasvd_lightning import CompressionConfig, compress_model, load_compressed, load_tokenizer
    from adasvd_lightning.core import pipeline
    from adasvd_lightning.display import quiet_libraries
    from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

    quiet_libraries()
    model = load_compressed(model_dir)
    batches = calibration_batches(load_tokenizer(model_dir), CalibrationSpec(None, samples=samples, seq_len=seq_len))
    captured = []
    factorize = pipeline.factorize

    def keep(weight, rank, whitening, **kw):
        captured.append((weight.clone(), rank, whitening))
        return factorize(weight, rank, whitening, **kw)

    pipeline.factorize = keep
    try:
        layers = "|".join(str(i) for i in range(blocks))
        config = CompressionConfig(method="svd-llm", ratio=0.4, include=[rf"\.layers\.({layers})\."],
                                   method_options={"refinement": "none"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compress_model(model, config, batches)
    finally:
        pipeline.factorize = factorize
    return captured


def measure(args) -> dict:
    import torch

    from adasvd_lightning.core.factorization import factorize
    from adasvd_lightning.core.linalg import decomposition_threads

    captured = _capture(args.model, args.blocks, args.samples, args.seq_len)
    keys = [f"{d}/{t or 'torch'}" for d, t in PATHS]
    totals = {k: {"wall": 0.0, "cpu": 0.0, "sigma": 0.0, "loss": 0.0} for k in keys}
    for _ in range(args.repeats):
        for weight, rank, whitening in captured:
            results = {}
            for key, (driver, threads) in zip(keys, PATHS):
                with decomposition_threads(threads):
                    w0, c0 = time.perf_counter(), time.process_time()
                    results[key] = factorize(weight, rank, whitening, driver=driver)
                    totals[key]["wall"] += time.perf_counter() - w0
                    totals[key]["cpu"] += time.process_time() - c0
            reference = results["svd/torch"]
            ref_s, ref_loss = reference.singular_values, reference.truncation_loss
            for key, factors in results.items():
                sigma = float((factors.singular_values - ref_s).abs().max() / ref_s[0])
                loss = abs(factors.truncation_loss - ref_loss) / ref_loss
                totals[key]["sigma"] = max(totals[key]["sigma"], sigma)
                totals[key]["loss"] = max(totals[key]["loss"], loss)
    shapes: dict[str, int] = {}
    for weight, _, _ in captured:
        name = "×".join(map(str, weight.shape))
        shapes[name] = shapes.get(name, 0) + 1
    return {"matrices": len(captured), "shapes": shapes, "repeats": args.repeats, "paths": totals,
            "torch_threads": torch.get_num_threads(), "machine": machine(), "argv": sys.argv[1:]}


def render(result: dict) -> str:
    paths = result["paths"]
    base = paths["auto/1"]["wall"]
    lines = [
        "## Decomposition threads: the svd phase on a real model",
        "",
        f"Command: `python benchmarks/decomposition_threads.py {' '.join(result['argv'])}`  ",
        f"Machine: {result['machine']} (shared with other jobs while measured). "
        f"{result['matrices']} real whitened matrices ({', '.join(f'{n}× {s}' for s, n in result['shapes'].items())}), "
        f"each factored {result['repeats']}× per path, paths interleaved per matrix. Raw: "
        "`benchmarks/results/decomposition_threads.json`.",
        "",
        "| path (driver / threads) | wall s | CPU s | × wall of auto/1 | max |Δσ|/σ₁ vs svd/torch | max rel. Δ truncation error |",
        "|---|---|---|---|---|---|",
    ]
    for key, t in paths.items():
        lines.append(f"| {key} | {t['wall']:.2f} | {t['cpu']:.2f} | {t['wall'] / base:.1f} | {t['sigma']:.1e} | "
                     f"{t['loss']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Llama-style model folder (safetensors)")
    parser.add_argument("--blocks", type=int, default=2, help="decoder blocks whose matrices are captured")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        parser.exit(2, f"error: no model folder at {args.model} (config.json missing)\n")
    result = measure(args)
    text = render(result)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "decomposition_threads.json").write_text(json.dumps(result, indent=2))
        write_section("decomposition-threads", text)


if __name__ == "__main__":
    main()
