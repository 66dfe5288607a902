"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from recsift.config import Settings, load_config
from recsift.stream.broker import EmbeddedBroker

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("RECSIFT_TEST_DATA", ROOT.parent / "shared" / "data"))


def kafka_settings(broker: EmbeddedBroker, topic: str, tmp: Path | None = None, **overrides: Any) -> Settings:
    """Settings for a Kafka source on the test broker (short group timeouts, as in embedded mode)."""
    base: dict[str, Any] = {
        "stream.source": "kafka",
        "stream.bootstrap_servers": broker.bootstrap_servers,
        "stream.topic": topic,
        "stream.dead_letter_topic": f"{topic}.dlq",
        "stream.group_id": f"g-{topic}",
        "stream.session_timeout_ms": 2000,
        "stream.heartbeat_interval_ms": 500,
        "monitoring.progress": False,
    }
    if tmp is not None:
        base["checkpoint.state_dir"] = str(tmp / "state")
    base.update(overrides)
    return load_config(overrides=base)
