"""Peak memory with the calibration activations in memory vs in files (``activation_dir``).

    python benchmarks/activation_memory.py                       # h512 × 4, 131,072 tokens
    python benchmarks/activation_memory.py --hidden 1024 --samples 256 --presets svd-llm

A synthetic Llama (random weights, float32, ``--hidden`` × ``--blocks``, vocabulary 4096) is
calibrated on ``--samples`` × ``--seq-len`` random ids, enough tokens that the hidden-state streams
outweigh the model. Each (preset, where) runs in its own process: compression seconds, the peak
resident memory during `compress_model` over the process's memory before it (sampled every 5 ms, the
loaded model and the calibration ids excluded), its file-backed and anonymous parts at that peak, and
a SHA-256 of the compressed state dict, which must be the same for both places. Budget (issue 17) =
0.2 × model + one block's float64 statistics over the loaded model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, method_config, run_json, write_section  # noqa: E402


def _status() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


class _Sampler:
    def __init__(self) -> None:
        self.start = _status()
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = _status()
            if now["VmRSS"] > self.peak["VmRSS"]:
                self.peak = now
            self._stop.wait(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one(spec: dict) -> dict:
    import warnings

    import torch

    from compression_speed import SYNTH_VOCAB, _block_statistics_bytes, _synthetic

    from adasvd_lightning import compress_model

    model = _synthetic(spec["hidden"], spec["blocks"])
    ids = torch.randint(0, SYNTH_VOCAB, (spec["samples"], spec["seq_len"]), generator=torch.Generator().manual_seed(1))
    batches = list(ids.split(spec["batch"]))
    with tempfile.TemporaryDirectory(prefix="activation-memory-", dir=spec.get("parent")) as folder:
        config = method_config(spec["method"], spec["ratio"],
                               activation_dir=folder if spec["where"] == "files" else None)
        paired = config.spec.refinement != "none" and config.spec.propagation == "compressed"
        with warnings.catch_warnings(), _Sampler() as sampler:
            warnings.simplefilter("ignore")
            started = time.perf_counter()
            compress_model(model, config, batches)
            seconds = time.perf_counter() - started
        left = sorted(p.name for p in Path(folder).iterdir())
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = spec["samples"] * spec["seq_len"]
    return {**spec, "seconds": seconds, "tokens": tokens, "model_mb": model_bytes / 2**20,
            "stream_mb": tokens * spec["hidden"] * 4 / 2**20,
            "stats_mb": _block_statistics_bytes(model, paired) / 2**20,
            "extra_mb": (sampler.peak["VmRSS"] - sampler.start["VmRSS"]) / 2**20,
            "extra_anon_mb": (sampler.peak["RssAnon"] - sampler.start["RssAnon"]) / 2**20,
            "extra_file_mb": (sampler.peak["RssFile"] - sampler.start["RssFile"]) / 2**20,
            "files_left": left, "sha256": digest.hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--presets", nargs="+", default=["svd-llm-w", "svd-llm"])
    parser.add_argument("--parent", default=None, help="where the activation folder is made (default: the system's)")
    parser.add_argument("--out", default="activation_memory.json")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    if min(args.hidden, args.blocks, args.samples, args.seq_len, args.batch) < 1 or not 0 < args.ratio < 1:
        parser.error("sizes must be positive and the ratio in (0, 1)")
    rows = []
    for method in args.presets:
        for where in ("memory", "files"):
            spec = {"method": method, "where": where, "hidden": args.hidden, "blocks": args.blocks,
                    "samples": args.samples, "seq_len": args.seq_len, "batch": args.batch, "ratio": args.ratio,
                    "parent": args.parent}
            row = run_json([str(Path(__file__).resolve()), "--one", json.dumps(spec)])
            rows.append(row)
            print(f"{method:>10} {where:>6}: {row['seconds']:7.1f} s, peak extra {row['extra_mb']:6.0f} MB "
                  f"(anonymous {row['extra_anon_mb']:.0f}, file-backed {row['extra_file_mb']:.0f}), "
                  f"files left {len(row['files_left'])}, sha256 {row['sha256'][:12]}", flush=True)
    lines = [
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`  ",
        f"Machine: {machine()}. Synthetic Llama h{args.hidden} × {args.blocks} blocks (random weights, float32), "
        f"{args.samples} × {args.seq_len} calibration tokens in batches of {args.batch}; one process per row. "
        "Peak extra = resident memory during `compress_model` over its start (the loaded model and the ids "
        "excluded), with its anonymous and file-backed parts at that moment; budget = 0.2 × model + one "
        "block's float64 statistics.",
        "",
        "| preset | activations | seconds | peak extra MB | anonymous / file-backed MB | one stream MB | budget MB "
        "| ÷ budget | files left | same weights as in memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        budget = 0.2 * row["model_mb"] + row["stats_mb"]
        in_memory = next(r for r in rows if r["method"] == row["method"] and r["where"] == "memory")
        same = in_memory["sha256"] == row["sha256"]
        lines.append(f"| `{row['method']}` | {row['where']} | {row['seconds']:.1f} | {row['extra_mb']:.0f} | "
                     f"{row['extra_anon_mb']:.0f} / {row['extra_file_mb']:.0f} | {row['stream_mb']:.0f} | "
                     f"{budget:.0f} | "
                     f"{row['extra_mb'] / budget:.2f} | {len(row['files_left'])} | {'yes' if same else '**no**'} |")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps({"argv": sys.argv[1:], "machine": machine(), "rows": rows}, indent=1))
    if not args.no_write:
        write_section("activation-memory", "## Calibration activations in files: peak memory (issue 17)\n\n" + text)


if __name__ == "__main__":
    main()
