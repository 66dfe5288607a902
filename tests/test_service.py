"""`recsift run` end to end as a real process, with the real broker, models and Prometheus:

- an ml-100k run scraped by Prometheus fills every query of the shipped Grafana dashboard;
- SIGKILL of the whole service at seeded points and during a refresh, on one partition: its children die
  with it, every component's final state equals an uninterrupted run's, exactly (so no event is lost and no
  sample handed on or offered twice), and the adapter registry is whole (several partitions' kills:
  ``tests/stream/test_crash.py`` and ``tests/test_scale_out.py``);
- a 30 s broker outage: the service stays up, reports it (metric, /readyz), and resumes where it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from recsift.selection.partitioned import PartitionedSelector
from recsift.state import State
from recsift.stream.broker import EmbeddedBroker, free_port
from recsift.stream.kafka import ensure_topic, produce_events
from tests.helpers import (
    MONITORING,
    PROMETHEUS,
    call,
    kafka_settings,
    prom_query,
    reachable,
    save_tiny_llm,
    start_prometheus,
    wait_for,
)
from tests.helpers import SERVICE_ENV as ENV

pytestmark = pytest.mark.slow
BUDGET = 64


def service_cmd(state: Path, tiny: Path, port: int, *extra: str, command: str = "run") -> list[str]:
    """`recsift run` (or ``command``) with small scoring batches, a 64-sample coreset and the tiny model as
    the LLM."""
    sets = {
        "monitoring.port": port, "scoring.batch_size": 500, "scoring.scorer.depth": 20, "selection.budget": BUDGET,
        "trainer.base_model": tiny, "trainer.dtype": "fp32", "trainer.max_prompt_tokens": 256,
        "trainer.refresh_samples": 16, "trainer.eval_samples": 16, "trainer.learning_rate": 0.005,
        "trainer.promote_tolerance": 1000, "trainer.cache_dir": state.parent / "cache",
        "checkpoint.interval_s": 1.0,
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    progress = ["--no-progress"] if command == "run" else []
    return [sys.executable, "-m", "recsift.cli", command, "--state-dir", str(state), *progress, *args, *extra]


def kafka_args(broker: EmbeddedBroker, topic: str, group: str | None = None) -> list[str]:
    return ["--source", "kafka", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic,
            "--group-id", group or f"g-{topic}", "--set", f"stream.dead_letter_topic={topic}.dlq",
            "--set", "stream.session_timeout_ms=2000", "--set", "stream.heartbeat_interval_ms=500"]


def dashboard_queries() -> list[str]:
    dash = json.loads((MONITORING / "grafana" / "recsift.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def has_data(port: int, expr: str) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in prom_query(port, expr))


def value(port: int, expr: str) -> float:
    result = prom_query(port, expr)
    assert result, f"no data for {expr}"
    return float(result[0]["value"][1])


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (.ci/run installs it)")
def test_an_ml100k_run_scraped_by_prometheus_fills_every_dashboard_query(tmp_path: Path, ml100k: Path) -> None:
    """`recsift run` on ml-100k and a `recsift serve` that its promotion hook drives, both scraped by the real
    Prometheus with the shipped rules: every dashboard query has data, the serving row's included."""
    tiny = save_tiny_llm(tmp_path / "tiny")
    port, prom_port, serve_port = free_port(), free_port(), free_port()
    serve = subprocess.Popen(
        [sys.executable, "-m", "recsift.cli", "serve", "--port", str(serve_port), "--follow", "api",
         "--registry", str(tmp_path / "state" / "adapters"), "--catalog", str(ml100k.with_suffix(".item")),
         "--set", f"trainer.base_model={tiny}", "--set", "trainer.dtype=fp32", "--set", "trainer.domain=movies",
         "--set", "trainer.max_new_tokens=4", "--set", "trainer.num_beams=2", "--set", "admin.token=hook-token",
         "--set", f"trainer.cache_dir={tmp_path / 'cache'}"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=(tmp_path / "serve.log").open("w"))
    hook = f"trainer.on_promote=[{{type: vllm, url: 'http://127.0.0.1:{serve_port}', api_key: hook-token}}]"
    proc = subprocess.Popen(
        service_cmd(tmp_path / "state", tiny, port, "--dataset", str(ml100k), "--set", "trainer.domain=movies",
                    # the drift trigger starts the one refresh the test waits for (its cooldown keeps a
                    # second from delaying the shutdown); the samples trigger is the fallback
                    "--set", "trainer.refresh_every_samples=40000",
                    # a short scoring backlog: the refresh's checkpoint waits for it to drain
                    "--set", "stream.backpressure_high=3000", "--set", "stream.backpressure_low=1000",
                    "--set", hook),
        env=ENV, stdout=subprocess.DEVNULL, stderr=(tmp_path / "service.log").open("w"))
    prom = start_prometheus(tmp_path, port, prom_port, scrape_interval="1s", serve_port=serve_port)
    queries = dashboard_queries()

    def ask(body: dict[str, object]) -> None:  # clients of the server: answers and a refusal
        req = urllib.request.Request(f"http://127.0.0.1:{serve_port}/recommend", data=json.dumps(body).encode())
        with contextlib.suppress(OSError):  # a refusal (HTTPError), or the server still starting
            urllib.request.urlopen(req, timeout=30).read()

    try:
        deadline = time.monotonic() + 300
        missing = queries
        while time.monotonic() < deadline and proc.poll() is None and serve.poll() is None:
            ask({"history": ["1", "2", "3"], "k": 5})
            ask({"history": ["1", "not-an-item"]})
            missing = [q for q in queries if not has_data(prom_port, q)]
            if not missing and value(prom_port, "max(recsift_serve_adapter_version)") >= 1:
                break
            time.sleep(1)
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        assert proc.poll() is None, (tmp_path / "service.log").read_text()[-3000:]
        assert not missing, f"dashboard queries without data: {missing}"
        # the data is the run's, not zero-initialised gauges
        assert value(prom_port, "rate(recsift_events_consumed_total[1m])") > 0
        assert value(prom_port, "recsift_source_connected") == 1
        assert value(prom_port, "recsift_influence_estimate_version") >= 1
        assert 0 < value(prom_port, "recsift_coreset_size") <= BUDGET
        assert value(prom_port, 'recsift_drift{metric="target_js"}') > 0
        assert value(prom_port, 'sum(recsift_refresh_runs_total{outcome="promoted"})') >= 1
        assert value(prom_port, "recsift_serving_adapter_version") >= 1
        assert 0 <= value(prom_port, 'recsift_eval{metric="hr@5"}') <= 1
        assert 0 <= value(prom_port, 'recsift_eval{metric="rank_percentile"}') <= 1
        with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/rules") as r:
            rules = [rule for g in json.loads(r.read())["data"]["groups"] for rule in g["rules"]]
        assert rules and all(rule["health"] == "ok" for rule in rules), rules
        # the promotion reached the server through the hook, and it answers with that version
        assert value(prom_port, "max(recsift_serve_adapter_version)") == value(prom_port, "recsift_serving_adapter_version")
        assert value(prom_port, 'sum(recsift_promotion_hook_deliveries_total{outcome="ok"})') >= 1
        assert value(prom_port, 'sum(recsift_serve_errors_total{reason="unknown_item"})') >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        serve.send_signal(signal.SIGTERM)
        proc.wait(120)
        serve.wait(60)
        prom.terminate()
        prom.wait(10)
    assert proc.returncode == 0, (tmp_path / "service.log").read_text()[-3000:]
    assert serve.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


def db_rows(state: Path, sql: str) -> list[tuple]:
    db = state / "recsift.sqlite"
    if not db.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:  # not created yet
        return []


def offsets_done(state: Path, topic: str) -> int:
    rows = db_rows(state, f"SELECT coalesce(sum(next_offset), 0) FROM offsets WHERE topic = '{topic}'")
    return int(rows[0][0]) if rows else 0


def refresh_in_flight(state: Path) -> bool:
    """A refresh takes its snapshot first and records its run last: more snapshots than runs = one running."""
    snaps = db_rows(state, "SELECT count(*) FROM coreset_snapshots")
    runs = db_rows(state, "SELECT count(*) FROM refresh_runs")
    return bool(snaps) and snaps[0][0] > (runs[0][0] if runs else 0)


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def registry_whole_after_kills(state: Path, tiny: Path) -> None:
    """After kills (one mid-refresh) a manual refresh promotes a complete version, the serving pointer names
    it, and nothing half-written is left in the adapter registry."""
    from safetensors.torch import load_file

    manual = subprocess.run(service_cmd(state, tiny, 0, command="refresh"), env=ENV, capture_output=True,
                            text=True, timeout=300, check=False)
    assert manual.returncode == 0 and "promoted" in manual.stdout, manual.stdout + manual.stderr[-3000:]
    adapters = state / "adapters"
    names = sorted(p.name for p in adapters.iterdir())
    assert not [n for n in names if n.startswith(".") and n != ".trainer.lock"], names  # the owner's lock stays
    current = (adapters / "current").read_text().strip()
    assert load_file(adapters / current / "adapter_model.safetensors")  # loads: the write was complete
    runs = db_rows(state, "SELECT outcome, detail FROM refresh_runs")
    promoted = [json.loads(d)["version"] for o, d in runs if o == "promoted"]
    assert promoted and current == promoted[-1] and set(promoted) <= set(names)
    history = [json.loads(line) for line in (adapters / "history").read_text().splitlines()]
    assert [h["to"] for h in history] == promoted


def component_states(state: Path, overrides: dict[str, object], restore_scorer: bool = True) -> dict[str, State]:
    """Every component's state as restored from a state directory: the stream state and dedup index of
    partition 0, the stream scorer (surrogate, scorer, reference reservoir, bounds), the scoring stage's
    pending batch, the selection stage (selector and validation counters, recent window, coverage,
    counters; partition 0's coreset and validation reservoirs), and the checkpointed offsets. Built by the
    service's own builders, loaded by its stores."""
    from recsift.config import load_config
    from recsift.service import build_scoring, build_selection, build_stream_scorer
    from recsift.stream.catalog import Catalog
    from recsift.stream.checkpoint import StreamStateStore
    from recsift.stream.dedup import DedupIndex
    from recsift.stream.windows import StreamState

    cfg = load_config(overrides={"checkpoint.state_dir": str(state), **overrides})
    conn = sqlite3.connect(state / "recsift.sqlite")
    try:
        stream, dedup = StreamState(cfg.window), DedupIndex(cfg.stream.dedup_capacity)
        StreamStateStore(stream, dedup).load(conn, {0})
        scorer = build_stream_scorer(cfg, Catalog())
        selection, coreset_store = build_selection(cfg, Catalog(), rescore=scorer.rescore)
        scoring, scoring_store = build_scoring(cfg, scorer, downstream=[selection])
        if restore_scorer:  # False: a deliberately broken restart, the negative control
            scoring_store.load(conn, {0})
        coreset_store.load(conn, {0})
        offsets = conn.execute("SELECT topic, partition, next_offset FROM offsets ORDER BY 1, 2").fetchall()
    finally:
        conn.close()
    selector = selection.selector
    assert isinstance(selector, PartitionedSelector) and sorted(selector.parts) == [0]
    return {"stream": stream.state_dict(), "dedup": dedup.state_dict(), "scorer": scoring.scorer.state_dict(),
            "scoring_stage": scoring.state_dict(), "selection": selection.state_dict(),
            # partition 0's coreset reservoir (members, spares, sketch, ...) and its validation reservoir
            "reservoir": coreset_store.part_state(0),
            "offsets": State(meta={"offsets": [list(r) for r in offsets]})}


# What a refresh leaves in the selection stage is when it ran, not what the stream did: the members of
# the last refresh's snapshot (the turnover baseline) and the drift report computed from it. Refreshes
# are scheduled by samples scored in this process and by wall-clock cooldowns, so a restart moves them.
REFRESH_BOOKKEEPING = ("last_snapshot", "last_drift")


def test_sigkill_of_the_service_ends_in_exactly_the_state_of_an_uninterrupted_run(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """One partition (a fixed order), scoring and selection on, killed at three seeded points and once
    during a refresh, then run to the end: every component's state equals an uninterrupted run's. The killed
    worker writes a changelog (the reference does not): then a worker on an empty disk with its worker id
    restores everything from it, its own state (scorer, selection) included, and goes on over more events
    exactly as the reference does on its kept disk."""
    from recsift.config import SyntheticConfig
    from recsift.data.synthetic import SyntheticStream
    from recsift.state import differences

    topic, changelog = make_topic(1), make_topic(1, prefix="changelog")
    everything = list(SyntheticStream(SyntheticConfig(seed=5, users=400, items=300, events=17_000)).payloads())
    events, later = everything[:16_000], everything[16_000:]
    produce_events(kafka_settings(broker, topic).stream, True, events, topic)  # (user key, payload) pairs
    tiny = save_tiny_llm(tmp_path / "tiny")
    # window.idle_flush_s is off: that flush is a processing-time latency bound, so when it fires decides
    # whether a closing window's last samples come before or after the next window's first micro-batch.
    # The set of samples never depends on it, their order (and so what the surrogate learns when) does.
    overrides = {"scoring.batch_size": 500, "scoring.scorer.depth": 20, "scoring.reestimate_every": 4,
                 "scoring.train_rows": 256, "selection.budget": BUDGET, "selection.selector.strata": 8,
                 "selection.coverage_clusters": 4, "window.idle_flush_s": 1e9,
                 "scoring.item_rows_start": 128}  # 300 items: the item table grows twice on the way
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]

    def cmd(state: Path, group: str, *extra: str) -> list[str]:
        return service_cmd(state, tiny, 0, *kafka_args(broker, topic, group), *sets,
                           "--set", "trainer.refresh_every_samples=8000", "--set", "stream.stop_when_idle_s=6",
                           "--set", "stream.backpressure_high=1500", "--set", "stream.backpressure_low=500", *extra)

    logged = ("--set", f"checkpoint.changelog_topic={changelog}", "--set", "stream.worker_id=crashy")

    # the uninterrupted reference runs beside the crashing runs (its own group and state directory): the
    # final states do not depend on timing, and the two share the machine's idle moments
    reference = tmp_path / "reference"
    with (tmp_path / "reference.log").open("w") as log:
        ref = subprocess.Popen(cmd(reference, f"ref-{topic}"), env=ENV, stdout=subprocess.DEVNULL, stderr=log)
    request.addfinalizer(lambda: ref.kill() if ref.poll() is None else None)  # a failed test leaves no process

    state, group = tmp_path / "crashy", f"crashy-{topic}"
    rnd = random.Random(int(os.environ.get("RECSIFT_CRASH_SEED", "13")))
    kills, during_refresh = 0, 0
    for i in range(4):
        proc = subprocess.Popen(cmd(state, group, *logged), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=(tmp_path / f"run{i}.log").open("w"))
        if i == 0:  # the first kill lands while a refresh is running
            wait_for(lambda: refresh_in_flight(state) or proc.poll() is not None, 300, "a refresh to start")
            time.sleep(0.5)
        else:
            target = offsets_done(state, topic) + rnd.randrange(1_000, 3_000)
            wait_for(lambda: offsets_done(state, topic) >= target or proc.poll() is not None, 300, "progress")
            time.sleep(rnd.uniform(0.0, 1.0))  # land between checkpoints
        if proc.poll() is not None:
            break
        during_refresh += refresh_in_flight(state)
        kids = children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        kills += 1
        wait_for(lambda: not any(running(k) for k in kids), 30, "the fetch and refresh children to die with the service")
    assert kills >= 3 and during_refresh >= 1, (kills, during_refresh)
    last = subprocess.run(cmd(state, group, *logged), env=ENV, capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]
    assert ref.wait(600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert offsets_done(reference, topic) == len(events)

    def equal_states(run: Path, uninterrupted: Path) -> None:
        got, want = component_states(run, overrides), component_states(uninterrupted, overrides)
        for name in REFRESH_BOOKKEEPING:
            assert name in want["selection"].meta  # what is left out exists: the exclusion is not stale
            del got["selection"].meta[name], want["selection"].meta[name]
        assert want["scorer"].meta["batches"] >= 20  # the scorer learnt and re-estimated on the way
        assert len(want["reservoir"].part("reservoir").meta["members"]) == BUDGET
        assert want["reservoir"].part("validation").part("reservoir").meta["samples"]  # compared, not empty
        # exact: the same floating-point operations in the same order, on restored bit-exact tensors
        diffs = {name: differences(got[name], want[name]) for name in want}
        assert not any(diffs.values()), {k: v[:5] for k, v in diffs.items() if v}

    equal_states(state, reference)
    # negative control: a restart that forgets the scorer's state (surrogate, estimate, reference set) is caught
    forgetful = component_states(state, overrides, restore_scorer=False)
    assert differences(forgetful["scorer"], component_states(reference, overrides)["scorer"])
    registry_whole_after_kills(state, tiny)

    # the killed worker's host is lost: a worker with its id on an empty disk, and the reference on its kept
    # disk, both go on over more events
    produce_events(kafka_settings(broker, topic).stream, True, later, topic)
    empty = tmp_path / "empty"
    with (tmp_path / "reference.log").open("a") as log:
        ref = subprocess.Popen(cmd(reference, f"ref-{topic}"), env=ENV, stdout=subprocess.DEVNULL, stderr=log)
        fresh = subprocess.run(cmd(empty, group, *logged), env=ENV, capture_output=True, text=True, timeout=600)
        assert fresh.returncode == 0, fresh.stderr[-3000:]
        assert ref.wait(600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    assert "changelog partition 0 restored" in fresh.stderr and "its own state restored" in fresh.stderr
    assert offsets_done(empty, topic) == len(everything)
    equal_states(empty, reference)


@pytest.mark.slow
def test_embedded_runs_on_a_kept_state_dir_continue_the_stream_as_one_longer_run(tmp_path: Path) -> None:
    """`make run` twice on one state directory: each run starts a fresh embedded broker, refilled with the
    records the checkpoint has consumed and the next --max-events, so two runs of N events end in every
    component's state equal to one run of 2N (one partition: a fixed order). A state that has consumed the
    whole feed is refused with a clear error, and a feed shorter than --max-events ends the run."""
    from recsift.config import ConfigError, load_config
    from recsift.service import run
    from recsift.state import differences

    n = 2_500
    overrides = {"stream.partitions": 1, "monitoring.port": 0, "scoring.batch_size": 500,
                 "scoring.scorer.depth": 20, "scoring.reestimate_every": 2, "selection.budget": BUDGET,
                 "selection.selector.strata": 8, "selection.coverage_clusters": 4, "window.idle_flush_s": 1e9,
                 "trainer.drift_thresholds": {"target_js": 1e9, "embedding_sw": 1e9}}

    def embedded_run(state: Path, max_events: int, **more: object) -> str:
        cfg = load_config(overrides={**overrides, **more, "checkpoint.state_dir": str(state)})
        summary = run(cfg, max_events=max_events)
        assert not summary.refreshes  # none ran: when one runs is wall-clock, not the stream
        return str(summary.ingest.stopped_by)

    twice, once = tmp_path / "twice", tmp_path / "once"
    assert embedded_run(twice, n) == "max-events"
    after_first = component_states(twice, overrides)
    assert embedded_run(twice, n) == "max-events"
    assert embedded_run(once, 2 * n) == "max-events"
    got, want = component_states(twice, overrides), component_states(once, overrides)
    assert want["offsets"].meta["offsets"] == [["interactions", 0, 2 * n]]
    for name in REFRESH_BOOKKEEPING:
        got["selection"].meta.pop(name, None), want["selection"].meta.pop(name, None)
    assert want["scorer"].meta["batches"] >= 5 and len(want["reservoir"].part("reservoir").meta["members"])
    diffs = {name: differences(got[name], want[name]) for name in want}
    assert not any(diffs.values()), {k: v[:5] for k, v in diffs.items() if v}
    # negative control: the first run alone (what a second run that consumed nothing new leaves) differs
    assert any(differences(after_first[name], want[name]) for name in ("scorer", "offsets"))

    # the whole feed consumed: refused, naming the state directory
    with pytest.raises(ConfigError, match="already consumed all 5,000 records"):
        embedded_run(twice, n, **{"stream.synthetic.events": 2 * n})
    # a feed shorter than --max-events ends the run instead of waiting for records that never come
    short = tmp_path / "short"
    assert embedded_run(short, 10 * n, **{"stream.synthetic.events": n}) == "end of feed"
    assert component_states(short, overrides)["offsets"].meta["offsets"] == [["interactions", 0, n]]


def test_a_30s_broker_outage_is_reported_and_survived(tmp_path: Path) -> None:
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:  # its own broker: this test freezes it
        topic = "outage"
        cfg = kafka_settings(broker, topic).stream
        ensure_topic(cfg, True, topic, 1)
        from recsift.config import SyntheticConfig
        from recsift.data.synthetic import SyntheticStream

        payloads = list(SyntheticStream(SyntheticConfig(events=30_000, users=300, items=200)).payloads())
        produce_events(cfg, True, payloads[:20_000], topic)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(service_cmd(tmp_path / "state", tmp_path, port, *kafka_args(broker, topic),
                                            "--set", "scoring.enabled=false", "--set", "stream.poll_max_records=500"),
                                env=ENV, stdout=subprocess.DEVNULL, stderr=(tmp_path / "service.log").open("w"))
        try:
            wait_for(lambda: reachable(url + "/healthz") and call(url + "/status")[1]["events_consumed"] >= 3_000,
                     120, "the service to consume")
            assert broker.process is not None
            broker.process.send_signal(signal.SIGSTOP)  # tansu keeps its log in memory: freeze it, don't kill it
            frozen_at = time.monotonic()
            consumed_at_freeze = call(url + "/status")[1]["events_consumed"]
            wait_for(lambda: call(url + "/readyz")[0] == 503, 20, "/readyz to report the outage")
            assert call(url + "/readyz")[1]["connected"] is False
            assert "recsift_source_connected 0.0" in call(url + "/metrics")[1]
            while time.monotonic() - frozen_at < 30:  # the service stays up and its loop alive throughout
                assert proc.poll() is None
                assert call(url + "/healthz")[0] == 200
                time.sleep(1)
            assert consumed_at_freeze < 20_000, "the outage came after everything was consumed"
        finally:
            if broker.process is not None:
                broker.process.send_signal(signal.SIGCONT)
        try:
            wait_for(lambda: call(url + "/readyz")[0] == 200, 90, "/readyz to recover")
            produce_events(cfg, True, payloads[20_000:], topic)
            wait_for(lambda: call(url + "/status")[1]["events_consumed"] >= 30_000, 120, "the service to resume")
            assert "recsift_source_connected 1.0" in call(url + "/metrics")[1]
            time.sleep(2)
            assert call(url + "/status")[1]["events_consumed"] == 30_000  # nothing read twice in this process
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        assert proc.returncode == 0, (tmp_path / "service.log").read_text()[-3000:]
        assert offsets_done(tmp_path / "state", topic) == 30_000


def test_a_run_scores_on_the_configured_surrogate_and_a_state_of_another_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`scoring.surrogate: gru4rec` runs the whole service on GRU4Rec (its checkpoint says so); the same state
    directory under another surrogate is refused with a clear error before anything is consumed. While it
    runs, the ingest thread runs torch on one thread and the scoring thread on torch's default
    (``recsift.process.one_torch_pool``); the ingest thread has its count back afterwards."""
    import torch

    from recsift.config import ConfigError, load_config
    from recsift.scoring.stage import ScoringStage
    from recsift.service import run

    default = torch.get_num_threads()
    seen: dict[str, set[int]] = {"ingest": set(), "scoring": set()}
    score = ScoringStage._score

    def spied(self: ScoringStage, samples: list) -> None:
        seen["scoring"].add(torch.get_num_threads())
        score(self, samples)

    monkeypatch.setattr(ScoringStage, "_score", spied)

    overrides = {"stream.partitions": 1, "monitoring.port": 0, "scoring.batch_size": 500, "scoring.scorer.depth": 10,
                 "scoring.reestimate_every": 2, "selection.budget": BUDGET, "selection.selector.strata": 8,
                 "selection.coverage_clusters": 4, "trainer.drift_thresholds": {"target_js": 1e9, "embedding_sw": 1e9},
                 "checkpoint.state_dir": str(tmp_path), "scoring.hidden": 16}
    summary = run(load_config(overrides={**overrides, "scoring.surrogate": "gru4rec"}), max_events=2_000,
                  progress=lambda _: seen["ingest"].add(torch.get_num_threads()))
    assert summary.scored >= 500 and summary.coreset == BUDGET
    assert seen == {"ingest": {1}, "scoring": {default}} and torch.get_num_threads() == default
    states = component_states(tmp_path, {**overrides, "scoring.surrogate": "gru4rec"})
    assert states["scorer"].part("surrogate").meta["surrogate"] == "gru4rec"
    with pytest.raises(ConfigError, match="holds a gru4rec surrogate, not bert4rec"):
        run(load_config(overrides={**overrides, "scoring.surrogate": "bert4rec"}), max_events=2_000)
    assert offsets_done(tmp_path, "interactions") == 2_000  # nothing more consumed


def test_a_checkpoint_asked_for_before_the_first_assignment_keeps_the_saved_state(
    broker: EmbeddedBroker, make_topic: Callable[..., str], tmp_path: Path
) -> None:
    """A refresh found interrupted at start asks for a checkpoint at once, while the group is still joining:
    the stages then hold the state they were built with, not the saved one. That checkpoint commits nothing,
    so the worker's first assignment restores every component's saved state (before, the fresh scorer and
    selection counters overwrote the saved ones, and the run went on from a surrogate that had learnt nothing)."""
    from recsift import service
    from recsift.config import SyntheticConfig
    from recsift.data.synthetic import SyntheticStream
    from recsift.monitoring.metrics import Metrics
    from recsift.state import differences
    from recsift.stream.catalog import Catalog

    topic = make_topic(1)
    produce_events(kafka_settings(broker, topic).stream, True,
                   list(SyntheticStream(SyntheticConfig(users=200, items=150, events=2_000)).payloads()), topic)
    overrides = {"scoring.batch_size": 500, "scoring.scorer.depth": 10, "scoring.reestimate_every": 2,
                 "selection.budget": BUDGET, "selection.selector.strata": 8, "selection.coverage_clusters": 4,
                 "trainer.refresh_interval_s": None, "trainer.drift_thresholds": {"target_js": 1e9, "embedding_sw": 1e9},
                 "stream.stop_when_idle_s": 3.0, "scoring.hidden": 16}
    cfg = kafka_settings(broker, topic, tmp_path, **overrides)
    assert service.run(cfg).scored >= 500
    state = cfg.checkpoint.state_dir
    saved = component_states(state, overrides)

    # a worker's pieces as `recsift run` builds them, before its source has joined the group
    scorer = service.build_stream_scorer(cfg, Catalog())
    selection, coreset_store = service.build_selection(cfg, Catalog(), rescore=scorer.rescore)
    stage, store = service.build_scoring(cfg, scorer, downstream=[selection])
    ingest = service.Ingest(cfg, Metrics(), Catalog(), participants=[store, coreset_store], handlers=[stage],
                            threaded=True)
    try:
        ingest.pipeline.source = ingest.source()
        ingest.pipeline.checkpoint_now()
        ingest.pipeline.on_assign({0})
        assert not differences(scorer.state_dict(), saved["scorer"])  # the live scorer is the saved one
        ingest.pipeline.source.close()
    finally:
        ingest.close()
    after = component_states(state, overrides)
    diffs = {name: differences(after[name], saved[name]) for name in saved}
    assert not any(diffs.values()), {k: v[:5] for k, v in diffs.items() if v}
