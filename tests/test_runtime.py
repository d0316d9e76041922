"""`retain_freed_memory`: after it, freed large tensors' memory is reused without new page faults.

Steady state only: glibc caches each aligned allocation's small leftover in its tcache (seven
entries per size), which keeps the freed block off the heap top, so the first few allocations of a
size grow the heap (see `core.runtime`). The test warms up past that and also bounds the growth.

Run in a child process: ``mallopt`` changes the whole process, and the test must not change the
allocator of the test session.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = r"""
import ctypes, json, resource, torch
from adasvd_lightning.core.runtime import retain_freed_memory

libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_long]

def faults_after_warm_up():
    start = libc.sbrk(0)
    for _ in range(12):  # warm-up past glibc's tcache (7 entries per size): see core.runtime
        torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.empty(16 * 2**20).fill_(1.0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
    return faults, (libc.sbrk(0) - start) / 2**20

plain, _ = faults_after_warm_up()
applied = retain_freed_memory()
retained, heap_growth_mib = faults_after_warm_up()
print(json.dumps({"applied": applied, "plain": plain, "retained": retained, "heap_mib": heap_growth_mib}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retain_freed_memory_avoids_page_faults():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["applied"]:
        pytest.skip("no glibc mallopt")
    pages = 64 * 2**20 // 4096
    assert result["plain"] > pages // 2  # glibc unmaps every freed 64 MiB block: faulted in again
    assert result["retained"] < pages // 20  # kept in the heap: reused without faults
    assert result["heap_mib"] <= 10 * 64  # the documented bound: about eight blocks (+ one live) before reuse


TRIM_CHILD = r"""
import json, os, torch
from adasvd_lightning.core.runtime import release_free_heap, retain_freed_memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

retain_freed_memory()  # every block from the heap, never trimmed by itself: the fragmented case
kept, scratch = [], []
for _ in range(64):  # 4 MiB temporaries interleaved with small long-lived tensors (new factors)
    scratch.append(torch.empty(2**20).fill_(1.0))
    kept.append(torch.ones(256))
scratch.clear()
before = rss_mib()
released = release_free_heap()
print(json.dumps({"released": released, "before": before, "after": rss_mib()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_free_heap_returns_freed_pages_between_live_tensors():
    """256 MiB of freed temporaries pinned in the heap by small live tensors between them go back to
    the system: what compression does after each block (`core.runtime.release_free_heap`)."""
    out = subprocess.run([sys.executable, "-c", TRIM_CHILD], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["released"]:
        pytest.skip("no glibc malloc_trim")
    assert result["before"] - result["after"] > 0.8 * 256
