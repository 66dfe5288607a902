"""The coreset store: the selection stage's state inside the checkpoint transaction, immutable snapshots.

Tables (in the checkpoint database):

- ``selection_state``: the bytes of :meth:`SelectionStage.state_dict` (selector members and spares,
  sketch, counts, quotas; validation reservoir; recent window; coverage; counters), rewritten by
  :meth:`CoresetStore.save` inside the checkpoint transaction, so it always matches the committed source
  offsets (a crash rolls the coreset back together with the offsets). Restoring reads only this.
- ``coreset_members`` and ``validation_samples``: rows derived from the same state in the same
  transaction, for readers in other processes (snapshots, the refresh's validation set, ``recsift coreset``).
- ``coreset_snapshots`` / ``snapshot_members``: numbered, immutable copies that refresh jobs train on.
  A snapshot is taken from committed members only, in its own transaction.

Refresh jobs (other processes) read snapshots with :func:`read_snapshot` on their own connection.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from recsift.selection.partitioned import PartitionedSelector
from recsift.selection.publish import CoresetPublisher, coreset_records
from recsift.selection.selector import Member
from recsift.selection.stage import SelectionStage
from recsift.selection.validation import PartitionedValidation
from recsift.state import State
from recsift.stream.checkpoint import connect
from recsift.stream.windows import Sample

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS selection_state (id INTEGER PRIMARY KEY CHECK (id = 1), state BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS coreset_members (sample_id INTEGER PRIMARY KEY, user_id TEXT NOT NULL,"
    " history TEXT NOT NULL, target TEXT NOT NULL, ts REAL NOT NULL, score REAL NOT NULL, version INTEGER NOT NULL,"
    " stratum INTEGER NOT NULL, updated_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS validation_samples (pos INTEGER PRIMARY KEY, sample BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS selection_partitions (partition INTEGER PRIMARY KEY, state BLOB NOT NULL,"
    " foreign_writer INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS coreset_snapshots (snapshot_id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " created_at REAL NOT NULL, size INTEGER NOT NULL, scorer_version INTEGER NOT NULL, reason TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS snapshot_members (snapshot_id INTEGER NOT NULL, sample_id INTEGER NOT NULL,"
    " user_id TEXT NOT NULL, history TEXT NOT NULL, target TEXT NOT NULL, ts REAL NOT NULL, score REAL NOT NULL,"
    " stratum INTEGER NOT NULL, PRIMARY KEY (snapshot_id, sample_id))",
)


class SnapshotNotFound(LookupError):
    """A coreset snapshot that is not in the checkpoint database."""


SELECTION_KEY = b"s"  # a partition's changelog record of its coreset reservoir (PartitionedSelector.part_state)


class CoresetStore:
    """Checkpoint participant for the selection stage.

    The stage's own state is one row. With a :class:`~recsift.selection.partitioned.PartitionedSelector`
    each owned partition's reservoir is also a row of ``selection_partitions`` and, with a changelog, the
    partition's ``s`` record (:class:`~recsift.stream.checkpoint.PartitionStore`): a partition assigned to
    this worker is adopted from its row (restored from the changelog first when another worker wrote it
    last), a revoked one is released after the revoke's checkpoint.

    With a ``publisher``, every committed state is also published to the coreset topic (after the
    transaction commits, before offsets go to Kafka: :mod:`recsift.selection.publish`)."""

    worker_part_names = ("selection",)  # the selection_state row: this worker's own state

    def __init__(self, stage: SelectionStage, publisher: CoresetPublisher | None = None) -> None:
        self.stage = stage
        self.publisher = publisher
        self._to_publish: dict[bytes, bytes] | None = None
        self._loaded = False
        self.changes: dict[int, list[tuple[bytes, bytes | None]]] = {}
        self._written: dict[int, bytes] = {}  # partition → its last committed reservoir record
        self._writing: dict[int, bytes] = {}
        self.worker_changes: dict[str, bytes] = {}
        self._own_written: bytes | None = None

    @property
    def partitioned(self) -> PartitionedSelector | None:
        sel = self.stage.selector
        return sel if isinstance(sel, PartitionedSelector) else None

    def create_schema(self, conn: sqlite3.Connection) -> None:
        for statement in SCHEMA:
            conn.execute(statement)

    def save(self, conn: sqlite3.Connection) -> None:
        now = time.time()
        own = self.stage.state_dict().to_bytes()
        conn.execute("INSERT OR REPLACE INTO selection_state VALUES (1, ?)", (own,))
        self.worker_changes = {"selection": own} if own != self._own_written else {}
        self.changes, self._writing = {}, {}
        if (sel := self.partitioned) is not None:
            for p in sorted(sel.parts):
                value = self.part_state(p).to_bytes()
                if self._written.get(p) == value:
                    continue
                conn.execute("INSERT OR REPLACE INTO selection_partitions VALUES (?, ?, 0)", (p, value))
                self.changes[p] = [(SELECTION_KEY, value)]
                self._writing[p] = value
        conn.execute("DELETE FROM coreset_members")
        conn.executemany("INSERT INTO coreset_members VALUES (?,?,?,?,?,?,?,?,?)",
                         (_member_row(m, now) for m in self.stage.selector.members.values()))
        conn.execute("DELETE FROM validation_samples")
        conn.executemany("INSERT INTO validation_samples VALUES (?, ?)",
                         enumerate(s.encode() for s, _ in self.stage.validation.ordered()))
        if self.publisher is not None:
            self._to_publish = self.records()

    def part_state(self, partition: int) -> State:
        """What moves with a partition: its coreset reservoir and, when kept per partition, its validation
        reservoir (the ``s`` changelog record)."""
        sel = self.partitioned
        assert sel is not None
        state = sel.part_state(partition)
        if isinstance(val := self.stage.validation, PartitionedValidation):
            state.put("validation", val.part_state(partition))
        return state

    def committed(self) -> None:
        self._own_written = self.worker_changes.get("selection", self._own_written)
        self._written.update(self._writing)
        self._writing = {}
        if self.publisher is not None and self._to_publish is not None:
            self.publisher.publish(self._to_publish)
            self._to_publish = None

    def records(self) -> dict[bytes, bytes]:
        """The stage's coreset state as coreset topic records (:func:`coreset_records`)."""
        assert self.publisher is not None
        selector = self.stage.selector
        stage = self.stage
        return coreset_records(self.publisher.worker,
                               ((m.sample, m.score, m.stratum, m.version) for m in selector.members.values()),
                               stage.validation.numbered(), selector.stats.offered,
                               samples=selector.stats.offered + stage.validation.seen,
                               drift=stage.last_drift.as_dict() if stage.last_drift else None)

    def load(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        """The stage's state once per process; with a partitioned selector, each assigned partition's
        reservoir (an empty one for a partition never seen)."""
        if not self._loaded:
            self._loaded = True
            row = conn.execute("SELECT state FROM selection_state WHERE id = 1").fetchone()
            if row is not None:
                self.stage.load_state_dict(State.from_bytes(row[0]))
        if (sel := self.partitioned) is None:
            return
        for p in sorted(partitions):
            row = conn.execute("SELECT state, foreign_writer FROM selection_partitions WHERE partition = ?",
                               (p,)).fetchone()
            state = State.from_bytes(row[0]) if row is not None else None
            sel.adopt(p, state, foreign=bool(row and row[1]))
            if isinstance(val := self.stage.validation, PartitionedValidation):
                # a reservoir saved before validation moved with its partition brings none: a new, empty one
                val.adopt(p, state.part("validation") if state is not None and "validation" in state.meta else None)
            self._written.pop(p, None)
        if self.publisher is not None:
            self.publisher.adopt(set(partitions))

    def release(self, partitions: set[int]) -> None:
        """Revoked partitions' reservoirs leave (the revoke's checkpoint saved them; the next owner adopts them)."""
        if (sel := self.partitioned) is None:
            return
        sel.release(partitions)
        if isinstance(val := self.stage.validation, PartitionedValidation):
            val.release(partitions)
        for p in partitions:
            self._written.pop(p, None)
        if self.publisher is not None:
            self.publisher.release(set(partitions))

    # ------------------------------------------------------------------ the changelog (PartitionStore, WorkerStore)

    def worker_parts(self, conn: sqlite3.Connection) -> dict[str, bytes]:
        row = conn.execute("SELECT state FROM selection_state WHERE id = 1").fetchone()
        return {"selection": bytes(row[0])} if row is not None else {}

    def replace_worker_parts(self, conn: sqlite3.Connection, parts: dict[str, bytes]) -> None:
        if "selection" in parts:
            conn.execute("INSERT OR REPLACE INTO selection_state VALUES (1, ?)", (parts["selection"],))

    def restored_own(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        """These reservoirs hold scores of this worker's own scorer, restored with them: not foreign, so their
        members are re-scored exactly when they would have been on the kept disk."""
        conn.executemany("UPDATE selection_partitions SET foreign_writer = 0 WHERE partition = ?",
                         [(p,) for p in sorted(partitions)])

    def owns(self, key: bytes) -> bool:
        return key == SELECTION_KEY

    def partition_records(self, conn: sqlite3.Connection, partition: int) -> dict[bytes, bytes]:
        row = conn.execute("SELECT state FROM selection_partitions WHERE partition = ?", (int(partition),)).fetchone()
        return {SELECTION_KEY: bytes(row[0])} if row is not None else {}

    def replace_partition(self, conn: sqlite3.Connection, partition: int, records: dict[bytes, bytes]) -> None:
        """Another worker's reservoir for ``partition`` (its scores are that worker's: marked foreign)."""
        conn.execute("DELETE FROM selection_partitions WHERE partition = ?", (int(partition),))
        if SELECTION_KEY in records:
            conn.execute("INSERT INTO selection_partitions VALUES (?, ?, 1)", (int(partition), records[SELECTION_KEY]))


def _member_row(m: Member, now: float) -> tuple[Any, ...]:
    s = m.sample
    return (s.sample_id, s.user_id, orjson.dumps(s.history).decode(), s.target, s.ts, m.score, m.version, m.stratum, now)


def write_coreset(db_path: str | Path, members: Iterable[tuple[Sample, float, int, int]],
                  validation: Iterable[Sample]) -> None:
    """Replace the committed coreset (members as (sample, score, stratum, scorer version)) and validation
    samples (oldest first) in one transaction: how a trainer materialises the coreset topic into the
    tables its refreshes snapshot and judge on."""
    now = time.time()
    with _transaction(db_path) as conn:
        conn.execute("DELETE FROM coreset_members")
        conn.executemany("INSERT INTO coreset_members VALUES (?,?,?,?,?,?,?,?,?)",
                         ((s.sample_id, s.user_id, orjson.dumps(s.history).decode(), s.target, s.ts, score, version,
                           stratum, now) for s, score, stratum, version in members))
        conn.execute("DELETE FROM validation_samples")
        conn.executemany("INSERT INTO validation_samples VALUES (?, ?)", enumerate(s.encode() for s in validation))


@contextmanager
def _transaction(db_path: str | Path) -> Iterator[sqlite3.Connection]:
    """One write transaction on its own connection (schema created first); rolled back on any error."""
    conn = connect(db_path)
    try:
        for statement in SCHEMA:
            conn.execute(statement)
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()


def read_selection_state(db_path: str | Path) -> State | None:
    """The committed selection stage state (for inspection and equivalence checks)."""
    rows = _rows(db_path, "SELECT state FROM selection_state WHERE id = 1")
    return State.from_bytes(rows[0][0]) if rows else None


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: int
    created_at: float
    size: int
    scorer_version: int
    reason: str


@dataclass(frozen=True)
class SnapshotMember:
    sample: Sample
    score: float
    stratum: int


def take_snapshot(db_path: str | Path, reason: str = "refresh") -> SnapshotInfo:
    """Copy the committed coreset into a new numbered snapshot (one transaction)."""
    with _transaction(db_path) as conn:
        size, version = conn.execute("SELECT count(*), coalesce(max(version), 0) FROM coreset_members").fetchone()
        created = time.time()
        cur = conn.execute("INSERT INTO coreset_snapshots (created_at, size, scorer_version, reason) VALUES (?,?,?,?)",
                           (created, size, version, reason))
        sid = int(cur.lastrowid or 0)
        conn.execute("INSERT INTO snapshot_members SELECT ?, sample_id, user_id, history, target, ts, score, stratum"
                     " FROM coreset_members", (sid,))
    return SnapshotInfo(sid, created, int(size), int(version), reason)


def _rows(db_path: str | Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """All rows of one read query on its own connection (readers in other processes use this)."""
    conn = connect(db_path)
    try:
        for statement in SCHEMA:
            conn.execute(statement)
        return [tuple(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def list_snapshots(db_path: str | Path) -> list[SnapshotInfo]:
    return [SnapshotInfo(int(a), float(b), int(c), int(d), e) for a, b, c, d, e in _rows(
        db_path, "SELECT snapshot_id, created_at, size, scorer_version, reason FROM coreset_snapshots ORDER BY snapshot_id")]


def read_snapshot(db_path: str | Path, snapshot_id: int | None = None) -> tuple[SnapshotInfo, list[SnapshotMember]]:
    """A snapshot's members (the latest snapshot when ``snapshot_id`` is None)."""
    snaps = list_snapshots(db_path)
    if not snaps:
        raise SnapshotNotFound(f"no coreset snapshot in {db_path}")
    info = snaps[-1] if snapshot_id is None else next((s for s in snaps if s.snapshot_id == snapshot_id), None)
    if info is None:
        raise SnapshotNotFound(f"no coreset snapshot {snapshot_id} in {db_path}")
    rows = _rows(db_path, "SELECT sample_id, user_id, history, target, ts, score, stratum FROM snapshot_members"
                          " WHERE snapshot_id = ? ORDER BY sample_id", (info.snapshot_id,))
    return info, [SnapshotMember(Sample(int(a), b, tuple(orjson.loads(c)), d, float(e)), float(f), int(g))
                  for a, b, c, d, e, f, g in rows]


def export_snapshot(db_path: str | Path, out: Path, snapshot_id: int | None = None) -> SnapshotInfo:
    """Write a snapshot as JSONL (one member per line) for inspection."""
    info, members = read_snapshot(db_path, snapshot_id)
    with out.open("w") as fh:
        for m in members:
            s = m.sample
            fh.write(json.dumps({"sample_id": s.sample_id, "user_id": s.user_id, "history": list(s.history),
                                 "target": s.target, "ts": s.ts, "score": m.score, "stratum": m.stratum}) + "\n")
    return info


def live_members(db_path: str | Path) -> list[tuple[Any, ...]]:
    """(sample id, user, target, score, stratum, version) of the committed live coreset."""
    return _rows(db_path, "SELECT sample_id, user_id, target, score, stratum, version FROM coreset_members"
                          " ORDER BY sample_id")


def read_validation(db_path: str | Path) -> list[Sample]:
    """The committed recent validation reservoir (refresh evaluation reads it)."""
    return [Sample.from_json(a) for (a,) in _rows(db_path, "SELECT sample FROM validation_samples ORDER BY pos")]
