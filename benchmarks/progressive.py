"""Progressive vs one-shot compression during training, on the reference model.

    python benchmarks/progressive.py

Both runs train the reference model for the same number of steps on the embedded training split with
the same optimizer settings; they differ only in when compression happens:

* one-shot: `SVDCompression(at="setup")` at the final ratio, then all steps of training;
* dense: no compression (the same extra training, for reference);
* progressive: a 3-stage schedule (ratio/3 → 2·ratio/3 → ratio at evenly spaced steps), training between
  stages and after the last one.

Perplexity on the embedded test split (README protocol) is written to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, machine, write_section  # noqa: E402


def run(kind: str, method: str, ratio: float, steps: int, lr: float) -> dict:
    import warnings

    import lightning as L

    from adasvd_lightning import evaluate_perplexity, load_compressed, load_tokenizer
    from adasvd_lightning.callbacks import SVDCompression
    from adasvd_lightning.core.blocks import block_loader
    from adasvd_lightning.core.corpus import embedded_corpus_path, read_text, tokenize_text
    from adasvd_lightning.display import quiet_libraries
    from adasvd_lightning.training.module import CausalLMModule
    from adasvd_lightning.training.reference import resolve_model

    quiet_libraries()
    warnings.simplefilter("ignore")
    L.seed_everything(0, verbose=False)
    path = resolve_model("reference", show_progress=False)
    tokenizer = load_tokenizer(path)
    model = load_compressed(path).train()
    if kind == "dense":
        callback = None
    elif kind == "one-shot":
        callback = SVDCompression(method=method, ratio=ratio, calibration_batches=8)
    else:
        points = [steps // 4, steps // 2, 3 * steps // 4]
        callback = SVDCompression(method=method, at="step", calibration_batches=8,
                                  schedule=[(p, ratio * (i + 1) / 3) for i, p in enumerate(points)])
    data = block_loader(tokenizer, embedded_corpus_path("train"), seq_len=256, batch_size=8, seed=0)
    module = CausalLMModule(model, learning_rate=lr, warmup_steps=max(1, steps // 20))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[callback] if callback else [])
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=data)
    seconds = time.perf_counter() - start
    test = tokenize_text(tokenizer, read_text(embedded_corpus_path("test")))
    ppl = evaluate_perplexity(model.eval(), test, seq_len=256, batch_size=16).perplexity
    return {"kind": kind, "ppl": ppl, "seconds": seconds,
            "stages": [round(r.achieved_ratio, 4) for r in callback.reports] if callback else [0.0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="svd-llm")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()
    # The commit the figures belong to (a dirty tree says so: the figures may not be reproducible from it).
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if git("status", "--porcelain", "--", "adasvd_lightning", "callbacks") else "")
    rows = [run(kind, args.method, args.ratio, args.steps, args.lr) for kind in ("dense", "one-shot", "progressive")]
    for r in rows:
        print(r)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "progressive.json").write_text(json.dumps({"commit": commit, "args": vars(args), "machine": machine(),
                                                          "rows": rows}, indent=2) + "\n")
    lines = [
        "## Progressive vs one-shot compression during training (reference model)",
        "",
        f"Command: `{' '.join(['python benchmarks/progressive.py', *sys.argv[1:]])}` at commit `{commit}`",
        f"Machine: {machine()}. Method `{args.method}`, final ratio {args.ratio:.0%}, {args.steps} training steps "
        f"of 8 × 256 tokens (AdamW, lr {args.lr}, warm-up + cosine) on the embedded training split; "
        "perplexity on the embedded test split. Progressive = stages at 25/50/75% of the steps.",
        "",
        "| run | stages (achieved ratio) | test ppl | train+compress seconds |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {' → '.join(f'{s:.0%}' for s in r['stages'])} | {r['ppl']:.2f} | {r['seconds']:.0f} |")
    write_section("progressive", "\n".join(lines))


if __name__ == "__main__":
    main()
