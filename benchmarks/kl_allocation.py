"""Module-KL allocation on a real model: exact probes vs the Fisher estimate (time, cost tables, perplexity).

    python benchmarks/kl_allocation.py --model /work/cache/smollm2-135m \
        --methods svd-llm adasvd-duo+allocation=module-kl-fisher --ratio 0.4
    python benchmarks/kl_allocation.py --model /work/cache/smollm2-135m --reference 'adasvd-duo+...' --render

Every method (a preset, optionally with ``+option=value`` method options as in the CLI) runs in its own
process: compression wall time and per-phase seconds, the per-module ranks, the allocation's cost table
(``CompressionReport.allocation["sensitivity"]``: KL increase over the uniform baseline per module and
candidate retention) and the perplexity on the README's protocol (first ``--eval-windows`` × 512 tokens
of the embedded test split). Rows accumulate in ``benchmarks/results/kl_allocation.json`` keyed by method
string, so a slow row (the exact probes) can be measured once and compared with later ones.

Comparison with ``--reference`` (a method string already in the file, normally the exact probes):
Spearman rank correlation of the cost tables over every (module, candidate < 1) entry the two share, the
mean over candidates of the per-candidate Spearman across modules (does the estimate rank *modules* the
same way), the share of modules given the same rank, and the perplexity ratio. Time ratios are against
the ``svd-llm`` row of the same file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, method_config, run_json, spearman, write_section  # noqa: E402

OUT = RESULTS / "kl_allocation.json"


def one(model_dir: str, method: str, ratio: float, samples: int, seq_len: int, eval_windows: int,
        batch_size: int) -> dict:
    """Compress, evaluate, and return the row (runs in a child process)."""
    import torch

    from adasvd_lightning import compress_model, evaluate_perplexity, load_compressed, load_tokenizer
    from adasvd_lightning.core.corpus import added_bos_token_id, embedded_corpus_path, read_text, tokenize_text
    from adasvd_lightning.display import quiet_libraries
    from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

    quiet_libraries()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(Path(model_dir))
    model = load_compressed(Path(model_dir))
    batches = calibration_batches(tokenizer, CalibrationSpec(None, samples=samples, seq_len=seq_len,
                                                             batch_size=batch_size))
    config = method_config(method, ratio)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress_model(model, config, batches)
    seconds = time.perf_counter() - start
    test = tokenize_text(tokenizer, read_text(embedded_corpus_path("test")))
    result = evaluate_perplexity(model, test, seq_len=512, batch_size=4, max_windows=eval_windows,
                                 bos_token_id=added_bos_token_id(tokenizer))
    return {
        "method": method, "ratio": ratio, "samples": samples, "seq_len": seq_len, "batch_size": batch_size,
        "seconds": seconds,
        "phases": getattr(report, "phase_seconds", {}), "perplexity": result.perplexity,
        "achieved_ratio": report.achieved_ratio, "ranks": {m.name: m.rank for m in report.modules},
        "candidates": list(config.spec.sensitivity_candidates),
        "sensitivity": report.allocation.get("sensitivity"),
        "sensitivity_baseline": report.allocation.get("sensitivity_baseline"),
    }


def compare(row: dict, ref: dict) -> dict:
    """Agreement of ``row``'s allocation with ``ref``'s (see the module docstring)."""
    out = {"ppl_ratio": row["perplexity"] / ref["perplexity"]}
    names = [n for n in ref["ranks"] if n in row["ranks"]]
    out["same_rank"] = sum(row["ranks"][n] == ref["ranks"][n] for n in names) / max(1, len(names))
    if row.get("sensitivity") and ref.get("sensitivity"):
        shared = [c for c in ref["candidates"] if c in row["candidates"] and c < 1.0]
        ia = [ref["candidates"].index(c) for c in shared]
        ib = [row["candidates"].index(c) for c in shared]
        xs, ys, per = [], [], []
        for j, (a, b) in enumerate(zip(ia, ib)):
            col_x = [ref["sensitivity"][n][a] for n in names]
            col_y = [row["sensitivity"][n][b] for n in names]
            xs += col_x
            ys += col_y
            per.append(spearman(col_x, col_y))
        out["spearman_all"] = spearman(xs, ys)
        out["spearman_per_candidate"] = sum(per) / max(1, len(per))
    return out


def _key(method: str, batch_size: int) -> str:
    """Row key: the method string, with the calibration batch size when it is not the default 8."""
    return method if batch_size == 8 else f"{method} @batch{batch_size}"


def _load() -> dict:
    return json.loads(OUT.read_text()) if OUT.is_file() else {"rows": {}}


def render(saved: dict, reference: str | None) -> None:
    rows = saved["rows"]
    base = next((r for k, r in rows.items() if k == "svd-llm"), None)
    ref = rows.get(reference) if reference else None
    lines = [
        "## Module-KL allocation: exact probes vs the Fisher estimate (issue 17)",
        "",
        "Commands: " + "; ".join(f"`python benchmarks/kl_allocation.py {' '.join(r['argv'])}`"
                                  for r in {json.dumps(r['argv']): r for r in rows.values()}.values()),
        f"Machine: {saved.get('machine', '?')} (shared with other jobs: compare rows of one invocation). "
        "Calibration: random windows of the embedded training split (seed 0); perplexity: first "
        "eval windows × 512 tokens of the embedded test split. `× svd-llm` = wall time / the `svd-llm` row's. "
        "ρ = Spearman rank correlation of the cost tables against the reference row (all module × candidate "
        "entries with retention < 1 / mean over candidates of the correlation across modules); "
        "`same rank` = modules given the reference's rank.",
        "",
        "| method | calib | wall s | × svd-llm | allocation s | ppl | ppl / ref | ρ all / per candidate | same rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else "–"
        cmp = compare(r, ref) if ref is not None and r is not ref else {}
        rho = (f"{cmp['spearman_all']:.3f} / {cmp['spearman_per_candidate']:.3f}" if "spearman_all" in cmp else "–")
        calib = f"{r['samples']}×{r['seq_len']} ({r.get('batch_size', 8)}/batch)"
        lines.append(
            f"| `{key}`{' (reference)' if r is ref else ''} | {calib} | {r['seconds']:.0f} | "
            f"{ratio} | {r['phases'].get('allocation', 0.0):.0f} | {r['perplexity']:.2f} | "
            f"{cmp['ppl_ratio']:.4f} | {rho} | {cmp['same_rank']:.0%} |" if cmp else
            f"| `{key}`{' (reference)' if r is ref else ''} | {calib} | {r['seconds']:.0f} | "
            f"{ratio} | {r['phases'].get('allocation', 0.0):.0f} | {r['perplexity']:.2f} | – | – | – |")
    write_section("kl-allocation", "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face causal-LM folder")
    parser.add_argument("--methods", nargs="*", default=[])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="calibration sequences per batch (a probe batch of the module-KL allocations)")
    parser.add_argument("--reference", help="method string (already measured) the others are compared with")
    parser.add_argument("--render", action="store_true", help="(re)write the BENCHMARKS.md section")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 < args.ratio < 1 or min(args.samples, args.eval_windows, args.batch_size) < 1 or args.seq_len < 2:
        parser.error("ratio must be in (0, 1); samples, eval windows, batch size >= 1; seq-len >= 2")
    if not (Path(args.model) / "config.json").is_file():
        parser.exit(2, f"error: no model folder at {args.model} (config.json missing)\n")
    for method in args.methods:
        method_config(method, args.ratio)  # bad presets/options fail before any model work
    if args.one:
        print(json.dumps(one(args.model, args.one, args.ratio, args.samples, args.seq_len, args.eval_windows,
                             args.batch_size)))
        return
    script = str(Path(__file__).resolve())
    argv = sys.argv[1:]
    for method in args.methods:
        row = run_json([script, "--model", args.model, "--one", method, "--ratio", str(args.ratio), "--samples",
                        str(args.samples), "--seq-len", str(args.seq_len), "--eval-windows", str(args.eval_windows),
                        "--batch-size", str(args.batch_size)])
        row["argv"] = argv
        saved = _load()  # re-read: another invocation may have added rows meanwhile
        saved["rows"][_key(method, args.batch_size)] = row
        saved["machine"] = machine()
        RESULTS.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(saved, indent=1))
        print(f"{method}: {row['seconds']:.0f} s (allocation {row['phases'].get('allocation', 0.0):.0f} s), "
              f"ppl {row['perplexity']:.2f}", flush=True)
    saved = _load()
    if args.reference:
        ref = saved["rows"].get(args.reference)
        if ref is None:
            parser.exit(2, f"error: no row {args.reference!r} in {OUT}\n")
        for key, row in saved["rows"].items():
            if row is not ref:
                print(key, json.dumps(compare(row, ref)))
    if args.render:
        render(saved, args.reference)


if __name__ == "__main__":
    main()
