"""Scale-out: 1, 2 and 3 `recsift run` workers of one consumer group over the same topic, each on its own
state directory with the changelog on, on this machine.

For each worker count, on a fresh group and changelog topic over the same events (all in the topic before
the workers start, so the rate is the workers' own):

- ``events_per_s``: events over the time from the first to the last committed checkpoint, read from the
  workers' checkpoint files every 0.5 s (the same clock for every count); per worker, over its own first
  to last checkpoint that moved its offsets;
- ``cpu_s_per_event``: the workers' user + system CPU seconds (their fetch children included) over the same
  span, per event of it (start-up, imports and the group join, is left out);
- ``changelog_bytes_per_event``: key + value bytes in the changelog topic afterwards, per event;
- ``worker_state_bytes_per_event``: the same for the worker topic (each worker's own state, scorer and
  selection, written in every checkpoint that changed it; ``--mode full`` only). The scorer's size follows
  ``scoring.item_capacity``, which the bench sizes to the dataset's items (×1.25, at least 1,000), as a
  deployment would;
- ``restore_s_per_100k``: a worker on an empty directory then restores every partition from the changelog
  (its log says how long each took); seconds per 100k events of stream that built that state.

``--mode ingest`` runs the workers without scoring (the stream state and the changelog alone); ``--mode full``
with scoring and selection (refreshes off: ``trainer.in_worker=false``, coreset published to a topic).
On two cores the totals cannot grow linearly with workers; what should hold is the per-event CPU cost
(growth over one worker ≤ 15%), reported as ``cpu_growth_vs_1``.

The workers checkpoint every ``--checkpoint-interval`` seconds (default 10, the configuration's default;
each checkpoint rewrites every owned partition's reservoir and the worker's scorer state, so 1 s costs
several times the changelog bytes). Each worker has its own surrogate, whose first influence estimate (and
one per ``scoring.reestimate_every`` of its batches) is a fixed cost: over a short stream it weighs on more
workers more, so full mode needs about a million events before the per-event cost is the steady one. The
result records whether kafka-python checked record batches with the native ``crc32c`` package
(``native_crc32c``; the Docker image installs it), since in pure Python that check costs ~0.1 s per MB of
changelog.

Usage:  python bench/scale.py --mode ingest --events 1000000     synthetic stream, no scoring
        python bench/scale.py --mode full --events 1000000        synthetic stream, scoring and selection
        python bench/scale.py --dataset ../shared/data/ml-100k/ml-100k.inter --mode ingest
Writes ``bench/results/scale.json`` (``--out`` to change it): one entry per mode, each with its command.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
RESTORED = re.compile(r"changelog partition (\d+) restored: (\d+) records read in ([\d.]+) s")


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def committed(state: Path, topic: str) -> dict[int, int]:
    """partition → next offset in a worker's checkpoint file (empty before its first checkpoint)."""
    import sqlite3

    db = state / "recsift.sqlite"
    if not db.exists():
        return {}
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return {int(p): int(o) for p, o in conn.execute("SELECT partition, next_offset FROM offsets WHERE topic = ?",
                                                              (topic,))}
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the table is not there yet
        return {}


def worker_cmd(state: Path, bootstrap: str, topic: str, group: str, changelog: str, mode: str,
               coreset: str, idle_s: float, item_capacity: int, interval_s: float) -> list[str]:
    sets: dict[str, Any] = {"checkpoint.changelog_topic": changelog, "checkpoint.interval_s": interval_s,
                            "stream.worker_id": state.name,  # one host here: the host name would be shared
                            "stream.stop_when_idle_s": idle_s, "monitoring.port": 0,
                            "stream.session_timeout_ms": 6000, "stream.heartbeat_interval_ms": 1000}
    if mode == "ingest":
        sets["scoring.enabled"] = "false"
    else:
        sets.update({"trainer.in_worker": "false", "stream.coreset_topic": coreset, "scoring.item_capacity": item_capacity})
    return [sys.executable, "-m", "recsift.cli", "run", "--state-dir", str(state), "--no-progress", "--source", "kafka",
            "--bootstrap-servers", bootstrap, "--topic", topic, "--group-id", group,
            "--set", f"stream.dead_letter_topic={topic}.dlq", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def cpu_seconds(proc: subprocess.Popen[bytes]) -> float | None:
    """User + system CPU seconds of a worker and its children (the fetch process) so far; None once gone."""
    import psutil

    try:
        p = psutil.Process(proc.pid)
        return sum(t.user + t.system for t in (q.cpu_times() for q in (p, *p.children(recursive=True))))
    except psutil.NoSuchProcess:
        return None


def changelog_size(bootstrap: str, topic: str, partitions: int) -> tuple[int, int]:
    """(records, key + value bytes) of the changelog topic."""
    from recsift.config import load_config
    from recsift.stream.changelog import KafkaChangelog

    cfg = load_config(overrides={"stream.bootstrap_servers": bootstrap}).stream
    log = KafkaChangelog(cfg, True, topic, timeout_s=60)
    try:
        records = [r for p in range(partitions) for r in log.read(p, 0)]
    finally:
        log.close()
    return len(records), sum(len(r.key) + len(r.value or b"") for r in records)


def run_count(k: int, *, bootstrap: str, topic: str, events: int, partitions: int, mode: str, work: Path,
              timeout_s: float, item_capacity: int, interval_s: float) -> dict[str, Any]:
    from recsift.config import load_config
    from recsift.stream.kafka import ensure_topic

    tag = f"{mode}-{k}"
    group, changelog, coreset = f"g-{tag}", f"{topic}.changelog-{tag}", f"{topic}.coreset-{tag}"
    cfg = load_config(overrides={"stream.bootstrap_servers": bootstrap}).stream
    ensure_topic(cfg, True, changelog, partitions, {"cleanup.policy": "compact"})
    ensure_topic(cfg, True, coreset, 1, {"cleanup.policy": "compact"})
    dirs = [work / tag / f"w{i}" for i in range(k)]
    logs = [work / tag / f"w{i}.log" for i in range(k)]
    for d in dirs:
        d.mkdir(parents=True)
    procs = [subprocess.Popen(worker_cmd(d, bootstrap, topic, group, changelog, mode, coreset, 5.0, item_capacity,
                                                interval_s), env=ENV,
                              stdout=subprocess.DEVNULL, stderr=log.open("w")) for d, log in zip(dirs, logs, strict=True)]
    first: float | None = None
    first_done = 0
    # per worker: CPU at the first checkpoint and the last seen (a worker whose partitions are done stops
    # when idle, before the others), and its offsets and times at its first and last progress
    cpu_at: list[list[float]] = [[] for _ in procs]
    start: list[tuple[float, int] | None] = [None] * k
    last: list[tuple[float, int]] = [(0.0, 0)] * k
    end = time.monotonic() + timeout_s
    last_note = 0.0
    try:
        while True:
            now = time.monotonic()
            offsets = [committed(d, topic) for d in dirs]
            done = sum(max((o.get(p, 0) for o in offsets), default=0) for p in range(partitions))
            if first is None and done:
                first, first_done = now, done
            for w, (proc, o) in enumerate(zip(procs, offsets, strict=True)):
                mine = sum(o.values())
                if first is not None and (cpu := cpu_seconds(proc)) is not None:
                    cpu_at[w] = [cpu_at[w][0] if cpu_at[w] else cpu, cpu]
                if mine and start[w] is None:
                    start[w] = (now, mine)
                if mine > last[w][1]:
                    last[w] = (now, mine)
            if done >= events:
                break
            # a worker whose partitions are done stops when idle; one that failed, or all stopping early, is an error
            if now > end or any(p.poll() not in (None, 0) for p in procs) or all(p.poll() is not None for p in procs):
                raise RuntimeError(f"{tag}: {done:,} of {events:,} events checkpointed; see {work / tag}")
            if now - last_note >= 10:
                say(f"{tag}: {done:,} / {events:,} events checkpointed")
                last_note = now
            time.sleep(0.5)
        finished = time.monotonic()
        cpu = sum(c[1] - c[0] for c in cpu_at if c)  # start-up (imports, group join) left out
    except BaseException:
        for p in procs:
            p.kill()
        raise
    for p in procs:
        p.wait(timeout=timeout_s)
    failed = [str(log) for p, log in zip(procs, logs, strict=True) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"{tag}: a worker failed; see {failed}")
    assert first is not None
    span = max(finished - first, 1e-9)
    per_worker = [(n1 - s[1]) / (t1 - s[0]) if s is not None and t1 > s[0] else 0.0
                  for s, (t1, n1) in zip(start, last, strict=True)]
    records, size = changelog_size(bootstrap, changelog, partitions)
    _, worker_size = changelog_size(bootstrap, f"{changelog}.workers", 1)

    # a worker on an empty directory restores every partition (nothing new to read: it stops when idle). Its
    # own group: tansu sometimes never completes a join to a group whose members have all just left (seen
    # here; the changelog, not the group, is where the state and offsets come from)
    fresh, fresh_log = work / tag / "restore", work / tag / "restore.log"
    proc = subprocess.Popen(worker_cmd(fresh, bootstrap, topic, f"{group}-restore", changelog, mode, coreset, 2.0,
                                       item_capacity, interval_s), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=fresh_log.open("w"))
    proc.wait(timeout=timeout_s)
    restored = RESTORED.findall(fresh_log.read_text())
    if proc.returncode != 0 or len(restored) != partitions:
        raise RuntimeError(f"{tag}: the restoring worker restored {len(restored)} of {partitions} partitions; see {fresh_log}")
    restore_s = sum(float(s) for _, _, s in restored)
    out: dict[str, Any] = {"workers": k, "mode": mode, "events": events, "events_per_s": (events - first_done) / span,
           "per_worker_events_per_s": per_worker, "seconds": span, "cpu_s": cpu, "cpu_s_per_event": cpu / (events - first_done),
           "changelog_records": records, "changelog_bytes_per_event": size / events,
           "worker_state_bytes_per_event": worker_size / events, "item_capacity": item_capacity,
           "restore_s": restore_s, "restore_records": sum(int(n) for _, n, _ in restored),
           "restore_s_per_100k": restore_s / (events / 100_000)}
    say(f"{tag}: {out['events_per_s']:,.0f} events/s, {out['cpu_s_per_event'] * 1e6:,.1f} µs CPU/event, "
        f"{out['changelog_bytes_per_event']:,.1f} changelog B/event, {out['worker_state_bytes_per_event']:,.1f} worker "
        f"state B/event, restore {restore_s:.2f} s")
    return out


def native_crc32c() -> bool:
    """Whether kafka-python checks record batches with the native ``crc32c`` package (``recsift[fast-crc]``, as
    the Docker image installs it) rather than in pure Python, which costs about 0.1 s of CPU per MB."""
    from kafka.record import util

    return util.crc32c_c is not None


def payloads(dataset: str, events: int) -> tuple[str, list[tuple[bytes | None, bytes]]]:
    from recsift.config import SyntheticConfig
    from recsift.data.datasets import detect_format, iter_events_or_payloads
    from recsift.data.synthetic import SyntheticStream
    from recsift.stream.kafka import keyed

    if dataset == "synthetic":
        return "synthetic", list(SyntheticStream(SyntheticConfig(events=events)).payloads())
    path = Path(dataset)
    return str(path), list(islice(keyed(iter_events_or_payloads(path, detect_format(path))), events))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="synthetic", help="synthetic, or a file / DEALRec directory in a format "
                    "recsift reads (../shared/data/ml-100k/ml-100k.inter, ../shared/data/games)")
    ap.add_argument("--events", type=int, default=300_000, help="at most this many events of the dataset")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--mode", choices=["ingest", "full", "both"], default="both")
    ap.add_argument("--checkpoint-interval", type=float, default=10.0,
                    help="the workers' checkpoint.interval_s (10 s: the default config's)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed for one worker count")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = ap.parse_args()

    from recsift.config import load_config
    from recsift.stream.broker import EmbeddedBroker
    from recsift.stream.kafka import ensure_topic, produce_events

    name, data = payloads(args.dataset, args.events)
    items = len({json.loads(value)["item_id"] for _, value in data})
    item_capacity = max(1_000, int(items * 1.25))
    work = Path(tempfile.mkdtemp(prefix="recsift-scale-"))
    modes = ["ingest", "full"] if args.mode == "both" else [args.mode]
    runs = []
    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        cfg = load_config(overrides={"stream.bootstrap_servers": broker.bootstrap_servers}).stream
        topic = "scale"
        ensure_topic(cfg, True, topic, args.partitions)
        ensure_topic(cfg, True, f"{topic}.dlq", 1)
        n = produce_events(cfg, True, data, topic)
        say(f"{n:,} events of {name} in {topic!r} ({args.partitions} partitions); work in {work}")
        for mode in modes:
            for k in args.workers:
                runs.append(run_count(k, bootstrap=broker.bootstrap_servers, topic=topic, events=n,
                                      partitions=args.partitions, mode=mode, work=work, timeout_s=args.timeout,
                                      item_capacity=item_capacity, interval_s=args.checkpoint_interval))
    for r in runs:
        base = next((b for b in runs if b["mode"] == r["mode"] and b["workers"] == min(args.workers)), r)
        r["cpu_growth_vs_1"] = r["cpu_s_per_event"] / base["cpu_s_per_event"] - 1.0
    # one entry per mode: a run of one mode replaces that mode's entry and keeps the other's
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    for mode in modes:
        result.setdefault("modes", {})[mode] = {
            "command": "python bench/scale.py " + " ".join(sys.argv[1:]), "dataset": name, "events": n,
            "partitions": args.partitions, "cores": os.cpu_count(), "checkpoint_interval_s": args.checkpoint_interval,
            "native_crc32c": native_crc32c(), "runs": [r for r in runs if r["mode"] == mode]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'mode':<7} {'workers':>7} {'events/s':>10} {'per worker':>24} {'CPU µs/event':>13} {'growth':>7} "
          f"{'changelog B/event':>18} {'worker B/event':>15} {'restore s/100k':>15}")
    for r in runs:
        per = ", ".join(f"{x:,.0f}" for x in r["per_worker_events_per_s"])
        print(f"{r['mode']:<7} {r['workers']:>7} {r['events_per_s']:>10,.0f} {per:>24} {r['cpu_s_per_event'] * 1e6:>13,.1f} "
              f"{r['cpu_growth_vs_1']:>+7.1%} {r['changelog_bytes_per_event']:>18,.1f} "
              f"{r.get('worker_state_bytes_per_event', float('nan')):>15,.1f} {r['restore_s_per_100k']:>15.2f}")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
