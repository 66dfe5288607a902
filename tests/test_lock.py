"""One owner per state directory and per adapter registry, released when the owner dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from recsift.cli import main
from recsift.lock import AlreadyOwned, DirectoryLock
from tests.helpers import ROOT

HOLD = "import sys, time; from recsift.lock import DirectoryLock; lock = DirectoryLock(sys.argv[1], 'worker').acquire(); " \
       "print('held', flush=True); time.sleep(600)"
TRY = "import sys; from recsift.lock import DirectoryLock; DirectoryLock(sys.argv[1], 'worker').acquire(); print('taken')"


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_a_second_process_is_refused_with_the_owner_named(tmp_path: Path) -> None:
    with DirectoryLock(tmp_path, "worker") as lock:
        assert lock.held
        out = subprocess.run(python(TRY, str(tmp_path)), capture_output=True, text=True, env=ENV, timeout=60)
        assert out.returncode != 0 and "taken" not in out.stdout
        assert f"in use by another recsift worker (pid {os.getpid()} on " in out.stderr
        with pytest.raises(AlreadyOwned):  # a second lock in the same process is refused as well
            DirectoryLock(tmp_path, "worker").acquire()
        DirectoryLock(tmp_path, "trainer").acquire().release()  # roles are independent
    out = subprocess.run(python(TRY, str(tmp_path)), capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "taken"


def test_a_killed_owner_releases_the_directory(tmp_path: Path) -> None:
    holder = subprocess.Popen(python(HOLD, str(tmp_path)), stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyOwned, match=f"pid {holder.pid} on "):
            DirectoryLock(tmp_path, "worker").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    DirectoryLock(tmp_path, "worker").acquire().release()  # no expiry to wait for


def test_cli_refuses_a_second_worker_and_a_second_refresher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with DirectoryLock(tmp_path, "worker"):
        assert main(["run", "--max-events", "10", "--no-progress", "--state-dir", str(tmp_path),
                     "--set", "monitoring.port=0"]) == 2
        assert f"{tmp_path} is in use by another recsift worker (pid {os.getpid()}" in capsys.readouterr().err
    (tmp_path / "recsift.sqlite").touch()  # `recsift refresh` wants a checkpoint before anything else
    with DirectoryLock(tmp_path / "adapters", "trainer"):
        assert main(["refresh", "--state-dir", str(tmp_path)]) == 2
        assert "in use by another recsift trainer" in capsys.readouterr().err
