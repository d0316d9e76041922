"""Quality benchmark: perplexity of every preset at several compression ratios on the reference model.

    python benchmarks/quality.py                      # all presets × 20/40/60/80 %, writes BENCHMARKS.md
    python benchmarks/quality.py --methods svd svd-llm --ratios 0.6
    python benchmarks/quality.py --methods adasvd adasvd+refinement=optimal --ratios 0.4 --no-write

Each (method, ratio) runs in its own process so its compression seconds and peak resident memory are
its own. Perplexity follows the README protocol on the embedded test split (256-token windows).
Deterministic: fixed calibration seed, deterministic reference model.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, method_config, run_json, write_section  # noqa: E402


def one(method: str, ratio: float, samples: int, seq_len: int, statistics_dtype: str) -> dict:
    """Compress the reference model with one preset and evaluate it (runs in a child process).

    ``method`` may carry method options after the preset, as in the CLI's ``--method-option``:
    ``adasvd+refinement=optimal`` (several joined by ``+``).
    """
    import torch

    from adasvd_lightning import compress_model, evaluate_perplexity, load_compressed
    from adasvd_lightning.core.corpus import embedded_corpus_path, read_text, tokenize_text
    from adasvd_lightning.display import quiet_libraries
    from adasvd_lightning.training.reference import resolve_model
    from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

    quiet_libraries()
    torch.manual_seed(0)
    path = resolve_model("reference", show_progress=False)
    from adasvd_lightning import load_tokenizer

    tokenizer = load_tokenizer(path)
    model = load_compressed(path)
    test = tokenize_text(tokenizer, read_text(embedded_corpus_path("test")))
    row: dict = {"method": method, "ratio": ratio, "statistics_dtype": statistics_dtype}
    if method == "dense":
        row.update(seconds=0.0, achieved_ratio=0.0, budget_deviation=0.0)
    else:
        batches = calibration_batches(tokenizer, CalibrationSpec(None, samples=samples, seq_len=seq_len))
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = method_config(method, ratio, statistics_dtype=statistics_dtype)
            report = compress_model(model, config, batches)
        row.update(
            seconds=time.perf_counter() - start,
            achieved_ratio=report.achieved_ratio,
            budget_deviation=report.budget_deviation,
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            rss_before_mb=rss0 / 1024,
            kept_columns=sum(m.kept_columns for m in report.modules),
        )
    result = evaluate_perplexity(model, test, seq_len=256, batch_size=16)
    row.update(perplexity=result.perplexity, nonfinite_windows=result.nonfinite_windows, tokens=result.tokens)
    return row


def main() -> None:
    from adasvd_lightning import CompressionConfig
    from adasvd_lightning.core.methods import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(PRESETS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6, 0.8])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--statistics-dtype", choices=["float64", "float32"], default=CompressionConfig.statistics_dtype,
                        help="CompressionConfig.statistics_dtype of every run (precision of the Gram products)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "RATIO"), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and benchmarks/results/ alone")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], float(args.one[1]), args.samples, args.seq_len, args.statistics_dtype)))
        return

    common = ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--statistics-dtype", args.statistics_dtype]
    script = str(Path(__file__).resolve())
    dense = run_json([script, "--one", "dense", "0", *common])
    rows = []
    for ratio in args.ratios:
        for method in args.methods:
            row = run_json([script, "--one", method, str(ratio), *common])
            row["delta"] = row["perplexity"] / dense["perplexity"] - 1
            rows.append(row)
            print(f"{method:>11} {ratio:.0%}: ppl {row['perplexity']:10.2f}  Δ {row['delta']:+9.2%}  "
                  f"{row['seconds']:6.1f}s  peak {row['peak_rss_mb']:.0f} MB", flush=True)

    if args.no_write:  # a partial run must not overwrite the full table's raw rows and plot either
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps({"dense": dense, "rows": rows, "machine": machine()}, indent=2))
    _plot(dense, rows, args.methods)
    lines = [
        "## Quality: perplexity vs compression ratio (reference model)",
        "",
        f"Command: `{' '.join(['python benchmarks/quality.py', *sys.argv[1:]])}`",
        f"Machine: {machine()}. Calibration: {args.samples} × {args.seq_len} tokens of the embedded training split "
        f"(seed 0). Evaluation: embedded test split, {dense['tokens']:,} predicted tokens in 256-token windows. "
        f"Dense perplexity: **{dense['perplexity']:.2f}**. Δ = ppl / ppl_dense − 1. Ratio = fraction of the target "
        "linears' weights removed; `budget` = deviation of the kept weights from the budget. Peak = peak resident "
        "memory of the process (model + calibration + statistics).",
        "",
        "| ratio | method | ppl | Δ | achieved | budget | kept cols | seconds | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ratio in args.ratios:
        subset = [r for r in rows if r["ratio"] == ratio]
        best = min(r["perplexity"] for r in subset)
        for r in subset:
            ppl = f"**{r['perplexity']:.2f}**" if r["perplexity"] == best else f"{r['perplexity']:.2f}"
            lines.append(
                f"| {ratio:.0%} | {r['method']} | {ppl} | {r['delta']:+.1%} | {r['achieved_ratio']:.2%} | "
                f"{r['budget_deviation']:+.2%} | {r.get('kept_columns', 0)} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |"
            )
    lines += ["", "![perplexity vs ratio](benchmarks/results/quality.png)"]
    write_section("quality", "\n".join(lines))


def _plot(dense: dict, rows: list[dict], methods: list[str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): skipping the plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        pts = sorted((r["ratio"], r["perplexity"]) for r in rows if r["method"] == method)
        ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.axhline(dense["perplexity"], color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio (% of target weights removed)")
    ax.set_ylabel("perplexity (embedded test split)")
    ax.set_title("Reference model: perplexity vs compression ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = RESULTS / "quality.png.tmp"
    fig.savefig(tmp, format="png", dpi=120)
    tmp.replace(RESULTS / "quality.png")


if __name__ == "__main__":
    main()
