from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from recsift.config import WindowConfig
from recsift.stream.checkpoint import (
    Checkpoint,
    CheckpointError,
    StreamStateStore,
)
from recsift.stream.dedup import DedupIndex
from recsift.stream.events import Event
from recsift.stream.windows import Sample, StreamState

CFG = WindowConfig(max_history=4, window_seconds=10.0, allowed_lateness_s=5.0, max_batch=8, max_users=30, user_ttl_s=80.0)


def stream(n: int, seed: int = 1) -> list[tuple[Event, int]]:
    rnd = random.Random(seed)
    out = []
    for k in range(n):
        u = rnd.randrange(40)
        out.append((Event(f"e{k}", f"u{u}", f"i{rnd.randrange(15)}", k * 0.7 + rnd.uniform(-8, 0)), u % 3))
    return out


def feed(state: StreamState, dedup: DedupIndex, events: list[tuple[Event, int]]) -> list[Sample]:
    out: list[Sample] = []
    for e, p in events:
        if not dedup.seen_before(e.event_id, p):
            for batch in state.process(e, p, now=0.0):
                out.extend(batch)
    return out


def snapshot(state: StreamState, dedup: DedupIndex) -> dict[str, object]:
    return {
        "histories": {p: [(u, list(h.items), h.touched_ts) for u, h in part.histories.items()] for p, part in state.partitions.items()},
        "clocks": {p: (part.max_ts, part.counts) for p, part in state.partitions.items()},
        "pending": {p: {s: w.samples for s, w in part.windows.items() if w.samples} for p, part in state.partitions.items()},
        "dedup": sorted(dedup.ids().items()),
        "users": state.users,
    }


def fresh(path: Path) -> tuple[StreamState, DedupIndex, Checkpoint]:
    state, dedup = StreamState(CFG), DedupIndex(50)
    return state, dedup, Checkpoint(path, [StreamStateStore(state, dedup)])


def test_round_trip_restores_everything_and_the_future(tmp_path: Path) -> None:
    events = stream(600)
    a_state, a_dedup, a_ckpt = fresh(tmp_path / "a.sqlite")
    feed(a_state, a_dedup, events[:200])
    a_ckpt.commit({("t", 0): 10})
    feed(a_state, a_dedup, events[200:350])  # a second, incremental checkpoint (evictions happen in between)
    a_ckpt.commit({("t", 0): 20, ("t", 1): 5})
    b_state, b_dedup, b_ckpt = fresh(tmp_path / "a.sqlite")
    b_ckpt.load({0, 1, 2})
    assert snapshot(b_state, b_dedup) == snapshot(a_state, a_dedup)
    assert b_ckpt.offsets("t") == {0: 20, 1: 5}
    # the same future: both produce identical samples from here on
    assert feed(a_state, a_dedup, events[350:]) == feed(b_state, b_dedup, events[350:])
    n_rows = b_ckpt.conn.execute("SELECT count(*) FROM histories").fetchone()[0]
    assert n_rows == a_state.users and a_state.users <= CFG.max_users  # evicted users were deleted


def test_load_only_the_assigned_partitions(tmp_path: Path) -> None:
    state, dedup, ckpt = fresh(tmp_path / "c.sqlite")
    feed(state, dedup, stream(300))
    ckpt.commit({})
    b_state, b_dedup, b_ckpt = fresh(tmp_path / "c.sqlite")
    b_ckpt.load({1})
    assert set(b_state.partitions) == {1}
    assert b_state.users == len(state.partitions[1].histories)
    assert b_dedup.ids() and all(p == 1 for p in b_dedup.ids().values())


class Exploding:
    def create_schema(self, conn: sqlite3.Connection) -> None:
        pass

    def save(self, conn: sqlite3.Connection) -> None:
        raise RuntimeError("disk on fire")

    def committed(self) -> None:
        raise AssertionError("must not be called after a failed save")

    def load(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        pass

    def release(self, partitions: set[int]) -> None:
        pass


def test_a_failed_save_rolls_back_state_and_offsets(tmp_path: Path) -> None:
    state, dedup, ckpt = fresh(tmp_path / "d.sqlite")
    events = stream(200)
    feed(state, dedup, events[:100])
    ckpt.commit({("t", 0): 100})
    before = ckpt.conn.execute("SELECT * FROM histories ORDER BY partition, user_id").fetchall()
    feed(state, dedup, events[100:])
    ckpt.add(Exploding())
    with pytest.raises(RuntimeError, match="disk on fire"):
        ckpt.commit({("t", 0): 200})
    assert ckpt.offsets("t") == {0: 100}
    assert ckpt.conn.execute("SELECT * FROM histories ORDER BY partition, user_id").fetchall() == before
    assert state.partitions[0].dirty  # change tracking kept for the next attempt


def test_schema_version_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.sqlite"
    Checkpoint(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(CheckpointError, match="schema version 999"):
        Checkpoint(path)


def test_checkpoint_uses_wal_and_full_sync(tmp_path: Path) -> None:
    ckpt = Checkpoint(tmp_path / "w.sqlite")
    assert ckpt.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ckpt.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_journal_records_each_emitted_sample_once_with_its_partition(tmp_path: Path) -> None:
    state, dedup = StreamState(CFG, journal=True), DedupIndex(1000)
    ckpt = Checkpoint(tmp_path / "j.sqlite", [StreamStateStore(state, dedup)])
    events = stream(400)
    emitted = feed(state, dedup, events[:200])
    ckpt.commit({})
    ckpt.commit({})  # nothing new: nothing journaled twice
    emitted += feed(state, dedup, events[200:])
    emitted += [s for batch in state.flush_idle(now=1e9) for s in batch]
    ckpt.commit({})
    rows = ckpt.conn.execute("SELECT sample_id, user_id, partition FROM journal ORDER BY rowid").fetchall()
    assert sorted(r[0] for r in rows) == sorted(s.sample_id for s in emitted) and len(rows) > 100
    assert all(p == int(u[1:]) % 3 for _, u, p in rows)  # stream() puts user uN on partition N % 3


def test_a_version_1_file_is_migrated_in_place(tmp_path: Path) -> None:
    """Version 1 kept the journal without partitions; its rows stay, new rows carry the partition."""
    path = tmp_path / "v1.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                       "INSERT INTO meta VALUES ('schema_version', '1');"
                       "CREATE TABLE journal (sample_id INTEGER NOT NULL, user_id TEXT NOT NULL);"
                       "INSERT INTO journal VALUES (7, 'u7');")
    conn.close()
    state, dedup = StreamState(CFG, journal=True), DedupIndex(1000)
    ckpt = Checkpoint(path, [StreamStateStore(state, dedup)])
    assert ckpt.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    feed(state, dedup, stream(100))
    state.flush_idle(now=1e9)
    ckpt.commit({})
    rows = ckpt.conn.execute("SELECT sample_id, partition FROM journal ORDER BY rowid").fetchall()
    assert rows[0] == (7, None) and len(rows) > 1 and all(p is not None for _, p in rows[1:])
