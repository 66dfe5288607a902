"""The coreset store: members and selector state inside the checkpoint transaction, immutable snapshots.

Tables (in the checkpoint database):

- ``coreset_members``: the live coreset (sample, scores, stratum, scorer version, key, times, embedding),
  rewritten by :meth:`CoresetStore.save` inside the checkpoint transaction, so it always matches the
  committed source offsets (a crash rolls members back together with the offsets);
- ``coreset_spares``: the selector's spares (non-members that refill a stratum whose quota grows), same
  columns, saved in the same transaction;
- ``selector_state``: the selector's counts, edges, sketch and clocks (one JSON row + the sketch blob);
- ``coreset_snapshots`` / ``snapshot_members``: numbered, immutable copies that refresh jobs train on.
  A snapshot is taken from committed members only, in its own transaction.

Refresh jobs (other processes) read snapshots with :func:`read_snapshot` on their own connection.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from recsift.selection.reservoir import StratifiedReservoir
from recsift.selection.selector import Member

if TYPE_CHECKING:
    from recsift.selection.stage import ValidationReservoir
from recsift.stream.checkpoint import connect, sample_from_json, sample_to_json
from recsift.stream.windows import Sample

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS coreset_members (sample_id INTEGER PRIMARY KEY, user_id TEXT NOT NULL,"
    " history TEXT NOT NULL, target TEXT NOT NULL, ts REAL NOT NULL, score REAL NOT NULL, version INTEGER NOT NULL,"
    " key REAL NOT NULL, stratum INTEGER NOT NULL, inserted_ts REAL NOT NULL,"
    " updated_at REAL NOT NULL, embedding BLOB)",
    "CREATE TABLE IF NOT EXISTS coreset_spares (sample_id INTEGER PRIMARY KEY, user_id TEXT NOT NULL,"
    " history TEXT NOT NULL, target TEXT NOT NULL, ts REAL NOT NULL, score REAL NOT NULL, version INTEGER NOT NULL,"
    " key REAL NOT NULL, stratum INTEGER NOT NULL, inserted_ts REAL NOT NULL,"
    " updated_at REAL NOT NULL, embedding BLOB)",
    "CREATE TABLE IF NOT EXISTS selector_state (id INTEGER PRIMARY KEY CHECK (id = 1), state TEXT NOT NULL,"
    " sketch BLOB NOT NULL, counts BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS validation_samples (pos INTEGER PRIMARY KEY, sample BLOB NOT NULL, embedding BLOB)",
    "CREATE TABLE IF NOT EXISTS coreset_snapshots (snapshot_id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " created_at REAL NOT NULL, size INTEGER NOT NULL, scorer_version INTEGER NOT NULL, reason TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS snapshot_members (snapshot_id INTEGER NOT NULL, sample_id INTEGER NOT NULL,"
    " user_id TEXT NOT NULL, history TEXT NOT NULL, target TEXT NOT NULL, ts REAL NOT NULL, score REAL NOT NULL,"
    " stratum INTEGER NOT NULL, PRIMARY KEY (snapshot_id, sample_id))",
)


class SnapshotNotFound(LookupError):
    """A coreset snapshot that is not in the checkpoint database."""


class CoresetStore:
    """Checkpoint participant for a streaming selector."""

    def __init__(self, selector: StratifiedReservoir, validation: ValidationReservoir | None = None) -> None:
        self.selector = selector
        self.validation = validation
        self._loaded = False

    def create_schema(self, conn: sqlite3.Connection) -> None:
        for statement in SCHEMA:
            conn.execute(statement)

    def save(self, conn: sqlite3.Connection) -> None:
        sel = self.selector
        now = time.time()
        for table, held in (("coreset_members", sel.members), ("coreset_spares", sel.spare)):
            conn.execute(f"DELETE FROM {table}")
            conn.executemany(f"INSERT INTO {table} VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                             (_member_row(m, now) for m in held.values()))
        if self.validation is not None:
            v = self.validation
            conn.execute("DELETE FROM validation_samples")
            conn.executemany("INSERT INTO validation_samples VALUES (?, ?, ?)",
                             ((i, sample_to_json(smp), np.asarray(e, dtype=np.float32).tobytes())
                              for i, (smp, e) in enumerate(zip(v.samples, v.embeddings, strict=True))))
        state = {"edges": sel.edges, "version": sel.version, "t0": sel.t0, "t_counts": sel.t_counts,
                 "since_edges": sel.since_edges, "sketch_pos": sel.sketch_pos, "stats": asdict(sel.stats),
                 "quotas": sel.quotas,
                 "validation": [self.validation.pos, self.validation.seen] if self.validation is not None else None}
        conn.execute("INSERT OR REPLACE INTO selector_state VALUES (1, ?, ?, ?)",
                     (json.dumps(state), sel.sketch.astype(np.float64).tobytes(), sel.counts.astype(np.float64).tobytes()))

    def committed(self) -> None:
        return None

    def load(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        """Restore once per process (the coreset is not partitioned)."""
        if self._loaded:
            return
        self._loaded = True
        row = conn.execute("SELECT state, sketch, counts FROM selector_state WHERE id = 1").fetchone()
        if row is None:
            return
        sel = self.selector
        state = json.loads(row[0])
        sel.edges = tuple(state["edges"]) if state["edges"] is not None else None  # type: ignore[assignment]
        sel.version, sel.t0, sel.t_counts = state["version"], state["t0"], state["t_counts"]
        sel.since_edges, sel.sketch_pos = state["since_edges"], state["sketch_pos"]
        for k, v in state["stats"].items():
            setattr(sel.stats, k, v)
        sel.sketch = np.frombuffer(row[1], dtype=np.float64).copy()
        sel.counts = np.frombuffer(row[2], dtype=np.float64).copy()
        sel.members.clear()
        sel.spare.clear()
        sel.users.clear()
        for table, held in (("coreset_members", sel.members), ("coreset_spares", sel.spare)):
            for r in conn.execute("SELECT sample_id, user_id, history, target, ts, score, version, key, stratum,"
                                  f" inserted_ts, embedding FROM {table}"):
                m = _member_from_row(r)
                held[m.sample.sample_id] = m
        for m in sel.members.values():
            sel.users[m.sample.user_id] += 1
        sel.restored(state.get("quotas"))
        if self.validation is not None and state.get("validation") is not None:
            v = self.validation
            v.pos, v.seen = state["validation"]
            rows = conn.execute("SELECT sample, embedding FROM validation_samples ORDER BY pos").fetchall()
            v.samples = [sample_from_json(a) for a, _ in rows]
            v.embeddings = [np.frombuffer(b, dtype=np.float32).copy() for _, b in rows]


def _member_row(m: Member, now: float) -> tuple[Any, ...]:
    return (m.sample.sample_id, m.sample.user_id, orjson.dumps(m.sample.history).decode(), m.sample.target,
            m.sample.ts, m.score, m.version, m.key, m.stratum, m.inserted_ts, now,
            None if m.embedding is None else np.asarray(m.embedding, dtype=np.float32).tobytes())


def _member_from_row(r: tuple[Any, ...]) -> Member:
    emb = None if r[10] is None else np.frombuffer(r[10], dtype=np.float32).copy()
    return Member(Sample(int(r[0]), r[1], tuple(orjson.loads(r[2])), r[3], float(r[4])), float(r[5]), int(r[6]),
                  float(r[7]), int(r[8]), emb, float(r[9]))


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
    conn = connect(db_path)
    try:
        for statement in SCHEMA:
            conn.execute(statement)
        conn.execute("BEGIN IMMEDIATE")
        size, version = conn.execute("SELECT count(*), coalesce(max(version), 0) FROM coreset_members").fetchone()
        created = time.time()
        cur = conn.execute("INSERT INTO coreset_snapshots (created_at, size, scorer_version, reason) VALUES (?,?,?,?)",
                           (created, size, version, reason))
        sid = int(cur.lastrowid or 0)
        conn.execute("INSERT INTO snapshot_members SELECT ?, sample_id, user_id, history, target, ts, score, stratum"
                     " FROM coreset_members", (sid,))
        conn.execute("COMMIT")
        return SnapshotInfo(sid, created, int(size), int(version), reason)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()


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
    return [sample_from_json(a) for (a,) in _rows(db_path, "SELECT sample FROM validation_samples ORDER BY pos")]
