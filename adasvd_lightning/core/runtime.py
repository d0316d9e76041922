"""Process-level memory settings: `retain_freed_memory` for CPU inference (opt-in; nothing in the
library calls it by itself) and `release_free_heap`, which compression calls between blocks.

`retain_freed_memory`: glibc's ``malloc`` serves every block above its mmap threshold (128 KiB at
start, adapting up to 32 MiB) with a fresh ``mmap`` and gives it back to the kernel on ``free``. A
transformer forward on CPU allocates activations of tens to hundreds of MiB per op (batch 32 × seq
512 × hidden 1024 in float32 is 64 MiB; an MLP activation 176 MiB), so every op's output is
page-faulted in and zero-filled by the kernel again: measured on the inference benchmark's
synthetic Llama at 32 × 512, about 1.8 million minor page faults (≈ 7 GiB) per forward and 20–30 %
of the latency (``benchmarks/inference.py``, BENCHMARKS.md). Raising the thresholds keeps freed
blocks in the heap for the next op, as jemalloc / tcmalloc (the usual ``LD_PRELOAD`` advice for CPU
inference) do. Costs: the process keeps its peak heap instead of returning it to the system, and
that heap holds up to about eight freed copies of each large block size before reuse starts. Why:
torch asks for 64-byte aligned memory (``posix_memalign``); glibc serves that by carving an aligned
block out of a slightly larger one and caches the small leftover in its per-thread cache (tcache,
seven entries per size), where it is never coalesced. The leftover pins the freed block away from
the heap top, and an exact-size hole is too small for the next aligned request of the same size, so
the heap grows by one block per allocation until the tcache bin is full (measured: 8 × 64 MiB, then
zero page faults per allocation; ``tests/test_runtime.py``).
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["retain_freed_memory", "release_free_heap"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def retain_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = _INT_MAX) -> bool:
    """Make glibc keep freed large blocks for reuse instead of unmapping them (``mallopt``).

    Blocks up to ``mmap_threshold`` bytes come from the heap, and the heap top is returned to the
    system only when more than ``trim_threshold`` bytes are free there. Affects allocations made
    after the call, process-wide (every tensor on the CPU, whatever model). Returns ``False``, and
    changes nothing, where there is no glibc ``mallopt`` (macOS, Windows, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has no mmap / trim tunables
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, _INT_MAX))
    return bool(ok and mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, _INT_MAX)))


_LIBC: ctypes.CDLL | None | bool = None  # None: not looked up yet; False: no glibc malloc_trim here


def release_free_heap() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim(0)``); False where there is none.

    Why compression calls it after every block: a block's factorization frees large float64
    temporaries while the new factors it allocates stay alive, interleaved with them in glibc's heap
    (aligned allocations fragment it, see the module docstring). The freed pages then stay in the
    process: on SmolLM2-135M the RSS peak of `svd-llm` stood 160 MB above the live bytes. Trimming
    between blocks returns them before the next block's statistics are allocated. It changes no
    allocator setting and costs a walk over the heap (milliseconds).
    """
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None)
                libc.gnu_get_libc_version  # noqa: B018 - glibc only
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                libc.malloc_trim.restype = ctypes.c_int
                _LIBC = libc
            except (OSError, AttributeError):
                pass
    if _LIBC is False:
        return False
    _LIBC.malloc_trim(0)
    return True
