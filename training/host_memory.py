"""Keep freed tensor memory inside the process on CPU.

PyTorch's CPU tensors come straight from ``malloc``. glibc gives blocks above its mmap
threshold back to the kernel when they are freed, and trims the top of the heap, so a training
step that frees its activations and allocates them again next step page-faults every page back
in, zero-filled by the kernel: on a small CPU model that costs as much as a large share of the
arithmetic (``benchmarks.train_throughput`` measures the trainer with it). Raising the
threshold to glibc's maximum and trimming only past a large slack keep the blocks for the next
step; the price is that the process keeps its peak memory.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper bound on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # free heap kept before glibc trims (mallopt takes an int)


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks; False where there is no glibc ``mallopt``
    (macOS, Windows, musl) or it refused, and nothing changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and (
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
