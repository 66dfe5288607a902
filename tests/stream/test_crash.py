"""Crash equivalence and graceful shutdown of `recsift run` as a real subprocess against the real broker."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from recsift.data.datasets import recbole_events
from recsift.stream.broker import EmbeddedBroker
from recsift.stream.kafka import keyed, produce_events
from tests.helpers import SERVICE_ENV as ENV
from tests.helpers import kafka_settings

pytestmark = pytest.mark.slow


def run_cmd(broker: EmbeddedBroker, topic: str, group: str, state: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "recsift.cli", "run", "--source", "kafka",
        "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic, "--group-id", group,
        "--state-dir", str(state), "--journal", "--no-progress",
        "--set", f"stream.dead_letter_topic={topic}.dlq",
        "--set", "stream.session_timeout_ms=2000", "--set", "stream.heartbeat_interval_ms=500",
        "--set", "checkpoint.interval_events=4000", "--set", "checkpoint.interval_s=1.0",
        "--set", "scoring.enabled=false", "--set", "monitoring.port=0",  # the stream state is under test here; scoring restarts: tests/scoring
        *extra,
    ]


def checkpointed_offset_sum(state: Path, topic: str) -> int:
    db = state / "recsift.sqlite"
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        row = conn.execute("SELECT coalesce(sum(next_offset), 0) FROM offsets WHERE topic = ?", (topic,)).fetchone()
        conn.close()
        return int(row[0])
    except sqlite3.Error:
        return 0


def final_state(state: Path) -> dict[str, object]:
    conn = sqlite3.connect(state / "recsift.sqlite")
    journal = [r[0] for r in conn.execute("SELECT sample_id FROM journal")]
    out = {
        "histories": conn.execute("SELECT partition, user_id, items FROM histories ORDER BY partition, user_id").fetchall(),
        "clocks": conn.execute("SELECT partition, max_ts, counts FROM clocks ORDER BY partition").fetchall(),
        "offsets": conn.execute("SELECT partition, next_offset FROM offsets ORDER BY partition").fetchall(),
        "pending": conn.execute("SELECT partition, window_start, sample FROM pending ORDER BY 1, 2, 3").fetchall(),
        "journal": sorted(journal),
        "journal_duplicates": len(journal) - len(set(journal)),
    }
    conn.close()
    return out


def test_sigkill_at_random_points_ends_in_the_same_state_as_an_uninterrupted_run(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path, ml100k: Path,
    request: pytest.FixtureRequest,
) -> None:
    topic = make_topic(3)
    events = recbole_events(ml100k)
    produce_events(kafka_settings(broker, topic).stream, True, keyed(events), topic)
    total = len(events)
    idle = ["--set", "stream.stop_when_idle_s=3"]

    ref_state = tmp_path / "ref"  # the uninterrupted reference runs beside the crashing runs (own group)
    with (tmp_path / "ref.log").open("w") as log:
        ref = subprocess.Popen(run_cmd(broker, topic, f"ref-{topic}", ref_state, *idle), env=ENV,
                               stdout=subprocess.DEVNULL, stderr=log)
    request.addfinalizer(lambda: ref.kill() if ref.poll() is None else None)

    rnd = random.Random(int(os.environ.get("RECSIFT_CRASH_SEED", "7")))
    kill_points = sorted(rnd.sample(range(total // 10, total * 9 // 10), 3))
    state = tmp_path / "crashy"
    group = f"crashy-{topic}"
    kills = 0
    for point in kill_points:
        proc = subprocess.Popen(run_cmd(broker, topic, group, state, *idle), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=(tmp_path / f"run-{point}.log").open("w"))
        target = max(point, checkpointed_offset_sum(state, topic) + 1)  # kill only after fresh progress
        deadline = time.monotonic() + 120
        while checkpointed_offset_sum(state, topic) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rnd.uniform(0.0, 0.6))  # land between checkpoints, mid-batch
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=30)
    assert kills >= 3, "the consumer finished before it could be killed three times"
    last = subprocess.run(run_cmd(broker, topic, group, state, *idle), env=ENV, capture_output=True, text=True, timeout=240)
    assert last.returncode == 0, last.stderr[-2000:]
    assert ref.wait(240) == 0, (tmp_path / "ref.log").read_text()[-2000:]
    assert checkpointed_offset_sum(ref_state, topic) == total

    crashed, reference = final_state(state), final_state(ref_state)
    assert crashed["journal_duplicates"] == 0
    assert crashed == reference
    assert len(reference["journal"]) > 90_000  # type: ignore[arg-type]


def test_sigterm_finishes_the_batch_checkpoints_commits_and_exits_cleanly(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    from kafka import KafkaConsumer, TopicPartition

    from recsift.config import SyntheticConfig
    from recsift.data.synthetic import SyntheticStream

    topic = make_topic(2)
    produce_events(kafka_settings(broker, topic).stream, True,
                   SyntheticStream(SyntheticConfig(seed=4, users=200, items=100, events=60_000)).payloads(), topic)
    state = tmp_path / "term"
    group = f"term-{topic}"
    proc = subprocess.Popen(run_cmd(broker, topic, group, state, "--set", "stream.poll_max_records=200"),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while checkpointed_offset_sum(state, topic) < 4000 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM" in out
    done = checkpointed_offset_sum(state, topic)
    assert 4000 <= done < 60_000
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=group, enable_auto_commit=False)
    committed = sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in (0, 1))
    consumer.close(autocommit=False)
    assert committed == done  # Kafka got exactly the checkpoint's offsets
    conn = sqlite3.connect(state / "recsift.sqlite")
    journaled = conn.execute("SELECT count(*) FROM journal").fetchone()[0]
    pending = conn.execute("SELECT count(*) FROM pending").fetchone()[0]
    import json as _json

    samples = sum(_json.loads(c)["samples"] for (c,) in conn.execute("SELECT counts FROM clocks"))
    assert journaled + pending == samples  # every sample made is either handed on or saved for later
