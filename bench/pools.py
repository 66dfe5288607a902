"""Torch's thread pools in the service: the scoring thread's time with one pool (the ingest thread runs torch
on one thread, ``recsift.process.one_torch_pool``) against a pool per thread (the service before it).

Each run is ``bench/perf.py``'s growth run on ``--events`` events (the stream produced into the embedded
broker first, read as a Kafka source, then the scoring stage alone on the same samples in the same process),
with the scoring thread's scorer calls timed: wall seconds, the thread's CPU seconds, and its voluntary and
involuntary context switches. A voluntary switch inside a scorer call is the thread going to sleep: a torch
worker it waits for is asleep, or the GIL is held elsewhere. The arms alternate (one, shared, one, shared …),
each run in a fresh interpreter, so the machine's drift falls on both.

``per_call_ratio`` is the stage alone's scorer seconds over the service's (the same 4,096-sample calls);
``in_service_vs_stage`` is ``bench/perf.py``'s ratio of rates at the last mark, which at 150k events also
counts the samples still queued there against the service.

Usage:  python bench/pools.py [--events 150000] [--pairs 2]
Writes ``bench/results/torch-pools.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RESULTS = ROOT / "bench" / "results"
ARMS = ("one", "shared")


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def switches() -> tuple[int, int]:
    """The calling thread's (voluntary, involuntary) context switches so far."""
    lines = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text().splitlines()
    count = {line.split(":")[0]: int(line.split()[1]) for line in lines if "ctxt_switches" in line}
    return count["voluntary_ctxt_switches"], count["nonvoluntary_ctxt_switches"]


def run_arm(arm: str, events: int) -> dict[str, Any]:
    """One growth run in this process, the scorer calls timed per phase; ``shared``: no ``one_torch_pool``."""
    import perf

    from recsift import service
    from recsift.scoring.stage import StreamScorer

    if arm == "shared":
        @contextlib.contextmanager
        def every_thread_its_pool() -> Iterator[None]:
            yield None  # the scoring stage then leaves its thread's count alone, as before

        service.one_torch_pool = every_thread_its_pool  # type: ignore[assignment]
    phase = ["service"]
    calls: dict[str, dict[str, float]] = {}
    score = StreamScorer.__call__

    def timed(self: StreamScorer, samples: Any) -> Any:
        v0, n0 = switches()
        w0, c0 = time.perf_counter(), time.thread_time()
        out = score(self, samples)
        w1, c1 = time.perf_counter(), time.thread_time()
        v1, n1 = switches()
        c = calls.setdefault(phase[0], {"calls": 0, "wall_s": 0.0, "cpu_s": 0.0, "voluntary": 0, "involuntary": 0})
        c["calls"] += 1
        c["wall_s"] += w1 - w0
        c["cpu_s"] += c1 - c0
        c["voluntary"] += v1 - v0
        c["involuntary"] += n1 - n0
        return out

    StreamScorer.__call__ = timed  # type: ignore[method-assign]
    alone = perf.stage_alone

    def stage_alone(*args: Any, **kwargs: Any) -> dict[str, Any]:
        phase[0] = "alone"
        return alone(*args, **kwargs)

    perf.stage_alone = stage_alone
    growth = perf.growth_worker(events)
    return {"arm": arm, "in_service_vs_stage": growth["in_service_vs_stage"], "scorer_calls": calls,
            "per_call_ratio": calls["alone"]["wall_s"] / calls["service"]["wall_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=150_000)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one run, in a child
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.events)))
        return
    runs = []
    for pair in range(args.pairs):
        for arm in ARMS:
            say(f"pair {pair + 1} of {args.pairs}: {arm} pool(s), {args.events:,} events")
            out = subprocess.run([sys.executable, __file__, "--arm", arm, "--events", str(args.events)], check=True,
                                 cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            c = runs[-1]["scorer_calls"]
            say(f"{arm}: scorer {c['service']['wall_s']:.1f} s in the service ({c['service']['voluntary']:,} sleeps), "
                f"{c['alone']['wall_s']:.1f} s alone: per-call ratio {runs[-1]['per_call_ratio']:.3f}")
    summary: dict[str, Any] = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        summary[arm] = {key: statistics.fmean(r[key] for r in mine) for key in ("per_call_ratio", "in_service_vs_stage")}
        summary[arm]["service_scorer_s"] = statistics.fmean(r["scorer_calls"]["service"]["wall_s"] for r in mine)
        summary[arm]["service_sleeps"] = statistics.fmean(r["scorer_calls"]["service"]["voluntary"] for r in mine)
    pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs), 2)]
    summary["per_call_ratio_one_minus_shared"] = [a["per_call_ratio"] - b["per_call_ratio"] for a, b in pairs]
    summary["service_scorer_s_one_over_shared"] = [a["scorer_calls"]["service"]["wall_s"] / b["scorer_calls"]["service"]["wall_s"]
                                                   for a, b in pairs]
    result = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "events": args.events,
              "command": " ".join(["python bench/pools.py", *sys.argv[1:]]), "runs": runs, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "torch-pools.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
