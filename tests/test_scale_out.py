"""Scale-out: `recsift run` workers of one consumer group, each on its own state directory (standing for
its own host), whose partitions' stream state moves through the changelog topic."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from recsift.config import WindowConfig
from recsift.data.datasets import recbole_events
from recsift.selection.stratified import partition_budget
from recsift.state import State
from recsift.stream.broker import EmbeddedBroker
from recsift.stream.checkpoint import Checkpoint, StreamStateStore
from recsift.stream.dedup import DedupIndex
from recsift.stream.kafka import keyed, produce_events
from recsift.stream.windows import StreamState
from tests.helpers import SERVICE_ENV as ENV
from tests.helpers import kafka_settings, wait_for
from tests.test_service import db_rows, kafka_args, offsets_done

DEDUP = 400_000  # remembers every id of ml-100k: what each partition remembers does not depend on the split
# window.idle_flush_s off: when that processing-time flush fires decides which samples are still buffered at
# the end; the samples themselves never depend on it
WINDOW = WindowConfig(idle_flush_s=1e9)
VALIDATION_SIZE = 300  # each partition keeps its last 100 held-out samples: the reservoirs evict across the move


def worker_cmd(state: Path, broker: EmbeddedBroker, topic: str, group: str, changelog: str,
               idle_s: float = 5) -> list[str]:
    sets = {"scoring.enabled": "false", "checkpoint.changelog_topic": changelog, "checkpoint.interval_s": 1.0,
            "window.idle_flush_s": WINDOW.idle_flush_s, "stream.dedup_capacity": DEDUP, "stream.stop_when_idle_s": idle_s,
            "monitoring.port": 0}
    return [sys.executable, "-m", "recsift.cli", "run", "--state-dir", str(state), "--no-progress", "--journal",
            *kafka_args(broker, topic, group), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def stream_state(state: Path, partitions: set[int], topic: str) -> dict[str, Any]:
    """Every piece of a worker's committed per-partition stream state: histories (items and TTL clock), each
    partition's clock and counts, the samples buffered in open windows, the remembered event ids, the journal
    of emitted samples, and the source offsets. (A history's ``seq`` is left out: it stamps the order in which
    one process touched users of all its partitions, so it differs between a split run and a single one.)"""
    st, dedup = StreamState(WINDOW, journal=True), DedupIndex(DEDUP)
    ckpt = Checkpoint(state / "recsift.sqlite", [StreamStateStore(st, dedup)])
    try:
        ckpt.load(partitions)
        journal = ckpt.conn.execute("SELECT partition, sample_id FROM journal ORDER BY partition, sample_id").fetchall()
        offsets = ckpt.offsets(topic)
    finally:
        ckpt.close()
    parts = st.partitions
    return {
        "histories": {p: sorted((u, list(h.items), h.touched_ts) for u, h in parts[p].histories.items()) for p in parts},
        "clocks": {p: (parts[p].max_ts, parts[p].counts) for p in parts},
        "pending": {p: {s: w.samples for s, w in parts[p].windows.items() if w.samples} for p in parts},
        "dedup": sorted((e, p) for e, p in dedup.ids().items()),
        "journal": [tuple(r) for r in journal if r[0] in partitions],
        "offsets": {p: o for p, o in offsets.items() if p in partitions},
    }


def run_to_idle(*procs: subprocess.Popen[bytes], logs: list[Path], timeout: float = 180) -> None:
    for proc, log in zip(procs, logs, strict=True):
        proc.wait(timeout=timeout)
        assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_a_killed_workers_partitions_move_with_their_state_and_an_empty_disk_restores_it(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path, ml100k: Path
) -> None:
    """Two workers on ml-100k over 3 partitions, one SIGKILLed mid-stream: the other restores the dead one's
    partitions from the changelog and finishes in exactly the state of an uninterrupted single worker. Then a
    worker on an empty disk restores everything and continues exactly as the reference on its kept disk."""
    topic, changelog, ref_changelog = make_topic(3), make_topic(3, prefix="changelog"), make_topic(3, prefix="changelog")
    events = recbole_events(ml100k)
    first, second = events[:80_000], events[80_000:]
    cfg = kafka_settings(broker, topic).stream
    feed = threading.Thread(target=produce_events, args=(cfg, True, keyed(first), topic), kwargs={"rate": 8000.0})
    feed.start()
    group, ref_group = f"g-{topic}", f"ref-{topic}"
    dirs = {name: tmp_path / name for name in ("a", "b", "reference", "empty")}
    logs = {name: tmp_path / f"{name}.log" for name in dirs}

    def start(name: str, grp: str, log: str | None = None, cl: str = changelog, idle_s: float = 5) -> subprocess.Popen[bytes]:
        out = logs[log or name].open("a")
        return subprocess.Popen(worker_cmd(dirs[name], broker, topic, grp, cl, idle_s), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=out)

    ref = start("reference", ref_group, cl=ref_changelog)
    # the survivor may finish its own partitions before the group notices the death (a tansu rejoin has taken
    # ~15 s): it must not stop idle meanwhile
    a, b = start("a", group), start("b", group, idle_s=25)
    try:
        rnd = random.Random(7)
        target = rnd.randrange(8_000, 20_000)
        wait_for(lambda: offsets_done(dirs["a"], topic) >= target or a.poll() is not None, 120, "worker a's progress")
        time.sleep(rnd.uniform(0.0, 1.0))  # between two of its checkpoints
        assert a.poll() is None, logs["a"].read_text()[-3000:]
        a.send_signal(signal.SIGKILL)
        a.wait()
        feed.join()
        run_to_idle(b, ref, logs=[logs["b"], logs["reference"]])
    finally:
        for proc in (a, b, ref):
            if proc.poll() is None:
                proc.kill()
    lost = set(int(p) for p, in Checkpoint(dirs["a"] / "recsift.sqlite").conn.execute("SELECT partition FROM offsets"))
    assert lost and lost != {0, 1, 2}, lost  # the dead worker owned part of the stream
    b_log = logs["b"].read_text()
    assert "restored" in b_log and all(f"changelog partition {p} restored" in b_log for p in lost), b_log[-3000:]

    everything = {0, 1, 2}
    reference = stream_state(dirs["reference"], everything, topic)
    assert sum(o for o in reference["offsets"].values()) == len(first)
    assert len(reference["journal"]) > 70_000
    survivor = stream_state(dirs["b"], everything, topic)
    assert survivor == reference  # every sample journaled exactly once; every partition's state equal

    # a worker on an empty disk, alone in the group, restores all three partitions; the reference restarts on
    # its kept disk; both process the rest of the stream
    produce_events(cfg, True, keyed(second), topic)
    fresh, ref = start("empty", group), start("reference", ref_group, cl=ref_changelog)
    try:
        run_to_idle(fresh, ref, logs=[logs["empty"], logs["reference"]])
    finally:
        for proc in (fresh, ref):
            if proc.poll() is None:
                proc.kill()
    assert all(f"changelog partition {p} restored" in logs["empty"].read_text() for p in everything)
    reference = stream_state(dirs["reference"], everything, topic)
    assert sum(o for o in reference["offsets"].values()) == len(events)
    assert stream_state(dirs["empty"], everything, topic) == reference


def partition_selection(state: Path) -> dict[int, dict[str, Any]]:
    """Per partition of a worker's committed checkpoint: its journal, the samples waiting to be scored, its
    coreset reservoir's members and the samples it was offered."""
    conn = Checkpoint(state / "recsift.sqlite").conn
    try:
        journal: dict[int, list[int]] = {}
        for p, sid in conn.execute("SELECT partition, sample_id FROM journal ORDER BY rowid"):
            journal.setdefault(int(p), []).append(int(sid))
        pending = {int(p): [int(s[0]) for s in orjson.loads(blob)]
                   for p, blob in conn.execute("SELECT partition, samples FROM partition_pending")}
        rows = {int(p): State.from_bytes(blob) for p, blob, _ in conn.execute("SELECT * FROM selection_partitions")}
    finally:
        conn.close()
    parts = {p: row.part("reservoir") for p, row in rows.items()}
    checks = {p: row.part("validation").part("reservoir").meta for p, row in rows.items()}
    return {p: {"journal": journal.get(p, []), "pending": pending.get(p, []),
                "members": {int(m[0][0]) for m in parts[p].meta["members"]} if p in parts else set(),
                "offered": parts[p].meta["stats"]["offered"] if p in parts else 0,
                "validation": [int(v[0]) for v in checks[p]["samples"]] if p in checks else [],
                "validation_seen": checks[p]["seen"] if p in checks else 0} for p in range(3)}


@pytest.mark.slow
def test_a_killed_scoring_workers_coreset_share_moves_to_the_survivor(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path, ml100k: Path
) -> None:
    """Two scoring workers on ml-100k over 3 partitions, publishing their coreset to the coreset topic, which
    a trainer materialises and refreshes from; one worker is SIGKILLed mid-stream. The survivor restores the dead one's partitions from the changelog — stream state,
    the samples waiting to be scored and each partition's coreset reservoir — and finishes. The coreset topic
    (what a trainer refreshes from) then holds exactly the survivor's committed coreset: one budget, ≥ 99%
    full, every member's partition's reservoir holding it; and every sample of every partition reached its
    partition's reservoir exactly once (offered + waiting + held out for validation = journaled), and every
    held-out sample its partition's validation reservoir, which the topic's validation records mirror. The
    trainer's mirror is that coreset, and every snapshot it refreshed from was within the budget."""
    from recsift.selection.validation import validation_mask
    from tests.helpers import save_tiny_llm
    from tests.selection.test_publish import read_view
    from tests.test_trainer_role import members, trainer_cmd

    budget = 240
    topic, changelog, coreset_topic = make_topic(3), make_topic(3, prefix="changelog"), make_topic(1, prefix="coreset")
    events = recbole_events(ml100k)[:30_000]
    cfg = kafka_settings(broker, topic).stream
    # the last third follows the kill, slowly: the survivor is still consuming when the group notices the death
    feed = threading.Thread(target=produce_events, args=(cfg, True, keyed(events[:20_000]), topic),
                            kwargs={"rate": 6000.0})
    feed.start()
    dirs = {name: tmp_path / name for name in ("a", "b")}
    logs = {name: tmp_path / f"{name}.log" for name in dirs}
    sets = {"checkpoint.changelog_topic": changelog, "checkpoint.interval_s": 1.0, "window.idle_flush_s": 1e9,
            "stream.stop_when_idle_s": 300, "monitoring.port": 0, "selection.budget": budget,
            "scoring.batch_size": 500, "scoring.scorer.depth": 20, "trainer.in_worker": "false",
            "scoring.item_capacity": 2000,  # ml-100k's 1,682 items: a scorer state far smaller than at 100,000
            "stream.coreset_topic": coreset_topic, "selection.validation_size": VALIDATION_SIZE}

    def start(name: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "recsift.cli", "run", "--state-dir", str(dirs[name]), "--no-progress",
               "--journal", *kafka_args(broker, topic, f"g-{topic}"), "--set", f"stream.worker_id={name}",
               *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=logs[name].open("a"))

    trainer_dir = tmp_path / "trainer"
    trainer = subprocess.Popen(trainer_cmd(trainer_dir, save_tiny_llm(tmp_path / "tiny"), broker, coreset_topic,
                                           "--set", "trainer.refresh_every_samples=12000"),
                               env=ENV, stdout=subprocess.DEVNULL, stderr=(tmp_path / "trainer.log").open("w"))
    a, b = start("a"), start("b")
    try:
        target = random.Random(11).randrange(2_000, 5_000)  # a owns one or two of three partitions
        wait_for(lambda: offsets_done(dirs["a"], topic) >= target or a.poll() is not None, 180, "worker a's progress")
        assert a.poll() is None, logs["a"].read_text()[-3000:]
        a.send_signal(signal.SIGKILL)
        a.wait()
        feed.join()
        produce_events(cfg, True, keyed(events[20_000:]), topic, rate=1000.0)
        # the group notices the death in its own time (its rejoin waited ~15 s here): stop the survivor once
        # it owns everything and has checkpointed the whole stream
        wait_for(lambda: offsets_done(dirs["b"], topic) >= len(events) or b.poll() is not None, 240, "the survivor")
        b.send_signal(signal.SIGTERM)
        run_to_idle(b, logs=[logs["b"]], timeout=120)
        survivor_coreset = members(dirs["b"] / "recsift.sqlite")
        wait_for(lambda: members(trainer_dir / "recsift.sqlite") == survivor_coreset or trainer.poll() is not None,
                 60, "the trainer's mirror of the last publish")
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(120) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    finally:
        for proc in (a, b, trainer):
            if proc.poll() is None:
                proc.kill()
    lost = {int(p) for p, in Checkpoint(dirs["a"] / "recsift.sqlite").conn.execute("SELECT partition FROM offsets")}
    assert lost and lost != {0, 1, 2}, lost
    b_log = logs["b"].read_text()
    assert all(f"changelog partition {p} restored" in b_log for p in lost), b_log[-3000:]

    survivor = partition_selection(dirs["b"])
    assert sum(len(s["journal"]) for s in survivor.values()) > 25_000
    for p, s in survivor.items():
        journal = s["journal"]
        assert len(set(journal)) == len(journal), p  # each sample handed on once
        scored = [sid for sid in journal if sid not in set(s["pending"])]
        held_out = [sid for sid, v in zip(scored, validation_mask(scored, 0.05, 0).tolist(), strict=True) if v]
        assert s["offered"] == len(scored) - len(held_out), (p, s["offered"], len(scored), held_out)  # offered once
        assert s["validation_seen"] == len(held_out) and s["validation"] == held_out[-len(s["validation"]):], p
        assert len(s["validation"]) == min(len(held_out), partition_budget(VALIDATION_SIZE, 3, {p})), p
        assert s["members"] <= set(scored), p
    committed = {sid for s in survivor.values() for sid in s["members"]}
    view = read_view(broker, coreset_topic)
    assert set(view.members) == committed  # the topic is the survivor's coreset: nothing left behind by a
    assert set(view.validation) == {sid for s in survivor.values() for sid in s["validation"]}  # dead worker
    assert 0.99 * budget <= len(committed) <= budget
    assert all(body["partition"] in range(3) and int(ident) in survivor[body["partition"]]["members"]
               for ident, body in view.members.items())
    # the trainer: its mirror is the survivor's coreset (scores, strata, versions), and it refreshed from
    # snapshots that never held more than the budget
    assert set(members(trainer_dir / "recsift.sqlite")) == committed
    sizes = [n for n, in db_rows(trainer_dir, "SELECT size FROM coreset_snapshots")]
    assert sizes and all(0 < n <= budget for n in sizes), sizes
