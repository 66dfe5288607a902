"""Process hygiene: a child whose parent died while it was still starting never runs on as an orphan; torch's
threads make one pool, the heavy thread's."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from recsift.process import die_with_parent


def prctl_only() -> None:
    """The negative control: the death signal alone, which a parent that is already gone never sends."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def _grandchild(marker: str, guard: Callable[[], None]) -> None:
    Path(marker + ".pid").write_text(str(os.getpid()))
    time.sleep(1.0)  # stands for the seconds a spawned child spends importing torch before its guard runs
    guard()
    time.sleep(1.0)
    Path(marker).write_text("ran on as an orphan")


def alive(pid: int) -> bool:
    """Running (a zombie left to an init that does not reap is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _short_lived_parent(marker: str, guard: Callable[[], None]) -> None:
    multiprocessing.get_context("spawn").Process(target=_grandchild, args=(marker, guard)).start()
    os._exit(0)  # gone before the grandchild's guard: as a SIGKILLed service is


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="the parent-death signal is Linux's")
@pytest.mark.parametrize(("guard", "survives"), [(die_with_parent, False), (prctl_only, True)])
def test_a_child_orphaned_before_its_guard_kills_itself(tmp_path: Path, guard: Callable[[], None],
                                                        survives: bool) -> None:
    marker = tmp_path / "orphan"
    parent = multiprocessing.get_context("spawn").Process(target=_short_lived_parent, args=(str(marker), guard))
    parent.start()
    parent.join(30)
    pid_file = Path(f"{marker}.pid")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (pid_file.exists() and pid_file.read_text()):
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    while time.monotonic() < deadline and alive(pid) and not marker.exists():
        time.sleep(0.1)
    assert marker.exists() == survives
    assert not alive(pid) or survives


POOLS = """
import sys, threading
from pathlib import Path
import torch
from recsift.process import one_torch_pool

def tasks():
    return len(list(Path("/proc/self/task").iterdir()))

def work():  # elementwise over 1M floats: torch runs it on its OpenMP pool
    torch.randn(1_000_000).exp_().sum()

def heavy(threads, out):
    torch.set_num_threads(threads)
    work()
    out.append(tasks())  # while this thread (and so its pool) is alive

base, out = tasks(), []
if sys.argv[1] == "one":
    with one_torch_pool() as threads:
        work()  # the ingest thread's own torch work
        t = threading.Thread(target=heavy, args=(threads, out)); t.start(); t.join()
else:  # the negative control: both threads on torch's default
    threads = torch.get_num_threads()
    work()
    t = threading.Thread(target=heavy, args=(threads, out)); t.start(); t.join()
print(out[0] - base - 1, threads, torch.get_num_threads())
"""


def test_one_torch_pool_leaves_the_heavy_threads_pool_the_only_one() -> None:
    """In a fresh interpreter (pytest's own threads have pools already): inside ``one_torch_pool`` the calling
    thread's torch work makes no OpenMP pool, so only the heavy thread's ``threads - 1`` workers exist, and the
    caller gets its count back afterwards. Without it, both threads make a pool."""
    def run(mode: str) -> tuple[int, int, int]:
        out = subprocess.run([sys.executable, "-c", POOLS, mode], capture_output=True, text=True, check=True,
                             timeout=120)
        pooled, threads, after = map(int, out.stdout.split())
        return pooled, threads, after

    pooled, threads, after = run("one")
    if threads < 2:
        pytest.skip("one core: torch makes no pool")
    assert pooled == threads - 1 and after == threads
    pooled_without, _, _ = run("none")
    assert pooled_without >= 2 * (threads - 1), pooled_without
