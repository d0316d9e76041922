"""Per-writer refinement report on a real model: which compensation steps validated, and what they did.

    python benchmarks/writer_report.py --model /path/to/hf-folder --method svd-llm --ratio 0.4 --samples 32 --seed 1

Compresses the model once (calibration: ``--samples`` random windows × ``--seq-len`` tokens of the
embedded training split, seed ``--seed``), prints the perplexity on the protocol of `real_models.py`
(first 24 × 512 tokens of the embedded test split) and, for every compensated target (a residual
writer, `core.residual`), the refinement steps it kept and its relative error on the held-out sequences
before and after them (on the residual's scale, as the validation scores it), plus its relative error
on all calibration tokens. Comparing two runs (e.g. ``--samples 32`` vs ``64``) shows which writers'
decisions changed: BENCHMARKS.md ("Calibration tokens") has the case that motivated it.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import method_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face causal-LM folder")
    parser.add_argument("--method", default="svd-llm")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    if not 0 < args.ratio < 1 or args.samples < 1 or args.seq_len < 2:
        parser.error("ratio must be in (0, 1); samples >= 1; seq-len >= 2")
    config = method_config(args.method, args.ratio)  # an unknown preset fails here, before any model work

    from adasvd_lightning import compress_model, evaluate_perplexity, load_compressed, load_tokenizer
    from adasvd_lightning.core.corpus import added_bos_token_id, embedded_corpus_path, read_text, tokenize_text
    from adasvd_lightning.core.errors import InvalidInputError
    from adasvd_lightning.core.serialization import check_model_folder
    from adasvd_lightning.display import quiet_libraries
    from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

    quiet_libraries()
    folder = Path(args.model).expanduser()
    try:
        check_model_folder(folder)
    except InvalidInputError as error:
        parser.error(str(error))
    torch.manual_seed(0)
    tokenizer = load_tokenizer(folder)
    model = load_compressed(folder)
    batches = calibration_batches(tokenizer, CalibrationSpec(None, samples=args.samples, seq_len=args.seq_len,
                                                             seed=args.seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress_model(model, config, batches)
    test = tokenize_text(tokenizer, read_text(embedded_corpus_path("test")))
    ppl = evaluate_perplexity(model, test, seq_len=512, batch_size=4, max_windows=24,
                              bos_token_id=added_bos_token_id(tokenizer)).perplexity
    rows = [dict(name=m.name, steps=m.refinement_steps, heldout_start=m.heldout_error_start,
                 heldout_after=m.heldout_error, error=m.relative_error)
            for m in report.modules if m.compensated]
    print(f"{args.method} {args.ratio:.0%} {args.samples}×{args.seq_len} seed {args.seed}: ppl {ppl:.2f}")
    print(f"{'writer':<40} {'steps':>5} {'held-out start':>15} {'after':>8} {'calib':>8}")

    def fmt(value: float | None) -> str:
        return "–" if value is None else f"{value:.4f}"

    for r in rows:
        print(f"{r['name']:<40} {r['steps']:>5} {fmt(r['heldout_start']):>15} {fmt(r['heldout_after']):>8} "
              f"{fmt(r['error']):>8}")
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "perplexity": ppl, "writers": rows}, indent=2))


if __name__ == "__main__":
    main()
