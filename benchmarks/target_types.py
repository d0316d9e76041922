"""Which targets break a method: compress only the targets of one type at a time and measure perplexity.

    python benchmarks/target_types.py --model /work/cache/smollm2-135m --method asvd --ratio 0.2
    python benchmarks/target_types.py --model DIR --method svd-llm-w --ratio 0.2 --types 'gate_proj|up_proj' all

A preset that collapses on a real model may owe it all to one kind of matrix. Each ``--types`` entry is
a regular expression on the last component of a target's name (``all`` = every target, ``dense`` = none);
only the matching targets are compressed, at the method's ratio, so each row says what that group alone
costs. Every row reloads the model and uses the same calibration windows (``--samples`` × ``--seq-len``
of the embedded training split, ``--seed``) and evaluation windows (the first ``--eval-windows`` ×
``--eval-seq-len`` tokens of the embedded test split, BOS where the tokenizer adds one), in one process.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, method_config, run_config  # noqa: E402

DEFAULT_TYPES = ["dense", "all", "q_proj|k_proj|v_proj|o_proj", "gate_proj|up_proj|down_proj", "q_proj|k_proj",
                 "v_proj", "o_proj", "gate_proj|up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Hugging Face model folder")
    parser.add_argument("--method", required=True, help="a preset, with options after '+' as in quality.py")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--types", nargs="+", default=DEFAULT_TYPES)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--out", help="results file name under benchmarks/results")
    args = parser.parse_args()
    run_config(parser, args)  # a bad preset, option or model folder: one line and exit code 2, before loading
    for types in args.types:
        try:
            re.compile(types)
        except re.error as error:
            parser.error(f"--types {types!r} is not a regular expression: {error}")

    import torch

    from adasvd_lightning import compress_model, evaluate_perplexity, load_compressed, load_tokenizer
    from adasvd_lightning.core.corpus import added_bos_token_id, embedded_corpus_path, read_text, tokenize_text
    from adasvd_lightning.display import quiet_libraries
    from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

    quiet_libraries()
    folder = Path(args.model)
    tokenizer = load_tokenizer(folder)
    test = tokenize_text(tokenizer, read_text(embedded_corpus_path("test")))
    batches = calibration_batches(tokenizer, CalibrationSpec(None, samples=args.samples, seq_len=args.seq_len,
                                                             seed=args.seed))
    rows = []
    print(f"{args.method} at {args.ratio:.0%} on {folder.name}; {machine()}")
    for types in args.types:
        torch.manual_seed(0)
        model = load_compressed(folder)
        start = time.perf_counter()
        row: dict = {"types": types, "method": args.method, "ratio": args.ratio}
        if types != "dense":
            include = None if types == "all" else [rf".*\.({types})$"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = compress_model(model, method_config(args.method, args.ratio, include=include), batches)
            errors = [m.relative_error for m in report.modules if m.relative_error is not None]
            row.update(targets=len(report.modules), achieved_ratio=report.achieved_ratio,
                       mean_error=sum(errors) / len(errors) if errors else None)
        result = evaluate_perplexity(model, test, seq_len=args.eval_seq_len, batch_size=4,
                                     max_windows=args.eval_windows, bos_token_id=added_bos_token_id(tokenizer))
        row.update(perplexity=result.perplexity, tokens=result.tokens, seconds=time.perf_counter() - start)
        rows.append(row)
        error = f"{row['mean_error']:.3f}" if row.get("mean_error") is not None else "–"
        print(f"{types:>32}: ppl {row['perplexity']:>14.2f}   targets {row.get('targets', 0):>3}   "
              f"mean relative error {error}", flush=True)
    if args.out:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / args.out).write_text(json.dumps({"model": str(folder), "machine": machine(), "argv": sys.argv,
                                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
