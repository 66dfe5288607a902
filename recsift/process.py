"""Process hygiene: for every child process recsift starts (the broker, the fetcher, the refresh), for the
C heap, and for torch's threads. A leaf: it imports nothing of recsift."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def die_with_parent(parent_pid: int | None = None) -> None:
    """In the child: ask Linux to SIGKILL it when the parent dies, even by SIGKILL (atexit never runs then),
    so a killed service leaves no orphan writing to its state. A no-op elsewhere.

    A parent that died before the request took effect (a spawned child imports for seconds first) is
    caught by comparing the parent's pid, ``parent_pid`` or multiprocessing's parent: the child then
    kills itself at once."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if parent_pid is None:
        parent = multiprocessing.parent_process()
        parent_pid = parent.pid if parent is not None else None
    if parent_pid is not None and os.getppid() != parent_pid:  # orphaned already: no death signal will come
        os.kill(os.getpid(), signal.SIGKILL)


def log_to_stderr(level: int = logging.INFO) -> None:
    """recsift's log format on stderr, with the chatty libraries quietened: one call per process (the CLI
    and every child that reports progress), so a child's lines read like its parent's."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    # kafka-python's event-loop timing notes ("Task ... ran for 0.118s") are nothing a user can act on
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # "Running job ..." twice a second otherwise


@contextlib.contextmanager
def one_torch_pool() -> Iterator[int]:
    """While open, the calling thread runs torch on one thread; yields the count it had (torch's default, or
    ``OMP_NUM_THREADS``) for the one thread that does the heavy work to take with ``torch.set_num_threads``.

    Why: torch's OpenMP runtime (libgomp) keeps a pool of worker threads for each thread that runs a parallel
    op, and once the pools' threads outnumber the cores it cuts its spin-wait to about a hundred iterations,
    so at the end of every parallel region the threads sleep and must be woken. A service whose ingest thread
    ran one parallel op (building the surrogate, a checkpoint) has two pools on two cores, and its scoring
    thread then slept ~150,000 times per 150k events (``bench/results/torch-pools.json``). The service
    opens this before it builds anything, so its ingest thread never makes a pool."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.get_num_threads()  # a thread takes its count at its first parallel call from the last one set anywhere:
    try:  # this fixes the calling thread's now, before the heavy thread sets its own
        yield threads
    finally:
        torch.set_num_threads(threads)


def release_free_memory() -> int:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``); returns 1 if any were released,
    0 if none were, -1 where there is no glibc.

    Scoring allocates and frees large tensors of varying shapes from several threads; glibc keeps the freed
    chunks in its arenas, so without this the service's RSS grows with the arenas' free space, not with what
    it holds (``bench/memory.py``: 0.5–0.8 GB in use against 1–2 GB free and growing). Call it where the
    temporaries are gone: after a checkpoint, whose drain leaves the scoring thread idle."""
    trim = _malloc_trim()
    return int(trim(0)) if trim is not None else -1


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once; None on other platforms and libcs (musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim
