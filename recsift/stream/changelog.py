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

A value larger than about half a megabyte (a partition's coreset reservoir with its validation share, for
example) goes out as chunk records followed by a header under its key (:func:`split_large`), so no message
reaches the brokers' size limit; a restore joins them again (:func:`join_large`).

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

**The worker's own state** (the stream scorer with its surrogate, the selection stage's counters, recent
window and coverage: :class:`~recsift.stream.checkpoint.WorkerStore`) belongs to no partition. It goes to the
compacted *worker topic* ``<changelog topic>.workers``, keyed by worker id (:class:`WorkerStateLog`), first
in each checkpoint that changed it; every owned partition's marker then names the versions it goes with
(``"worker": {"id", "seq", "parts"}``). A worker with no state of its own on disk (an empty disk) takes, after
restoring its partitions, the versions that the newest of their markers written under its id names, and so
continues exactly where it stopped; a worker that takes over another one's partitions keeps its own scorer
and re-scores what it adopted. The cost: every checkpoint that updated the surrogate writes its whole state
(weights, Adam moments, replay buffer; its embedding rows, and their moments, grow with
``scoring.item_capacity``).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import orjson

from recsift.config import StreamConfig
from recsift.stream.checkpoint import PartitionStore, WorkerStore
from recsift.stream.kafka import kafka_client_config

log = logging.getLogger(__name__)

MARKER_KEY = b"o"
CHUNKED = b"\x00recsift-chunked\x00"  # the value under a key whose value went out as chunk records
CHUNK_PREFIX = b"\x00chunk\x00"  # the keys of those chunk records; no store's key starts with a NUL
CHUNK_BYTES = 512 * 1024  # a value above this is split: brokers refuse messages over about 1 MB

Records = list[tuple[bytes, bytes | None]]


class ChangelogUnavailable(RuntimeError):
    """The changelog topic could not be written or read (broker away, topic missing)."""


class WorkerStateMissing(LookupError):
    """A version of a worker's own state that a marker names is not (whole) in the worker topic."""


class LogRecord(NamedTuple):
    offset: int
    key: bytes
    value: bytes | None


def marker(writer: str, offset: int | None, worker: dict[str, Any] | None = None) -> bytes:
    """A partition's checkpoint marker; ``worker``: the versions of the writing worker's own state that the
    checkpoint goes with (``{"id", "seq", "parts": {name: [seq, writer]}}``, :class:`WorkerStateLog`)."""
    body: dict[str, Any] = {"writer": writer, "offset": offset}
    if worker is not None:
        body["worker"] = worker
    return orjson.dumps(body)


def split_large(records: Records, limit: int = CHUNK_BYTES) -> Records:
    """The records as written: a value over ``limit`` bytes goes out as chunk records followed, under its own
    key, by a header naming them (so the key's last value is always whole once the header is there)."""
    out: Records = []
    for key, value in records:
        if value is None or len(value) <= limit:
            out.append((key, value))
            continue
        parts = [value[i:i + limit] for i in range(0, len(value), limit)]
        out += [(CHUNK_PREFIX + key + b"\x00" + str(i).encode(), part) for i, part in enumerate(parts)]
        out.append((key, CHUNKED + orjson.dumps({"chunks": len(parts), "sha256": hashlib.sha256(value).hexdigest()})))
    return out


def join_large(state: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The stores' records of a collapsed changelog state: chunked values joined, chunk records left out;
    ``ChangelogUnavailable`` when a value's chunks are not all there."""
    out: dict[bytes, bytes] = {}
    for key, value in state.items():
        if key.startswith(CHUNK_PREFIX):
            continue
        if value.startswith(CHUNKED):
            head = orjson.loads(value[len(CHUNKED):])
            parts = [state.get(CHUNK_PREFIX + key + b"\x00" + str(i).encode()) for i in range(int(head["chunks"]))]
            value = b"".join(p for p in parts if p is not None)
            if None in parts or hashlib.sha256(value).hexdigest() != head["sha256"]:
                raise ChangelogUnavailable(f"changelog record {key!r}: its chunks are incomplete")
        out[key] = value
    return out


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
        """Every record of ``partition`` from offset ``start`` to its end as of now."""
        out: list[LogRecord] = []
        self.scan(partition, start, out.append, progress)
        return out

    def latest(self, partition: int, keep: Callable[[bytes], bool],
               progress: Callable[[int], object] | None = None) -> dict[bytes, bytes]:
        """The last value of every key ``keep`` accepts in the whole of ``partition`` (tombstoned keys left out),
        holding one value per key while reading: a topic not yet compacted may hold many."""
        state: dict[bytes, bytes] = {}

        def apply(r: LogRecord) -> None:
            if keep(r.key):
                if r.value is None:
                    state.pop(r.key, None)
                else:
                    state[r.key] = r.value

        self.scan(partition, 0, apply, progress)
        return state

    def scan(self, partition: int, start: int, sink: Callable[[LogRecord], object],
             progress: Callable[[int], object] | None = None) -> int:
        """Hand every record of ``partition`` from offset ``start`` to its end as of now to ``sink``; returns
        how many.

        The end is the fetch responses' high-water mark (tansu's end_offsets reports the base offset of a
        partition's last batch instead); ``ChangelogUnavailable`` when it is not reached in ``timeout_s``."""
        from kafka import KafkaConsumer, TopicPartition
        from kafka.errors import KafkaError

        count = 0
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
                                               f"its end within {self.timeout_s:.0f} s ({count} records read)")
                got = consumer.poll(timeout_ms=200).get(tp, [])
                for r in got:
                    sink(LogRecord(r.offset, r.key, r.value))
                count += len(got)
                if got:
                    deadline = time.monotonic() + self.timeout_s  # progress: the limit is on a stall
                    if progress is not None:
                        progress(len(got))
                    continue
                high = consumer.highwater(tp)
                if high is not None and consumer.position(tp) >= high:
                    return count
        except KafkaError as exc:
            raise ChangelogUnavailable(f"changelog topic {self.topic!r} partition {partition}: {exc}") from exc
        finally:
            consumer.close(autocommit=False)

    def close(self) -> None:
        self.producer.close(timeout=5)


class WorkerStateLog:
    """A worker's own state (:class:`~recsift.stream.checkpoint.WorkerStore`) in the compacted worker topic.

    Each part is written in chunks of ``chunk_bytes`` under ``<worker>/<part>/<slot>/<i>``, then a header
    ``<worker>/<part>/<slot>/h`` = ``{"writer", "seq", "chunks", "sha256"}``. A part has two slots and a
    write always goes to the one that does not hold its committed version, so a write whose checkpoint never
    committed can only overwrite an older version, never the one the partitions' markers name. The local table
    ``worker_slots`` remembers what each slot holds (in the checkpoint transaction)."""

    def __init__(self, log: KafkaChangelog, worker: str, chunk_bytes: int = 512 * 1024,
                 on_write: Callable[[int], object] | None = None) -> None:
        if not worker:
            raise ValueError("the worker topic needs a worker id (stream.worker_id)")
        self.log, self.worker, self.chunk_bytes, self.on_write = log, worker, chunk_bytes, on_write

    def key(self, part: str, slot: int, suffix: int | str) -> bytes:
        return f"{self.worker}/{part}/{slot}/{suffix}".encode()

    @staticmethod
    def create_schema(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS worker_slots (part TEXT NOT NULL, slot INTEGER NOT NULL,"
                     " seq INTEGER NOT NULL, chunks INTEGER NOT NULL, writer TEXT NOT NULL, PRIMARY KEY (part, slot))")

    @staticmethod
    def committed(conn: sqlite3.Connection) -> dict[str, tuple[int, str]]:
        """part → (seq, writer) of its committed (newest) version; the writer (a state directory) tells two
        workers that were given the same id apart."""
        rows = conn.execute("SELECT part, seq, writer FROM worker_slots AS w WHERE seq ="
                            " (SELECT MAX(seq) FROM worker_slots WHERE part = w.part)").fetchall()
        return {str(part): (int(seq), str(writer)) for part, seq, writer in rows}

    @staticmethod
    def target_slot(conn: sqlite3.Connection, part: str) -> int:
        """The slot the next write of ``part`` goes to: the one that does not hold its committed version."""
        held = dict(conn.execute("SELECT slot, seq FROM worker_slots WHERE part = ?", (part,)).fetchall())
        return min((0, 1), key=lambda k: held.get(k, -1))

    def write(self, conn: sqlite3.Connection, writer: str, seq: int, parts: dict[str, bytes]) -> None:
        """Produce ``parts`` as version ``seq`` and wait for the acknowledgement (``ChangelogUnavailable``)."""
        records: Records = []
        rows = []
        for name, blob in sorted(parts.items()):
            slot = self.target_slot(conn, name)
            old = conn.execute("SELECT chunks FROM worker_slots WHERE part = ? AND slot = ?", (name, slot)).fetchone()
            chunks = [blob[i:i + self.chunk_bytes] for i in range(0, len(blob), self.chunk_bytes)] or [b""]
            records += [(self.key(name, slot, i), chunk) for i, chunk in enumerate(chunks)]
            records += [(self.key(name, slot, i), None) for i in range(len(chunks), int(old[0]) if old else 0)]
            header = {"writer": writer, "seq": seq, "chunks": len(chunks), "sha256": hashlib.sha256(blob).hexdigest()}
            records.append((self.key(name, slot, "h"), orjson.dumps(header)))
            rows.append((name, slot, seq, len(chunks), writer))
        before = self.log.bytes_written
        self.log.write({0: records})
        if self.on_write is not None:
            self.on_write(self.log.bytes_written - before)
        conn.executemany("INSERT OR REPLACE INTO worker_slots VALUES (?, ?, ?, ?, ?)", rows)

    def read(self, versions: dict[str, tuple[int, str]],
             progress: Callable[[int], object] | None = None) -> dict[str, tuple[int, bytes]]:
        """part → (slot, bytes) of the parts at the given versions (part → (seq, writer)), read from the topic;
        ``WorkerStateMissing`` when one is missing or does not match its checksum."""
        prefix = f"{self.worker}/".encode()
        state = self.log.latest(0, lambda k: k.startswith(prefix), progress)
        out: dict[str, tuple[int, bytes]] = {}
        for name, (seq, writer) in versions.items():
            for slot in (0, 1):
                raw = state.get(self.key(name, slot, "h"))
                header = orjson.loads(raw) if raw else {}
                if header.get("seq") != seq or header.get("writer") != writer:
                    continue
                chunks = [state.get(self.key(name, slot, i)) for i in range(int(header["chunks"]))]
                blob = b"".join(c for c in chunks if c is not None)
                if None in chunks or hashlib.sha256(blob).hexdigest() != header["sha256"]:
                    raise WorkerStateMissing(f"worker {self.worker!r}: part {name!r} version {seq} is incomplete")
                out[name] = (slot, blob)
                break
            else:
                raise WorkerStateMissing(f"worker {self.worker!r}: part {name!r} version {seq} is not in the topic")
        return out

    def restored(self, conn: sqlite3.Connection, seq: int, versions: dict[str, tuple[int, str]],
                 found: dict[str, tuple[int, bytes]]) -> None:
        """Record the restored versions locally: the next write of each part goes to its other slot."""
        conn.execute("DELETE FROM worker_slots")
        for name, (slot, blob) in found.items():
            chunks = max(1, -(-len(blob) // self.chunk_bytes))
            seq_of, writer = versions[name]
            conn.execute("INSERT INTO worker_slots VALUES (?, ?, ?, ?, ?)", (name, slot, seq_of, chunks, writer))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('worker_seq', ?)", (str(seq),))


class StreamChangelog:
    """Keeps the changelog topic equal to the stream state's checkpoints and restores partitions from it
    (the :class:`~recsift.stream.checkpoint.ChangelogWriter` of a checkpoint)."""

    def __init__(self, log: KafkaChangelog, store: PartitionStore, source_topic: str,
                 on_restore: Callable[[str, int, float], object] | None = None,
                 on_progress: Callable[[int], object] | None = None,
                 on_write: Callable[[int, int], object] | None = None,
                 workers: WorkerStateLog | None = None) -> None:
        self.log = log
        self.workers = workers  # this worker's own state (the stream scorer), None: not kept in Kafka
        self.worker_stores: list[WorkerStore] = []
        self.worker_seq = 0  # the last version of this worker's own state written
        self._restored_markers: dict[int, dict[str, Any]] = {}  # partition → its last marker, restored by a sync
        self.stores: list[PartitionStore] = [store]  # the stream state's; the scoring and selection stores join
        self.source_topic = source_topic
        self.writer = ""  # this state directory's id, read or made by create_schema
        self.on_restore = on_restore  # (outcome, records read, seconds) per synced partition that needed work
        self.on_progress = on_progress  # records read, while reading
        self.on_write = on_write  # (records, bytes) of each acknowledged write
        self.records_written = 0
        self.chunk_bytes = CHUNK_BYTES  # larger values go out in chunks (split_large)
        self._marked: dict[int, int | None] = {}  # partition → source offset of its last marker

    def add(self, store: object) -> None:
        """A participant whose per-partition state moves with the partition (a ``PartitionStore``, its keys its
        own) and/or whose worker state the worker topic keeps (a ``WorkerStore``, its part names its own)."""
        if isinstance(store, PartitionStore):
            self.stores.append(store)
        if isinstance(store, WorkerStore) and self.workers is not None:
            taken = {n for w in self.worker_stores for n in w.worker_part_names}
            if clash := taken & set(store.worker_part_names):
                raise ValueError(f"worker state parts {sorted(clash)} are already kept by another store")
            self.worker_stores.append(store)

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
        if self.workers is not None:
            self.workers.create_schema(conn)
            seq = conn.execute("SELECT value FROM meta WHERE key = 'worker_seq'").fetchone()
            self.worker_seq = int(seq[0]) if seq is not None else 0

    # ------------------------------------------------------------------ writing

    def publish(self, conn: sqlite3.Connection, offsets: dict[int, int]) -> None:
        """The worker's own state first (when it changed), then each partition's changes and its marker, which
        names the worker state's versions that go with it: a marker is written for every owned partition when
        the worker state changed, so that each one's last marker names the current versions."""
        worker, changed = self._publish_worker(conn)
        batch: dict[int, Records] = {}
        for p, offset in offsets.items():
            records = split_large([r for store in self.stores for r in store.changes.get(p, ())], self.chunk_bytes)
            if records or self._marked.get(p) != offset or changed:
                batch[p] = [*records, (MARKER_KEY, marker(self.writer, offset, worker))]
        if batch:
            self._write(conn, batch)
            self._marked.update((p, offsets[p]) for p in batch)

    def _publish_worker(self, conn: sqlite3.Connection) -> tuple[dict[str, Any] | None, bool]:
        """Write the worker state's changed parts as a new version; returns the marker's worker entry."""
        if self.workers is None or not self.worker_stores:
            return None, False
        changed = {name: blob for w in self.worker_stores for name, blob in w.worker_changes.items()}
        if changed:
            seq = self.worker_seq + 1
            self.workers.write(conn, self.writer, seq, changed)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('worker_seq', ?)", (str(seq),))
            # kept when the transaction fails later; after a crash the file's number is reused, which is safe:
            # the rewrite goes to the same uncommitted slot, and a marker names a version by (seq, writer)
            self.worker_seq = seq
        return {"id": self.workers.worker, "seq": self.worker_seq, "parts": self.workers.committed(conn)}, bool(changed)

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
        outcomes = {p: self._sync(conn, p) for p in sorted(partitions)}
        self._restore_worker(conn)
        return outcomes

    def _restore_worker(self, conn: sqlite3.Connection) -> None:
        """A worker with no state of its own here (an empty disk) takes the versions that the last marker this
        worker wrote names, among the partitions just restored: it continues exactly where it stopped."""
        markers, self._restored_markers = self._restored_markers, {}
        if self.workers is None or not self.worker_stores or any(w.worker_parts(conn) for w in self.worker_stores):
            return
        mine = {p: w for p, m in markers.items()
                if isinstance(w := m.get("worker"), dict) and w.get("id") == self.workers.worker}
        if not mine:
            return  # a new worker, or partitions from other workers: the scorer starts fresh
        latest = max(mine.values(), key=lambda w: int(w["seq"]))
        versions = {str(name): (int(seq), str(writer)) for name, (seq, writer) in latest["parts"].items()}
        started = time.perf_counter()
        try:
            found = self.workers.read(versions, self.on_progress)
        except WorkerStateMissing as exc:  # compacted away or cut short: nothing to continue from
            log.error("cannot restore this worker's own state (%s); its scorer starts fresh", exc)
            self._done("worker_missing", 0, started)
            return
        for store in self.worker_stores:
            store.replace_worker_parts(conn, {n: b for n, (_, b) in found.items() if n in store.worker_part_names})
            store.restored_own(conn, set(mine))
        self.workers.restored(conn, int(latest["seq"]), versions, found)
        self.worker_seq = int(latest["seq"])
        log.info("worker %r: its own state restored from the changelog (version %d: %s) in %.2f s",
                 self.workers.worker, self.worker_seq, ", ".join(f"{n} {len(b):,} bytes" for n, (_, b) in found.items()),
                 time.perf_counter() - started)
        self._done("worker_restored", sum(len(b) for _, b in found.values()), started)

    def _sync(self, conn: sqlite3.Connection, p: int) -> str:
        started = time.perf_counter()
        row = conn.execute("SELECT next_offset FROM changelog_positions WHERE partition = ?", (p,)).fetchone()
        position = int(row[0]) if row is not None else 0
        tail = self.log.read(p, position, self.on_progress)
        offset = self._source_offset(conn, p)
        if not tail:
            if row is None and (local := self._local(conn, p)):
                self._write(conn, {p: [*split_large(list(local.items()), self.chunk_bytes),
                                       (MARKER_KEY, marker(self.writer, offset))]})
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
            self._replace(conn, p, join_large(state))
            last = orjson.loads(markers[-1].value or b"{}")
            self._restored_markers[p] = last
            offset = last.get("offset")
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
            records.extend(split_large(list(self._local(conn, p).items()), self.chunk_bytes))
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
        if self.workers is not None:
            self.workers.log.close()


def changelog_summary(outcomes: dict[int, str]) -> dict[str, Any]:
    """outcome → partitions, for a log line."""
    out: dict[str, Any] = {}
    for p, outcome in sorted(outcomes.items()):
        out.setdefault(outcome, []).append(p)
    return out
