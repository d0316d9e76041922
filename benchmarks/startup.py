"""Start-up time of the ``adasvd`` command: help and bad-argument errors, which should do no real work.

    python benchmarks/startup.py --label after            # 5 runs per command, median
    python benchmarks/startup.py --label before --repeat 3

Each command runs as ``python -m adasvd_lightning …`` in a fresh process (so nothing is cached in the
interpreter; the OS file cache is warm after the first run, as it is for a user typing commands). Wall
and CPU seconds (user + system of the child) are medians over ``--repeat`` runs; a last run of each
command reports which heavy libraries it imported. The table goes to stdout and the raw numbers to
``benchmarks/results/startup_<label>.json``. To time an older version, check it out in a separate
worktree and run this script there with the same interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HEAVY = ("torch", "transformers", "lightning", "deepspeed", "datasets", "jsonargparse")

# (label, arguments, expected exit code)
COMMANDS: list[tuple[str, list[str], int]] = [
    ("adasvd --help", ["--help"], 0),
    ("adasvd compress --help", ["compress", "--help"], 0),
    ("adasvd compress --ratio 2 (bad argument)", ["compress", "--ratio", "2", "--out", "x"], 2),
    ("adasvd evaluate --batch-size 0 (bad argument)", ["evaluate", "--batch-size", "0"], 2),
    ("adasvd fit --help (LightningCLI)", ["fit", "--help"], 0),
]

# Runs `main` and reports, on stderr's last line, which heavy top-level packages got imported.
_PROBE = (
    "import atexit, json, sys\n"
    "atexit.register(lambda: print('HEAVY ' + json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(%r))),"
    " file=sys.stderr))\n"
    "from adasvd_lightning.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
) % (HEAVY,)


def _time_once(args: list[str], expected: int) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "adasvd_lightning", *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != expected:
        raise RuntimeError(f"adasvd {' '.join(args)} exited {proc.returncode}, expected {expected}:\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_probed(args: list[str]) -> tuple[int, list[str], list[str]]:
    """Run ``adasvd <args>``: exit status, its stderr lines, and the heavy libraries it imported.

    Shared with tests/test_startup.py, which asserts that help and argument errors import none.
    """
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    lines = proc.stderr.strip().splitlines()
    probe = [ln for ln in lines if ln.startswith("HEAVY ")][-1]
    return proc.returncode, [ln for ln in lines if not ln.startswith("HEAVY ")], json.loads(probe[len("HEAVY "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="name of this measurement (e.g. before, after)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per command (median reported)")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    rows = []
    for label, argv, expected in COMMANDS:
        _time_once(argv, expected)  # warm the file cache
        runs = [_time_once(argv, expected) for _ in range(args.repeat)]
        rows.append({
            "command": label, "argv": argv,
            "wall_s": statistics.median(r[0] for r in runs), "cpu_s": statistics.median(r[1] for r in runs),
            "heavy_imports": run_probed(argv)[2],
        })
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"label": args.label, "commit": commit, "repeat": args.repeat, "load_average_1min": load,
              "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                         f"Python {platform.python_version()}", "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"startup_{args.label}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.label} @ {commit}: median of {args.repeat} runs, load average {load:.2f}, {result['machine']}\n")
    print("| command | wall, s | CPU, s | heavy libraries imported |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| `{row['command']}` | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | {', '.join(row['heavy_imports']) or 'none'} |")


if __name__ == "__main__":
    main()
