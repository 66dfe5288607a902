"""The `recsift` command: embedded default run, dataset feeds, the foreground broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from recsift.cli import main
from recsift.stream.broker import free_port
from tests.helpers import ROOT


@pytest.mark.slow
def test_embedded_default_run_consumes_the_synthetic_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--max-events", "3000", "--state-dir", str(tmp_path), "--set", "monitoring.port=0",
                 "--set", "scoring.batch_size=500", "--set", "scoring.scorer.depth=20"]) == 0
    out, err = capsys.readouterr()
    assert "events consumed             3,000" in out
    assert "max-events" in out

    def count(label: str) -> int:
        return int(next(line for line in out.splitlines() if line.startswith(label)).split()[len(label.split())]
                   .replace(",", ""))

    samples, scored, waiting = count("samples emitted"), count("samples scored"), count("samples awaiting scoring")
    # the progress bar's last line shows the run's final counts
    last_bar = err[err.rindex("ingest: 100%"):].splitlines()[0]
    assert f"samples={samples}," in last_bar and f"users={count('users tracked')}]" in last_bar, last_bar
    assert 0 < samples < 3000
    assert scored % 500 == 0 and 0 < scored + waiting <= samples  # the rest wait in open windows
    coreset, validation = count("coreset"), count("validation samples")
    assert 0 < coreset <= 1024 and 0 < validation < scored * 0.15  # about 5% held out
    assert coreset + validation <= scored

    # the committed coreset is what `recsift coreset` shows and exports
    assert main(["coreset", "show", "--state-dir", str(tmp_path)]) == 0
    assert f"members              {coreset:,}" in capsys.readouterr().out
    assert main(["coreset", "export", "--state-dir", str(tmp_path), "--out", str(tmp_path / "c.jsonl")]) == 0
    lines = (tmp_path / "c.jsonl").read_text().splitlines()
    assert len(lines) == coreset and "snapshot 1" in capsys.readouterr().out
    assert main(["coreset", "show", "--state-dir", str(tmp_path / "absent")]) == 2
    assert (tmp_path / "recsift.sqlite").exists()


@pytest.mark.slow
def test_embedded_run_on_ml100k(tmp_path: Path, ml100k: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = ml100k.parent.parent
    assert main(["run", "--dataset", "ml-100k", "--max-events", "5000", "--no-progress", "--state-dir", str(tmp_path),
                 "--set", "monitoring.port=0", "--set", f"stream.data_dir={data_dir}",
                 "--set", "scoring.batch_size=500", "--set", "scoring.scorer.depth=20"]) == 0
    assert "events consumed             5,000" in capsys.readouterr().out


def test_broker_command_runs_until_terminated() -> None:
    from kafka import KafkaAdminClient

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "recsift.cli", "broker", "--port", str(port)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert f"127.0.0.1:{port}" in line
        admin = KafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}")
        assert isinstance(admin.list_topics(), list)
        admin.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_the_broker_dies_with_a_sigkilled_parent() -> None:
    import socket
    import time

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "recsift.cli", "broker", "--port", str(port)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    assert f"127.0.0.1:{port}" in proc.stdout.readline()  # type: ignore[union-attr]
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            time.sleep(0.1)
        except OSError:
            return
    pytest.fail("the tansu broker outlived its SIGKILLed parent")
