"""The checkpoint: all of recsift's state and the source offsets it covers, in ONE SQLite transaction.

Ordering rules (the commit protocol; a crash between any two steps ends in the same state as a run
without the crash):

1. Downstream work is drained: every sample handed on so far has been applied to its participant.
2. Dead letters written so far are flushed to durable storage (they may repeat after a crash, never vanish).
3. One transaction writes every participant's changes and the next offset of every owned partition.
   With a changelog topic (:mod:`recsift.stream.changelog`), the stream state's changes and those offsets
   are produced and acknowledged inside the transaction, before it commits, and the transaction records
   the changelog offsets it covers.
4. Only after that transaction commits are the offsets committed to Kafka.

On (re)start, and whenever partitions are assigned, the checkpoint's offsets are the truth: the
source seeks to them, whatever Kafka's committed offsets say. The database runs in WAL mode with
``synchronous=FULL``, so a committed checkpoint survives a power cut.

Other packages add their state to the same transaction by implementing :class:`Participant`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import orjson

from recsift.stream.dedup import DedupIndex
from recsift.stream.windows import OpenWindow, Sample, StreamState, WindowCounts

SCHEMA_VERSION = 2  # 2: the journal has a partition column (a version 1 file is migrated in place)


class CheckpointError(RuntimeError):
    """The checkpoint database cannot be used (wrong schema version, corrupt file)."""


class Participant(Protocol):
    """A piece of state that is saved in the checkpoint transaction."""

    def create_schema(self, conn: sqlite3.Connection) -> None:
        """Create its tables (``IF NOT EXISTS``)."""

    def save(self, conn: sqlite3.Connection) -> None:
        """Write what changed since the last commit. Runs inside the open transaction."""

    def committed(self) -> None:
        """The transaction committed: forget the change tracking."""

    def load(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        """Restore the state of the given source partitions (participants that are not partitioned ignore them)."""

    def release(self, partitions: set[int]) -> None:
        """The partitions were revoked after a checkpoint: forget their state (their next owner restores it)."""


def connect(path: str | Path) -> sqlite3.Connection:
    """An SQLite connection with the checkpoint's durability settings; transactions are explicit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def read_history(path: str | Path, user_id: str) -> tuple[float, list[str]] | None:
    """A user's history in a worker's checkpoint database, opened read-only (``recsift serve`` reads beside
    running workers): (the time of its last event, its items oldest first); None if the user is not there.
    A partition that moved away may leave an older copy behind: the newest one wins."""
    if not Path(path).is_file():
        return None
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    try:
        row = conn.execute("SELECT touched_ts, items FROM histories WHERE user_id = ? ORDER BY touched_ts DESC, seq DESC"
                           " LIMIT 1", (user_id,)).fetchone()
    except sqlite3.OperationalError:  # no histories table yet (a worker that has not checkpointed)
        return None
    finally:
        conn.close()
    return (float(row[0]), [str(i) for i in orjson.loads(row[1])]) if row is not None else None


@runtime_checkable
class PartitionStore(Protocol):
    """A participant whose state is kept per source partition in the changelog (:mod:`recsift.stream.changelog`):
    each key of a partition's changelog belongs to exactly one store (``owns``)."""

    changes: dict[int, list[tuple[bytes, bytes | None]]]  # after save(): each owned partition's changed records

    def owns(self, key: bytes) -> bool: ...

    def partition_records(self, conn: sqlite3.Connection, partition: int) -> dict[bytes, bytes]:
        """The committed state of ``partition`` as changelog records."""

    def replace_partition(self, conn: sqlite3.Connection, partition: int, records: dict[bytes, bytes]) -> None:
        """Make ``partition``'s rows the state ``records`` describe (another worker wrote it)."""


@runtime_checkable
class WorkerStore(Protocol):
    """A participant with state of this worker's own, not of a partition (the stream scorer: its surrogate is
    trained on whatever this worker owned), which the changelog keeps in its worker topic so that the worker,
    restarted on an empty disk, continues exactly where it stopped (:mod:`recsift.stream.changelog`).
    The state is a few named parts (each store's names its own), each written when it changed."""

    worker_part_names: tuple[str, ...]
    worker_changes: dict[str, bytes]  # after save(): part name → its bytes, for the parts that changed

    def worker_parts(self, conn: sqlite3.Connection) -> dict[str, bytes]:
        """The committed parts in this state directory (empty: it has none, an empty disk)."""

    def replace_worker_parts(self, conn: sqlite3.Connection, parts: dict[str, bytes]) -> None:
        """Make the local rows these parts (restored from the changelog)."""

    def restored_own(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        """After :meth:`replace_worker_parts`: these restored partitions were last written by this very worker
        (its state just restored), not by another one."""


class ChangelogWriter(Protocol):
    """Writes the changes a checkpoint commits to a changelog topic and restores partitions from it
    (:mod:`recsift.stream.changelog`)."""

    def create_schema(self, conn: sqlite3.Connection) -> None: ...

    def sync(self, conn: sqlite3.Connection, partitions: set[int]) -> dict[int, str]:
        """Inside a transaction, before the partitions are loaded: bring their rows to the changelog's state."""

    def publish(self, conn: sqlite3.Connection, offsets: dict[int, int]) -> None:
        """Inside the checkpoint transaction, after every participant saved: produce the changes and wait for
        the broker's acknowledgement (raise when it does not come: the transaction then rolls back)."""


class Checkpoint:
    """Owns the SQLite file; commits participants and offsets atomically."""

    def __init__(self, path: str | Path, participants: Iterable[Participant] = ()) -> None:
        self.path = Path(path)
        self.conn = connect(self.path)
        self.participants: list[Participant] = list(participants)
        self.changelog: ChangelogWriter | None = None
        self._lock = threading.Lock()
        self.commits = 0
        with self._transaction():
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) == 1:
                columns = [c[1] for c in self.conn.execute("PRAGMA table_info(journal)")]
                if columns and "partition" not in columns:
                    self.conn.execute("ALTER TABLE journal ADD COLUMN partition INTEGER")
                self.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise CheckpointError(
                    f"{self.path} has checkpoint schema version {row[0]}, this recsift writes {SCHEMA_VERSION}"
                )
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS offsets (topic TEXT NOT NULL, partition INTEGER NOT NULL,"
                " next_offset INTEGER NOT NULL, PRIMARY KEY (topic, partition))"
            )
            for p in self.participants:
                p.create_schema(self.conn)

    def add(self, participant: Participant) -> None:
        with self._transaction():
            participant.create_schema(self.conn)
        self.participants.append(participant)

    class _Txn:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")

    def _transaction(self) -> Checkpoint._Txn:
        return Checkpoint._Txn(self.conn)

    def commit(self, offsets: dict[tuple[str, int], int]) -> float:
        """Write every participant's changes and ``offsets`` ((topic, partition) → next offset) in one
        transaction. Returns the seconds it took."""
        started = time.perf_counter()
        with self._lock, self._transaction() as conn:
            for p in self.participants:
                p.save(conn)
            if self.changelog is not None:
                self.changelog.publish(conn, {part: off for (_, part), off in offsets.items()})
            conn.executemany(
                "INSERT INTO offsets VALUES (?, ?, ?)"
                " ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                [(topic, part, off) for (topic, part), off in offsets.items()],
            )
        for p in self.participants:
            p.committed()
        self.commits += 1
        return time.perf_counter() - started

    def attach_changelog(self, changelog: ChangelogWriter) -> None:
        with self._transaction() as conn:
            changelog.create_schema(conn)
        self.changelog = changelog

    def sync_changelog(self, partitions: set[int]) -> dict[int, str]:
        """Restore assigned partitions from the changelog where it is ahead of this file (partition → outcome)."""
        if self.changelog is None or not partitions:
            return {}
        with self._lock, self._transaction() as conn:
            return self.changelog.sync(conn, partitions)

    def offsets(self, topic: str) -> dict[int, int]:
        """partition → next offset to read, as of the last committed checkpoint."""
        rows = self.conn.execute("SELECT partition, next_offset FROM offsets WHERE topic = ?", (topic,)).fetchall()
        return {int(p): int(o) for p, o in rows}

    def load(self, partitions: set[int]) -> None:
        with self._lock:
            for p in self.participants:
                p.load(self.conn, partitions)

    def release(self, partitions: set[int]) -> None:
        with self._lock:
            for p in self.participants:
                p.release(partitions)

    def close(self) -> None:
        self.conn.close()


def execute_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated DDL inside the open transaction (``executescript`` would commit it)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


_dumps = orjson.dumps
_fragment = orjson.Fragment  # already-encoded JSON, embedded as it is


def _in(partitions: set[int]) -> str:
    return ",".join(str(int(p)) for p in sorted(partitions)) or "NULL"


# Changelog record keys of one partition's stream state (recsift.stream.changelog): the value of a key is the
# state it names, so the topic compacts to the partition's current state.
CLOCK_KEY = b"c"  # {"max_ts", "counts"}
WINDOWS_KEY = b"w"  # [[window start, [sample, ...]], ...]: the samples buffered in open windows


def history_key(user_id: str) -> bytes:
    return b"h:" + user_id.encode()  # [items, touched_ts, seq]; a tombstone when the user is evicted


def dedup_key(generation: int, first_event_id: str) -> bytes:
    # [event id, ...] accepted in one checkpoint; tombstones when the generation is forgotten. Named by its
    # first id, so a checkpoint retried after a failed one writes the same key again.
    return f"d:{generation}:{first_event_id}".encode()


def journal_key(first_sample_id: int) -> bytes:
    return f"j:{first_sample_id}".encode()  # [[sample id, user id], ...] handed on in one checkpoint


class StreamStateStore:
    """Checkpoint participant for histories, open windows, per-partition clocks, the dedup index and, when
    ``state.journal`` is on, the journal of emitted samples.

    Histories and dedup ids are saved incrementally (only what changed); clocks and open windows,
    which are small and bounded, are rewritten for the owned partitions. With ``track_changes`` each save
    also leaves the same changes as changelog records, per partition, in ``changes``.
    """

    def __init__(self, state: StreamState, dedup: DedupIndex, track_changes: bool = False) -> None:
        self.state = state
        self.dedup = dedup
        self.track_changes = track_changes
        self.changes: dict[int, list[tuple[bytes, bytes | None]]] = {}
        self._written: dict[tuple[int, bytes], bytes] = {}  # (partition, key) → last committed clock / windows value
        self._writing: dict[tuple[int, bytes], bytes] = {}

    def create_schema(self, conn: sqlite3.Connection) -> None:
        execute_script(
            conn,
            """
            CREATE TABLE IF NOT EXISTS histories (partition INTEGER NOT NULL, user_id TEXT NOT NULL,
                items BLOB NOT NULL, touched_ts REAL NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (partition, user_id));
            CREATE TABLE IF NOT EXISTS clocks (partition INTEGER PRIMARY KEY, max_ts REAL, counts TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS pending (partition INTEGER NOT NULL, window_start REAL NOT NULL,
                pos INTEGER NOT NULL, sample TEXT NOT NULL, PRIMARY KEY (partition, window_start, pos));
            CREATE TABLE IF NOT EXISTS dedup_chunks (partition INTEGER NOT NULL, generation INTEGER NOT NULL,
                ids BLOB NOT NULL);
            CREATE INDEX IF NOT EXISTS dedup_generation ON dedup_chunks (partition, generation);
            CREATE TABLE IF NOT EXISTS journal (sample_id INTEGER NOT NULL, user_id TEXT NOT NULL, partition INTEGER);
            """,
        )

    def save(self, conn: sqlite3.Connection) -> None:
        owned = _in(set(self.state.partitions))
        conn.execute(f"DELETE FROM clocks WHERE partition IN ({owned})")
        conn.execute(f"DELETE FROM pending WHERE partition IN ({owned})")
        out = self.changes = {}
        self._writing = {}
        for p, part in self.state.partitions.items():
            records = out[p] = []
            histories = part.histories
            rows = [(p, u, _dumps(tuple(h.items)), h.touched_ts, h.seq)
                    for u in part.dirty if (h := histories.get(u)) is not None]
            conn.executemany("INSERT OR REPLACE INTO histories VALUES (?, ?, ?, ?, ?)", rows)
            conn.executemany("DELETE FROM histories WHERE partition = ? AND user_id = ?", [(p, u) for u in part.evicted])
            max_ts = part.max_ts if part.max_ts != float("-inf") else None
            counts = {k: getattr(part.counts, k) for k in WindowCounts.__slots__}
            conn.execute("INSERT INTO clocks VALUES (?, ?, ?)", (p, max_ts, json.dumps(counts)))
            pending = sorted((start, window.samples) for start, window in part.windows.items() if window.samples)
            conn.executemany("INSERT INTO pending VALUES (?, ?, ?, ?)",
                             [(p, start, pos, s.encode()) for start, samples in pending for pos, s in enumerate(samples)])
            if part.emitted:
                conn.executemany("INSERT INTO journal VALUES (?, ?, ?)", [(s.sample_id, s.user_id, p) for s in part.emitted])
            if self.track_changes:
                records.extend((history_key(u), _dumps([_fragment(items), ts, seq])) for _, u, items, ts, seq in rows)
                records.extend((history_key(u), None) for u in part.evicted)
                for key, value in ((CLOCK_KEY, _dumps({"max_ts": max_ts, "counts": counts})),
                                   (WINDOWS_KEY, _dumps([[start, [s.to_json() for s in samples]]
                                                         for start, samples in pending]))):
                    if self._written.get((p, key)) != value:  # an unchanged clock or window set is not rewritten
                        records.append((key, value))
                        self._writing[p, key] = value
                if part.emitted:
                    records.append((journal_key(part.emitted[0].sample_id),
                                    _dumps([[s.sample_id, s.user_id] for s in part.emitted])))
        # dedup ids: one compact chunk per (partition, generation) per checkpoint, not a row per event
        dedup = self.dedup
        chunks = [(p, g, _dumps(ids)) for (p, g), ids in dedup.added.items() if ids]
        conn.executemany("INSERT INTO dedup_chunks VALUES (?, ?, ?)", chunks)
        if self.track_changes:
            for p, g, ids in chunks:
                out.setdefault(p, []).append((dedup_key(g, dedup.added[p, g][0]), ids))
            for p, g, first in conn.execute(
                "SELECT partition, generation, json_extract(CAST(ids AS TEXT), '$[0]') FROM dedup_chunks"
                f" WHERE generation < ? AND partition IN ({owned})", (dedup.forgotten_below,)
            ).fetchall():
                out.setdefault(int(p), []).append((dedup_key(int(g), str(first)), None))
        conn.execute(f"DELETE FROM dedup_chunks WHERE generation < ? AND partition IN ({owned})", (dedup.forgotten_below,))

    def release(self, partitions: set[int]) -> None:
        self.state.drop_partitions(partitions)
        self.dedup.drop_partitions(partitions)

    def owns(self, key: bytes) -> bool:
        return key in (CLOCK_KEY, WINDOWS_KEY) or key[:2] in (b"h:", b"d:", b"j:")

    def committed(self) -> None:
        self.state.clear_changes()
        self.dedup.clear_changes()
        self._written.update(self._writing)
        self._writing = {}

    def replace_partition(self, conn: sqlite3.Connection, partition: int, records: dict[bytes, bytes]) -> None:
        """Make ``partition``'s rows the state that changelog ``records`` (key → value) describe. Runs inside
        the open transaction; :meth:`load` brings the rows into memory."""
        p = int(partition)
        for table in ("histories", "clocks", "pending", "dedup_chunks", "journal"):
            conn.execute(f"DELETE FROM {table} WHERE partition = ?", (p,))
        chunks = []
        for key, value in records.items():
            body = orjson.loads(value)
            if key == CLOCK_KEY:
                conn.execute("INSERT INTO clocks VALUES (?, ?, ?)", (p, body["max_ts"], json.dumps(body["counts"])))
            elif key == WINDOWS_KEY:
                conn.executemany("INSERT INTO pending VALUES (?, ?, ?, ?)",
                                 [(p, float(start), pos, _dumps(s)) for start, samples in body
                                  for pos, s in enumerate(samples)])
            elif key.startswith(b"h:"):
                items, touched_ts, seq = body
                conn.execute("INSERT INTO histories VALUES (?, ?, ?, ?, ?)",
                             (p, key[2:].decode(), _dumps(items), float(touched_ts), int(seq)))
            elif key.startswith(b"d:"):
                chunks.append((int(key.decode().split(":", 2)[1]), key, value))
            elif key.startswith(b"j:"):
                conn.executemany("INSERT INTO journal VALUES (?, ?, ?)", [(int(sid), user, p) for sid, user in body])
            else:
                raise ValueError(f"not a stream state changelog key: {key!r}")
        conn.executemany("INSERT INTO dedup_chunks VALUES (?, ?, ?)", [(p, g, ids) for g, _, ids in sorted(chunks)])

    def partition_records(self, conn: sqlite3.Connection, partition: int) -> dict[bytes, bytes]:
        """The committed state of ``partition`` as changelog records (the journal included)."""
        p = int(partition)
        out: dict[bytes, bytes] = {}
        for user_id, items, touched_ts, seq in conn.execute(
            "SELECT user_id, items, touched_ts, seq FROM histories WHERE partition = ?", (p,)
        ):
            out[history_key(user_id)] = _dumps([orjson.loads(items), touched_ts, seq])
        for max_ts, counts in conn.execute("SELECT max_ts, counts FROM clocks WHERE partition = ?", (p,)):
            out[CLOCK_KEY] = _dumps({"max_ts": max_ts, "counts": json.loads(counts)})
        windows: dict[float, list[Any]] = {}
        for start, text in conn.execute(
            "SELECT window_start, sample FROM pending WHERE partition = ? ORDER BY window_start, pos", (p,)
        ):
            windows.setdefault(float(start), []).append(orjson.loads(text))
        if out:
            out[WINDOWS_KEY] = _dumps([[start, samples] for start, samples in sorted(windows.items())])
        for generation, ids in conn.execute("SELECT generation, ids FROM dedup_chunks WHERE partition = ?", (p,)):
            ids = bytes(ids) if isinstance(ids, (bytes, memoryview)) else ids.encode()
            out[dedup_key(int(generation), orjson.loads(ids)[0])] = ids
        journal = conn.execute("SELECT sample_id, user_id FROM journal WHERE partition = ? ORDER BY rowid", (p,)).fetchall()
        if journal:
            out[journal_key(int(journal[0][0]))] = _dumps([[int(sid), user] for sid, user in journal])
        return out

    def load(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        state = self.state
        parts = _in(partitions)
        self._written = {k: v for k, v in self._written.items() if k[0] not in partitions}
        for p, user_id, items, touched_ts, seq in conn.execute(
            f"SELECT partition, user_id, items, touched_ts, seq FROM histories WHERE partition IN ({parts}) ORDER BY seq"
        ):
            state.restore_user(int(p), user_id, orjson.loads(items), float(touched_ts), int(seq))
        for p, max_ts, counts in conn.execute(f"SELECT partition, max_ts, counts FROM clocks WHERE partition IN ({parts})"):
            part = state.partition(int(p))
            part.max_ts = float("-inf") if max_ts is None else float(max_ts)
            part.counts = WindowCounts(**json.loads(counts))
        now = time.monotonic()
        for p, start, text in conn.execute(
            f"SELECT partition, window_start, sample FROM pending WHERE partition IN ({parts})"
            " ORDER BY partition, window_start, pos"
        ):
            # A window with nothing buffered needs no row: lateness depends on the clock alone.
            windows = state.partition(int(p)).windows
            window = windows.get(float(start))
            if window is None:
                window = windows[float(start)] = OpenWindow(first_buffered_at=now)
                part = state.partition(int(p))
                part.next_close = min(part.next_close, float(start) + state.cfg.window_seconds)
            window.samples.append(Sample.from_json(text)._replace(partition=int(p)))
        (newest,) = conn.execute(f"SELECT max(generation) FROM dedup_chunks WHERE partition IN ({parts})").fetchone()
        if newest is not None:
            rows = conn.execute(
                f"SELECT partition, generation, ids FROM dedup_chunks WHERE partition IN ({parts}) AND generation >= ?"
                " ORDER BY rowid",
                (int(newest) - 1,),
            )
            self.dedup.restore(int(newest), ((e, int(p), int(g)) for p, g, ids in rows for e in orjson.loads(ids)))
