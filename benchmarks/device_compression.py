"""Compression with blocks streamed to an accelerator: a Llama-7B-shaped model, measured per phase.

    python benchmarks/device_compression.py --device cuda --out /abs/dir/device_compression.json
    python benchmarks/device_compression.py --device cpu --hidden 256 --blocks 2 --samples 8 --seq-len 128 \
        --out /tmp/dc.json                               # check the script on a CPU machine
    python benchmarks/device_compression.py --render /abs/dir/device_compression.json   # BENCHMARKS.md section

Why it exists: the extrapolation table (`benchmarks/extrapolate.py`) predicts a GPU run of a 7B model
from assumed FLOP rates. Issue 17 asks for a measurement in its place once a session has a GPU, and a
session is lent one for minutes at most, so this is the one prepared script that such a session runs
(`benchmarks/device_check.sh` wraps it with the CUDA inference table).

The model is Llama-shaped with random weights, as in `compression_speed.py` (hidden 4096 gives MLP
11008, head_dim 64, as Llama-2-7B), float32 and kept on the host; ``execution_device`` moves one block
at a time to the device, as a user compressing a model larger than the device would run it. Each
preset runs in its own process (its host and device peaks are its own) and reports:

* the phases of `CompressionReport.phase_seconds`. Kernels run asynchronously, so time can land in the
  phase that next waits for the device (every batch's activations come back to the host, which bounds
  the drift to one batch); the total is exact;
* the unavoidable parts as issue 17 defines them, measured in the same process on the same device:
  one pass of the dense blocks over the calibration batches (streamed the same way), plus the
  compressed blocks' pass for the presets fitted against the dense outputs, plus one Gram-eigh
  decomposition per target matrix in float64;
* peak host memory over the start (RSS) and the device's peak allocated bytes;
* for `svd-llm`, the prediction of `extrapolate.py`'s cost model for the same shape and hardware
  row; for every preset, a Llama-2-7B (32 blocks, 524,288 tokens) time scaled from the measurement:
  calibration and statistics per block and token, the rest per block.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, method_config, run_json, write_section  # noqa: E402

LLAMA2_7B_BLOCKS = 32
LLAMA2_7B_TOKENS = 256 * 2048
SCALED_BY_TOKENS = ("calibration", "statistics")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stream_seconds(blocks, inputs, runner) -> float:
    """One pass of every block over every batch, each block resident on the device for its batches:
    what one stream costs when blocks are streamed (the transfers included)."""
    import torch

    hidden = [inp.hidden for inp in inputs]
    t0 = time.perf_counter()
    with torch.no_grad():
        for block in blocks:
            with runner.resident(block):
                hidden = [runner.run(block, inp, h) for inp, h in zip(inputs, hidden)]
    _sync(runner.device)
    return time.perf_counter() - t0


def _decomposition_seconds(shapes: dict[tuple[int, int], int], device, ratio: float) -> float:
    """One float64 Gram-eigh truncated decomposition per target on ``device``, timed once per shape."""
    import torch

    from adasvd_lightning.core.linalg import thin_svd

    total = 0.0
    for (m, n), count in shapes.items():
        a = torch.randn(m, n, dtype=torch.float64, device=device)
        rank = max(1, int((1 - ratio) * m * n / (m + n)))
        thin_svd(a[: min(m, 64), : min(n, 64)], 8, driver="gram")  # the solver's first call loads its kernels
        _sync(device)
        t0 = time.perf_counter()
        thin_svd(a, rank, driver="gram")
        _sync(device)
        total += (time.perf_counter() - t0) * count
        del a
    return total


def one(spec: dict) -> dict:
    """Build the model, measure its unavoidable parts, compress it with blocks on the device (child process)."""
    import warnings

    import torch

    from adasvd_lightning import compress_model
    from adasvd_lightning.core.calibration import capture_block_inputs
    from adasvd_lightning.core.offload import BlockRunner, usable_device
    from adasvd_lightning.core.runtime import release_free_heap
    from adasvd_lightning.core.surgery import find_decoder_blocks, find_targets, linear_shape
    from compression_speed import _PeakSampler, _rss, _synthetic

    device = usable_device(spec["device"])
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 here, as on the CPU rows
    model = _synthetic(spec["hidden"], spec["blocks"])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (spec["samples"], spec["seq_len"]), generator=g)
    batches = list(ids.split(spec["batch"]))
    tokens = int(ids.numel())
    shapes: dict[tuple[int, int], int] = {}
    for _, _, targets in find_targets(model):
        for module in targets.values():
            shapes[linear_shape(module)] = shapes.get(linear_shape(module), 0) + 1
    _, blocks = find_decoder_blocks(model)
    runner = BlockRunner.for_device(device)
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks[0], batches)
    _stream_seconds(blocks[:1], inputs[:1], runner)  # warm-up: kernels, the device's allocator
    dense_s = _stream_seconds(blocks, inputs, runner)
    del inputs
    config = method_config(spec["method"], spec["ratio"], execution_device=str(device))
    paired = config.spec.refinement != "none" and config.spec.propagation == "compressed"
    gc.collect()
    release_free_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with warnings.catch_warnings(), _PeakSampler() as sampler:
        warnings.simplefilter("ignore")
        report = compress_model(model, config, batches)
        _sync(device)
    device_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks[0], batches)
    compressed_s = _stream_seconds(blocks, inputs, runner)
    del inputs
    decomposition_s = _decomposition_seconds(shapes, device, spec["ratio"])
    unavoidable = dense_s + (compressed_s if paired else 0.0) + decomposition_s
    cfg = model.config
    return {
        **{k: spec[k] for k in ("device", "method", "ratio", "samples", "seq_len", "batch")},
        "hidden": cfg.hidden_size, "mlp": cfg.intermediate_size, "blocks": cfg.num_hidden_layers,
        "vocab": cfg.vocab_size, "tokens": tokens, "paired": paired,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "seconds": report.seconds, "phases": getattr(report, "phase_seconds", {}),
        "dense_stream_s": dense_s, "compressed_stream_s": compressed_s, "decomposition_s": decomposition_s,
        "unavoidable_s": unavoidable, "x_unavoidable": report.seconds / unavoidable,
        "model_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "host_extra_mb": (sampler.peak - sampler.start) / 2**20, "host_rss_mb": _rss() / 2**20,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
        "device_peak_mb": device_peak / 2**20 if device_peak is not None else None,
        "achieved_ratio": report.achieved_ratio,
    }


def predicted(row: dict) -> dict:
    """`extrapolate.py`'s per-phase prediction for the measured shape on its GPU row (or this CPU's
    single-thread rates for a CPU check), and a Llama-2-7B time scaled from the measured phases."""
    from extrapolate import HARDWARE, Shape, measure_rates, phase_costs, predict_seconds

    shape = Shape("measured", row["hidden"], row["mlp"], row["hidden"], row["blocks"], row["vocab"])
    rates = measure_rates()
    hardware = next(h for name, h in HARDWARE.items() if "GPU" in name) if row["device"].startswith("cuda") \
        else {"f32": rates["f32"], "f64": rates["f64"], "eigh_speedup": 1.0}
    # The cost model counts `svd-llm`'s work (paired statistics, closed-form refinement) only.
    model = predict_seconds(phase_costs(shape, row["tokens"], row["seq_len"]), hardware, rates["eigh_c"]) \
        if row["method"] == "svd-llm" else None
    blocks = LLAMA2_7B_BLOCKS / row["blocks"]
    per_token = LLAMA2_7B_TOKENS / row["tokens"]
    scaled = {k: v * blocks * (per_token if k in SCALED_BY_TOKENS else 1.0) for k, v in row["phases"].items()}
    scaled["total"] = sum(scaled.values())
    return {"cost_model": model, "llama2_7b": scaled}


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.1f} s"


def render(result: dict) -> str:
    rows = [r for r in result["rows"] if "error" not in r]
    phases = sorted({k for r in rows for k, v in r["phases"].items() if v >= 0.05},
                    key=lambda k: -max(r["phases"].get(k, 0.0) for r in rows))
    lines = ["## Compression with blocks on an accelerator: a Llama-7B-shaped model (issue 17)", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}.", "",
             "| preset | device | blocks × tokens | wall s | unavoidable s (dense + compressed stream + "
             "decompositions) | × unavoidable | " + " | ".join(phases) +
             " | host peak − start MB | device peak MB | Llama-2-7B, scaled |",
             "|---|---|---|---|---|---|" + "---|" * len(phases) + "---|---|---|"]
    for r in rows:
        cells = " | ".join(f"{r['phases'].get(k, 0.0):.1f}" for k in phases)
        stream = f"{r['compressed_stream_s']:.1f}" if r["paired"] else "–"
        peak = f"{r['device_peak_mb']:,.0f}" if r["device_peak_mb"] is not None else "–"
        lines.append(f"| `{r['method']}` | {r['device_name']} | {r['blocks']} × {r['tokens']:,} | "
                     f"{r['seconds']:.1f} | "
                     f"{r['unavoidable_s']:.1f} ({r['dense_stream_s']:.1f} + {stream} + {r['decomposition_s']:.1f}) | "
                     f"{r['x_unavoidable']:.2f} | {cells} | {r['host_extra_mb']:,.0f} | {peak} | "
                     f"{_duration(r['predicted']['llama2_7b']['total'])} |")
    lines += ["", "The cost model of `extrapolate.py` for the same shape, per phase (predicted / measured s):", ""]
    for r in rows:
        model = r["predicted"]["cost_model"]
        if model is None:
            continue
        pairs = ", ".join(f"{k} {model[k]:.1f} / {r['phases'].get(k, 0.0):.1f}"
                          for k in ("calibration", "statistics", "whitening", "svd", "refinement"))
        lines.append(f"* `{r['method']}`: {pairs}; total {model['total']:.1f} / {r['seconds']:.1f}.")
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"* `{r['method']}` failed: {r['error']}")
    lines += ["", "Llama-2-7B, scaled: calibration and statistics × (32 blocks ÷ measured) × (524,288 tokens ÷ "
              "measured), the other phases × blocks only (their work does not grow with the tokens)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="sequences per calibration batch")
    parser.add_argument("--methods", nargs="+", default=["svd-llm", "svd-llm-w"])
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--out", help="results file (JSON), any path")
    parser.add_argument("--render", metavar="JSON", help="write the BENCHMARKS.md section from a results file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))), flush=True)
        return
    if args.render:
        result = json.loads(Path(args.render).read_text())
        text = render(result)
        print(text)
        write_section("device-compression", text)
        return
    from adasvd_lightning.core.errors import InvalidInputError
    from adasvd_lightning.core.offload import usable_device

    try:
        usable_device(args.device)
        for method in args.methods:
            method_config(method, args.ratio)
    except InvalidInputError as error:
        parser.error(str(error))
    if not args.out:
        parser.error("--out is required (the results file)")
    out = Path(args.out).expanduser().resolve()
    result = {"command": "python benchmarks/device_compression.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "rows": []}
    for method in args.methods:
        spec = {"device": args.device, "hidden": args.hidden, "blocks": args.blocks, "samples": args.samples,
                "seq_len": args.seq_len, "batch": args.batch, "method": method, "ratio": args.ratio}
        print(f"{method}: {args.blocks} blocks of hidden {args.hidden} on {args.device}, "
              f"{args.samples} × {args.seq_len} tokens", flush=True)
        try:
            row = run_json([str(Path(__file__).resolve()), "--one", json.dumps(spec)], show_stderr=True)
            row["predicted"] = predicted(row)
        except Exception as error:  # noqa: BLE001 — one preset's failure must not cost the others' rows
            traceback.print_exc()
            row = {**spec, "error": f"{type(error).__name__}: {str(error)[-500:]}"}
        result["rows"].append(row)
        tmp = out.with_name(out.name + ".tmp")  # a whole file after every preset, never a half-written one
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, out)
    print(render(result))


if __name__ == "__main__":
    main()
