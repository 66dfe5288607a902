"""One owner per directory: a worker's state directory, the trainer's adapter registry.

Two ``recsift run`` processes on one state directory would interleave their checkpoints in one SQLite
file, and two refreshers on one registry would race for version names and the ``current`` pointer. Each
owner takes an exclusive ``flock`` on ``<directory>/.<role>.lock`` for its lifetime and writes who it is
into the file. The kernel drops the lock when the process dies, however it dies (SIGKILL included), so a
crashed owner never blocks its successor, and there is no expiry to tune. ``flock`` covers processes on
one host and on volumes that one host mounts (docker compose's shared volumes); on a network filesystem,
check that it supports ``flock`` before sharing a registry between hosts.

A leaf: it imports nothing of recsift.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any


class AlreadyOwned(RuntimeError):
    """Another live process owns the directory; the message says which and what to do."""


class DirectoryLock:
    """An exclusive lock on ``directory`` for ``role`` (``worker``, ``trainer``); a context manager.
    ``owner`` names the holder in the refusal message when it is not the role (a trainer holds its state
    directory's ``worker`` lock, so no worker can share that directory)."""

    def __init__(self, directory: str | Path, role: str, owner: str | None = None) -> None:
        self.directory, self.role, self.owner = Path(directory), role, owner or role
        self.path = self.directory / f".{role}.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> DirectoryLock:
        """Take the lock or raise :class:`AlreadyOwned` at once (never waits)."""
        if self._file is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held open for the owner's lifetime)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read()
            handle.close()
            raise AlreadyOwned(f"{self.directory} is in use by another recsift {_owner(text, self.role)} "
                               f"({_describe(text)}); stop it, or give this one its own directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                 "owner": self.owner}))
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _owner(text: str, role: str) -> str:
    try:
        return str(json.loads(text).get("owner", role))
    except (ValueError, AttributeError):
        return role


def _describe(text: str) -> str:
    try:
        holder: dict[str, Any] = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["since"])))
        return f"pid {int(holder['pid'])} on {holder['host']} since {since}"
    except (ValueError, KeyError, TypeError):
        return "owner unknown"
