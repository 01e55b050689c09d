"""Training on the CPU without paying the kernel to hand back memory the next step asks for again.

glibc's `malloc` serves every allocation above 32 MB with its own `mmap` and returns it with `munmap` when freed. A
training step of GPT-2 small allocates several such tensors and frees them before the next step: the LM head's
weight gradient and the input embedding's (154 MB each, and their sum), the caption positions' logits and their
gradients (about 90 MB each at batch 40). Each step the kernel maps them again and page-faults every 4 KB of them in,
zeroed: on a 2-core Intel Xeon that was 270,000 page faults and about a quarter of a recipe (a) step. Keeping freed
memory in the heap for reuse removes this; allocators such as jemalloc and tcmalloc do so too, but they must be
preloaded before Python starts, and PyTorch has no caching allocator for the CPU. So `reuse_freed_memory()` sets
glibc's own switches, through `mallopt`, for as long as training runs: no `mmap` for large blocks, no trimming of the
heap. The process's resident memory then stays near its peak until the block ends (in `bench_train.py`, 4.64 GB
instead of 4.31 GB at the peak for recipe (a), and below the paper's loop), where the freed memory is handed back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

# mallopt's parameters and glibc's defaults for them (malloc.h, malloc/malloc.c).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536

_lock = threading.Lock()
_depth = 0


@cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (on Linux), whose `mallopt` switches this module sets; else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def reuses_freed_memory() -> bool:
    """Whether a `reuse_freed_memory()` block is running and has set glibc's switches."""
    return _depth > 0 and _glibc() is not None


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """
    Keep the memory that freed tensors leave in the process's heap, for later allocations to reuse, while the block
    runs (glibc only; elsewhere nothing changes). Blocks nest, across threads too: the outermost one sets the switches
    and, when it ends, puts glibc's defaults back and returns the free memory to the system (`malloc_trim`).
    """
    global _depth
    libc = _glibc()
    with _lock:
        if libc is not None and _depth == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, -1)  # -1: never trim (mallopt(3))
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if libc is not None and _depth == 0:
                # glibc's documented defaults. Its mmap threshold, which adjusted itself to the sizes freed, stays
                # fixed from here on where it was when the block began.
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
