"""Reference-build throughput by torch thread setting: wall and CPU seconds per training step.

    python benchmarks/threads.py                 # steps 6..45 of the reference build, 3 settings
    python benchmarks/threads.py --steps 20 --settings adasvd 1

Each setting runs ``adasvd reference`` (the real build, in an empty cache) in a fresh process with
plain progress lines on every step (``ADASVD_PROGRESS_INTERVAL=0``). The parent reads the lines as
they come and samples the child's CPU time (user + system, all threads, from ``/proc/<pid>/stat``)
at the end of step 5 and of the last measured step, then stops the child. Steps 1–5 are left out
(start-up, first-touch allocations). On a machine shared with other work the numbers say what the
build gets under that load; the load average is printed with them.

Settings: ``adasvd`` = what the command picks by itself (`adasvd_lightning.threads`), ``N`` =
``OMP_NUM_THREADS=N``, ``N-passive`` = that plus ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep
instead of spinning).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WARMUP = 5


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def measure(setting: str, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    if setting != "adasvd":
        threads, _, policy = setting.partition("-")
        env["OMP_NUM_THREADS"] = threads
        if policy:
            env["OMP_WAIT_POLICY"] = policy.upper()
    with tempfile.TemporaryDirectory() as cache:
        env.update(ADASVD_CACHE=cache, ADASVD_PROGRESS_INTERVAL="0")
        proc = subprocess.Popen([sys.executable, "-m", "adasvd_lightning", "reference"], stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        marks: dict[int, tuple[float, float]] = {}
        for line in proc.stderr:
            match = re.search(r"train reference model: (\d+)/", line)
            if match and int(match.group(1)) in (WARMUP, WARMUP + steps):
                marks[int(match.group(1))] = (time.perf_counter(), _cpu_seconds(proc.pid))
                if len(marks) == 2:
                    break
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    (w0, c0), (w1, c1) = marks[WARMUP], marks[WARMUP + steps]
    return {"setting": setting, "steps": steps, "wall_per_step_s": (w1 - w0) / steps,
            "cpu_per_step_s": (c1 - c0) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="measured steps per setting (after 5 warm-up steps)")
    parser.add_argument("--settings", nargs="+", default=["adasvd", "1", "2-passive"])
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from adasvd_lightning.threads import available_cpus

    load = os.getloadavg()[0]
    rows = [measure(setting, args.steps) for setting in args.settings]
    load_after = os.getloadavg()[0]
    result = {"available_cpus": available_cpus(), "cpu_count": os.cpu_count(), "load_average_1min": [load, load_after],
              "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "threads.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{os.cpu_count()} CPUs visible, {available_cpus()} available (affinity/cgroup); "
          f"load average {load:.1f} → {load_after:.1f}; steps {WARMUP + 1}–{WARMUP + args.steps} of the reference build\n")
    print("| threads | wall s / step | CPU s / step |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['wall_per_step_s']:.2f} | {row['cpu_per_step_s']:.2f} |")


if __name__ == "__main__":
    main()
