"""Hand the heap memory this process has freed back to the system, which glibc would keep.

XLA's compilations free most of what they allocate, but glibc keeps those pages resident for
reuse, and the large buffers of a step (above its mmap threshold) never reuse them: a 135M-model
demo on CPU would carry about a gibibyte of such pages through training.
"""

from __future__ import annotations

import ctypes


def release() -> None:
    """malloc_trim(0): return every free heap page to the system (nothing where the C library is
    not glibc)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:  # not glibc
        return
    trim(0)
