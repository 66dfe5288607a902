"""The C heap's free pages go back to the OS after a checkpoint (glibc arenas keep them otherwise)."""

from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path

import pytest

from recsift.process import release_free_memory


def rss_bytes() -> int:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_freed_heap_pages_are_returned() -> None:
    """Many small blocks (below the mmap threshold, so inside an arena) freed in another thread: RSS stays up
    until the release, which gives the pages back; a second release finds nothing left to return."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def churn() -> None:
        blocks = [libc.malloc(64 * 1024) for _ in range(4096)]  # 256 MiB in 64 KiB blocks
        for b in blocks:
            libc.memset(b, 1, 64 * 1024)  # touched: resident
        for b in blocks[:-1]:  # the last one pins the top of the heap, so no automatic trim at free()
            libc.free(b)

    worker = threading.Thread(target=churn)
    worker.start()
    worker.join()
    before = rss_bytes()
    assert release_free_memory() == 1
    after = rss_bytes()
    assert before - after > 128 * 2**20, (before, after)
