"""`recsift run` over files: formats, dead-letter file, resume from the checkpoint."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from recsift.cli import main
from recsift.config import SyntheticConfig
from recsift.data.synthetic import SyntheticStream


def write_jsonl(path: Path, n: int = 400, bad: tuple[str, ...] = ()) -> None:
    events = SyntheticStream(SyntheticConfig(seed=11, users=30, items=25, events=n)).events()
    lines = [e.encode().decode() for e in events]
    for k, b in enumerate(bad):
        lines.insert(10 + 37 * k, b)
    path.write_text("\n".join(lines) + "\n")


def db_state(state: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[tuple[object, ...]]]:
    conn = sqlite3.connect(state / "recsift.sqlite")
    try:
        return (
            conn.execute("SELECT partition, user_id, items FROM histories ORDER BY 1, 2").fetchall(),
            conn.execute("SELECT next_offset FROM offsets").fetchall(),
            sorted(conn.execute("SELECT sample_id FROM journal").fetchall()),
        )
    finally:
        conn.close()


def run(*args: str) -> int:
    return main(["run", "--no-progress", "--journal", "--set", "monitoring.port=0", *args])


def test_file_replay_dead_letters_bad_lines_to_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "events.jsonl"
    bad = ('{"event_id": 1', '{"event_id": "x", "user_id": "u1"}', '{"event_id":"y","user_id":"u1","item_id":"i1","timestamp":"later"}')
    write_jsonl(src, bad=bad)
    dlq = tmp_path / "dead.jsonl"
    assert run("--input", str(src), "--state-dir", str(tmp_path / "s"), "--set", f"stream.dead_letter_path={dlq}") == 0
    out = capsys.readouterr().out
    assert "end of input" in out and "events consumed             403" in out
    records = [json.loads(line) for line in dlq.read_text().splitlines()]
    assert [r["payload"] for r in records] == list(bad)
    assert [r["reason"] for r in records] == ["malformed_json", "missing_field", "invalid_field"]
    assert [r["source"]["offset"] for r in records] == [10, 47, 84]
    # unset, the dead letters go into the run's own state directory (not a ./state shared by every run)
    assert run("--input", str(src), "--state-dir", str(tmp_path / "own")) == 0
    own = [json.loads(line) for line in (tmp_path / "own" / "dead_letter.jsonl").read_text().splitlines()]
    assert [r["payload"] for r in own] == list(bad)


def test_a_restart_resumes_at_the_checkpoint_and_matches_one_uninterrupted_run(tmp_path: Path) -> None:
    src = tmp_path / "events.jsonl"
    write_jsonl(src, n=900)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run("--input", str(src), "--state-dir", str(whole)) == 0
    assert run("--input", str(src), "--state-dir", str(parts), "--max-events", "250") == 0
    assert db_state(parts)[1] == [(250,)]
    assert run("--input", str(src), "--state-dir", str(parts), "--max-events", "300") == 0
    assert run("--input", str(src), "--state-dir", str(parts)) == 0
    assert db_state(parts) == db_state(whole)
    assert run("--input", str(src), "--state-dir", str(parts)) == 0  # nothing new: state unchanged
    assert db_state(parts) == db_state(whole)


def test_csv_and_recbole_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = tmp_path / "e.csv"
    csv_path.write_text("event_id,user_id,item_id,timestamp,value\n1,u1,i1,1700000000,1\n2,u1,i2,2023-11-14T22:14:00Z,2.5\n3,u1,i3,,1\n4,u1,i4,1700000100,high\n")
    assert run("--input", str(csv_path), "--state-dir", str(tmp_path / "c"), "--set", f"stream.dead_letter_path={tmp_path / 'c.dlq'}") == 0
    out = capsys.readouterr().out
    assert "samples emitted             1" in out and "rejected: missing_field   1" in out and "rejected: invalid_field   1" in out
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t4\t20\n1\t11\t3\t10\n2\t10\t5\t15\n")
    assert run("--input", str(inter), "--state-dir", str(tmp_path / "r")) == 0
    histories = [(p, u, json.loads(items)) for p, u, items in db_state(tmp_path / "r")[0]]
    assert histories == [(0, "1", ["11", "10"]), (0, "2", ["10"])]  # time-sorted


def test_missing_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--input", str(tmp_path / "nope.jsonl"), "--state-dir", str(tmp_path / "s")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evicted_histories_are_counted_by_reason_in_the_metric(tmp_path: Path) -> None:
    from recsift import service
    from recsift.config import load_config
    from recsift.monitoring.metrics import Metrics

    path = tmp_path / "events.jsonl"
    write_jsonl(path, n=600)  # 30 users
    cfg = load_config(overrides={"stream.file_path": str(path), "stream.source": "file", "scoring.enabled": False,
                                 "checkpoint.state_dir": str(tmp_path / "s"), "monitoring.port": 0,
                                 "window.max_users": 5, "stream.dead_letter_path": str(tmp_path / "dlq.jsonl")})
    metrics = Metrics()
    summary = service.run(cfg, metrics=metrics)
    capacity = metrics.registry.get_sample_value("recsift_users_evicted_total", {"reason": "capacity"})
    ttl = metrics.registry.get_sample_value("recsift_users_evicted_total", {"reason": "ttl"})
    assert summary.ingest.users == 5 and capacity is not None and capacity >= 25 and ttl == 0
