"""The checkpoint: all of recsift's state and the source offsets it covers, in ONE SQLite transaction.

Ordering rules (the commit protocol; a crash between any two steps ends in the same state as a run
without the crash):

1. Downstream work is drained: every sample handed on so far has been applied to its participant.
2. Dead letters written so far are flushed to durable storage (they may repeat after a crash, never vanish).
3. One transaction writes every participant's changes and the next offset of every owned partition.
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
from typing import Protocol

import orjson

from recsift.stream.dedup import DedupIndex
from recsift.stream.windows import OpenWindow, Sample, StreamState, WindowCounts

SCHEMA_VERSION = 1


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


def connect(path: str | Path) -> sqlite3.Connection:
    """An SQLite connection with the checkpoint's durability settings; transactions are explicit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class Checkpoint:
    """Owns the SQLite file; commits participants and offsets atomically."""

    def __init__(self, path: str | Path, participants: Iterable[Participant] = ()) -> None:
        self.path = Path(path)
        self.conn = connect(self.path)
        self.participants: list[Participant] = list(participants)
        self._lock = threading.Lock()
        self.commits = 0
        with self._transaction():
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
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
            conn.executemany(
                "INSERT INTO offsets VALUES (?, ?, ?)"
                " ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                [(topic, part, off) for (topic, part), off in offsets.items()],
            )
        for p in self.participants:
            p.committed()
        self.commits += 1
        return time.perf_counter() - started

    def offsets(self, topic: str) -> dict[int, int]:
        """partition → next offset to read, as of the last committed checkpoint."""
        rows = self.conn.execute("SELECT partition, next_offset FROM offsets WHERE topic = ?", (topic,)).fetchall()
        return {int(p): int(o) for p, o in rows}

    def load(self, partitions: set[int]) -> None:
        with self._lock:
            for p in self.participants:
                p.load(self.conn, partitions)

    def close(self) -> None:
        self.conn.close()


def execute_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated DDL inside the open transaction (``executescript`` would commit it)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


_dumps = orjson.dumps


def _in(partitions: set[int]) -> str:
    return ",".join(str(int(p)) for p in sorted(partitions)) or "NULL"


class StreamStateStore:
    """Checkpoint participant for histories, open windows, per-partition clocks and the dedup index.

    Histories and dedup ids are saved incrementally (only what changed); clocks and open windows,
    which are small and bounded, are rewritten for the owned partitions.
    """

    def __init__(self, state: StreamState, dedup: DedupIndex) -> None:
        self.state = state
        self.dedup = dedup

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
            """,
        )

    def save(self, conn: sqlite3.Connection) -> None:
        owned = _in(set(self.state.partitions))
        conn.execute(f"DELETE FROM clocks WHERE partition IN ({owned})")
        conn.execute(f"DELETE FROM pending WHERE partition IN ({owned})")
        for p, part in self.state.partitions.items():
            histories = part.histories
            conn.executemany(
                "INSERT OR REPLACE INTO histories VALUES (?, ?, ?, ?, ?)",
                (
                    (p, u, _dumps(tuple(h.items)), h.touched_ts, h.seq)
                    for u in part.dirty
                    if (h := histories.get(u)) is not None
                ),
            )
            conn.executemany("DELETE FROM histories WHERE partition = ? AND user_id = ?", [(p, u) for u in part.evicted])
            max_ts = part.max_ts if part.max_ts != float("-inf") else None
            counts = {k: getattr(part.counts, k) for k in WindowCounts.__slots__}
            conn.execute("INSERT INTO clocks VALUES (?, ?, ?)", (p, max_ts, json.dumps(counts)))
            conn.executemany(
                "INSERT INTO pending VALUES (?, ?, ?, ?)",
                [
                    (p, start, pos, s.encode())
                    for start, window in part.windows.items()
                    for pos, s in enumerate(window.samples)
                ],
            )
        # dedup ids: one compact chunk per (partition, generation) per checkpoint, not a row per event
        dedup = self.dedup
        conn.executemany("INSERT INTO dedup_chunks VALUES (?, ?, ?)",
                         [(p, g, _dumps(ids)) for (p, g), ids in dedup.added.items()])
        conn.execute(f"DELETE FROM dedup_chunks WHERE generation < ? AND partition IN ({owned})", (dedup.forgotten_below,))

    def committed(self) -> None:
        self.state.clear_changes()
        self.dedup.clear_changes()

    def load(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        state = self.state
        parts = _in(partitions)
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
            window.samples.append(Sample.from_json(text))
        (newest,) = conn.execute(f"SELECT max(generation) FROM dedup_chunks WHERE partition IN ({parts})").fetchone()
        if newest is not None:
            rows = conn.execute(
                f"SELECT partition, generation, ids FROM dedup_chunks WHERE partition IN ({parts}) AND generation >= ?"
                " ORDER BY rowid",
                (int(newest) - 1,),
            )
            self.dedup.restore(int(newest), ((e, int(p), int(g)) for p, g, ids in rows for e in orjson.loads(ids)))


class SampleJournal:
    """Checkpoint participant that records the id of every emitted sample (audits and crash tests).

    Not bounded by the stream length: enable it (``checkpoint.journal_samples``) only where that is wanted.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, str]] = []
        self._saved = 0
        self._lock = threading.Lock()

    def record(self, batch: list[Sample]) -> None:
        with self._lock:
            self._pending.extend((s.sample_id, s.user_id) for s in batch)

    def create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS journal (sample_id INTEGER NOT NULL, user_id TEXT NOT NULL)")

    def save(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            self._saved = len(self._pending)
            conn.executemany("INSERT INTO journal VALUES (?, ?)", self._pending[: self._saved])

    def committed(self) -> None:
        with self._lock:
            del self._pending[: self._saved]
            self._saved = 0

    def load(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        """Nothing to restore: the journal is append-only and lives in the database."""
