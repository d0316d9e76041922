"""Helpers shared by the benchmark scripts: machine description, subprocess runs, BENCHMARKS.md sections."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, {gpu}"


def run_json(args: list[str], *, show_stderr: bool = False) -> dict:
    """Run ``python <args>`` in a fresh process (so peak memory is per run) and parse its last JSON line.

    ``show_stderr``: the child's stderr (its progress lines) goes to ours as it runs, instead of being
    kept for the error message.
    """
    proc = subprocess.run([sys.executable, *args], stdout=subprocess.PIPE,
                          stderr=None if show_stderr else subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        detail = "its stderr is above" if show_stderr else proc.stderr[-3000:]
        raise RuntimeError(f"{' '.join(args)} failed:\n{detail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_section(name: str, body: str) -> None:
    """Replace (or append) the ``name`` section of BENCHMARKS.md, delimited by HTML comments."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery table below says the command and machine that produced it.\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def add_run_arguments(parser, samples: int) -> None:
    """The options every single-run benchmark shares: which preset, at which ratio, on how much
    calibration text (``samples`` × ``--seq-len`` tokens by default)."""
    parser.add_argument("--method", default="svd-llm", help="a preset, options joined by + (adasvd+refinement=optimal)")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--seq-len", type=int, default=256)


def run_config(parser, args):
    """The run's `CompressionConfig`, with ``args.model`` (when given) checked to be a model folder:
    bad input ends here with one line and exit code 2 (``parser.error``), before anything is loaded."""
    from adasvd_lightning.core.errors import InvalidInputError
    from adasvd_lightning.core.serialization import check_model_folder

    try:
        config = method_config(args.method, args.ratio)
        if getattr(args, "model", None):
            check_model_folder(Path(args.model).expanduser())
    except InvalidInputError as error:
        parser.error(str(error))
    return config


def method_config(method: str, ratio: float, **config):
    """`CompressionConfig` for a benchmark's method name: a preset, optionally with method options
    joined by ``+`` as in the CLI's ``--method-option`` (``adasvd+refinement=optimal``)."""
    from adasvd_lightning import CompressionConfig
    from adasvd_lightning.cli import _parse_options

    preset, *options = method.split("+")
    return CompressionConfig(method=preset, ratio=ratio, method_options=_parse_options(options), **config)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equally long lists (ties broken by position)."""
    def ranks(x):
        t = torch.tensor(x, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))
