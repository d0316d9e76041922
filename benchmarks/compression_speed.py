"""Compression speed and memory: per-phase wall time and peak host memory of each preset.

    python benchmarks/compression_speed.py                  # default grid (~15 min on 2 cores), writes BENCHMARKS.md
    python benchmarks/compression_speed.py --quick --no-write
    python benchmarks/compression_speed.py --hidden 256 512 --presets svd-llm adasvd --no-reference
    python benchmarks/compression_speed.py --model /path/to/llama-folder --presets svd-llm \
        --samples 32 --seq-len 256 --decomposition-threads 1 none --out real.json   # a real model

Models: synthetic Llama-shaped models with random weights (head_dim 64, intermediate ≈ 2.69·hidden as
in Llama-2, vocabulary 4096, float32), the trained reference model, or — ``--model DIR`` — any model
folder (then only that model runs, each preset once per ``--decomposition-threads`` value, so a
before/after pair is measured in one invocation). Calibration: random token ids (synthetic) or the
embedded training split (reference, model folders), in batches of 8 sequences.

Every run is its own process, so its memory figures are its own:

* phases — exclusive wall seconds per pipeline phase from `CompressionReport.phase_seconds`
  (:mod:`adasvd_lightning.core.profiling`); ``allocation`` is everything done only to plan ranks
  (dense passes, their statistics and SVDs, module-KL probes), ``columns`` and ``refinement`` include
  their own decompositions.
* unavoidable — measured in the same process: one dense forward of the whole model over the calibration
  batches, plus one decomposition per target matrix (the faster of LAPACK SVD and the Gram-eigh path of
  :mod:`adasvd_lightning.core.linalg`, in float64, timed once per distinct shape on a random matrix).
  ``× unavoidable`` = compression seconds / that sum (the issue's target: ≤ 2).
* memory — resident set size sampled every 5 ms by a thread during `compress_model` (``peak − start``
  = what compression adds on top of the loaded model and calibration ids; glibc may keep freed memory,
  so this is an upper bound on live data) and the process's ``ru_maxrss``. ``budget`` = 0.2 × dense
  model bytes + one decoder block's statistics (float64 Gram matrices of its distinct linear inputs,
  two per input — H_cc and H_oc — with paired refinement statistics): the issue's target for the overhead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, method_config, run_json, write_section  # noqa: E402

PRESETS = ("svd", "svd-llm", "adasvd", "adasvd+refinement=optimal", "duo-svd", "adasvd-duo")
KL_PRESETS = ("duo-svd", "adasvd-duo")
SYNTH_VOCAB = 4096
BATCH = 8


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _allocated() -> int | None:
    """Bytes glibc's malloc has handed out and not taken back (heap + mmapped chunks), or None.

    RSS also counts freed memory the allocator keeps for reuse, which makes a peak-RSS difference vary
    by ±70 MB between runs of the same row; the allocated bytes are the live data itself.
    """
    info = _mallinfo2()
    return None if info is None else int(info.uordblks + info.hblkhd)


def _mallinfo2():
    import ctypes

    global _MALLINFO2
    if _MALLINFO2 is None:
        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                "keepcost")]
        try:
            function = ctypes.CDLL("libc.so.6").mallinfo2
            function.restype = MallInfo2
            _MALLINFO2 = function
        except (OSError, AttributeError):  # not glibc ≥ 2.33
            _MALLINFO2 = False
    return _MALLINFO2() if _MALLINFO2 else None


_MALLINFO2 = None


class _PeakSampler:
    """Samples this process's resident set size — and, with glibc, its allocated bytes — in a thread
    (the allocator releases the GIL in torch ops)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = _rss()
        self.alloc_start = self.alloc_peak = _allocated()
        self.peak_phase = "-"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        from adasvd_lightning.core import profiling

        while not self._stop.is_set():
            rss = _rss()
            allocated = _allocated()
            if allocated is not None and allocated > self.alloc_peak:
                self.alloc_peak = allocated
            if rss > self.peak:
                self.peak = rss
                timer = profiling.active_timer()  # which pipeline phase was running at the peak
                stack = list(timer._stack) if timer is not None else []
                self.peak_phase = stack[-1][0] if stack else "-"
            self._stop.wait(self.interval)

    def __enter__(self) -> "_PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _import_model_code(config) -> None:
    """Build the model class on the meta device (no storage): transformers imports its modules then."""
    import torch
    import transformers

    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(config)


def _peak_over_imports(row: dict) -> float:
    """Peak RSS over the imports (model code included) and the tokenizer / calibration text: the run's
    host memory against the issue's budget 1.2 × model + one block's statistics."""
    return row["rss_peak_mb"] - row["rss_imports_mb"] - row.get("rss_inputs_mb", 0.0)


def _synthetic(hidden: int, blocks: int):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=max(64, round(hidden * 2.6875 / 64) * 64),
                            num_hidden_layers=blocks, num_attention_heads=heads, num_key_value_heads=heads,
                            vocab_size=SYNTH_VOCAB, max_position_embeddings=4096)
    return tf.LlamaForCausalLM(config).eval()


def _block_statistics_bytes(model, paired: bool) -> int:
    """float64 Gram bytes of one block's distinct linear inputs (Llama: attention, o_proj, MLP, down_proj)."""
    cfg = model.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    return (3 * h * h + i * i) * 8 * (2 if paired else 1)


def _decomposition_seconds(shapes: dict[tuple[int, int], int], threads: int | None, lapack_svd: bool = True) -> dict:
    """One float64 decomposition per matrix: LAPACK SVD and the Gram-eigh path, timed once per shape,
    with the run's decomposition thread count (``lapack_svd=False``: the Gram path only — LAPACK's SVD
    of a 4096 × 11008 matrix alone takes minutes on one core and is never the faster one)."""
    import torch

    from adasvd_lightning.core.linalg import decomposition_threads, thin_svd

    lapack = fast = 0.0
    for (m, n), count in shapes.items():
        a = torch.randn(m, n, dtype=torch.float64)
        rank = max(1, int(0.6 * m * n / (m + n)))
        with decomposition_threads(threads):
            t0 = time.perf_counter()
            if lapack_svd:
                thin_svd(a, rank, driver="svd")
            t1 = time.perf_counter()
            thin_svd(a, rank, driver="gram")
            t2 = time.perf_counter()
        lapack += (t1 - t0) * count if lapack_svd else float("inf")
        fast += (t2 - t1) * count
        del a
    return {"lapack": lapack, "gram": fast}


def _decoder_forward_seconds(model, batches) -> float:
    """One forward of the decoder stack alone over the calibration batches: what a compression run
    has to run per stream (it never runs the LM head, ~20 % of SmolLM2's forward)."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    with torch.no_grad():
        t0 = time.perf_counter()
        for b in batches:
            decoder(**b) if isinstance(b, dict) else decoder(b)
        return time.perf_counter() - t0


def one(spec: dict) -> dict:
    """Build/load a model, measure the unavoidable parts and one compression (runs in a child process)."""
    import warnings

    import torch

    import transformers  # noqa: F401  (imported before the baseline below, as loading would)

    from adasvd_lightning import compress_model, load_compressed, load_tokenizer
    from adasvd_lightning.core.runtime import release_free_heap
    from adasvd_lightning.core.surgery import find_targets, linear_shape
    from adasvd_lightning.display import quiet_libraries
    from adasvd_lightning.training.reference import resolve_model
    from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

    # The interpreter and libraries (their code pages count in RSS), not the model's memory. The model
    # class's own modules are imported lazily by transformers when the model is built (~20 MB of code
    # for Llama), so a skeleton is built on the meta device first: its RSS is code, never weights.
    rss_bare_imports = _rss()
    path = None
    if spec["model"] != "synthetic":  # "reference" or a model folder
        quiet_libraries()
        path = resolve_model(spec["model"], show_progress=False)
        _import_model_code(transformers.AutoConfig.from_pretrained(path))
    else:
        _import_model_code(transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                    num_attention_heads=1, vocab_size=128))
    rss_imports = _rss()
    rss_inputs = 0  # the tokenizer and the calibration text: the user's process holds them, not the model
    if path is not None:
        model = load_compressed(path)
        rss_model = _rss()
        batches = calibration_batches(load_tokenizer(path), CalibrationSpec(None, samples=spec["samples"],
                                                                             seq_len=spec["seq_len"]))
        rss_inputs = _rss() - rss_model
    else:
        model = _synthetic(spec["hidden"], spec["blocks"])
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, SYNTH_VOCAB, (spec["samples"], spec["seq_len"]), generator=g)
        batches = list(ids.split(BATCH))
    torch.manual_seed(0)
    shapes: dict[tuple[int, int], int] = {}
    for _, _, targets in find_targets(model):
        for module in targets.values():
            shapes[linear_shape(module)] = shapes.get(linear_shape(module), 0) + 1
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = sum(int(b["input_ids"].numel()) if isinstance(b, dict) else int(b.numel()) for b in batches)

    with torch.no_grad():  # one dense forward over the calibration data (head included)
        t0 = time.perf_counter()
        for b in batches:
            model(**b) if isinstance(b, dict) else model(b)
        forward_s = time.perf_counter() - t0

    dense_decoder_s = _decoder_forward_seconds(model, batches)
    config = method_config(spec["method"], spec["ratio"], **spec.get("config", {}))
    # The timing forwards above leave freed logits in glibc's heap; hand them back so the run starts
    # from what it really holds (the sampler's start and peak both move down by that amount).
    gc.collect()
    release_free_heap()
    with warnings.catch_warnings(), _PeakSampler() as sampler:
        warnings.simplefilter("ignore")
        cpu0 = time.process_time()
        report = compress_model(model, config, batches)
        cpu_s = time.process_time() - cpu0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    compressed_decoder_s = _decoder_forward_seconds(model, batches)
    decomposition = _decomposition_seconds(shapes, config.decomposition_threads, spec.get("lapack_svd", True))
    paired = config.spec.refinement != "none" and config.spec.propagation == "compressed"
    hidden = model.config.hidden_size
    best_decomposition = min(decomposition["lapack"], decomposition["gram"])
    return {
        **{k: spec[k] for k in ("model", "method", "ratio", "samples", "seq_len")},
        "statistics_dtype": config.statistics_dtype,
        "hidden": hidden, "blocks": model.config.num_hidden_layers, "tokens": tokens,
        "decomposition_threads": config.decomposition_threads,
        "seconds": report.seconds, "cpu_s": cpu_s, "phases": getattr(report, "phase_seconds", {}),
        "forward_s": forward_s, "svd_lapack_s": decomposition["lapack"], "svd_gram_s": decomposition["gram"],
        "unavoidable_s": forward_s + best_decomposition,
        # Issue 17's definition: the streams the method needs (the dense decoder stream; plus the
        # compressed stream when it fits against the dense outputs) + one decomposition per target.
        "dense_decoder_s": dense_decoder_s, "compressed_decoder_s": compressed_decoder_s,
        "unavoidable_streams_s": dense_decoder_s + (compressed_decoder_s if paired else 0.0) + best_decomposition,
        "paired": paired,
        "rss_budget_mb": 1.2 * model_bytes / 2**20 + _block_statistics_bytes(model, paired) / 2**20,
        "model_mb": model_bytes / 2**20, "stats_mb": _block_statistics_bytes(model, paired) / 2**20,
        "activations_mb": tokens * hidden * 4 / 2**20,
        "rss_imports_mb": rss_imports / 2**20, "rss_bare_imports_mb": rss_bare_imports / 2**20,
        "rss_inputs_mb": rss_inputs / 2**20,
        "rss_start_mb": sampler.start / 2**20, "rss_peak_mb": sampler.peak / 2**20,
        "extra_mb": (sampler.peak - sampler.start) / 2**20, "maxrss_mb": maxrss / 2**20,
        "peak_phase": sampler.peak_phase,
        "allocated_extra_mb": (sampler.alloc_peak - sampler.alloc_start) / 2**20
        if sampler.alloc_start is not None else None,
        "achieved_ratio": report.achieved_ratio,
    }


def _grid(args) -> list[dict]:
    runs: list[dict] = []
    dtypes = args.statistics_dtype or [None]  # None: CompressionConfig's default
    options = {"config": {"statistics_dtype": dtypes[0]} if dtypes[0] else {}}
    base = dict(model="synthetic", ratio=args.ratio, samples=args.samples, seq_len=args.seq_len, **options)
    if not args.lapack_svd:
        base["lapack_svd"] = False

    def add(**kw):
        spec = {**base, **kw}
        same = {k: v for k, v in spec.items() if k != "sweep"}
        if all({k: v for k, v in run.items() if k != "sweep"} != same for run in runs):
            runs.append(spec)

    if args.model:
        for method in args.presets:
            for dtype in dtypes:
                for threads in args.decomposition_threads:
                    add(model=args.model, method=method, sweep="model",
                        config={**({"statistics_dtype": dtype} if dtype else {}), "decomposition_threads": threads})
        return runs

    for hidden in args.hidden:
        for method in args.presets:
            if method in KL_PRESETS and hidden > args.kl_max_hidden:
                continue
            if hidden > args.all_max_hidden and method not in args.large_presets:
                continue
            add(hidden=hidden, blocks=args.blocks[0], method=method, sweep="hidden")
    for blocks in args.blocks:
        add(hidden=args.sweep_hidden, blocks=blocks, method=args.sweep_method, sweep="blocks")
    for tokens in args.tokens:
        add(hidden=args.token_hidden, blocks=args.blocks[0], method=args.sweep_method,
            samples=max(1, tokens // args.seq_len), sweep="tokens")
    if args.reference:
        for method in args.presets:
            runs.append(dict(model="reference", method=method, ratio=args.ratio, samples=64, seq_len=256,
                             sweep="reference", **options))
    return runs


def _phase_cell(row: dict) -> str:
    from adasvd_lightning.core.profiling import PHASES

    total = row["seconds"] or 1.0
    parts = [(p, row["phases"].get(p, 0.0)) for p in PHASES]
    return ", ".join(f"{p} {s:.1f} ({s / total:.0%})" for p, s in parts if s >= 0.05 * total or s >= 1.0)


def _table(rows: list[dict], title: str) -> list[str]:
    lines = [f"**{title}**", "",
             "| model | preset | tokens | seconds | × unavoidable | main phases (s, share) | decomposition s LAPACK / gram | "
             "peak extra MB (phase at peak) | budget MB | model MB | block stats MB | activations MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "reference" if r["model"] == "reference" else f"h{r['hidden']}×{r['blocks']}"
        budget = 0.2 * r["model_mb"] + r["stats_mb"]
        lines.append(
            f"| {name} | {r['method']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['seconds'] / r['unavoidable_s']:.1f} "
            f"({r['unavoidable_s']:.1f} s) | {_phase_cell(r)} | {r['svd_lapack_s']:.2f} / {r['svd_gram_s']:.2f} | "
            f"{r['extra_mb']:.0f}{' (' + r['peak_phase'] + ')' if r.get('peak_phase') else ''} | {budget:.0f} | "
            f"{r['model_mb']:.0f} | {r['stats_mb']:.0f} | {r['activations_mb']:.0f} |"
        )
    return lines + [""]


def _threads(value: str) -> int | None:
    if value.lower() == "none":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {value!r}")
    return int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--hidden", nargs="+", type=int, default=[256, 512, 1024, 2048])
    parser.add_argument("--blocks", nargs="+", type=int, default=[4, 8, 16],
                        help="block sweep (the first value is used by the other sweeps)")
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048, 8192, 32768], help="calibration token sweep")
    parser.add_argument("--sweep-hidden", type=int, default=256, help="hidden size of the block sweep")
    parser.add_argument("--token-hidden", type=int, default=512, help="hidden size of the token sweep")
    parser.add_argument("--sweep-method", default="svd-llm")
    parser.add_argument("--kl-max-hidden", type=int, default=512,
                        help="module-kl presets (probe-bound: one model forward per module and candidate) only up to this size")
    parser.add_argument("--all-max-hidden", type=int, default=1024,
                        help="above this hidden size only --large-presets run (time limit of the default grid)")
    parser.add_argument("--large-presets", nargs="+", default=["svd-llm"])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--statistics-dtype", nargs="+", choices=["float64", "float32"], default=None,
                        help="CompressionConfig.statistics_dtype (precision of the Gram products; default: the "
                             "config's); with --model, each preset runs once per value, in this one invocation")
    parser.add_argument("--no-reference", dest="reference", action="store_false")
    parser.add_argument("--model", help="a model folder: run only this model (the presets × --decomposition-threads)")
    parser.add_argument("--decomposition-threads", nargs="+", type=_threads, default=[1],
                        help="CompressionConfig.decomposition_threads values to run (a number or 'none' = torch's)")
    parser.add_argument("--no-lapack-svd", dest="lapack_svd", action="store_false",
                        help="time only the Gram-eigh decomposition for the unavoidable part (LAPACK's SVD of "
                             "7B-width matrices takes minutes per shape on one core and is never the faster)")
    parser.add_argument("--quick", action="store_true", help="tiny grid to check the script")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true",
                        help="leave BENCHMARKS.md alone, and the results file too unless --out names one")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the BENCHMARKS.md section from benchmarks/results/compression_speed.json (no runs)")
    parser.add_argument("--out", help="raw rows file under benchmarks/results/ (default compression_speed.json, "
                                      "the section's; use another name for a partial re-run)")
    args = parser.parse_args()
    # A check run (--no-write) must not replace the rows BENCHMARKS.md's section was rendered from.
    keep_rows = args.out is not None or not args.no_write
    out = RESULTS / (args.out or "compression_speed.json")
    if args.render:
        saved = json.loads(out.read_text())
        render = _render_model if parser.parse_args(saved["argv"]).model else _render
        render(saved["rows"], parser.parse_args(saved["argv"]), saved["argv"], saved.get("wall_s"), saved["machine"],
                out.name)
        return
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    if args.model and not (Path(args.model) / "config.json").is_file():
        parser.exit(2, f"error: no model folder at {args.model} (config.json missing)\n")
    if args.quick:
        args.hidden, args.blocks, args.tokens, args.samples = [128], [2], [512], 4
        args.sweep_hidden = args.token_hidden = 128
        args.presets, args.reference = ["svd", "svd-llm"], False

    script = str(Path(__file__).resolve())
    rows = []
    started = time.perf_counter()
    for spec in _grid(args):
        sweep = spec.pop("sweep")
        row = run_json([script, "--one", json.dumps(spec)])
        row["sweep"] = sweep
        rows.append(row)
        print(f"{sweep:>9} {row['model']:>9} h{row['hidden']}×{row['blocks']} {row['method']:>10} "
              f"[{row['statistics_dtype']} stats, {row.get('decomposition_threads') or 'torch'} decomposition threads] "
              f"{row['tokens']:>6} tok: {row['seconds']:7.1f}s (×{row['seconds'] / row['unavoidable_s']:.1f} of "
              f"{row['unavoidable_s']:.1f}s unavoidable)  extra {row['extra_mb']:6.0f} MB at {row.get('peak_phase')} "
              f"(allocated {row.get('allocated_extra_mb') or 0:.0f} MB)  [{_phase_cell(row)}]  "
              f"streams-unavoidable {row['unavoidable_streams_s']:.1f}s (×{row['seconds'] / row['unavoidable_streams_s']:.2f}); "
              f"peak RSS − imports − inputs {_peak_over_imports(row):.0f} MB vs 1.2×model+stats "
              f"{row['rss_budget_mb']:.0f} MB (inputs {row.get('rss_inputs_mb', 0):.0f} MB)", flush=True)
        if not args.quick:  # rows so far, so an interrupted long run keeps what it measured
            print(f"ROW {json.dumps(row)}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - started

    if args.quick or not keep_rows:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "machine": machine(), "argv": sys.argv[1:], "wall_s": wall}, indent=2))
    if not args.no_write:
        (_render_model if args.model else _render)(rows, args, sys.argv[1:], wall, machine(), out.name)


def _render(rows: list[dict], args, argv: list[str], wall: float | None, machine_line: str, out_name: str) -> None:
    """Write the BENCHMARKS.md section from the rows of one grid run."""
    by = {s: [r for r in rows if r["sweep"] == s] for s in ("hidden", "blocks", "tokens", "reference")}
    lines = [
        "## Compression speed and memory (per phase, per preset)",
        "",
        f"Command: `OMP_NUM_THREADS=2 flock /tmp/adasvd-cpu.lock python benchmarks/compression_speed.py{(' ' + ' '.join(argv)) if argv else ''}`",
        f"Machine: {machine_line}." + (f" Whole grid: {wall / 60:.1f} min." if wall else "")
        + f" Ratio {args.ratio:.0%}. Raw rows: `benchmarks/results/{out_name}`.",
        "",
        "Synthetic models are Llama-shaped with random weights (`h{hidden}×{blocks}`, head_dim 64, intermediate "
        "≈ 2.69·hidden, vocabulary 4096); calibration is random ids in batches of 8 × "
        f"{args.seq_len}. `× unavoidable` = compression seconds / (one dense forward over the calibration data + "
        "one float64 decomposition per target matrix, the faster of LAPACK SVD and Gram-eigh), measured in the "
        "same process. Phases are exclusive seconds from `CompressionReport.phase_seconds` (phases under 5 % and "
        "1 s omitted); `allocation` is all the work done only to plan ranks (dense passes, their SVDs, module-KL "
        "probes). `peak extra` = peak RSS during `compress_model` (5 ms sampling) − RSS before it, an upper bound "
        "on live data (it includes calibration activations and, for module-KL, the probes' reference log-probs), "
        "with the pipeline phase that was running when the peak was sampled; "
        "`budget` = 0.2 × model + one block's float64 statistics (H_cc and H_oc per distinct input with paired "
        "statistics), the issue's memory target for that overhead.",
        "",
    ]
    lines += _table(by["hidden"], f"Hidden-size sweep ({args.blocks[0]} blocks, {args.samples}×{args.seq_len} tokens)")
    lines += _table(by["blocks"], f"Depth sweep (hidden {args.sweep_hidden}, {args.sweep_method})")
    lines += _table(by["tokens"], f"Calibration-token sweep (hidden {args.token_hidden}, {args.blocks[0]} blocks, {args.sweep_method})")
    if by["reference"]:
        lines += _table(by["reference"], "Reference model (64 × 256 calibration tokens, as in the quality table)")
    write_section("compression-speed", "\n".join(lines))


def _render_model(rows: list[dict], args, argv: list[str], wall: float | None, machine_line: str, out_name: str) -> None:
    """BENCHMARKS.md section of a ``--model DIR`` run: one row per preset × decomposition thread count."""
    from adasvd_lightning.core.profiling import PHASES

    first = rows[0]
    lines = [
        f"## Compression speed and memory on a real model ({Path(first['model']).name})",
        "",
        f"Command: `python benchmarks/compression_speed.py {' '.join(argv)}`  ",
        f"Machine: {machine_line}; the 2 cores were shared with other jobs, so read the ratios between rows "
        "(one invocation, rows run one after another), not the absolute seconds."
        + (f" Whole run: {wall / 60:.1f} min." if wall else "") + f" Raw rows: `benchmarks/results/{out_name}`.",
        f"Ratio {args.ratio:.0%}, {first['tokens']:,} calibration tokens ({args.samples} × {args.seq_len}). "
        "`threads` = `CompressionConfig.decomposition_threads` (`torch` = torch's thread count, the behaviour "
        "before it existed). `× unav.` = seconds / (one dense forward over the calibration data + one "
        "decomposition per target, same process). Memory: RSS before `compress_model` (imports, model and "
        "calibration ids loaded), its peak during the run (5 ms sampling), the process's maximum RSS (loading "
        "included), and what the run adds over the model's bytes.",
        "",
        "| preset | threads | wall s | CPU s | × unav. | " + " | ".join(PHASES)
        + " | RSS start / peak MB | process max RSS MB | (peak − start) / model |",
        "|---|---|---|---|---|" + "---|" * len(PHASES) + "---|---|---|",
    ]
    several_dtypes = len({r.get("statistics_dtype") for r in rows}) > 1
    for r in rows:
        phases = " | ".join(f"{r['phases'].get(p, 0.0):.1f}" for p in PHASES)
        preset = f"{r['method']} [{r['statistics_dtype']} stats]" if several_dtypes else r["method"]
        lines.append(
            f"| {preset} | {r.get('decomposition_threads') or 'torch'} | {r['seconds']:.0f} | "
            f"{r.get('cpu_s', float('nan')):.0f} | {r['seconds'] / r['unavoidable_s']:.1f} | {phases} | "
            f"{r['rss_start_mb']:.0f} / {r['rss_peak_mb']:.0f} | {r['maxrss_mb']:.0f} | "
            f"{r['extra_mb'] / r['model_mb']:.2f} |"
        )
    write_section("compression-speed-real", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

