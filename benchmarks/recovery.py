"""Recovery fine-tuning after compression with DeepSpeed ZeRO on 2 CPU processes (reference model).

    python benchmarks/recovery.py --method svd-llm --ratio 0.6 --steps 150

Rows: dense; compressed (no recovery); recovery with ZeRO-2 (all parameters), ZeRO-3 (all parameters),
and SVD-LLM's sequential scheme under ZeRO-3 (U factors for steps/2, then V factors for steps/2). Each
run compresses at setup with `SVDCompression`, trains with `CPUDeepSpeedStrategy`, writes a ZeRO
checkpoint, and is exported with `adasvd export` and evaluated on the embedded test split. Each of the 2
processes trains on batches of 4 × 256 tokens (8 × 256 per step in total).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine, write_section  # noqa: E402

RUN = str(Path(__file__).resolve().parent / "recovery_run.py")


def _train(model: Path, out: Path, stage: int, trainable: str, steps: int, compress: bool, method: str, ratio: float) -> float:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(29400 + int(time.time()) % 500)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, RUN, str(model), str(out), str(stage), trainable, str(steps),
                           "1" if compress else "0", method, str(ratio)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return time.perf_counter() - start


def _ppl(folder: Path) -> float:
    from adasvd_lightning.workflows import evaluate_folder

    return evaluate_folder(folder, batch_size=16)["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="svd-llm")
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from adasvd_lightning import CompressionConfig
    from adasvd_lightning.display import quiet_libraries
    from adasvd_lightning.training.export import export_checkpoint
    from adasvd_lightning.training.reference import resolve_model
    from adasvd_lightning.workflows import CalibrationSpec, compress_folder

    quiet_libraries()
    reference = resolve_model("reference", show_progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = _ppl(reference)
        rows.append(("dense", dense, 0.0))
        compressed = tmp / "compressed"
        report = compress_folder(reference, CompressionConfig(method=args.method, ratio=args.ratio),
                                 CalibrationSpec(None, samples=16, seq_len=256, batch_size=4), compressed)
        rows.append((f"{args.method} {args.ratio:.0%}, no recovery", _ppl(compressed), report.seconds))
        for label, stage in (("ZeRO-2, all parameters", 2), ("ZeRO-3, all parameters", 3)):
            ckpt = tmp / f"ckpt{stage}"
            seconds = _train(reference, ckpt, stage, "all", args.steps, True, args.method, args.ratio)
            out = export_checkpoint(ckpt, tmp / f"out{stage}", reference)
            rows.append((label, _ppl(out), seconds))
        # SVD-LLM's sequential recovery: U factors, export, then V factors from the exported model.
        half = args.steps // 2
        seconds = _train(reference, tmp / "ckpt_u", 3, "up", half, True, args.method, args.ratio)
        u_model = export_checkpoint(tmp / "ckpt_u", tmp / "out_u", reference)
        seconds += _train(u_model, tmp / "ckpt_v", 3, "down", args.steps - half, False, args.method, args.ratio)
        uv = export_checkpoint(tmp / "ckpt_v", tmp / "out_v", u_model)
        rows.append(("ZeRO-3, U then V (SVD-LLM)", _ppl(uv), seconds))
    gap = rows[1][1] - dense
    lines = [
        "## Recovery fine-tuning with DeepSpeed ZeRO on CPU (reference model)",
        "",
        f"Command: `{' '.join(['python benchmarks/recovery.py', *sys.argv[1:]])}`",
        f"Machine: {machine()}; 2 CPU processes, gloo, `CPUDeepSpeedStrategy`. Method `{args.method}` at "
        f"{args.ratio:.0%}, compressed at setup (16 × 256 calibration tokens per rank), then {args.steps} steps of "
        "2 × 4 × 256 tokens, AdamW lr 5e-4 with warm-up + cosine, on the embedded training split; export with "
        "`adasvd export`, perplexity on the embedded test split. Gap recovered = (ppl_compressed − ppl) / "
        "(ppl_compressed − ppl_dense).",
        "",
        "| run | test ppl | gap recovered | seconds |",
        "|---|---|---|---|",
    ]
    for label, ppl, seconds in rows:
        recovered = (rows[1][1] - ppl) / gap if gap > 0 else 0.0
        lines.append(f"| {label} | {ppl:.2f} | {recovered:.0%} | {seconds:.0f} |")
    print("\n".join(lines))
    write_section("recovery", "\n".join(lines))


if __name__ == "__main__":
    main()
