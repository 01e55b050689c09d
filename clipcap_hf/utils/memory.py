"""Training and captioning on the CPU without paying the kernel to hand back memory the next step asks for again.

glibc's `malloc` serves large allocations with their own `mmap` (every one above 32 MB; above 128 KB until its
threshold adapts) and returns them with `munmap` when freed, and hands back the free top of its heap beyond a
threshold. A training step of GPT-2 small allocates several such tensors and frees them before the next step: the LM
head's weight gradient and the input embedding's (154 MB each, and their sum), the caption positions' logits and their
gradients (about 90 MB each at batch 40). Each step the kernel maps them again and page-faults every 4 KB of them in,
zeroed: on a 2-core Intel Xeon that was 270,000 page faults and about a quarter of a recipe (a) step. Captioning
does the same on a smaller scale: a greedy batch of 16 images from pixels faulted 90,000 to 140,000 pages in (CLIP's
activations, logits, the key/value cache) on an AMD EPYC. Keeping freed memory in the heap for reuse removes this;
allocators such as jemalloc and tcmalloc do so too, but they must be preloaded before Python starts, and PyTorch has no
caching allocator for the CPU. So `reuse_freed_memory()` sets glibc's own switches, through `mallopt`, for as long as
training runs (`ClipCapTrainer.train`) or a captioning run over many batches
(`clipcap_hf.inference.captioning_run`): no `mmap` for large blocks, no trimming of the heap. The process's resident
memory then stays near its peak until the block ends (over 40 steps of recipe (a) at batch 40, a peak of 4.64 GB
instead of 4.31 GB, below the paper's loop's 5.67 GB), where the freed memory is handed back.

This serves the allocations of the main thread, where `Trainer.train` and the captioning runs run: glibc gives other
threads heaps of their own, which hand back what they free whatever these switches say. Where the environment tunes
glibc's malloc itself (`GLIBC_TUNABLES` or a `MALLOC_*_` variable), nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

# mallopt's parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
# After the block: glibc's default count of mmapped blocks, and the thresholds that glibc's own adjustment reaches in a
# process that frees blocks above 32 MB (its maximum mmap threshold on 64-bit, and twice that for trimming), which
# setting any of them stops (malloc/malloc.c).
RESTORED = ((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 32 * 2**20), (M_TRIM_THRESHOLD, 64 * 2**20))
# Environment variables through which users tune glibc's malloc themselves.
MALLOC_ENVIRONMENT = ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()
_depth = 0


def on_glibc() -> bool:
    """Whether this process runs on Linux with glibc, whose malloc switches this module sets."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@cache
def _glibc() -> ctypes.CDLL | None:
    """
    The C library when it is glibc (on Linux) and the environment leaves its malloc to its defaults; else None (then
    nothing is changed).
    """
    if not on_glibc():
        return None
    if any(name in os.environ for name in MALLOC_ENVIRONMENT):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def _restore(libc: ctypes.CDLL) -> None:
    for parameter, value in RESTORED:
        libc.mallopt(parameter, value)


def _restore_in_forked_child() -> None:
    # A process forked within a block (a DataLoader worker) would otherwise keep the switches for its whole life.
    global _depth
    if _depth > 0:
        _depth = 0
        libc = _glibc()
        if libc is not None:
            _restore(libc)


os.register_at_fork(after_in_child=_restore_in_forked_child)


def reuses_freed_memory() -> bool:
    """Whether a `reuse_freed_memory()` block is running and has set glibc's switches."""
    return _depth > 0 and _glibc() is not None


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """
    Keep the memory that freed tensors leave in the process's heap, for the main thread's later allocations to reuse,
    while the block runs (glibc only, unless the environment tunes its malloc; elsewhere nothing changes). Blocks
    nest, across threads too: the outermost one sets the switches and, when it ends, gives glibc back its usual
    thresholds and returns the free memory to the system (`malloc_trim`).
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
            if _depth > 0:  # 0 in a process forked within the block, which got the defaults back at the fork
                _depth -= 1
                if libc is not None and _depth == 0:
                    _restore(libc)
                    libc.malloc_trim(0)
