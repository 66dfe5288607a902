"""The coreset topic: a worker's committed coreset, published to a real (tansu) broker and read back."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from recsift.config import SyntheticConfig
from recsift.data.synthetic import SyntheticStream
from recsift.monitoring.metrics import Metrics
from recsift.selection.publish import (
    CoresetPublisher,
    CoresetTopicReader,
    CoresetView,
    changes,
    coreset_records,
    record_key,
)
from recsift.selection.store import read_selection_state, read_validation
from recsift.stream.broker import EmbeddedBroker
from recsift.stream.kafka import ensure_topic, produce_events
from recsift.stream.windows import Sample
from tests.helpers import kafka_settings

WORKER = "host-a"


def sample(i: int) -> Sample:
    return Sample(i, f"u{i % 7}", (f"i{i % 5}", f"i{i % 3}"), f"i{i}", float(i))


def state(ids: range, score: float = 0.5, validation: range = range(0)) -> dict[bytes, bytes]:
    return coreset_records(WORKER, ((sample(i), score + i / 1000, i % 4, 1) for i in ids),
                           ((sample(i), i) for i in validation), offered=ids.stop)


def read_view(broker: EmbeddedBroker, topic: str) -> CoresetView:
    reader = CoresetTopicReader(kafka_settings(broker, topic).stream, True, topic)
    try:
        reader.catch_up()
        return reader.view
    finally:
        reader.close()


def test_changes_are_new_or_changed_values_and_tombstones_for_what_left() -> None:
    a, b = state(range(0, 10)), state(range(5, 15))
    todo = dict(changes(a, b))
    assert {k for k, v in todo.items() if v is None} == {record_key("m", i) for i in range(5)}
    assert {k for k, v in todo.items() if v is not None} == {record_key("m", i) for i in range(10, 15)} | {
        record_key("w", WORKER)}  # members 5-9 are unchanged; the worker's counters changed
    assert changes(b, b) == []
    rescored = state(range(5, 15), score=0.9)
    assert len(changes(b, rescored)) == 10  # a new score is a new value


def test_the_view_is_the_last_value_per_key_and_counts_what_is_not_a_coreset_record() -> None:
    view = CoresetView()
    for key, value in state(range(3), validation=range(10, 12)).items():
        view.apply(key, value)
    view.apply(record_key("m", 1), None)
    assert sorted(view.members) == [0, 2] and sorted(view.validation) == [10, 11]
    assert [s.sample_id for s in view.validation_samples()] == [10, 11]
    for key, value in [(None, b"{}"), (b"x:1", b"{}"), (b"m:1", b"not json"), (b"m:1", b"[1]"),
                       (b"m:1", orjson.dumps({"worker": WORKER, "sample": [1, "u"]})), (b"m:", b"{}"),
                       (b"m:1", orjson.dumps({"worker": WORKER, "sample": sample(1).to_json()})),  # no score
                       (b"v:1", orjson.dumps({"worker": WORKER, "sample": sample(1).to_json(), "seq": "x"})),
                       (b"w:h", orjson.dumps({"worker": "h", "samples": "many"})),
                       (b"w:h", orjson.dumps({"worker": "h", "samples": 1, "drift": [1]}))]:
        assert view.apply(key, value) is None
    assert view.invalid == 10 and sorted(view.members) == [0, 2] and sorted(view.validation) == [10, 11]
    assert len(view.member_samples()) == 2  # what was kept decodes
    assert set(view.owned_by(WORKER)) == {record_key("m", 0), record_key("m", 2), record_key("v", 10),
                                          record_key("v", 11), record_key("w", WORKER)}
    assert view.owned_by("another host") == {}


def test_a_restarted_publisher_catches_up_and_sends_only_the_difference(
    broker: EmbeddedBroker, make_topic: Callable[..., str]
) -> None:
    topic = make_topic(1)
    cfg = kafka_settings(broker, topic).stream
    old, new = state(range(0, 40), validation=range(100, 110)), state(range(20, 60), validation=range(105, 115))
    first = CoresetPublisher(cfg, True, topic, WORKER)
    try:
        assert first.catch_up() == 0 and first.publish(old)
    finally:
        first.close()
    sent: list[tuple[int, int]] = []
    restarted = CoresetPublisher(cfg, True, topic, WORKER, on_publish=lambda up, tomb: sent.append((up, tomb)))
    try:
        assert restarted.catch_up() == len(old)
        assert restarted.publish(new)
    finally:
        restarted.close()
    assert sent == [(20 + 5 + 1, 20 + 5)]  # new members and validation samples + counters; what left
    view = read_view(broker, topic)
    assert view.owned_by(WORKER) == new
    assert view.members == {i: orjson.loads(new[record_key("m", i)]) for i in range(20, 60)}

    # negative control: a restart that does not read what the topic holds leaves the evicted members in it
    forgetful = CoresetPublisher(cfg, True, topic, WORKER)
    try:
        assert forgetful.publish(state(range(50, 70)))
    finally:
        forgetful.close()
    assert set(read_view(broker, topic).members) != set(range(50, 70))


def test_a_publish_during_a_broker_outage_fails_is_counted_and_the_next_one_sends_it(tmp_path: Path) -> None:
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:  # its own broker: this test freezes it
        topic = "coreset"
        cfg = kafka_settings(broker, topic).stream
        ensure_topic(cfg, True, topic, 1, {"cleanup.policy": "compact"})
        failures: list[BaseException] = []
        publisher = CoresetPublisher(cfg, True, topic, WORKER, on_failure=failures.append)
        try:
            assert publisher.publish(state(range(10)))
            assert broker.process is not None
            broker.process.send_signal(signal.SIGSTOP)
            try:
                assert not publisher.publish(state(range(5, 15)), timeout_s=2.0)
            finally:
                broker.process.send_signal(signal.SIGCONT)
            assert len(failures) == 1
            # members 10-14 of the failed publish reach the broker once it thaws, unconfirmed: when they
            # have left by the next publish, that publish must still tombstone them
            time.sleep(1.0)
            assert publisher.publish(state(range(15, 20)))
            assert read_view(broker, topic).owned_by(WORKER) == state(range(15, 20))
            assert publisher.publish(state(range(5, 20)))
        finally:
            publisher.close()
        assert read_view(broker, topic).owned_by(WORKER) == state(range(5, 20))


def committed(db: Path) -> tuple[dict[int, tuple[float, int, int]], list[Sample], dict[str, object]]:
    conn = sqlite3.connect(db)
    try:
        members = {int(a): (float(b), int(c), int(d)) for a, b, c, d in
                   conn.execute("SELECT sample_id, score, stratum, version FROM coreset_members")}
    finally:
        conn.close()
    selection = read_selection_state(db)
    assert selection is not None
    offered = selection.part("selector").meta["stats"]["offered"]
    counters = {"offered": offered, "samples": offered + selection.part("validation").meta["seen"],
                "drift": selection.meta["last_drift"]}
    return members, read_validation(db), counters


@pytest.mark.slow
def test_the_service_publishes_its_committed_coreset_and_a_restart_carries_on(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    from recsift import service

    topic, coreset_topic = make_topic(2), make_topic(1, prefix="coreset")
    payloads = list(SyntheticStream(SyntheticConfig(events=8000, users=200, items=150)).payloads())
    cfg = kafka_settings(broker, topic, tmp_path, **{
        "stream.coreset_topic": coreset_topic, "stream.worker_id": WORKER, "stream.stop_when_idle_s": 3.0,
        "scoring.batch_size": 500, "scoring.scorer.depth": 20, "selection.budget": 64,
        "selection.validation_size": 50, "trainer.refresh_interval_s": None,
        "trainer.drift_thresholds": {"target_js": 1e9, "embedding_sw": 1e9},  # no refresh: not what is tested
        "checkpoint.interval_events": 1000})  # several checkpoints a run: members leave between publishes
    db = tmp_path / "state" / "recsift.sqlite"
    for part in (payloads[:5000], payloads[5000:]):  # the second run restarts on the first one's state
        produce_events(cfg.stream, True, part, topic)  # (user key, payload) pairs
        metrics = Metrics()
        service.run(cfg, metrics=metrics)
        members, validation, counters = committed(db)
        view = read_view(broker, coreset_topic)
        assert len(members) == 64 and len(validation) == 50
        assert {i: (b["score"], b["stratum"], b["version"]) for i, b in view.members.items()} == members
        assert view.validation_samples() == validation  # the same samples, oldest first
        assert view.workers[WORKER] == {"worker": WORKER, "members": 64, "validation": 50, **counters}
        assert counters["drift"] is not None  # the stage measured drift: what a trainer's drift trigger reads
        assert view.invalid == 0
        assert metrics.registry.get_sample_value("recsift_coreset_topic_records_total", {"kind": "tombstone"}) > 0
        assert metrics.registry.get_sample_value("recsift_coreset_topic_publish_failures_total") == 0


def partition_state(worker: str, members: dict[int, range]) -> dict[bytes, bytes]:
    """A worker's records with these members per partition."""
    held = [(sample(i)._replace(partition=p), 0.5, i % 4, 1) for p, ids in members.items() for i in ids]
    return coreset_records(worker, held, (), offered=len(held))


@pytest.mark.parametrize("adopts", [True, False])
def test_a_moved_partition_s_members_are_answered_for_by_its_new_owner(
    broker: EmbeddedBroker, make_topic: Callable[..., str], adopts: bool
) -> None:
    """Worker a publishes partitions 0 and 1; partition 1 moves to worker b, whose reservoir for it no longer
    holds 10-14. b reads the partition's members before its first publish and tombstones them; a, having
    released partition 1, leaves b's members alone. The control (``adopts=False``, b never reads what the
    topic holds for its new partition) leaves a's stale members in the topic: the coreset exceeds its budget."""
    topic = make_topic(1)
    cfg = kafka_settings(broker, topic).stream
    a = CoresetPublisher(cfg, True, topic, "a", partitioned=True)
    b = CoresetPublisher(cfg, True, topic, "b", partitioned=True)
    try:
        assert a.catch_up() == 0
        a.adopt({0, 1})
        assert a.publish(partition_state("a", {0: range(0, 10), 1: range(10, 20)}))
        assert b.catch_up() == 0  # b holds nothing of its own yet: a's members are not b's
        if adopts:
            b.adopt({1})
        a.release({1})
        assert b.publish(partition_state("b", {1: range(15, 25)}))
        assert a.publish(partition_state("a", {0: range(0, 10)}))
    finally:
        a.close()
        b.close()
    members = read_view(broker, topic).members
    if not adopts:
        assert set(range(10, 15)) <= set(members)  # stale: 35 members where the partitions hold 20
        return
    assert set(members) == set(range(0, 10)) | set(range(15, 25))
    assert {i: m["worker"] for i, m in members.items() if m["partition"] == 1} == dict.fromkeys(range(15, 25), "b")


def test_a_reader_part_way_through_a_publish_never_sees_more_members_than_the_budget() -> None:
    """A trainer polls the topic while a worker publishes, and a worker killed mid-publish leaves a prefix of
    its records: every prefix of the records that replace 40 members by 40 others holds at most 40. The control,
    values before tombstones, passes through 60."""

    def worst(records: list[tuple[bytes, bytes | None]]) -> int:
        view = CoresetView()
        for key, value in old.items():
            view.apply(key, value)
        most = len(view.members)
        for key, value in records:
            view.apply(key, value)
            most = max(most, len(view.members))
        return most

    old, new = state(range(0, 40)), state(range(20, 60))
    assert worst(changes(old, new)) == 40
    values_first = sorted(changes(old, new), key=lambda kv: kv[1] is None)  # upserts, then tombstones
    assert worst(values_first) == 60
