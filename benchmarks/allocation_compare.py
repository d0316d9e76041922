"""Two module-KL allocations of one model side by side: where their budgets go, and what the probes saw.

    python benchmarks/allocation_compare.py --model /work/cache/smollm2-135m \\
        --rows real_models_40_exhaustive.json real_models_40_fisher_b37edfb.json \\
        --table /path/to/probe-table.jsonl

``--rows``: `real_models.py` results files (``benchmarks/results/``); every compressed row in them is
one allocation. Per allocation it prints the perplexity and the fraction of parameters each module type
(q/k/v/o/gate/up/down) and each third of the depth keeps — m·k + r·(m + n − k) of m·n for a module of
rank r with k preserved columns, shapes read from the model folder's safetensors headers.

``--table``: a probe table written by ``CompressionConfig.probe_table`` (read as data here; the
library's own checks apply when a compression reads it). It prints how noisy the exhaustive probes are:
the rows whose cost rises with the retention somewhere (a probe that says truncating *less* costs
more), the entries below the baseline's retention that are negative (truncating *more* than the
uniform baseline measured as an improvement), and those entries' sizes against the row's largest cost.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS  # noqa: E402

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _shapes(folder: Path) -> dict[str, tuple[int, int]]:
    from safetensors import safe_open

    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.endswith(".weight"):
                    shape = f.get_slice(key).get_shape()
                    if len(shape) == 2:
                        shapes[key[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return shapes


def _kept(module: dict, shape: tuple[int, int]) -> tuple[float, float]:
    m, n = shape
    r, k = module.get("rank"), module.get("kept_columns") or 0
    kept = m * n if r is None else m * k + r * (m + n - k)
    return float(min(kept, m * n)), float(m * n)


def _block(name: str) -> int | None:
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def allocation_table(rows: list[dict], shapes: dict[str, tuple[int, int]]) -> list[str]:
    blocks = max(_block(m["name"]) or 0 for r in rows for m in r["modules"]) + 1
    thirds = [(0, blocks // 3), (blocks // 3, 2 * blocks // 3), (2 * blocks // 3, blocks)]
    head = ("| allocation | ppl | " + " | ".join(TYPES) + " | "
            + " | ".join(f"blocks {a}–{b - 1}" for a, b in thirds) + " | modules under 25 % |")
    lines = [head, "|" + "---|" * (3 + len(TYPES) + len(thirds))]
    for row in rows:
        sums: dict[str, list[float]] = {}
        low = 0
        for module in row["modules"]:
            shape = shapes.get(module["name"])
            if shape is None:
                raise SystemExit(f"error: {module['name']} is not a 2-D weight of the model folder")
            kept, total = _kept(module, shape)
            low += kept < 0.25 * total
            kind = next((t for t in TYPES if module["name"].endswith(t)), "other")
            third = next(i for i, (a, b) in enumerate(thirds) if a <= (_block(module["name"]) or 0) < b)
            for key in (kind, f"third{third}"):
                acc = sums.setdefault(key, [0.0, 0.0])
                acc[0] += kept
                acc[1] += total
        cells = [f"{sums[k][0] / sums[k][1]:.2f}" if k in sums else "–" for k in TYPES]
        cells += [f"{sums[f'third{i}'][0] / sums[f'third{i}'][1]:.2f}" for i in range(len(thirds))]
        lines.append(f"| `{row['method']}` | {row['perplexity']:.2f} | " + " | ".join(cells) + f" | {low} |")
    return lines


def table_noise(path: Path, candidates: list[float], baseline: float) -> list[str]:
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines[1:] if line.strip()]
    rising = negative = 0
    ratios = []
    for row in rows:
        values = [v for v in row["values"] if v is not None]
        if any(b > a for a, b in zip(values, values[1:])):
            rising += 1
        top = max(abs(v) for v in values) or 1.0
        for rho, value in zip(candidates, row["values"]):
            if value is not None and rho < baseline and value < 0:
                negative += 1
                ratios.append(-value / top)
    ratios.sort()
    median = ratios[len(ratios) // 2] if ratios else 0.0
    return [f"{len(rows)} rows: {rising} rise somewhere with the retention; {negative} entries below the "
            f"baseline retention {baseline:g} are negative (median size {median:.0%} of their row's largest "
            "cost)."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model folder (shapes from its safetensors headers)")
    parser.add_argument("--rows", nargs="+", required=True, help="real_models.py results files in benchmarks/results/")
    parser.add_argument("--table", help="a probe table (JSON lines) to summarise")
    parser.add_argument("--candidates", type=float, nargs="+",
                        default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                        help="the table's candidate retentions (the presets' default)")
    parser.add_argument("--baseline", type=float, default=0.6, help="the uniform retention (1 − ratio)")
    args = parser.parse_args()
    folder = Path(args.model).expanduser()
    if not folder.is_dir():
        parser.exit(2, f"error: no model folder at {folder}\n")
    rows = []
    for name in args.rows:
        path = RESULTS / name
        if not path.is_file():
            parser.exit(2, f"error: no results file {path}\n")
        rows += [r for r in json.loads(path.read_text())["rows"] if r.get("modules")]
    text = allocation_table(rows, _shapes(folder))
    if args.table:
        text += [""] + table_noise(Path(args.table), args.candidates, args.baseline)
    print("\n".join(text))


if __name__ == "__main__":
    main()
