"""The stream state's changelog on the real broker: a partition's state restored on another "host" (an
empty directory) equals the state its writer checkpointed, and a checkpoint that never committed is
undone, in the local file and in the topic."""

from __future__ import annotations

import copy
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from recsift.stream.broker import EmbeddedBroker
from recsift.stream.changelog import (
    CHUNK_BYTES,
    CHUNK_PREFIX,
    MARKER_KEY,
    ChangelogUnavailable,
    KafkaChangelog,
    StreamChangelog,
    WorkerStateLog,
)
from recsift.stream.checkpoint import Checkpoint, StreamStateStore
from recsift.stream.dedup import DedupIndex
from recsift.stream.kafka import ensure_topic
from recsift.stream.windows import Sample, StreamState
from tests.helpers import kafka_settings
from tests.stream.test_checkpoint import CFG, feed, stream

WIDE = CFG.model_copy(update={"max_users": 10_000})
TOPIC = "src"  # the source topic's name, as the checkpoint's offsets table records it


class Host:
    """One worker's stream state, checkpoint file and changelog (a directory stands for a host)."""

    def __init__(self, path: Path, broker: EmbeddedBroker, changelog_topic: str, changelog: bool = True) -> None:
        # TTL evictions and dedup generation rolls happen (tombstones); capacity eviction, which depends on
        # every partition a process holds, does not, so two hosts can be compared partition by partition
        self.state, self.dedup = StreamState(WIDE, journal=True), DedupIndex(60)
        self.store = StreamStateStore(self.state, self.dedup, track_changes=changelog)
        self.ckpt = Checkpoint(path, [self.store])
        self.log = KafkaChangelog(kafka_settings(broker, changelog_topic).stream, True, changelog_topic, timeout_s=20)
        self.changelog = StreamChangelog(self.log, self.store, TOPIC)
        if changelog:
            self.ckpt.attach_changelog(self.changelog)
        self.emitted: list[Sample] = []

    def feed(self, events: list) -> None:
        self.emitted += feed(self.state, self.dedup, events)

    def commit(self, offsets: dict[int, int]) -> None:
        self.ckpt.commit({(TOPIC, p): o for p, o in offsets.items()})

    def assign(self, partitions: set[int]) -> dict[int, str]:
        outcomes = self.ckpt.sync_changelog(partitions)
        self.ckpt.load(partitions)
        return outcomes

    def snapshot(self, partitions: set[int]) -> dict[str, object]:
        """Every piece of per-partition state (histories with their LRU stamps, clocks and counts, buffered
        samples, remembered ids, journal) and the source offsets."""
        parts = {p: self.state.partitions[p] for p in sorted(partitions) if p in self.state.partitions}
        journal = self.ckpt.conn.execute(
            f"SELECT partition, sample_id FROM journal WHERE partition IN ({','.join(map(str, partitions))})"
        ).fetchall()
        return copy.deepcopy({  # a copy: the live state goes on changing
            "histories": {p: [(u, list(h.items), h.touched_ts, h.seq) for u, h in part.histories.items()]
                          for p, part in parts.items()},
            "clocks": {p: (part.max_ts, part.counts) for p, part in parts.items()},
            "pending": {p: {s: w.samples for s, w in part.windows.items() if w.samples} for p, part in parts.items()},
            "dedup": sorted((e, p) for e, p in self.dedup.ids().items() if p in partitions),
            "journal": sorted(journal),
            "offsets": {p: o for p, o in self.ckpt.offsets(TOPIC).items() if p in partitions},
        })

    def close(self) -> None:
        self.log.close()
        self.ckpt.close()


@pytest.fixture
def hosts(broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path):  # type: ignore[no-untyped-def]
    topic = make_topic(3, prefix="changelog")
    made: list[Host] = []

    def make(name: str, changelog: bool = True) -> Host:
        made.append(Host(tmp_path / name / "recsift.sqlite", broker, topic, changelog))
        return made[-1]

    yield make
    for h in made:
        h.close()


@pytest.mark.parametrize("chunk_bytes", [CHUNK_BYTES, 40])
def test_a_partition_moves_to_an_empty_host_and_continues_identically(hosts, chunk_bytes: int) -> None:  # type: ignore[no-untyped-def]
    """Also with values split into chunk records (40 bytes: most histories and every journal chunk are), as
    a partition's coreset reservoir is when it outgrows a broker's message size limit."""
    events = stream(1500)
    a = hosts("a")
    a.changelog.chunk_bytes = chunk_bytes
    a.feed(events[:400])
    a.commit({0: 400, 1: 380, 2: 390})
    a.feed(events[400:900])  # evictions, generation rolls and forgotten dedup chunks in between
    a.commit({0: 900, 1: 880, 2: 890})
    assert a.changelog.records_written > 100

    b = hosts("b")  # another host: an empty directory
    assert b.assign({1, 2}) == {1: "restored", 2: "restored"}
    assert b.snapshot({1, 2}) == a.snapshot({1, 2})
    written = [r for p in (0, 1, 2) for r in a.log.read(p, 0)]
    chunks = [r for r in written if r.key.startswith(CHUNK_PREFIX)]
    assert bool(chunks) == (chunk_bytes == 40) and all(len(r.value or b"") <= chunk_bytes for r in chunks)
    # the same future: both make the same samples for those partitions from here on
    rest = [(e, p) for e, p in events[900:] if p in (1, 2)]
    assert feed(a.state, a.dedup, rest) == feed(b.state, b.dedup, rest)


def crash_between_changelog_and_commit(hosts) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Host "a" commits a checkpoint, then dies after the next one reached the changelog but before its
    transaction committed; returns the committed state."""
    events = stream(1200)
    a = hosts("a")
    a.feed(events[:500])
    a.commit({0: 500, 1: 500, 2: 500})
    committed = a.snapshot({0, 1, 2})
    a.feed(events[500:1000])
    with pytest.raises(RuntimeError, match="killed"), a.ckpt._transaction() as conn:
        a.store.save(conn)
        a.changelog.publish(conn, {0: 1000, 1: 1000, 2: 1000})
        raise RuntimeError("killed")
    return committed


def test_a_checkpoint_that_did_not_commit_is_undone_in_the_file_and_the_topic(hosts) -> None:  # type: ignore[no-untyped-def]
    committed = crash_between_changelog_and_commit(hosts)
    again = hosts("a")  # the restarted process, on the same directory
    assert again.assign({0, 1, 2}) == {0: "repaired", 1: "repaired", 2: "repaired"}
    assert again.snapshot({0, 1, 2}) == committed  # the local checkpoint stands: the run redoes that work
    # and the topic was brought back to it: a third host restores the committed state, not the lost one
    c = hosts("c")
    assert c.assign({0, 1, 2}) == {0: "restored", 1: "restored", 2: "restored"}
    assert c.snapshot({0, 1, 2}) == committed


def test_negative_control_a_restart_that_trusts_its_own_unfinished_checkpoint_fails(hosts) -> None:  # type: ignore[no-untyped-def]
    """The same crash, restarted by a changelog that cannot tell its own unfinished checkpoint from another
    host's (it forgot its writer id): it restores the lost checkpoint, whose work the run would then skip
    in the selector and journal of this directory — the comparison above must catch that."""
    committed = crash_between_changelog_and_commit(hosts)
    again = hosts("a")
    again.changelog.writer = "forgotten"
    assert again.assign({0, 1, 2}) == {0: "restored", 1: "restored", 2: "restored"}
    assert again.snapshot({0, 1, 2}) != committed


def test_the_owner_that_comes_back_takes_the_newer_state_from_the_changelog(hosts) -> None:  # type: ignore[no-untyped-def]
    events = stream(1500)
    p0 = [(e, p) for e, p in events if p == 0]
    a = hosts("a")
    a.assign({0})
    a.feed(p0[:150])
    a.commit({0: 150})
    b = hosts("b")  # partition 0 moves to b, which processes more of it
    assert b.assign({0}) == {0: "restored"}
    b.feed(p0[150:350])
    b.commit({0: 350})
    a.state.drop_partitions({0})
    a.dedup.drop_partitions({0})
    assert a.assign({0}) == {0: "restored"}  # a's own rows are older than the changelog
    assert a.snapshot({0}) == b.snapshot({0})
    assert a.ckpt.offsets(TOPIC) == {0: 350}
    nothing_new = hosts("b2")
    assert nothing_new.assign({0}) == {0: "restored"}
    assert b.assign({0}) == {0: "restored"}  # a's adopting marker tells b its rows are no longer current


def test_state_checkpointed_before_the_changelog_was_switched_on_is_published_whole(hosts) -> None:  # type: ignore[no-untyped-def]
    a = hosts("a", changelog=False)
    a.feed(stream(600))
    a.commit({0: 600, 1: 600, 2: 600})
    before = a.snapshot({0, 1, 2})
    a.close()
    a = hosts("a")  # the same directory, now with a changelog
    assert a.assign({0, 1, 2}) == {0: "published", 1: "published", 2: "published"}
    b = hosts("b")
    assert b.assign({0, 1, 2}) == {0: "restored", 1: "restored", 2: "restored"}
    assert b.snapshot({0, 1, 2}) == before == a.snapshot({0, 1, 2})


def test_markers_close_every_checkpoint_of_every_partition_that_moved(hosts, broker: EmbeddedBroker) -> None:  # type: ignore[no-untyped-def]
    a = hosts("a")
    a.feed(stream(300))
    a.commit({0: 100, 1: 100, 2: 100})
    a.commit({0: 100, 1: 100, 2: 100})  # nothing changed: nothing written
    a.commit({0: 120, 1: 100, 2: 100})  # only an offset moved: a marker alone
    records = a.log.read(0, 0)
    assert records[-1].key == MARKER_KEY and records[-2].key == MARKER_KEY
    assert sum(r.key == MARKER_KEY for r in a.log.read(1, 0)) == 1


def test_a_write_the_broker_does_not_confirm_rolls_the_checkpoint_back(
    tmp_path: Path, broker: EmbeddedBroker, make_topic: Callable[..., str]
) -> None:
    state, dedup = StreamState(WIDE), DedupIndex(60)
    store = StreamStateStore(state, dedup, track_changes=True)
    ckpt = Checkpoint(tmp_path / "x.sqlite", [store])
    topic = make_topic(1, prefix="changelog")  # partition 2's records have nowhere to go
    log = KafkaChangelog(kafka_settings(broker, topic).stream, True, topic, timeout_s=2)
    ckpt.attach_changelog(StreamChangelog(log, store, TOPIC))
    feed(state, dedup, [(e, 2) for e, _ in stream(200)])
    with pytest.raises(ChangelogUnavailable, match="did not confirm"):
        ckpt.commit({(TOPIC, 2): 200})
    assert ckpt.offsets(TOPIC) == {} and ckpt.conn.execute("SELECT count(*) FROM histories").fetchone() == (0,)
    assert state.partitions[2].dirty  # the next checkpoint retries all of it
    log.close()


class Blobs:
    """A participant with worker state of its own (a ``WorkerStore``): named byte strings, in one table. The
    real ones (the scorer, the selection stage) are checked end to end in tests/test_service.py."""

    worker_part_names = ("big", "small")

    def __init__(self) -> None:
        self.parts: dict[str, bytes] = {}
        self.worker_changes: dict[str, bytes] = {}
        self.own: set[int] = set()

    def create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS blobs (name TEXT PRIMARY KEY, value BLOB NOT NULL)")

    def save(self, conn: sqlite3.Connection) -> None:
        self.worker_changes = dict(self.parts)
        conn.executemany("INSERT OR REPLACE INTO blobs VALUES (?, ?)", list(self.parts.items()))

    def committed(self) -> None: ...

    def load(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        self.parts = self.worker_parts(conn)

    def release(self, partitions: set[int]) -> None: ...

    def worker_parts(self, conn: sqlite3.Connection) -> dict[str, bytes]:
        return {str(n): bytes(v) for n, v in conn.execute("SELECT name, value FROM blobs")}

    def replace_worker_parts(self, conn: sqlite3.Connection, parts: dict[str, bytes]) -> None:
        conn.executemany("INSERT OR REPLACE INTO blobs VALUES (?, ?)", list(parts.items()))

    def restored_own(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        self.own |= partitions


class OneSlot(WorkerStateLog):
    """Negative control: every version of a part overwrites the same slot."""

    @staticmethod
    def target_slot(conn: sqlite3.Connection, part: str) -> int:
        return 0


def worker_host(hosts, broker: EmbeddedBroker, name: str, worker: str, log: type[WorkerStateLog] = WorkerStateLog,
                ) -> tuple[Host, Blobs]:  # type: ignore[no-untyped-def]
    host = hosts(name)
    topic = f"{host.log.topic}.workers"
    ensure_topic(kafka_settings(broker, topic).stream, True, topic, 1, {"cleanup.policy": "compact"})
    host.changelog.workers = log(KafkaChangelog(kafka_settings(broker, topic).stream, True, topic, timeout_s=20),
                                 worker, chunk_bytes=1000)
    with host.ckpt._transaction() as conn:
        host.changelog.create_schema(conn)
    blobs = Blobs()
    host.ckpt.add(blobs)
    host.changelog.add(blobs)
    return host, blobs


def crash_while_writing_worker_state(hosts, broker: EmbeddedBroker, log: type[WorkerStateLog]
                                     ) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """Worker "w" commits its state twice, then dies after a third version of its own state reached the
    worker topic, before its partitions' records and markers did; returns the committed parts. (Had the markers
    gone out too, a new host would take that third checkpoint whole, its partitions and worker state alike.)"""
    events = stream(900)
    a, blobs = worker_host(hosts, broker, "a", "w", log)
    a.feed(events[:300])
    blobs.parts = {"big": b"1" * 3500, "small": b"one"}
    a.commit({0: 300, 1: 300, 2: 300})
    a.feed(events[300:600])
    blobs.parts = {"big": b"2" * 2500, "small": b"two"}
    a.commit({0: 600, 1: 600, 2: 600})
    committed = dict(blobs.parts)
    blobs.parts = {"big": b"3" * 4100, "small": b"three"}
    with pytest.raises(RuntimeError, match="killed"), a.ckpt._transaction() as conn:
        blobs.save(conn)
        a.changelog._publish_worker(conn)  # the first step of publish(): the worker state goes out first
        raise RuntimeError("killed")
    return committed


def test_an_empty_disk_restores_the_workers_own_state_that_its_partitions_checkpoint_names(
    hosts, broker: EmbeddedBroker
) -> None:  # type: ignore[no-untyped-def]
    """A worker's own state (scorer, selection) is versioned in the worker topic, two slots per part: the
    unconfirmed third version cannot overwrite the committed second, which the partitions' markers name."""
    committed = crash_while_writing_worker_state(hosts, broker, WorkerStateLog)
    c, blobs = worker_host(hosts, broker, "c", "w")  # the same worker, its host lost: an empty disk
    assert c.assign({0, 1, 2}) == {0: "restored", 1: "restored", 2: "restored"}
    assert blobs.parts == committed and blobs.own == {0, 1, 2}
    other, theirs = worker_host(hosts, broker, "d", "another")  # another worker: its own state starts empty
    assert other.assign({1}) == {1: "restored"}
    assert theirs.parts == {} and theirs.own == set()


def test_negative_control_one_slot_per_part_loses_the_committed_worker_state(hosts, broker: EmbeddedBroker) -> None:  # type: ignore[no-untyped-def]
    committed = crash_while_writing_worker_state(hosts, broker, OneSlot)
    c, blobs = worker_host(hosts, broker, "c", "w", OneSlot)
    c.assign({0, 1, 2})
    assert blobs.parts != committed  # the unconfirmed write took the committed version's place
