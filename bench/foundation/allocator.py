"""Keep freed host memory in the process instead of handing it back to the kernel after every op.

glibc serves an allocation above its mmap threshold (128 KiB, raised adaptively) with a fresh
``mmap`` and returns it with ``munmap`` when freed, and it trims the heap's top whenever more than
the trim threshold lies free there. A CPU forward pass allocates and frees activations of a few
MiB per layer per batch, so with the defaults every conv output is page-faulted in anew: measured on
this project's 2-core AMD EPYC machine, one thread, the digits CNN's second convolution on a batch of
250 takes 6.5 ms by default and 2.1-2.9 ms with the thresholds below (64 examples: unchanged),
and the attacks run most of their passes at such batches. The arithmetic is untouched: every value
is bit-identical (tests/test_allocator.py), so no result is keyed by it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter numbers (malloc.h)."""

MMAP_THRESHOLD = 32 << 20
"""Allocations below 32 MiB (glibc's largest mmap threshold on 64-bit) come from the heap, so
freeing one leaves its pages mapped for the next."""

TRIM_THRESHOLD = 64 << 20
"""Free memory at the heap's top is returned to the kernel only beyond 64 MiB: a worker keeps at
most that much more than it uses."""

_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Set the thresholds once per process; True where they are in force (glibc), False elsewhere
    (macOS, musl, Windows: their allocators behave differently, and nothing is changed there)."""
    global _tuned
    if _tuned is None:
        _tuned = _set_thresholds()
    return _tuned


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # not glibc: musl's mallopt ignores these parameters
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
