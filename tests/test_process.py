"""Child-process hygiene: a child whose parent died while it was still starting never runs on as an orphan."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
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
