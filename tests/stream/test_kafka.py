"""Ingestion through a real Kafka-protocol broker (tansu): bad input, rebalances, backpressure, lag, replay."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from recsift.cli import main
from recsift.config import SyntheticConfig
from recsift.data.synthetic import SyntheticStream
from recsift.monitoring.metrics import Metrics
from recsift.service import Ingest
from recsift.stream.broker import EmbeddedBroker
from recsift.stream.catalog import Catalog, Item
from recsift.stream.deadletter import dead_letter_payload
from recsift.stream.kafka import keyed, produce_events
from recsift.stream.windows import Batch, sample_id_for
from recsift.vocab import RejectReason
from tests.helpers import kafka_settings


def read_topic(broker: EmbeddedBroker, topic: str, expected: int, timeout_s: float = 30.0) -> list:  # type: ignore[type-arg]
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=None, enable_auto_commit=False)
    parts = consumer.partitions_for_topic(topic) or set()
    consumer.assign([TopicPartition(topic, p) for p in parts])
    consumer.seek_to_beginning()
    out: list = []  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout_s
    while len(out) < expected and time.monotonic() < deadline:
        for recs in consumer.poll(timeout_ms=300).values():
            out.extend(recs)
    time.sleep(0.3)
    for recs in consumer.poll(timeout_ms=300).values():  # anything beyond `expected` would be a bug
        out.extend(recs)
    consumer.close()
    return out


def journal(ingest: Ingest) -> list[int]:
    return [r[0] for r in ingest.checkpoint.conn.execute("SELECT sample_id FROM journal")]


@pytest.mark.parametrize("fetch_process", [True, False], ids=["fetch-process", "in-process"])
def test_bad_input_is_dead_lettered_with_reasons_and_valid_events_all_yield_samples(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path, fetch_process: bool
) -> None:
    topic = make_topic(3)
    catalog = Catalog(Item(f"i{i}", f"Item {i}") for i in range(50))
    valid = [
        {"event_id": f"v{k}", "user_id": f"u{k % 37}", "item_id": f"i{(k * 7) % 50}", "timestamp": 1_700_000_000 + k}
        for k in range(1200)
    ]
    bad: list[tuple[bytes, RejectReason]] = [
        (b"{this is not json", RejectReason.MALFORMED_JSON),
        (b"\xff\xfe\xfd", RejectReason.MALFORMED_JSON),
        (b'"just a string"', RejectReason.MALFORMED_JSON),
        (json.dumps({"event_id": "m1", "item_id": "i1", "timestamp": 1}).encode(), RejectReason.MISSING_FIELD),
        (json.dumps({"event_id": "m2", "user_id": "u1", "item_id": "i1"}).encode(), RejectReason.MISSING_FIELD),
        (json.dumps({"event_id": "x1", "user_id": "u1", "item_id": "i1", "timestamp": "soon"}).encode(), RejectReason.INVALID_FIELD),
        (json.dumps({"event_id": "x2", "user_id": [1], "item_id": "i1", "timestamp": 1}).encode(), RejectReason.INVALID_FIELD),
        (json.dumps({"event_id": "o1", "user_id": "u1", "item_id": "i1", "timestamp": 1, "pad": "x" * 5000}).encode(), RejectReason.OVERSIZE),
        (json.dumps({"event_id": "k1", "user_id": "u1", "item_id": "nope", "timestamp": 1_700_000_000}).encode(), RejectReason.UNKNOWN_ITEM),
        (json.dumps(valid[10]).encode(), RejectReason.DUPLICATE),
        (json.dumps(valid[500]).encode(), RejectReason.DUPLICATE),
    ]
    raw: list[bytes] = []
    bad_iter = iter(bad)
    for k, v in enumerate(valid):
        raw.append(json.dumps(v).encode())
        if k % 100 == 99:  # sprinkle the bad ones through the stream, after the originals of the duplicates
            b = next(bad_iter, None)
            if b is not None:
                raw.append(b[0])
    raw.extend(b[0] for b in bad_iter)
    # keyed by user id like every producer of this topic (a retried duplicate keeps its key)
    produce_events(kafka_settings(broker, topic).stream, True, keyed(raw), topic)

    cfg = kafka_settings(broker, topic, tmp_path, **{
        "stream.stop_when_idle_s": 3.0, "stream.max_message_bytes": 2048, "stream.unknown_items": "reject",
        "checkpoint.journal_samples": True, "stream.fetch_process": fetch_process,
    })
    metrics = Metrics()
    ingest = Ingest(cfg, metrics, catalog)
    summary = ingest.pipeline.run(ingest.source())

    assert summary.consumed == len(valid) + len(bad)
    expected_reasons = Counter(r.value for _, r in bad)
    assert {k: v for k, v in summary.rejected.items() if v} == dict(expected_reasons)
    for reason in RejectReason:
        assert metrics.registry.get_sample_value("recsift_events_rejected_total", {"reason": reason.value}) == expected_reasons[reason.value]
    # every valid event of a user that already had history yields exactly its sample
    seen: set[str] = set()
    expected_samples = []
    for v in valid:
        if v["user_id"] in seen:
            expected_samples.append(sample_id_for(v["user_id"], v["event_id"]))
        seen.add(v["user_id"])
    got = journal(ingest)
    assert sorted(got) == sorted(expected_samples) and len(set(got)) == len(got)
    ingest.close()

    dead = read_topic(broker, cfg.stream.dead_letter_topic, len(bad))
    records = [json.loads(r.value) for r in dead]
    assert sorted((dead_letter_payload(r), r["reason"]) for r in records) == sorted((p, r.value) for p, r in bad)
    assert all(r["source"]["topic"] == topic and r["detail"] for r in records)


def run_in_thread(ingest: Ingest) -> threading.Thread:
    t = threading.Thread(target=ingest.pipeline.run, args=(ingest.source(),), daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_two_consumers_split_partitions_and_a_rebalance_loses_nothing(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = make_topic(4)
    stream = SyntheticStream(SyntheticConfig(seed=3, users=300, items=200, events=24_000))
    catalog = stream.catalog()
    producer = threading.Thread(
        target=produce_events, args=(kafka_settings(broker, topic).stream, True, stream.payloads(), topic, 4000.0)
    )
    producer.start()
    opts = {"stream.stop_when_idle_s": 4.0, "checkpoint.journal_samples": True, "checkpoint.interval_events": 2000}
    cfg = kafka_settings(broker, topic, tmp_path / "group", **opts)
    a, b = Ingest(cfg, Metrics(), catalog), Ingest(cfg, Metrics(), catalog)
    ta = run_in_thread(a)
    deadline = time.monotonic() + 30
    while a.pipeline.summary.consumed < 3000 and time.monotonic() < deadline:
        time.sleep(0.05)
    tb = run_in_thread(b)  # joins mid-stream: the group rebalances
    producer.join()
    ta.join(60)
    tb.join(60)
    assert not ta.is_alive() and not tb.is_alive()
    assert a.pipeline.summary.consumed > 0 and b.pipeline.summary.consumed > 0
    assert a.metrics.registry.get_sample_value("recsift_rebalances_total", {"outcome": "revoked"}) >= 1

    # reference: one consumer alone, its own group and state
    ref_cfg = kafka_settings(broker, topic, tmp_path / "ref", **{**opts, "stream.group_id": f"ref-{topic}"})
    ref = Ingest(ref_cfg, Metrics(), catalog)
    ref_summary = ref.pipeline.run(ref.source())
    assert ref_summary.consumed == 24_000
    assert a.pipeline.summary.consumed + b.pipeline.summary.consumed >= 24_000  # replays after revoke allowed

    got = journal(a)  # a and b share the database
    assert len(got) == len(set(got)), "a sample was emitted twice"
    assert sorted(got) == sorted(journal(ref))
    q = "SELECT partition, user_id, items FROM histories ORDER BY partition, user_id"
    assert a.checkpoint.conn.execute(q).fetchall() == ref.checkpoint.conn.execute(q).fetchall()
    assert a.checkpoint.offsets(topic) == ref.checkpoint.offsets(topic)
    for ingest in (a, b, ref):
        ingest.close()


def test_backpressure_pauses_and_resumes_without_loss(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = make_topic(2)
    stream = SyntheticStream(SyntheticConfig(seed=5, users=50, items=40, events=4000))
    produce_events(kafka_settings(broker, topic).stream, True, stream.payloads(), topic)
    handled: list[int] = []

    def slow(batch: Batch) -> None:
        time.sleep(0.0002 * len(batch))
        handled.extend(s.sample_id for s in batch)

    cfg = kafka_settings(broker, topic, tmp_path, **{
        "stream.stop_when_idle_s": 3.0, "stream.backpressure_high": 300, "stream.backpressure_low": 50,
        "stream.poll_max_records": 200, "window.max_batch": 50, "checkpoint.journal_samples": True,
    })
    ingest = Ingest(cfg, Metrics(), stream.catalog(), handlers=[slow], threaded=True)
    summary = ingest.pipeline.run(ingest.source())
    assert summary.consumed == 4000
    assert ingest.metrics.registry.get_sample_value("recsift_backpressure_pauses_total") >= 1
    assert sorted(handled) == sorted(journal(ingest)) and len(handled) == summary.samples
    ingest.close()


def test_consumer_lag_is_the_true_backlog_even_on_tansu(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = make_topic(1)
    stream = SyntheticStream(SyntheticConfig(seed=2, users=20, items=20, events=3000))
    produce_events(kafka_settings(broker, topic).stream, True, stream.payloads(), topic)
    cfg = kafka_settings(broker, topic, tmp_path, **{"stream.poll_max_records": 250})
    metrics = Metrics()
    ingest = Ingest(cfg, metrics, Catalog())
    summary = ingest.pipeline.run(ingest.source(), max_events=1000)
    assert summary.offsets == {0: 1000}
    assert metrics.registry.get_sample_value("recsift_consumer_lag_records", {"partition": "0"}) == 2000
    ingest.close()


def test_replay_command_keys_by_user_and_respects_the_rate(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = make_topic(2)
    path = tmp_path / "events.jsonl"
    events = SyntheticStream(SyntheticConfig(seed=9, users=10, items=10, events=300)).events()
    path.write_text("".join(e.encode().decode() + "\n" for e in events))
    started = time.monotonic()
    assert main(["replay", str(path), "--topic", topic, "--bootstrap-servers", broker.bootstrap_servers, "--rate", "1000"]) == 0
    assert time.monotonic() - started >= 0.25  # 300 events at 1000/s cannot take less than 0.3 s
    records = read_topic(broker, topic, 300)
    assert len(records) == 300
    assert all(json.loads(r.value)["user_id"].encode() == r.key for r in records)
    by_user: dict[bytes, set[int]] = {}
    for r in records:
        by_user.setdefault(r.key, set()).add(r.partition)
    assert all(len(parts) == 1 for parts in by_user.values())  # a user's events stay in one partition


def test_keyed_uses_the_user_id_and_survives_garbage() -> None:
    pairs = list(keyed([b'{"user_id": 7, "x": 1}', b"garbage", b"[]"]))
    assert pairs == [(b"7", b'{"user_id": 7, "x": 1}'), (None, b"garbage"), (None, b"[]")]


def test_record_framing_round_trips_keys_values_and_nulls() -> None:
    from recsift.stream.fetcher import decode_records, encode_records
    from recsift.stream.sources import SourceRecord

    records = [SourceRecord(0, 5, b"u1", b'{"a": 1}'), SourceRecord(2, 2**40, None, b""), SourceRecord(1, 0, b"", b"\xff\x00")]
    assert decode_records(encode_records(records)) == records
    assert decode_records(b"HEADER" + encode_records(records), 6) == records


def test_catalog_topic_feeds_unknown_item_checks(broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path) -> None:
    from recsift import service

    topic, catalog_topic = make_topic(1), make_topic(1, prefix="items")
    items = [json.dumps({"item_id": f"i{i}", "title": f"Game {i}", "genre": "x"}).encode() for i in range(5)]
    produce_events(kafka_settings(broker, topic).stream, True, [(None, p) for p in [*items, b"not an item"]], catalog_topic)
    events = [{"event_id": f"e{k}", "user_id": "u1", "item_id": f"i{k}", "timestamp": 1_700_000_000 + k} for k in range(8)]
    produce_events(kafka_settings(broker, topic).stream, True, keyed(json.dumps(e).encode() for e in events), topic)
    cfg = kafka_settings(broker, topic, tmp_path, **{
        "stream.catalog_topic": catalog_topic, "stream.unknown_items": "reject", "stream.stop_when_idle_s": 2.0,
    })
    summary = service.run(cfg).ingest
    assert summary.accepted == 5 and summary.rejected["unknown_item"] == 3  # i5, i6, i7 are not in the catalog
    assert summary.samples == 4


def test_the_catalog_reader_catches_up_on_a_topic_written_in_batches(broker: EmbeddedBroker, make_topic: Callable[..., str]) -> None:
    """catch_up reads every item of a topic written in several batches. It stops at the fetch responses'
    high-water mark, which tansu reports as the offset after the last record (unlike its ListOffsets
    answer, which the coreset reader must not trust: ``CoresetTopicReader.catch_up``)."""
    from recsift.stream.catalog import Catalog, CatalogTopicReader

    catalog_topic = make_topic(1, prefix="items")
    settings = kafka_settings(broker, catalog_topic).stream
    items = [json.dumps({"item_id": f"i{i}", "title": f"Game {i}"}).encode() for i in range(1200)]
    for start in range(0, len(items), 300):  # four separate batches
        produce_events(settings, True, [(None, p) for p in items[start:start + 300]], catalog_topic)
    reader = CatalogTopicReader(settings.model_copy(update={"catalog_topic": catalog_topic}), True, Catalog())
    try:
        assert reader.catch_up() == len(items)
        assert len(reader.catalog) == len(items) and reader.invalid == 0
    finally:
        reader.close()
