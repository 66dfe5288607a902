"""Kafka (kafka-python): client settings, topic creation, the consumer-group source and the producer side
of ``recsift replay``.

:class:`KafkaSource` hands out records and never commits on its own: the pipeline commits offsets only
after its checkpoint transaction (see :mod:`recsift.stream.checkpoint`). Partition assignment is reported
to the pipeline through two callbacks so that it can checkpoint before a partition is revoked and restore
state (and the checkpoint's offsets) when one is assigned.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Any

from recsift.config import StreamConfig
from recsift.stream.events import Event
from recsift.stream.sources import SourceRecord

log = logging.getLogger(__name__)


def kafka_client_config(cfg: StreamConfig, embedded: bool) -> dict[str, Any]:
    """Connection settings shared by consumers, producers and admin clients."""
    conf: dict[str, Any] = {"bootstrap_servers": cfg.bootstrap_servers.split(","), "security_protocol": cfg.security_protocol}
    if cfg.sasl_mechanism is not None:
        conf["sasl_mechanism"] = cfg.sasl_mechanism
        conf["sasl_plain_username"] = cfg.sasl_username
        conf["sasl_plain_password"] = cfg.sasl_password.get_secret_value() if cfg.sasl_password else None
    if cfg.ssl_cafile is not None:
        conf["ssl_cafile"] = str(cfg.ssl_cafile)
    return conf


def consumer_timeouts(cfg: StreamConfig, embedded: bool) -> dict[str, int]:
    """Group timeouts. The embedded tansu broker holds a first group join for about half the session
    timeout, so it gets a short one; against real Kafka the defaults stay within the broker's limits (≥ 6 s)."""
    session = cfg.session_timeout_ms or (2000 if embedded else 10_000)
    heartbeat = cfg.heartbeat_interval_ms or (500 if embedded else 3000)
    return {"session_timeout_ms": session, "heartbeat_interval_ms": min(heartbeat, session // 3)}


def ensure_topic(cfg: StreamConfig, embedded: bool, topic: str, partitions: int,
                 configs: dict[str, str] | None = None) -> None:
    """Create ``topic`` with ``partitions`` partitions (and topic ``configs``) unless it exists."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(**kafka_client_config(cfg, embedded), client_id="recsift-admin")
    try:
        if topic not in admin.list_topics():
            admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=configs or {})])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


def topic_partitions(cfg: StreamConfig, embedded: bool, topic: str, timeout_ms: int = 5000) -> int:
    """How many partitions ``topic`` has (0 when the broker does not know it); a broker that cannot be
    reached within ``timeout_ms`` raises ``KafkaTimeoutError`` (the default would wait 30 s)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(**kafka_client_config(cfg, embedded), group_id=None, enable_auto_commit=False,
                             bootstrap_timeout_ms=timeout_ms)
    try:
        return len(consumer.partitions_for_topic(topic) or ())
    finally:
        consumer.close()


class KafkaSource:
    """A member of consumer group ``group_id`` reading ``topic``; auto-commit off, offsets committed by the pipeline."""

    def __init__(
        self,
        cfg: StreamConfig,
        embedded: bool,
        on_assign: Callable[[set[int]], dict[int, int]],
        on_revoke: Callable[[set[int], bool], None],
    ) -> None:
        from kafka import ConsumerRebalanceListener, KafkaConsumer

        self.cfg = cfg
        self.topic = cfg.topic
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._paused = False
        self._in_callback = False
        self._session_s = consumer_timeouts(cfg, embedded)["session_timeout_ms"] / 1000.0
        self.consumer = KafkaConsumer(
            **kafka_client_config(cfg, embedded),
            **consumer_timeouts(cfg, embedded),
            group_id=cfg.group_id,
            client_id=f"recsift-{cfg.group_id}",
            enable_auto_commit=False,
            auto_offset_reset=cfg.auto_offset_reset,
            max_poll_records=cfg.poll_max_records,
            max_partition_fetch_bytes=max(1 << 20, cfg.max_message_bytes * 4),
        )
        source = self

        # The listener runs inside poll()/close() (the caller is blocked meanwhile, so pipeline state is safe
        # to touch); kafka-python 3 runs it on its IO thread, where blocking consumer calls are refused, so
        # commits made from inside it go out asynchronously (see commit()).
        class _Listener(ConsumerRebalanceListener):
            def _revoke(self, revoked: Iterable[Any], lost: bool) -> None:
                parts = {tp.partition for tp in revoked if tp.topic == source.topic}
                if parts:
                    source._in_callback = True
                    try:
                        source._on_revoke(parts, lost)
                    finally:
                        source._in_callback = False

            def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
                self._revoke(revoked, lost=False)

            def on_partitions_lost(self, lost: Iterable[Any]) -> None:
                self._revoke(lost, lost=True)

            def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
                tps = [tp for tp in assigned if tp.topic == source.topic]
                source._in_callback = True
                try:
                    offsets = source._on_assign({tp.partition for tp in tps})
                finally:
                    source._in_callback = False
                for tp in tps:
                    if tp.partition in offsets:
                        source.consumer.seek(tp, offsets[tp.partition])
                if source._paused and tps:
                    source.consumer.pause(*tps)

        self.consumer.subscribe([cfg.topic], listener=_Listener())

    def poll(self, max_records: int, timeout_ms: int) -> list[SourceRecord]:
        """kafka-python's ConsumerRecords, handed on as they are: they have SourceRecord's fields
        (partition, offset, key, value), and copying them would cost a measurable share of the ingest rate."""
        batches = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        return list(chain.from_iterable(batches.values()))

    def assignment(self) -> set[int]:
        return {tp.partition for tp in self.consumer.assignment() if tp.topic == self.topic}

    def commit(self, offsets: dict[int, int]) -> bool | None:
        """Commit offsets of owned partitions to Kafka. False when the group is rebalancing (the checkpoint
        already holds them, so nothing is lost: the next owner seeks to the checkpoint's offsets)."""
        from kafka import TopicPartition
        from kafka.errors import CommitFailedError, KafkaError
        from kafka.structs import OffsetAndMetadata

        owned = self.assignment()
        todo = {TopicPartition(self.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items() if p in owned}
        if not todo:
            return True
        if self._in_callback:  # asynchronous: a failure is logged when the broker answers
            self.consumer.commit_async(todo, callback=_log_commit_failure)
            return None
        try:
            self.consumer.commit(todo, timeout_ms=int(self._session_s * 1000))  # bounded: a broker outage must not hang
            return True
        except (CommitFailedError, KafkaError) as exc:
            log.warning("offset commit to Kafka failed (%s); the checkpoint holds the offsets", type(exc).__name__)
            return False

    def pause(self) -> None:
        self._paused = True
        self.consumer.pause(*self.consumer.assignment())

    def resume(self) -> None:
        self._paused = False
        self.consumer.resume(*self.consumer.paused())

    @property
    def paused(self) -> bool:
        return self._paused

    def heartbeat_age(self) -> float:
        """Seconds since the last heartbeat the group coordinator answered (inf before the first).
        It grows during a broker outage or a network partition, whether connections are refused or hang."""
        coordinator = self.consumer.metrics().get("consumer-coordinator-metrics", {})
        age = coordinator.get("last-heartbeat-seconds-ago")
        return float(age) if age is not None else math.inf

    def connected(self) -> bool:
        """True while heartbeats reach the broker within the session timeout."""
        return self.heartbeat_age() <= self._session_s

    def lag(self, processed: dict[int, int]) -> dict[int, int]:
        """Records behind the log end per owned partition, counted from ``processed`` (next offset to
        process; the consumer's position where absent). The high-water mark comes from fetch responses
        (``highwater``), which is right on every broker; ``end_offsets`` is only a fallback before the first
        fetch (tansu reports the last batch's base offset + 1 there, not the high-water mark)."""
        from kafka.errors import KafkaError

        tps = [tp for tp in self.consumer.assignment() if tp.topic == self.topic]
        missing = [tp for tp in tps if self.consumer.highwater(tp) is None]
        ends: dict[Any, int] = {}
        if missing:
            try:
                ends = self.consumer.end_offsets(missing)
            except KafkaError:
                ends = {}
        out = {}
        for tp in tps:
            high = self.consumer.highwater(tp)
            high = ends.get(tp) if high is None else high
            if high is None:
                continue
            try:
                position = processed[tp.partition] if tp.partition in processed else self.consumer.position(tp, timeout_ms=1000)
            except KafkaError:
                continue
            out[tp.partition] = max(0, high - position)
        return out

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def _log_commit_failure(offsets: Any, response: Any) -> None:
    if isinstance(response, Exception):
        log.warning("asynchronous offset commit failed (%s); the checkpoint holds the offsets", response)


def produce_events(
    cfg: StreamConfig,
    embedded: bool,
    payloads: Iterable[tuple[bytes | None, bytes]],
    topic: str,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Produce (key, value) pairs to ``topic``, as fast as possible or at ``rate`` events/s. Returns the count."""
    from kafka import KafkaProducer

    producer = KafkaProducer(
        **kafka_client_config(cfg, embedded), linger_ms=20, batch_size=256 * 1024, acks=1, enable_idempotence=False
    )
    started = time.monotonic()
    n = 0
    try:
        for key, value in payloads:
            producer.send(topic, key=key, value=value)
            n += 1
            if rate is not None:
                ahead = n / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            if progress is not None and n % 10_000 == 0:
                progress(n)
        producer.flush()
    finally:
        producer.close()
    if progress is not None:
        progress(n)
    return n


def keyed(payloads: Iterable[bytes | Event]) -> Iterator[tuple[bytes | None, bytes]]:
    """(user-id key, payload) pairs: the user id is the message key so a user's events share a partition."""
    for p in payloads:
        if isinstance(p, Event):
            yield p.user_id.encode(), p.encode()
            continue
        try:
            user = json.loads(p).get("user_id")
            key = str(user).encode() if user is not None else None
        except (ValueError, AttributeError):
            key = None
        yield key, p
