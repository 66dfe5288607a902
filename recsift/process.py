"""Child-process hygiene shared by every process recsift starts (the broker, the fetcher, the refresh).
A leaf: it imports nothing of recsift."""

from __future__ import annotations

import ctypes
import signal
import sys


def die_with_parent() -> None:
    """In the child: ask Linux to SIGKILL it when the parent dies, even by SIGKILL (atexit never runs then),
    so a killed service leaves no orphan writing to its state. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
