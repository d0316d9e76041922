"""Which targets should chase the dense outputs? Perplexity and per-block residual drift, per choice.

    python benchmarks/compensation_ablation.py --model /path/to/hf-folder --ratio 0.2 \
        --compensate '' 'o_proj' '(gate|up)_proj' 'down_proj' '(o|down)_proj'

For each regular expression, compresses the model with ``--method`` (default `svd-llm`), letting only
the targets whose names match it take compensating refinement steps (the others keep the whitened fit
to their own compressed input; `auto` = the library's rule, the residual writers), then prints the
perplexity (protocol of `real_models.py`) and, on 8 × 256 other windows (seed 1), the relative error of
every block's output hidden states against the dense model's — split into the first position (where
real LLMs keep their attention-sink activations) and the rest. This is the experiment behind
`core/residual.py`; BENCHMARKS.md ("the compensated presets at 20 %") has its results.

Overriding the rule is an experiment, not an option of the library: it patches the pipeline's
per-target decision (`_factorize_target(compensate=...)`) only: the residual writers' statistics stay
weighted by the residual's scale whichever the choice, the other targets' stay unweighted. (The
unweighted rows of BENCHMARKS.md's table were measured before the weighting existed, at 3e74cb2.)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

import torch


def _drift(dense, model, ids) -> list[tuple[float, float]]:
    with torch.no_grad():
        ho = dense(input_ids=ids, output_hidden_states=True).hidden_states
        hc = model(input_ids=ids, output_hidden_states=True).hidden_states
    rows = []
    for o, c in zip(ho[1:], hc[1:]):
        e, o = (c - o).double(), o.double()
        rows.append((float(e[:, 1:].norm() / o[:, 1:].norm()), float(e[:, 0].norm() / o[:, 0].norm())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", default="svd-llm")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--compensate", nargs="+", default=["auto", ""],
                        help="regular expressions of the targets that may chase the dense outputs ('auto': the rule)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the calibration windows (seed 1 draws the drift windows too: with it the "
                             "drift columns are measured on calibration text; the perplexity never is)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import method_config

    from adasvd_lightning import compress_model, evaluate_perplexity, load_compressed, load_tokenizer
    from adasvd_lightning.core import pipeline
    from adasvd_lightning.core.corpus import added_bos_token_id, embedded_corpus_path, read_text, tokenize_text
    from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

    path = Path(args.model)
    tokenizer = load_tokenizer(path)
    calibration = calibration_batches(tokenizer, CalibrationSpec(None, samples=args.samples, seq_len=args.seq_len,
                                                                             seed=args.seed))
    held = calibration_batches(tokenizer, CalibrationSpec(None, samples=8, seq_len=args.seq_len, seed=1))
    held_ids = torch.cat([b["input_ids"] if isinstance(b, dict) else b for b in held])
    test = tokenize_text(tokenizer, read_text(embedded_corpus_path("test")))
    dense = load_compressed(path)
    original = pipeline._factorize_target
    rows = []
    for pattern in args.compensate:
        def decide(name, *a, compensate=True, _pattern=pattern, **kw):
            if _pattern != "auto":
                compensate = bool(_pattern) and re.search(_pattern, name) is not None
            return original(name, *a, compensate=compensate, **kw)

        pipeline._factorize_target = decide
        try:
            model = load_compressed(path)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = compress_model(model, method_config(args.method, args.ratio), calibration)
            seconds = time.perf_counter() - start
        finally:
            pipeline._factorize_target = original
        ppl = evaluate_perplexity(model, test, seq_len=512, batch_size=4, max_windows=24,
                                  bos_token_id=added_bos_token_id(tokenizer)).perplexity
        drift = _drift(dense, model, held_ids)
        steps = sum(m.refinement_steps > 0 for m in report.modules)
        rows.append(dict(compensate=pattern, ppl=ppl, seconds=seconds, refined=steps, drift=drift))
        print(f"compensate={pattern!r}: ppl {ppl:.2f}, {steps} targets took steps, {seconds:.0f} s", flush=True)
        print("  block output error (rest / first position): "
              + " ".join(f"{i}:{r:.2f}/{f:.2f}" for i, (r, f) in enumerate(drift)), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(method=args.method, ratio=args.ratio, rows=rows), indent=1))


if __name__ == "__main__":
    main()
