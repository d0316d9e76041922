"""`retain_freed_memory`: after it, freed large tensors' memory is reused without new page faults.

Run in a child process: ``mallopt`` changes the whole process, and the test must not change the
allocator of the test session.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource, torch
from adasvd_lightning.core.runtime import retain_freed_memory

def faults_after_warm_up():
    for _ in range(3):  # warm-up: the heap may take two blocks before reusing them
        torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.empty(16 * 2**20).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3

plain = faults_after_warm_up()
applied = retain_freed_memory()
print(json.dumps({"applied": applied, "plain": plain, "retained": faults_after_warm_up()}))
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
