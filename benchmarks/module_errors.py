"""Real output error of every compressed linear, on calibration and held-out windows.

    python benchmarks/module_errors.py --model /path/to/hf-folder --blocks 6 --methods svd-llm-w svd-llm

Compresses the first ``--blocks`` decoder blocks of the model with each method (calibration as in
`real_models.py`: ``--samples`` × ``--seq-len`` tokens of the embedded training split, seed 0), then
replays the calibration windows and ``--held-out`` other windows (seed 1) through the dense and the
compressed model and reports, per target linear, ‖W′x_c − W x_o‖ / ‖W x_o‖ with the inputs each model
really feeds it — the quantity the compensating refinements minimise on their statistics. A method whose
statistics describe inputs the compressed model does not produce shows it here: its real error exceeds
the error it reports. Also prints the perplexity with those blocks compressed.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import torch


def _inputs(model, names, batches):
    seen = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--methods", nargs="+", default=["svd-llm-w", "svd-llm"])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--held-out", type=int, default=16)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import method_config

    from adasvd_lightning import compress_model, evaluate_perplexity, load_compressed, load_tokenizer
    from adasvd_lightning.core.corpus import added_bos_token_id, embedded_corpus_path, read_text, tokenize_text
    from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

    path = Path(args.model)
    tokenizer = load_tokenizer(path)
    calibration = calibration_batches(tokenizer, CalibrationSpec(None, samples=args.samples, seq_len=args.seq_len))
    held = calibration_batches(tokenizer, CalibrationSpec(None, samples=args.held_out, seq_len=args.seq_len, seed=1))
    test = tokenize_text(tokenizer, read_text(embedded_corpus_path("test")))
    dense = load_compressed(path)
    include = [rf".*layers\.{i}\." for i in range(args.blocks)]
    names = [n for n, m in dense.named_modules()
             if isinstance(m, torch.nn.Linear) and any(re.match(p, n) for p in include)]
    dense_in = {"calib": _inputs(dense, names, calibration), "held": _inputs(dense, names, held)}
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for method in args.methods:
        model = load_compressed(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compress_model(model, method_config(method, args.ratio, include=include), calibration)
        real_in = {"calib": _inputs(model, names, calibration), "held": _inputs(model, names, held)}
        for n in names:
            w = dense.get_submodule(n).weight.double()
            approx = model.get_submodule(n).dense_weight().double()
            errors = []
            for split in ("calib", "held"):
                y = dense_in[split][n].double() @ w.T
                errors.append(float((real_in[split][n].double() @ approx.T - y).norm() / y.norm()))
            table.setdefault(n, {})[method] = tuple(errors)
        ppl = evaluate_perplexity(model, test, seq_len=512, batch_size=4, max_windows=24,
                                  bos_token_id=added_bos_token_id(tokenizer)).perplexity
        print(f"{method}: ppl {ppl:.2f} with blocks 0–{args.blocks - 1} compressed at {args.ratio:.0%}", flush=True)
    print("| module | " + " | ".join(f"{m} calib | {m} held-out" for m in args.methods) + " |")
    print("|---|" + "---|---|" * len(args.methods))
    for n in names:
        cells = " | ".join(f"{table[n][m][0]:.3f} | {table[n][m][1]:.3f}" for m in args.methods)
        print(f"| {n.split('layers.', 1)[-1]} | {cells} |")


if __name__ == "__main__":
    main()
