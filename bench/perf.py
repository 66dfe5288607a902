"""The performance suite: runs the ingest, scoring, selection and refresh benchmarks, prints one table of
their figures and ratios with the machine's core count, and measures the cost growth of the whole
pipeline (embedded broker → validate → windows → surrogate update + influence scoring → streaming
selection → checkpoint) at 100k, 300k and 1M events of the synthetic stream: the rate over each segment
(per-event cost must stay flat), the RSS of the service's processes (memory must stay bounded) and how full
the coreset is (``coreset_fill`` at each mark and its minimum over every poll after warm-up: ≥ 0.99).

Usage:  python bench/perf.py                      every benchmark at its default size, then the growth run
        python bench/perf.py --light              smaller sub-benchmarks (ingest 300k × 1, refresh slice 32)
        python bench/perf.py --tabulate           no runs: the table from the committed bench/results/*.json
        python bench/perf.py --only growth        just the growth run (--growth-events to change its length)
Writes ``bench/results/perf.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
MARKS = (100_000, 300_000, 1_000_000)
WARMUP_BUDGETS = 4  # the coreset fill is checked once this many budgets of samples have been scored
BENCHES = {  # name → (default arguments, --light arguments)
    "ingest": (["--events", "1000000", "--reps", "3"], ["--events", "300000", "--reps", "1"]),
    "scoring": ([], ["--loop-samples", "500", "--effort-samples", "16"]),
    "selection": ([], ["--samples", "100000"]),
    "refresh": ([], ["--slice", "32", "--users", "2", "--titles", "500"]),
}


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def service_rss(pid: int) -> tuple[int, int]:
    """(RSS of the service: the process and its fetch child; RSS of the embedded tansu broker), bytes.
    The broker stands in for Kafka and keeps the whole topic in memory, so it is reported apart."""
    import psutil

    proc = psutil.Process(pid)
    service, broker = proc.memory_info().rss, 0
    for child in proc.children(recursive=True):
        try:
            rss = child.memory_info().rss
            if "tansu" in child.name():
                broker += rss
            else:
                service += rss
        except psutil.NoSuchProcess:
            pass
    return service, broker


def growth_worker(events: int) -> dict[str, Any]:
    """`recsift run` in this process on ``events`` synthetic events, sampled as it goes. Refreshes are off
    (no drift trigger, an interval of 1e9 s: a None override means "not given" and would keep the 30-min
    default): they run in their own process and would only add LLM training."""
    from recsift import service
    from recsift.config import load_config
    from recsift.monitoring.metrics import Metrics

    state = Path(tempfile.mkdtemp(prefix="recsift-perf-"))
    cfg = load_config(overrides={"checkpoint.state_dir": str(state), "monitoring.port": 0, "monitoring.progress": False,
                                 "stream.synthetic.events": events, "trainer.refresh_interval_s": 1e9,
                                 "trainer.drift_thresholds": {}})
    metrics = Metrics()
    marks = [m for m in MARKS if m <= events] or [events]
    crossed: list[dict[str, float]] = []
    fills: list[float] = []
    done = threading.Event()

    def consumed() -> float:
        return metrics.registry.get_sample_value("recsift_events_consumed_total") or 0.0

    def gauge(name: str) -> float:
        return metrics.registry.get_sample_value(name) or 0.0

    def fill() -> float:
        return gauge("recsift_coreset_size") / max(gauge("recsift_coreset_capacity"), 1.0)

    def sample() -> None:
        started = None
        # warm-up: WARMUP_BUDGETS budgets of samples, and at least two scoring batches (the scored counter
        # moves before the batch reaches the selector, so one batch alone would read a coreset not yet filled)
        warmup = max(WARMUP_BUDGETS * cfg.selection.budget, 2 * cfg.scoring.batch_size)
        while not done.is_set() and len(crossed) < len(marks):
            n = consumed()
            if started is None and n > 0:
                started = time.perf_counter()
            if gauge("recsift_samples_scored_total") >= warmup:  # after warm-up: every poll
                fills.append(fill())
            if started is not None and n >= marks[len(crossed)]:
                rss, broker = service_rss(os.getpid())
                crossed.append({"events": n, "seconds": time.perf_counter() - started, "rss_bytes": rss,
                                "broker_rss_bytes": broker, "scored": gauge("recsift_samples_scored_total"),
                                "coreset_fill": fill()})
                say(f"growth: {n:,.0f} events at {crossed[-1]['seconds']:.0f} s, service RSS {rss / 2**20:.0f} MB "
                    f"(broker {broker / 2**20:.0f} MB), coreset {fill():.1%} full")
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    summary = service.run(cfg, max_events=events, metrics=metrics)
    done.set()
    sampler.join(5)
    segments, previous = [], {"events": 0.0, "seconds": 0.0}
    for point in crossed:
        segments.append({"from": previous["events"], "to": point["events"],
                         "events_per_s": (point["events"] - previous["events"]) / (point["seconds"] - previous["seconds"]),
                         "rss_mb": point["rss_bytes"] / 2**20, "broker_rss_mb": point["broker_rss_bytes"] / 2**20})
        previous = point
    return {"events": summary.ingest.consumed, "samples_scored": summary.scored, "marks": crossed, "segments": segments,
            "coreset": summary.coreset, "budget": cfg.selection.budget, "coreset_fill": [m["coreset_fill"] for m in crossed],
            "coreset_fill_min_after_warmup": min(fills) if fills else None, "fill_polls_after_warmup": len(fills)}


def run_bench(name: str, light: bool) -> float:
    args = BENCHES[name][1 if light else 0]
    say(f"running bench/{name}.py {' '.join(args)}")
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *args], check=True, cwd=ROOT)
    return time.perf_counter() - started


def load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def table(results: dict[str, dict[str, Any]], growth: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(figure, value, ratio or note) rows."""
    rows: list[tuple[str, str, str]] = []
    ing = results.get("ingest", {})
    for r in ing.get("rows", []):
        if r["fetch"] == "process":
            rows.append((f"ingest events/s (crc {r['crc']})", f"{r['pipeline_rate']:,.0f}",
                         f"{r['ratio_median']:.2f}x the bare consumer ({r['bare_rate']:,.0f}/s)"))
    sc = results.get("scoring", {})
    if sc:
        rows += [("surrogate epoch on Games", f"{sc['surrogate_epoch_s']:.1f} s", "target <= 25 s"),
                 ("influence samples/s (one JVP per batch)", f"{sc['influence_jvp_samples_per_s']:,.0f}",
                  f"{sc['jvp_speedup']:.0f}x the per-sample loop ({sc['influence_loop_samples_per_s']:,.0f}/s)"),
                 ("GraNd / EL2N samples/s", f"{sc['grand_samples_per_s']:,.0f} / {sc['el2n_samples_per_s']:,.0f}", ""),
                 ("effort samples/s (SmolLM2-135M)", f"{sc['effort_samples_per_s']:.2f}",
                  f"{sc['effort_batched_speedup']:.2f}x one at a time"),
                 ("scoring stage samples/s (synthetic)", f"{sc['stream_stage_samples_per_s']:,.0f}", "")]
    sel = results.get("selection", {})
    if sel:
        rows += [("selector offers/s (budget 1,024)", f"{sel['offer_samples_per_s_budget_1024']:,.0f}",
                  f"{sel['select_share_of_pipeline']:.2%} of the pipeline's per-sample time"),
                 ("batch vs. streaming selection on Games", f"{sel['batch_select_games_s']:.3f} s vs. "
                  f"{sel['stream_select_games_s']:.3f} s", ""),
                 ("GORACS 10k x 2k", f"{sel['goracs_10k_x_2k_s']:.1f} s", "")]
    ref = results.get("refresh", {})
    if ref:
        rows += [("LoRA training samples/s (SmolLM2-135M)", f"{ref['train_samples_per_s']:.2f}",
                  f"{ref['train_tokens_per_s']:.0f} tokens/s"),
                 ("1,024-sample refresh vs. a full epoch", f"{ref['refresh_1024_s_extrapolated'] / 60:.1f} min vs. "
                  f"{ref['full_epoch_s_extrapolated'] / 3600:.1f} h", f"{ref['refresh_cost_share']:.1%} of the cost"),
                 ("prompt grounding s/user", f"{ref['prompt_ground_s_per_user']:.2f}",
                  f"generation + grounding {ref['generate_and_ground_s_per_user']:.1f} s/user")]
    if growth:
        segs = growth["segments"]
        for s in segs:
            rows.append((f"pipeline events/s, {s['from']:,.0f} → {s['to']:,.0f}", f"{s['events_per_s']:,.0f}",
                         f"RSS {s['rss_mb']:,.0f} MB"))
        if growth.get("coreset_fill"):
            rows.append(("coreset fill at each mark", ", ".join(f"{f:.1%}" for f in growth["coreset_fill"]),
                         f"min after warm-up {growth['coreset_fill_min_after_warmup']:.1%}"
                         if growth.get("coreset_fill_min_after_warmup") is not None else ""))
        if len(segs) > 1:
            rows.append(("per-event cost, last segment / first", f"{segs[0]['events_per_s'] / segs[-1]['events_per_s']:.2f}",
                         f"RSS last / first {segs[-1]['rss_mb'] / segs[0]['rss_mb']:.2f}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tabulate", action="store_true", help="print the table from the committed results; run nothing")
    ap.add_argument("--light", action="store_true", help="smaller sub-benchmarks")
    ap.add_argument("--only", help="comma-separated subset of: ingest, scoring, selection, refresh, growth")
    ap.add_argument("--growth-events", type=int, default=MARKS[-1])
    ap.add_argument("--growth-worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.growth_worker:
        print(json.dumps(growth_worker(args.growth_worker)))
        return
    wanted = set((args.only or ",".join([*BENCHES, "growth"])).split(","))
    durations: dict[str, float] = {}
    previous = load("perf")
    growth = previous.get("growth")
    if not args.tabulate:
        for name in BENCHES:
            if name in wanted:
                durations[name] = run_bench(name, args.light)
        if "growth" in wanted:
            say(f"growth run: {args.growth_events:,} synthetic events through the whole pipeline")
            out = subprocess.run([sys.executable, __file__, "--growth-worker", str(args.growth_events)], check=True,
                                 cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout
            growth = json.loads(out.strip().splitlines()[-1])
    results = {name: load(name) for name in BENCHES}
    rows = table(results, growth)
    cores = os.cpu_count()
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"recsift performance, {cores} cores ({time.strftime('%Y-%m-%d')})")
    for figure, value, note in rows:
        print(f"  {figure:<{width}}  {value:>22}  {note}")
    if not args.tabulate:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "perf.json").write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "cores": cores, "light": args.light, "durations_s": durations,
            "growth": growth, "table": [{"figure": f, "value": v, "note": n} for f, v, n in rows],
            "sources": {name: {"date": results[name].get("date")} for name in BENCHES}}, indent=2))


if __name__ == "__main__":
    main()
