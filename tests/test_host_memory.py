"""host_memory.release gives freed heap pages back: resident memory falls after a release."""

import ctypes
import sys

import pytest

from qstar_jax import host_memory


def resident_mib() -> float:
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux") or
                    not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="glibc only")
def test_release_returns_freed_heap_pages():
    # 240 MB in heap blocks below glibc's mmap threshold, every 16th kept: freeing the rest
    # leaves their pages resident (the kept blocks pin the heap's top), until a release.
    blocks = [bytearray(60_000) for _ in range(4000)]
    kept = blocks[::16]
    del blocks
    before = resident_mib()
    host_memory.release()
    assert resident_mib() < before - 100
    assert len(kept) == 250
