"""The coreset topic: a worker's committed coreset and validation reservoir as a compacted Kafka topic.

Every record is keyed by what it describes, so the topic compacts to the current state:

- ``m:<sample id>`` a coreset member: ``{"worker", "sample", "score", "stratum", "version", "partition"}``
  (the source partition whose reservoir holds it);
- ``v:<sample id>`` a validation sample: ``{"worker", "sample", "seq", "partition"}`` (read in
  :func:`~recsift.selection.validation.validation_order`: event time, then ``seq``);
- ``w:<worker id>`` the worker's counters: ``{"worker", "members", "validation", "offered", "samples",
  "drift"}`` (samples the selection stage saw; its last drift report, or null);
- a key with no value (a tombstone) removes a member or validation sample that left.

Ordering rule (the checkpoint's, extended): the checkpoint transaction commits, *then* the difference
between the committed state and what the topic holds for this worker is produced and flushed, *then*
offsets go to Kafka. The difference is computed from state, not from events, so a crash or a broker
outage between the steps costs nothing: the next publish sends whatever is still missing. On start the
publisher reads the topic to learn what it holds for this worker (:meth:`CoresetPublisher.catch_up`).

With partitioned selection (workers of one group, :mod:`recsift.selection.partitioned`) a worker answers
for the members and validation samples of the partitions it owns, whoever wrote them: when a partition is
assigned it learns the partition's records from the topic before its next publish
(:meth:`CoresetPublisher.adopt`), so those the previous owner published and the partition's reservoirs no
longer hold are tombstoned; when a partition is revoked it forgets them without a tombstone
(:meth:`CoresetPublisher.release`): they are the next owner's.

Readers (a trainer on another host) rebuild the state with :class:`CoresetView`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from recsift.config import StreamConfig
from recsift.selection.validation import validation_order
from recsift.stream.kafka import kafka_client_config
from recsift.stream.windows import Sample

log = logging.getLogger(__name__)

MEMBER, VALIDATION, WORKER = "m", "v", "w"
UNCONFIRMED = b""  # a value sent but not acknowledged; equal to no encoded record, so it is always re-sent


def record_key(kind: str, ident: int | str) -> bytes:
    return f"{kind}:{ident}".encode()


def parse_key(key: bytes) -> tuple[str, str]:
    """(kind, id) of a record key; ``ValueError`` for a key that is not one of the topic's."""
    kind, sep, ident = key.decode().partition(":")
    if not sep or kind not in (MEMBER, VALIDATION, WORKER) or not ident:
        raise ValueError(f"not a coreset topic key: {key!r}")
    return kind, ident


@dataclass
class CoresetView:
    """The current state of a coreset topic, rebuilt from its records (last value per key wins)."""

    members: dict[int, dict[str, Any]] = field(default_factory=dict)
    validation: dict[int, dict[str, Any]] = field(default_factory=dict)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    invalid: int = 0  # records that are not the topic's (counted, skipped)

    def apply(self, key: bytes | None, value: bytes | None) -> str | None:
        """Apply one record; returns its kind, or None for a record that is not the topic's."""
        try:
            if key is None:
                raise ValueError("no key")
            kind, ident = parse_key(key)
            body = None if value is None else orjson.loads(value)
            if body is not None and not isinstance(body, dict):
                raise ValueError("not a JSON object")
            if kind == WORKER:
                table: dict[Any, dict[str, Any]] = self.workers
                k: int | str = ident
                if body is not None:
                    int(body.get("samples", 0))
                    if not isinstance(body.get("drift") or {}, dict):
                        raise ValueError("drift is not an object")
            else:
                table, k = (self.members if kind == MEMBER else self.validation), int(ident)
                if body is not None:  # a value that does not decode is rejected whole
                    Sample.from_json(body["sample"])
                    if kind == MEMBER:
                        float(body["score"]), int(body["stratum"]), int(body["version"])
                    else:
                        int(body["seq"])
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            self.invalid += 1
            log.warning("skipped a record that is not a coreset topic record (%s)", exc)
            return None
        if body is None:
            table.pop(k, None)
        else:
            table[k] = body
        return kind

    def owned_by(self, worker: str, members: bool = True) -> dict[bytes, bytes]:
        """key → encoded value of every live record this worker wrote (its members and validation samples too,
        unless ``members`` is false: with partitioned selection those belong to their partition's owner)."""
        out: dict[bytes, bytes] = {}
        tables = ((MEMBER, self.members), (VALIDATION, self.validation), (WORKER, self.workers))
        for kind, table in tables if members else tables[2:]:
            for ident, body in table.items():
                if body.get("worker") == worker:
                    out[record_key(kind, ident)] = orjson.dumps(body)
        return out

    def partition_records(self, partitions: set[int]) -> dict[bytes, bytes]:
        """key → encoded value of every live member and validation sample of these source partitions (a
        record with no partition was written before records carried one: partition 0)."""
        return {record_key(kind, ident): orjson.dumps(body)
                for kind, table in ((MEMBER, self.members), (VALIDATION, self.validation))
                for ident, body in table.items() if int(body.get("partition", 0)) in partitions}

    def member_samples(self) -> list[tuple[Sample, float, int, int]]:
        """(sample, score, stratum, scorer version) of every member, by sample id."""
        return [(Sample.from_json(b["sample"]), float(b["score"]), int(b["stratum"]), int(b["version"]))
                for _, b in sorted(self.members.items())]

    def validation_samples(self) -> list[Sample]:
        """The validation samples, oldest first (:func:`~recsift.selection.validation.validation_order`)."""
        rows = [(Sample.from_json(b["sample"]), int(b["seq"])) for b in self.validation.values()]
        return [sample for sample, _ in sorted(rows, key=validation_order)]


def coreset_records(worker: str, members: Iterable[tuple[Sample, float, int, int]],
                    validation: Iterable[tuple[Sample, int]], offered: int, samples: int | None = None,
                    drift: dict[str, float] | None = None) -> dict[bytes, bytes]:
    """key → encoded value of a worker's whole coreset state (members as (sample, score, stratum,
    version); validation samples as (sample, sequence number)); the worker's counters carry the samples
    the selection stage has seen and its last drift report, which a trainer's scheduler acts on."""
    out: dict[bytes, bytes] = {}
    n_members = n_validation = 0
    for sample, score, stratum, version in members:
        out[record_key(MEMBER, sample.sample_id)] = orjson.dumps(
            {"worker": worker, "sample": sample.to_json(), "score": float(score), "stratum": int(stratum),
             "version": int(version), "partition": sample.partition})
        n_members += 1
    for sample, seq in validation:
        out[record_key(VALIDATION, sample.sample_id)] = orjson.dumps(
            {"worker": worker, "sample": sample.to_json(), "seq": int(seq), "partition": sample.partition})
        n_validation += 1
    out[record_key(WORKER, worker)] = orjson.dumps(
        {"worker": worker, "members": n_members, "validation": n_validation, "offered": int(offered),
         "samples": int(offered if samples is None else samples), "drift": drift})
    return out


def changes(published: Mapping[bytes, bytes], current: Mapping[bytes, bytes]) -> list[tuple[bytes, bytes | None]]:
    """The records that turn ``published`` into ``current``: tombstones for what left, then new or changed
    values. Tombstones first, so that a reader part-way through them (a trainer polling, or a publish cut short
    by a crash) never sees more members than the budget: evictions land before the members that replaced them."""
    tombstones: list[tuple[bytes, bytes | None]] = [(k, None) for k in published if k not in current]
    upserts = [(k, v) for k, v in current.items() if published.get(k) != v]
    return tombstones + upserts


class CoresetTopicReader:
    """Reads a coreset topic from the beginning, without a consumer group, into a :class:`CoresetView`."""

    def __init__(self, cfg: StreamConfig, embedded: bool, topic: str, view: CoresetView | None = None) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.view = view if view is not None else CoresetView()
        self.consumer = KafkaConsumer(**kafka_client_config(cfg, embedded), enable_auto_commit=False, group_id=None)
        parts = self.consumer.partitions_for_topic(topic) or {0}
        self.consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        self.consumer.seek_to_beginning()

    def poll(self, timeout_ms: int = 0) -> int:
        """Apply the records that arrived; returns how many were read (those that are not the topic's
        are counted in the view's ``invalid``)."""
        n = 0
        for recs in self.consumer.poll(timeout_ms=timeout_ms).values():
            for r in recs:
                n += 1
                self.view.apply(r.key, r.value)
        return n

    def catch_up(self, timeout_s: float = 30.0) -> int:
        """Read to every partition's end as of now; ``TimeoutError`` when that takes over ``timeout_s``.

        The end is where the reported end offsets are *and* a poll brings nothing more: tansu reports the
        base offset of a partition's last batch as its end offset, so the end offset alone would stop
        short of that batch (measured: end offset 431 with records up to offset 503)."""
        deadline = time.monotonic() + timeout_s
        end = self.consumer.end_offsets(list(self.consumer.assignment()))
        n = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the coreset topic was not read to its end within {timeout_s:.0f} s")
            got = self.poll(200)
            n += got
            if not got and all(self.consumer.position(tp) >= off for tp, off in end.items()):
                return n

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class CoresetPublisher:
    """Keeps a worker's records in the coreset topic equal to its committed coreset state.

    :meth:`publish` sends the difference between ``current`` and what the topic holds for this worker
    and flushes; a failure (broker away) is counted and logged, and the next publish retries it."""

    def __init__(self, cfg: StreamConfig, embedded: bool, topic: str, worker: str,
                 on_publish: Callable[[int, int], object] | None = None,
                 on_failure: Callable[[BaseException], object] | None = None, partitioned: bool = False) -> None:
        from kafka import KafkaProducer

        self.topic, self.worker, self.partitioned = topic, worker, partitioned
        self.cfg, self.embedded = cfg, embedded
        self.published: dict[bytes, bytes] = {}
        self.partition_of: dict[bytes, int] = {}  # member/validation key → its partition (partitioned)
        self.to_adopt: set[int] = set()  # assigned partitions whose members are not yet read from the topic
        self.on_publish, self.on_failure = on_publish, on_failure
        self.producer = KafkaProducer(**kafka_client_config(cfg, embedded), acks="all", linger_ms=5,
                                      max_in_flight_requests_per_connection=1,  # a key's records stay in order
                                      enable_idempotence=False, max_block_ms=10_000)

    def _read(self, timeout_s: float) -> CoresetView:
        reader = CoresetTopicReader(self.cfg, self.embedded, self.topic)
        try:
            reader.catch_up(timeout_s)
        finally:
            reader.close()
        return reader.view

    def catch_up(self, timeout_s: float = 30.0) -> int:
        """Learn what the topic holds for this worker (read it to its end); returns the record count."""
        self.published = self._read(timeout_s).owned_by(self.worker, members=not self.partitioned)
        return len(self.published)

    def adopt(self, partitions: set[int]) -> None:
        """These partitions were assigned: their members in the topic are this worker's to keep equal to its
        state from the next publish on (read then, so a broker away now costs a retry, not the assignment)."""
        self.to_adopt |= partitions

    def release(self, partitions: set[int]) -> None:
        """These partitions were revoked: their members are the next owner's (no tombstones from here)."""
        self.to_adopt -= partitions
        for key in [k for k, p in self.partition_of.items() if p in partitions]:
            self.published.pop(key, None)
            del self.partition_of[key]

    def _learn_adopted(self, timeout_s: float) -> None:
        for key, value in self._read(timeout_s).partition_records(self.to_adopt).items():
            self.published[key] = value
            self._track(key, value)
        self.to_adopt = set()

    def _track(self, key: bytes, value: bytes) -> None:
        """Remember the partition of a member or validation record (partitioned selection: ``release``
        forgets a revoked partition's records); a record with no partition predates them: partition 0."""
        if self.partitioned and not key.startswith(b"w:"):
            self.partition_of[key] = int(orjson.loads(value).get("partition", 0))

    def publish(self, current: Mapping[bytes, bytes], timeout_s: float = 30.0) -> bool:
        """Produce the changes and wait for the broker to acknowledge them; False when it did not."""
        if self.to_adopt:
            try:
                self._learn_adopted(timeout_s)
            except Exception as exc:  # the broker away: this publish waits for the next checkpoint
                log.warning("coreset topic %r: cannot read the members of assigned partitions (%s); the next "
                            "checkpoint retries", self.topic, exc)
                if self.on_failure is not None:
                    self.on_failure(exc)
                return False
        todo = changes(self.published, current)
        if not todo:
            return True
        try:
            futures = [(k, v, self.producer.send(self.topic, key=k, value=v)) for k, v in todo]
            self.producer.flush(timeout=timeout_s)
            for k, v, fut in futures:
                fut.get(timeout=timeout_s)  # raises the send's error
                if v is None:
                    self.published.pop(k, None)
                    self.partition_of.pop(k, None)
                else:
                    self.published[k] = v
                    self._track(k, v)
        except Exception as exc:  # a broker outage must not stop the worker: the next publish retries
            # what was sent and not confirmed may still land: the next publish must treat those keys as
            # possibly held (resend the value, or tombstone a key that has left since)
            for k, v in todo:
                if v is not None and self.published.get(k) != v:
                    self.published[k] = UNCONFIRMED
                    self._track(k, v)
            log.warning("coreset topic %r: publish failed (%s); the next checkpoint retries it", self.topic, exc)
            if self.on_failure is not None:
                self.on_failure(exc)
            return False
        if self.on_publish is not None:
            self.on_publish(sum(v is not None for _, v in todo), sum(v is None for _, v in todo))
        return True

    def close(self) -> None:
        self.producer.close(timeout=5)
