"""How many CPU threads torch should use: the CPUs this process may actually run on.

torch sizes its intra-op pool from the cores it sees. In a container limited by a CPU quota (cgroup
``cpu.max``) or pinned to a few cores (affinity), that can be far more threads than CPUs the process
gets, and oversubscribed threads spend their time waiting for each other. `available_cpus` takes the
smallest of: the affinity mask (``os.sched_getaffinity``), the cgroup v2 ``cpu.max`` quota, and the
cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` quota (rounded up to whole CPUs).

On a machine already busy (load average at or above those CPUs) threads also wait passively
(``OMP_WAIT_POLICY=PASSIVE``). By default OpenMP threads spin between parallel regions, which pays
only while each thread has a core to itself; on a shared machine the spinning threads take the cores
from the ones with work. The reference build on this project's shared 2-core machine (load 15–21):
16.8 s wall and 3.07 CPU-s per step spinning, 1.03 s and 0.30 CPU-s passive
(``benchmarks/threads.py``; 0.3 CPU-s is what a step costs on an idle machine).

A user's own choice wins: with ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) set the thread count is
left alone, with ``OMP_WAIT_POLICY`` set the wait policy is. Standard library only — the CLI decides
before torch (and its OpenMP runtime) is loaded, through the environment.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

__all__ = ["available_cpus", "cgroup_cpu_limit", "configure_threads", "machine_is_busy"]

_USER_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _quota(quota: float, period: float) -> int | None:
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup") -> int | None:
    """Whole CPUs allowed by this cgroup's CPU quota, or None when there is no quota (or no cgroup)."""
    root = Path(root)
    try:  # cgroup v2: "max 100000" (no limit) or "200000 100000" (2 CPUs)
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else _quota(float(quota), float(period))
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):  # cgroup v1: quota -1 means none
        try:
            quota = float((folder / "cpu.cfs_quota_us").read_text())
            period = float((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return _quota(quota, period)
    return None


def available_cpus() -> int:
    """CPUs this process can use: affinity mask and cgroup quota, whichever is smaller (at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cpus, limit) if limit is not None else cpus)


def machine_is_busy(cpus: int) -> bool:
    """Whether other work already keeps ``cpus`` CPUs' worth of the machine busy (1-minute load)."""
    try:
        return os.getloadavg()[0] >= cpus
    except OSError:  # no load average on this platform
        return False


def configure_threads() -> dict[str, str]:
    """Size torch's thread pool to `available_cpus` and, on a busy machine, make idle threads sleep.

    Unless the user chose. Sets ``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY`` (read when torch starts,
    and inherited by worker processes such as DeepSpeed's) and, if torch is already imported,
    ``torch.set_num_threads`` too. Returns what it set.
    """
    chosen: dict[str, str] = {}
    threads = available_cpus()
    if not any(os.environ.get(name) for name in _USER_SETTINGS):
        chosen["OMP_NUM_THREADS"] = str(threads)
        torch = sys.modules.get("torch")
        if torch is not None and hasattr(torch, "set_num_threads"):
            torch.set_num_threads(threads)
    if not os.environ.get("OMP_WAIT_POLICY") and machine_is_busy(threads):
        chosen["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.update(chosen)
    return chosen
