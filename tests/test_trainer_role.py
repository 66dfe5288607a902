"""Roles: `recsift run` as a worker that only publishes its coreset, `recsift trainer` as the process
that refreshes from the coreset topic, each on its own state directory (standing for separate hosts)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from recsift.config import SyntheticConfig
from recsift.data.synthetic import SyntheticStream
from recsift.selection.stratified import partition_budget
from recsift.stream.broker import EmbeddedBroker
from recsift.stream.kafka import produce_events
from recsift.stream.windows import Sample
from tests.helpers import kafka_settings, save_tiny_llm, wait_for
from tests.test_service import ENV, children, db_rows, kafka_args, refresh_in_flight, service_cmd


def trainer_cmd(state: Path, tiny: Path, broker: EmbeddedBroker, coreset_topic: str, *extra: str) -> list[str]:
    sets = {"trainer.base_model": tiny, "trainer.dtype": "fp32", "trainer.max_prompt_tokens": 256,
            "trainer.refresh_samples": 16, "trainer.eval_samples": 16, "trainer.learning_rate": 0.005,
            "trainer.promote_tolerance": 1000, "trainer.cache_dir": state.parent / "cache",
            "trainer.refresh_every_samples": 2000, "monitoring.port": 0}
    return [sys.executable, "-m", "recsift.cli", "trainer", "--state-dir", str(state), "--bootstrap-servers",
            broker.bootstrap_servers, "--coreset-topic", coreset_topic,
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], *extra]


def test_a_split_without_a_coreset_topic_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsift.cli import main

    assert main(["run", "--state-dir", str(tmp_path), "--set", "trainer.in_worker=false"]) == 2
    assert "set stream.coreset_topic too" in capsys.readouterr().err
    assert main(["trainer", "--state-dir", str(tmp_path)]) == 2
    assert "recsift trainer reads the workers' coreset topic" in capsys.readouterr().err
    assert not (tmp_path / "adapters").exists()  # refused before anything was touched


def members(db: Path) -> dict[int, tuple[float, int, int]]:
    conn = sqlite3.connect(db)
    try:
        return {int(a): (float(b), int(c), int(d)) for a, b, c, d in
                conn.execute("SELECT sample_id, score, stratum, version FROM coreset_members")}
    finally:
        conn.close()


@pytest.mark.slow
def test_a_separate_trainer_refreshes_from_the_coreset_topic_alone(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic, coreset_topic = make_topic(2), make_topic(1, prefix="coreset")
    produce_events(kafka_settings(broker, topic).stream, True,
                   SyntheticStream(SyntheticConfig(events=6000, users=200, items=150)).payloads(), topic)
    tiny = save_tiny_llm(tmp_path / "tiny")
    worker_dir, trainer_dir = tmp_path / "worker", tmp_path / "trainer"
    trainer = subprocess.Popen(trainer_cmd(trainer_dir, tiny, broker, coreset_topic), env=ENV,
                               stdout=subprocess.PIPE, stderr=(tmp_path / "trainer.log").open("w"), text=True)
    worker: subprocess.Popen[str] | None = None
    try:
        lock = trainer_dir / ".worker.lock"  # a trainer holds its directory's worker lock, as owner "trainer"
        wait_for(lambda: (lock.exists() and "trainer" in lock.read_text()) or trainer.poll() is not None, 60,
                 "the trainer to start")
        # one trainer per state directory and registry; and no worker may share the trainer's directory
        second = subprocess.run(trainer_cmd(trainer_dir, tiny, broker, coreset_topic), env=ENV,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "in use by another recsift trainer" in second.stderr, second.stderr
        worker_there = subprocess.run(service_cmd(trainer_dir, tiny, 0, *kafka_args(broker, topic)), env=ENV,
                                      capture_output=True, text=True, timeout=60)
        assert worker_there.returncode == 2 and "in use by another recsift trainer" in worker_there.stderr

        worker = subprocess.Popen(service_cmd(worker_dir, tiny, 0, *kafka_args(broker, topic),
                                              "--set", "trainer.in_worker=false",
                                              "--set", f"stream.coreset_topic={coreset_topic}",
                                              "--set", "stream.stop_when_idle_s=3",
                                              "--set", "checkpoint.interval_events=1000"),
                                  env=ENV, stdout=subprocess.PIPE, stderr=(tmp_path / "worker.log").open("w"), text=True)
        # the trainer killed while its first refresh runs: the refresh process dies with it, and a restarted
        # trainer finds the registry consistent, discards the partial write and refreshes again
        wait_for(lambda: refresh_in_flight(trainer_dir) or trainer.poll() is not None, 300, "the trainer's refresh")
        assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
        time.sleep(1.0)
        kids = children(trainer.pid)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        wait_for(lambda: not any(Path(f"/proc/{k}").exists() for k in kids), 30, "the refresh process to die")
        assert not db_rows(trainer_dir, "SELECT outcome FROM refresh_runs")  # killed before it was recorded
        assert not (trainer_dir / "adapters" / "current").exists()
        trainer = subprocess.Popen(trainer_cmd(trainer_dir, tiny, broker, coreset_topic), env=ENV,
                                   stdout=subprocess.PIPE, stderr=(tmp_path / "trainer.log").open("a"), text=True)
        out, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
        assert not (worker_dir / "adapters").exists() or not any((worker_dir / "adapters").iterdir())  # never refreshed
        assert "by `recsift trainer`" in out and "serving adapter" not in out  # says so
        wait_for(lambda: len(db_rows(trainer_dir, "SELECT outcome FROM refresh_runs")) >= 2 or trainer.poll() is not None,
                 300, "the restarted trainer's refresh")
        time.sleep(2.0)  # the trainer reads the worker's last publish (it polls every 0.5 s)
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        trainer.send_signal(signal.SIGTERM)
        out, _ = trainer.communicate(timeout=300)
    assert trainer.returncode == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    assert "recsift trainer summary" in out and "v0001" in out
    adapters = trainer_dir / "adapters"  # nothing partial is left; the one version is whole and current
    assert sorted(p.name for p in adapters.iterdir()
                  if p.name not in ("history", "current") and not p.name.endswith(".lock")) == ["v0001"]
    assert (adapters / "v0001" / "adapter_model.safetensors").is_file()

    # the trainer trained on the worker's coreset, read from the topic alone
    # the interrupted run is on record as such, and the restarted trainer ran it again at once
    assert db_rows(trainer_dir, "SELECT trigger, outcome, json_extract(detail, '$.reason') FROM refresh_runs") == \
        [("interval", "failed", "interrupted"), ("interval", "promoted", None)]
    assert "was interrupted (its process stopped)" in (tmp_path / "trainer.log").read_text()
    assert (trainer_dir / "adapters" / "current").read_text().strip() == "v0001"
    # each partition's share fills from its own samples: a refresh before the second partition's arrive sees
    # only the first's 32; the last one sees the whole budget
    sizes = [size for size, in db_rows(trainer_dir, "SELECT size FROM coreset_snapshots")]
    assert len(sizes) == 2 and all(0 < size <= 64 for size in sizes) and sizes[-1] == 64, sizes
    # the mirror equals the worker's committed coreset and validation reservoir after its last checkpoint
    assert len(members(worker_dir / "recsift.sqlite")) == 64
    assert members(trainer_dir / "recsift.sqlite") == members(worker_dir / "recsift.sqlite")
    assert db_rows(trainer_dir, "SELECT sample FROM validation_samples ORDER BY pos") == \
        db_rows(worker_dir, "SELECT sample FROM validation_samples ORDER BY pos")


@pytest.mark.slow
def test_two_workers_of_one_group_keep_one_budget_between_them(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """Each worker selects the share of the global budget that its partitions own (64 over 2 partitions:
    32 each); the coreset topic, the trainer's input, holds one full budget, not one per worker."""
    from tests.selection.test_publish import read_view

    topic, coreset_topic = make_topic(2), make_topic(1, prefix="coreset")
    produce_events(kafka_settings(broker, topic).stream, True,
                   SyntheticStream(SyntheticConfig(events=12_000, users=200, items=150)).payloads(), topic)
    tiny = save_tiny_llm(tmp_path / "tiny")

    def worker(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            service_cmd(tmp_path / name, tiny, 0, *kafka_args(broker, topic), "--set", "trainer.in_worker=false",
                        "--set", f"stream.coreset_topic={coreset_topic}", "--set", f"stream.worker_id={name}",
                        "--set", "checkpoint.interval_events=1000"),
            env=ENV, stdout=subprocess.PIPE, stderr=(tmp_path / f"{name}.log").open("w"), text=True)

    workers = {"w1": worker("w1"), "w2": worker("w2")}  # they join together: the broker waits for a group
    try:
        # both run until the stream is checkpointed, then stop together: a worker that left first would hand
        # its partition, and so its share, to the other
        def done() -> int:  # per partition, the furthest either worker checkpointed (a moved one is in both)
            rows = [r for n in workers for r in db_rows(tmp_path / n, "SELECT partition, next_offset FROM offsets")]
            return sum(max(o for q, o in rows if q == p) for p in {q for q, _ in rows})

        wait_for(lambda: done() == 12_000 or any(p.poll() is not None for p in workers.values()), 300,
                 "the stream to be checkpointed")
    finally:
        for proc in workers.values():
            proc.send_signal(signal.SIGTERM)
    for name, proc in workers.items():
        proc.communicate(timeout=120)
        assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("w1", "w2")}
    assert all("hold 32 of the budget" in log for log in logs.values()), logs  # each applied its share

    view = read_view(broker, coreset_topic)
    per_worker = Counter(body["worker"] for body in view.members.values())
    assert per_worker == {"w1": 32, "w2": 32}, per_worker
    for name in ("w1", "w2"):  # each worker's committed coreset is its share, and it is what it published
        assert set(members(tmp_path / name / "recsift.sqlite")) == \
            {sid for sid, body in view.members.items() if body["worker"] == name}


def test_a_partition_count_that_cannot_be_read_keeps_the_budget_and_is_retried_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker away when a worker's partitions change: the loop tick logs once, keeps the budget and
    does not block the ingest loop on a metadata read every turn (it retries after ``RETRY_S``)."""
    import logging

    from recsift.config import load_config
    from recsift.monitoring.metrics import Metrics
    from recsift.service import Ingest, PartitionShare, build_selection
    from recsift.stream.broker import free_port
    from recsift.stream.catalog import Catalog
    from recsift.stream.file_source import FileSource

    (tmp_path / "events.jsonl").write_text("")
    file_cfg = load_config(overrides={"checkpoint.state_dir": str(tmp_path / "state"), "stream.source": "file",
                                      "stream.file_path": str(tmp_path / "events.jsonl")})
    ingest = Ingest(file_cfg, Metrics(), Catalog())
    pipeline = ingest.pipeline
    pipeline.source = FileSource(tmp_path / "events.jsonl", lambda: iter(()), pipeline.on_assign)  # owns {0}
    away = load_config(overrides={"stream.source": "kafka", "stream.bootstrap_servers": f"127.0.0.1:{free_port()}",
                                  "selection.budget": 64})
    selection, _ = build_selection(away, Catalog())
    share = PartitionShare(away, selection)
    try:
        with caplog.at_level(logging.WARNING, logger="recsift.service"):
            share(pipeline)
            share(pipeline)  # within RETRY_S: no second read
        warnings = [r for r in caplog.records if "partition count" in r.getMessage()]
        assert len(warnings) == 1 and selection.partition_count_target is None and share.retry_at > 0
    finally:
        ingest.close()


def test_a_worker_knows_its_partitions_shares_before_its_first_offer(
    broker: EmbeddedBroker, make_topic: Callable[..., str]
) -> None:
    """The count is read before the worker joins (``PartitionShare.prime``), so an adopted partition's
    reservoir never fills to the whole budget: the first batch already goes into its share. The control: a
    stage that learns the count only later lets the partition hold the whole budget meanwhile."""
    from recsift.scoring.stage import ScoredSample
    from recsift.selection.partitioned import PartitionedSelector
    from recsift.service import PartitionShare, build_selection
    from recsift.stream.catalog import Catalog

    topic = make_topic(partitions=3)
    cfg = kafka_settings(broker, topic, **{"selection.budget": 1024, "selection.validation_fraction": 0.0})
    rng = np.random.default_rng(0)

    def first_batch(prime: bool) -> int:
        selection, _ = build_selection(cfg, Catalog())
        assert isinstance(selection.selector, PartitionedSelector)
        if prime:
            assert PartitionShare(cfg, selection).prime() == 3
        selection.selector.adopt(1, None)  # the assignment, before any record
        batch = [ScoredSample(Sample(sample_id=i, user_id="u", history=("1", "2"), target="3", ts=float(i), partition=1),
                              float(rng.normal()), 0, rng.normal(size=8).astype(np.float32)) for i in range(2000)]
        selection(batch)
        return len(selection.selector)

    assert first_batch(prime=True) == partition_budget(1024, 3, {1}) == 341
    assert first_batch(prime=False) == 1024  # the control: the whole budget until the count arrives
