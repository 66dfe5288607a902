"""The stream state's changelog: a compacted topic that lets a partition's state move to another host.

This is the state-store changelog of Kafka Streams and quix-streams. Partition ``p`` of the changelog topic
holds the state of source partition ``p``: every key names one piece of it (the keys are in
:mod:`recsift.stream.checkpoint`: a user's history, the clock, the open windows, a dedup chunk, a journal
chunk), so the last value of every key is the partition's state, and compaction keeps only that. Stores of
the later stages join with keys of their own (:class:`~recsift.stream.checkpoint.PartitionStore`): the
samples waiting to be scored (``p``, :mod:`recsift.scoring.stage`) and the coreset reservoir (``s``,
:mod:`recsift.selection.store`).

**Writing** (inside the checkpoint transaction, see :mod:`recsift.stream.checkpoint`): the changes of every
owned partition are produced, each partition's followed by a *marker* ``o`` = ``{"writer", "offset"}`` (the
state directory that wrote it and the partition's next source offset); the transaction commits only after
the broker acknowledged them, and it records each partition's *position* (the changelog offset after its
marker). Records after a partition's last marker belong to a checkpoint that did not finish.

**Syncing** (when partitions are assigned, before their state is loaded), per partition:

- nothing after the local position: the local state is the changelog's state;
- a marker by another writer after it: the partition was processed elsewhere since. Its state is rebuilt
  from the changelog (the last value of every key up to the last marker) and replaces the local rows; its
  source offset comes from that marker (*restored*);
- otherwise only this directory's own records follow: a checkpoint whose transaction never committed. The
  local state stands and the run redoes that work, exactly as without a changelog (*repaired*).

Either way the records after the state that stands are then undone (each key gets back its value in that
state, or a tombstone), followed by a marker of this writer, so the changelog again ends in a whole
checkpoint. A partition with local state and no position yet (the changelog was switched on later, or its
topic is new) is first published whole.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import orjson

from recsift.config import StreamConfig
from recsift.stream.checkpoint import PartitionStore
from recsift.stream.kafka import kafka_client_config

log = logging.getLogger(__name__)

MARKER_KEY = b"o"

Records = list[tuple[bytes, bytes | None]]


class ChangelogUnavailable(RuntimeError):
    """The changelog topic could not be written or read (broker away, topic missing)."""


class LogRecord(NamedTuple):
    offset: int
    key: bytes
    value: bytes | None


def marker(writer: str, offset: int | None) -> bytes:
    return orjson.dumps({"writer": writer, "offset": offset})


def collapse(records: Iterable[LogRecord], last_offset: int) -> dict[bytes, bytes]:
    """The state the records up to ``last_offset`` describe: the last value of every key, markers left out."""
    state: dict[bytes, bytes] = {}
    for r in records:
        if r.offset > last_offset:
            break
        if r.key == MARKER_KEY:
            continue
        if r.value is None:
            state.pop(r.key, None)
        else:
            state[r.key] = r.value
    return state


class KafkaChangelog:
    """Produces to and reads from the changelog topic (one changelog partition per source partition)."""

    def __init__(self, cfg: StreamConfig, embedded: bool, topic: str, timeout_s: float = 30.0) -> None:
        from kafka import KafkaProducer

        self.cfg, self.embedded, self.topic, self.timeout_s = cfg, embedded, topic, timeout_s
        self.producer = KafkaProducer(**kafka_client_config(cfg, embedded), acks="all", linger_ms=5,
                                      max_in_flight_requests_per_connection=1,  # a key's records stay in order
                                      enable_idempotence=False, max_block_ms=10_000,
                                      max_request_size=max(1 << 20, cfg.max_message_bytes * 8))
        self.bytes_written = 0

    def write(self, records: dict[int, Records]) -> dict[int, int]:
        """Produce each partition's records in order and wait for the acknowledgements; returns partition →
        the changelog offset after its last record. ``ChangelogUnavailable`` when the broker did not confirm."""
        try:
            last = {}
            for p, recs in records.items():
                for key, value in recs:
                    last[p] = self.producer.send(self.topic, key=key, value=value, partition=p)
                    self.bytes_written += len(key) + (len(value) if value is not None else 0)
            self.producer.flush(timeout=self.timeout_s)
            return {p: fut.get(timeout=self.timeout_s).offset + 1 for p, fut in last.items()}
        except Exception as exc:
            raise ChangelogUnavailable(f"changelog topic {self.topic!r}: the broker did not confirm a write ({exc})") from exc

    def read(self, partition: int, start: int, progress: Callable[[int], object] | None = None) -> list[LogRecord]:
        """Every record of ``partition`` from offset ``start`` to its end as of now.

        The end is the fetch responses' high-water mark (tansu's end_offsets reports the base offset of a
        partition's last batch instead); ``ChangelogUnavailable`` when it is not reached in ``timeout_s``."""
        from kafka import KafkaConsumer, TopicPartition
        from kafka.errors import KafkaError

        out: list[LogRecord] = []
        try:
            consumer = KafkaConsumer(**kafka_client_config(self.cfg, self.embedded), group_id=None,
                                     enable_auto_commit=False, max_poll_records=10_000,
                                     max_partition_fetch_bytes=max(1 << 20, self.cfg.max_message_bytes * 8))
        except KafkaError as exc:
            raise ChangelogUnavailable(f"changelog topic {self.topic!r}: cannot reach the broker ({exc})") from exc
        tp = TopicPartition(self.topic, partition)
        try:
            consumer.assign([tp])
            consumer.seek(tp, start)
            deadline = time.monotonic() + self.timeout_s
            while True:
                if time.monotonic() > deadline:
                    raise ChangelogUnavailable(f"changelog topic {self.topic!r} partition {partition}: not read to "
                                               f"its end within {self.timeout_s:.0f} s ({len(out)} records read)")
                got = consumer.poll(timeout_ms=200).get(tp, [])
                out.extend(LogRecord(r.offset, r.key, r.value) for r in got)
                if got:
                    deadline = time.monotonic() + self.timeout_s  # progress: the limit is on a stall
                    if progress is not None:
                        progress(len(got))
                    continue
                high = consumer.highwater(tp)
                if high is not None and consumer.position(tp) >= high:
                    return out
        except KafkaError as exc:
            raise ChangelogUnavailable(f"changelog topic {self.topic!r} partition {partition}: {exc}") from exc
        finally:
            consumer.close(autocommit=False)

    def close(self) -> None:
        self.producer.close(timeout=5)


class StreamChangelog:
    """Keeps the changelog topic equal to the stream state's checkpoints and restores partitions from it
    (the :class:`~recsift.stream.checkpoint.ChangelogWriter` of a checkpoint)."""

    def __init__(self, log: KafkaChangelog, store: PartitionStore, source_topic: str,
                 on_restore: Callable[[str, int, float], object] | None = None,
                 on_progress: Callable[[int], object] | None = None,
                 on_write: Callable[[int, int], object] | None = None) -> None:
        self.log = log
        self.stores: list[PartitionStore] = [store]  # the stream state's; the scoring and selection stores join
        self.source_topic = source_topic
        self.writer = ""  # this state directory's id, read or made by create_schema
        self.on_restore = on_restore  # (outcome, records read, seconds) per synced partition that needed work
        self.on_progress = on_progress  # records read, while reading
        self.on_write = on_write  # (records, bytes) of each acknowledged write
        self.records_written = 0
        self._marked: dict[int, int | None] = {}  # partition → source offset of its last marker

    def add(self, store: PartitionStore) -> None:
        """Another store whose per-partition state moves with the partition (its keys are its own)."""
        self.stores.append(store)

    def _local(self, conn: sqlite3.Connection, p: int) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        for store in self.stores:
            out.update(store.partition_records(conn, p))
        return out

    def _replace(self, conn: sqlite3.Connection, p: int, state: dict[bytes, bytes]) -> None:
        """Hand each store its keys of a restored partition state; a key no store owns is skipped and logged
        (a changelog written by workers with more stores than this one)."""
        claimed = 0
        for store in self.stores:
            mine = {k: v for k, v in state.items() if store.owns(k)}
            claimed += len(mine)
            store.replace_partition(conn, p, mine)
        if claimed < len(state):
            log.warning("changelog partition %d: %d records of kinds this worker does not keep were skipped",
                        p, len(state) - claimed)

    def create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS changelog_positions (partition INTEGER PRIMARY KEY,"
                     " next_offset INTEGER NOT NULL)")
        row = conn.execute("SELECT value FROM meta WHERE key = 'changelog_writer'").fetchone()
        if row is None:
            row = (uuid.uuid4().hex,)
            conn.execute("INSERT INTO meta VALUES ('changelog_writer', ?)", row)
        self.writer = str(row[0])

    # ------------------------------------------------------------------ writing

    def publish(self, conn: sqlite3.Connection, offsets: dict[int, int]) -> None:
        batch: dict[int, Records] = {}
        for p, offset in offsets.items():
            records = [r for store in self.stores for r in store.changes.get(p, ())]
            if records or self._marked.get(p) != offset:
                batch[p] = [*records, (MARKER_KEY, marker(self.writer, offset))]
        if batch:
            self._write(conn, batch)
            self._marked.update((p, offsets[p]) for p in batch)

    def _write(self, conn: sqlite3.Connection, batch: dict[int, Records]) -> None:
        before = self.log.bytes_written
        positions = self.log.write(batch)
        records = sum(len(r) for r in batch.values())
        self.records_written += records
        if self.on_write is not None:
            self.on_write(records, self.log.bytes_written - before)
        conn.executemany("INSERT INTO changelog_positions VALUES (?, ?) ON CONFLICT (partition)"
                         " DO UPDATE SET next_offset = excluded.next_offset", list(positions.items()))

    # ------------------------------------------------------------------ syncing

    def sync(self, conn: sqlite3.Connection, partitions: set[int]) -> dict[int, str]:
        """Bring each partition's local rows to the changelog's last whole checkpoint (module docstring).
        Runs inside the open transaction; returns partition → outcome (current, published, restored, repaired)."""
        return {p: self._sync(conn, p) for p in sorted(partitions)}

    def _sync(self, conn: sqlite3.Connection, p: int) -> str:
        started = time.perf_counter()
        row = conn.execute("SELECT next_offset FROM changelog_positions WHERE partition = ?", (p,)).fetchone()
        position = int(row[0]) if row is not None else 0
        tail = self.log.read(p, position, self.on_progress)
        offset = self._source_offset(conn, p)
        if not tail:
            if row is None and (local := self._local(conn, p)):
                self._write(conn, {p: [*local.items(), (MARKER_KEY, marker(self.writer, offset))]})
                self._marked[p] = offset
                log.info("published partition %d's local state to the changelog (%d records)", p, len(local))
                return self._done("published", len(local), started)
            self._marked[p] = offset
            return "current"
        history = tail if position == 0 else self.log.read(p, 0, self.on_progress)
        markers = [r for r in history if r.key == MARKER_KEY and r.offset >= position and r.value is not None]
        if any(orjson.loads(m.value or b"{}").get("writer") != self.writer for m in markers):
            cut = markers[-1].offset
            state = collapse(history, cut)
            self._replace(conn, p, state)
            offset = orjson.loads(markers[-1].value or b"{}").get("offset")
            if offset is not None:
                conn.execute("INSERT INTO offsets VALUES (?, ?, ?) ON CONFLICT (topic, partition)"
                             " DO UPDATE SET next_offset = excluded.next_offset", (self.source_topic, p, int(offset)))
            outcome = "restored"
        else:
            cut = position - 1
            state = collapse(history, cut)
            outcome = "repaired"
        after = dict.fromkeys(r.key for r in history if r.offset > cut and r.key != MARKER_KEY)
        records: Records = [(k, state.get(k)) for k in after]
        if row is None and outcome == "repaired":
            records.extend(self._local(conn, p).items())
        self._write(conn, {p: [*records, (MARKER_KEY, marker(self.writer, offset))]})
        self._marked[p] = offset
        log.info("changelog partition %d %s: %d records read in %.2f s, %d keys after the last whole checkpoint "
                 "undone", p, outcome, len(history), time.perf_counter() - started, len(after))
        return self._done(outcome, len(history), started)

    def _source_offset(self, conn: sqlite3.Connection, p: int) -> int | None:
        row = conn.execute("SELECT next_offset FROM offsets WHERE topic = ? AND partition = ?",
                           (self.source_topic, p)).fetchone()
        return int(row[0]) if row is not None else None

    def _done(self, outcome: str, records: int, started: float) -> str:
        if self.on_restore is not None:
            self.on_restore(outcome, records, time.perf_counter() - started)
        return outcome

    def close(self) -> None:
        self.log.close()


def changelog_summary(outcomes: dict[int, str]) -> dict[str, Any]:
    """outcome → partitions, for a log line."""
    out: dict[str, Any] = {}
    for p, outcome in sorted(outcomes.items()):
        out.setdefault(outcome, []).append(p)
    return out
