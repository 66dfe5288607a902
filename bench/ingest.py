"""Ingest benchmark: recsift's pipeline (broker → validate → windows → samples → checkpoint) against a bare
kafka-python consumer reading the same topic, in the same run, plus the pipeline's RSS as the stream grows.

Usage:  python bench/ingest.py [--events 1000000] [--reps 3]

Every side runs in its own subprocess with identical client settings; rates are counted from the first
record to the last (the group join is excluded on every side). recsift is measured with its default
fetch process (Kafka records decoded in a child process, in parallel with the pipeline) and with the
consumer in the pipeline's own process. kafka-python checks every record batch's CRC32C, in pure Python
unless the ``crc32c`` package is installed; both CRC modes are measured, because the bare consumer's speed
depends mostly on which one it gets. Results: a table on stdout and ``bench/results/ingest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from recsift.config import SyntheticConfig  # noqa: E402

SYNTHETIC_DEFAULT = SyntheticConfig()
RESULTS = ROOT / "bench" / "results"
USERS, ITEMS = SYNTHETIC_DEFAULT.users, SYNTHETIC_DEFAULT.items  # histories are full (L = 50) by 100k events


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def worker_bare(bootstrap: str, topic: str, events: int) -> dict[str, float]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"bare-{time.time_ns()}", enable_auto_commit=False,
        auto_offset_reset="earliest", session_timeout_ms=2000, heartbeat_interval_ms=500, max_poll_records=2000,
    )
    n, first = 0, None
    while n < events:
        for recs in consumer.poll(timeout_ms=200, max_records=2000).values():
            if first is None:
                first = time.perf_counter()
            for r in recs:
                _ = r.value
                n += 1
    elapsed = time.perf_counter() - (first or time.perf_counter())
    consumer.close(autocommit=False)
    return {"events": n, "seconds": elapsed, "rate": n / elapsed}


def worker_pipeline(bootstrap: str, topic: str, events: int, rss_at: int, fetch_process: bool) -> dict[str, Any]:
    from recsift.config import load_config
    from recsift.monitoring.metrics import Metrics
    from recsift.service import Ingest
    from recsift.stream.catalog import Catalog
    from recsift.stream.pipeline import Pipeline

    state = tempfile.mkdtemp(prefix="recsift-bench-")
    cfg = load_config(overrides={
        "stream.source": "kafka", "stream.bootstrap_servers": bootstrap, "stream.topic": topic,
        "stream.group_id": f"pipe-{time.time_ns()}", "stream.dead_letter_topic": f"{topic}.dlq",
        "stream.session_timeout_ms": 2000, "stream.heartbeat_interval_ms": 500,
        "checkpoint.state_dir": state, "monitoring.progress": False, "stream.fetch_process": fetch_process,
    })
    marks = sorted({rss_at, *(events * k // 10 for k in range(1, 10))})
    trajectory: list[tuple[int, int]] = []

    def sample_rss(pipeline: Pipeline) -> None:
        consumed = pipeline.summary.consumed
        if marks and consumed >= marks[0]:
            trajectory.append((consumed, _rss()))
            while marks and consumed >= marks[0]:
                marks.pop(0)

    ingest = Ingest(cfg, Metrics(), Catalog(), ticks=[sample_rss])
    summary = ingest.pipeline.run(ingest.source(), max_events=events)
    trajectory.append((summary.consumed, _rss()))
    ingest.close()
    early = next(r for n, r in trajectory if n >= rss_at)
    return {
        "events": summary.consumed, "seconds": summary.busy_s, "rate": summary.consumed / summary.busy_s,
        "samples": summary.samples, "checkpoints": summary.checkpoints,
        "rss_early_bytes": early, "rss_end_bytes": trajectory[-1][1], "rss_trajectory": trajectory,
    }


def run_worker(kind: str, crc: str, bootstrap: str, topic: str, events: int, rss_at: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", kind, "--crc", crc, "--bootstrap", bootstrap, "--topic", topic,
           "--events", str(events), "--rss-at", str(rss_at)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'bench'}{os.pathsep}{ROOT}"}  # bench/sitecustomize.py
    if crc == "python":  # in every process of the worker, the fetch process included
        env["RECSIFT_BENCH_PURE_PYTHON_CRC"] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--rss-at", type=int, default=100_000, help="first RSS sample after this many events")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--worker", choices=["bare", "pipeline", "pipeline-inline"], help=argparse.SUPPRESS)
    ap.add_argument("--crc", choices=["native", "python"], default="native", help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", help=argparse.SUPPRESS)
    ap.add_argument("--topic", default="bench", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        if args.worker == "bare":
            result = worker_bare(args.bootstrap, args.topic, args.events)
        else:
            result = worker_pipeline(args.bootstrap, args.topic, args.events, args.rss_at, args.worker == "pipeline")
        print(json.dumps(result))
        return

    from recsift.config import load_config
    from recsift.data.synthetic import SyntheticStream
    from recsift.stream.broker import EmbeddedBroker
    from recsift.stream.kafka import ensure_topic, produce_events

    try:
        import crc32c  # noqa: F401

        modes = ["native", "python"]
    except ImportError:
        modes = ["python"]
    with EmbeddedBroker() as broker:
        cfg = load_config(overrides={"stream.bootstrap_servers": broker.bootstrap_servers})
        ensure_topic(cfg.stream, True, args.topic, args.partitions)
        t0 = time.perf_counter()
        stream = SyntheticStream(SyntheticConfig(seed=0, users=USERS, items=ITEMS, events=args.events))
        produce_events(cfg.stream, True, stream.payloads(), args.topic)
        print(f"produced {args.events:,} events in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        kinds = ("bare", "pipeline", "pipeline-inline")
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {k: [] for k in kinds} for m in modes}
        for rep in range(args.reps):  # interleaved, so drifts in machine load hit every side alike
            for mode in modes:
                for kind in kinds:
                    r = run_worker(kind, mode, broker.bootstrap_servers, args.topic, args.events, args.rss_at)
                    runs[mode][kind].append(r)
                    print(f"rep {rep + 1} crc={mode:6s} {kind:15s} {r['rate']:>10,.0f} events/s", file=sys.stderr)

    rows = []
    for mode in modes:
        bare = [r["rate"] for r in runs[mode]["bare"]]
        for kind, fetch in (("pipeline", "process"), ("pipeline-inline", "inline")):
            pipe = [r["rate"] for r in runs[mode][kind]]
            ratios = [p / b for p, b in zip(pipe, bare, strict=True)]  # each against the bare run of its rep
            early = statistics.median(r["rss_early_bytes"] for r in runs[mode][kind])
            end = statistics.median(r["rss_end_bytes"] for r in runs[mode][kind])
            # after warm-up: from 30% of the stream to its end
            steady = statistics.median(
                r["rss_end_bytes"] / next(b for n, b in r["rss_trajectory"] if n >= 0.3 * args.events) - 1
                for r in runs[mode][kind]
            )
            rows.append({
                "crc": mode, "fetch": fetch, "bare_rate": statistics.median(bare),
                "pipeline_rate": statistics.median(pipe), "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios),
                "rss_at_early_mb": early / 2**20, "rss_at_end_mb": end / 2**20, "rss_change": end / early - 1,
                "rss_change_after_30pct": steady,
            })
    print(f"\ningest benchmark: {args.events:,} synthetic events ({USERS:,} users), {args.partitions} partitions, "
          f"{args.reps} interleaved reps, {os.cpu_count()} cores, Python {platform.python_version()}")
    header = f"{'CRC32C':8s} {'fetch':8s} {'bare ev/s':>11s} {'recsift ev/s':>13s} {'ratio (min-max)':>18s} " \
             f"{'RSS@' + format(args.rss_at, ','):>12s} {'RSS@' + format(args.events, ','):>14s} {'RSS change':>11s} " \
             f"{'from 30%':>9s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['crc']:8s} {r['fetch']:8s} {r['bare_rate']:>11,.0f} {r['pipeline_rate']:>13,.0f} "
              f"{r['ratio_median']:>7.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) "
              f"{r['rss_at_early_mb']:>9.1f} MB {r['rss_at_end_mb']:>11.1f} MB {r['rss_change']:>+10.1%} "
              f"{r['rss_change_after_30pct']:>+8.1%}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"events": args.events, "users": USERS, "partitions": args.partitions, "reps": args.reps,
           "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "rows": rows, "runs": runs}
    (RESULTS / "ingest.json").write_text(json.dumps(out, indent=2))
    print(f"\nwrote {RESULTS / 'ingest.json'}")


if __name__ == "__main__":
    main()
