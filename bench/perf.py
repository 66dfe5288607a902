"""The performance suite: runs the ingest, scoring, selection and refresh benchmarks, prints one table of
their figures and ratios with the machine's core count, and measures the cost growth of the whole
pipeline (embedded broker → validate → windows → surrogate update + influence scoring → streaming
selection → checkpoint) at 100k, 300k, 1M and 3M events of the synthetic stream: the rate over each
segment (per-event cost must stay flat), the RSS of the service's processes (memory must stay bounded), how
full the coreset is (``coreset_fill`` at each mark, and its minimum over every poll once it first filled:
≥ 0.99; ``warmup_samples`` says when that was) and, side by side in the same run, the scoring stage alone
on the first 300k events of the same stream (``in_service_vs_stage``: the service's scoring rate over it).

Usage:  python bench/perf.py                      every benchmark at its default size, then the growth run
        python bench/perf.py --light              smaller sub-benchmarks (ingest 300k × 1, refresh slice 32)
        python bench/perf.py --tabulate           no runs: the table from the committed bench/results/*.json
        python bench/perf.py --only growth        just the growth run (--growth-events to change its length)
        python bench/perf.py --only growth --growth-feed games --growth-out perf-games
                                                  the growth run on a dataset (a shared one's name or a directory)
        python bench/perf.py --only growth --growth-events 300000 --repeats 3 --growth-out perf-300k-repeats
                                                  three runs: the in-service ratio's mean and 95% interval
Writes ``bench/results/perf.json`` (or ``--growth-out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
MARKS = (100_000, 300_000, 1_000_000, 3_000_000)
STAGE_EVENTS = 300_000  # the scoring stage alone is timed on this prefix of the same stream
BENCHES = {  # name → (default arguments, --light arguments)
    "ingest": (["--events", "1000000", "--reps", "3"], ["--events", "300000", "--reps", "1"]),
    "scoring": ([], ["--loop-samples", "500", "--effort-samples", "16"]),
    "selection": ([], ["--samples", "100000"]),
    "refresh": ([], ["--slice", "32", "--users", "2", "--titles", "500"]),
}


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def service_rss(pid: int) -> tuple[int, int, int]:
    """(RSS of the service: the process and its fetch child; RSS of the embedded tansu broker; RSS of the
    fetch child alone), bytes. The broker stands in for Kafka and keeps the whole topic in memory, so it is
    reported apart; the fetch child is a part of the service, reported apart as well to tell where growth is."""
    import psutil

    proc = psutil.Process(pid)
    service, broker, child = proc.memory_info().rss, 0, 0
    for c in proc.children(recursive=True):
        try:
            rss = c.memory_info().rss
            if "tansu" in c.name():
                broker += rss
            else:
                service += rss
                child += rss
        except psutil.NoSuchProcess:
            pass
    return service, broker, child


def growth_worker(events: int, feed_name: str = "synthetic") -> dict[str, Any]:
    """`recsift run` in this process on ``events`` events of ``feed_name`` (the synthetic stream, or a dataset:
    a shared one's name or a directory in its format, e.g. ``games``), sampled as it goes.

    The stream is produced into an embedded broker before the clock starts (as in ``bench/scale.py``), and
    the service reads it as a Kafka source: the producer stands for the upstream system, not for recsift, so
    its CPU is not charged to the service; the broker's own is (it runs on the same cores). Refreshes are
    off (no drift trigger, an interval of 1e9 s: a None override means "not given" and would keep the
    30-min default): they run in their own process and would only add LLM training."""
    from recsift import service
    from recsift.config import load_config
    from recsift.monitoring.metrics import Metrics
    from recsift.stream.broker import EmbeddedBroker
    from recsift.stream.kafka import ensure_topic, produce_events

    state = Path(tempfile.mkdtemp(prefix="recsift-perf-"))
    feed_dir = Path(feed_name) if Path(feed_name).is_dir() else None
    cfg = load_config(overrides={"checkpoint.state_dir": str(state), "monitoring.port": 0, "monitoring.progress": False,
                                 "stream.synthetic.events": events, "trainer.refresh_interval_s": 1e9,
                                 "trainer.drift_thresholds": {},
                                 "stream.feed": feed_dir.name if feed_dir else feed_name,
                                 **({"stream.data_dir": str(feed_dir.parent)} if feed_dir else {})})
    feed = service.embedded_feed(cfg, events)
    catalog = state / "catalog.jsonl"
    catalog.write_text("".join(json.dumps({**it.attributes, "item_id": it.item_id, "title": it.title}) + "\n"
                               for it in feed.catalog))
    metrics = Metrics()
    marks: list[int] = []  # 100k, 300k, 1M, 3M below the stream's length, and its end
    crossed: list[dict[str, float]] = []
    rss_since_mark: list[float] = []  # the service's RSS every second since the last mark (it swings with the trims)
    child_since_mark: list[float] = []  # its fetch child's part of it
    fills: list[float] = []
    full_at: list[float] = []  # samples scored when the coreset was first full: the end of its warm-up
    done = threading.Event()

    def consumed() -> float:
        return metrics.registry.get_sample_value("recsift_events_consumed_total") or 0.0

    def gauge(name: str) -> float:
        return metrics.registry.get_sample_value(name) or 0.0

    def fill() -> float:
        return gauge("recsift_coreset_size") / max(gauge("recsift_coreset_capacity"), 1.0)

    def sample() -> None:
        started, last_rss = None, 0.0
        while not done.is_set() and len(crossed) < len(marks):
            n = consumed()
            if started is None and n > 0:
                started = time.perf_counter()
            if started is not None and time.perf_counter() - last_rss >= 1.0:
                total, _, child = service_rss(os.getpid())
                rss_since_mark.append(total)
                child_since_mark.append(child)
                last_rss = time.perf_counter()
            now_fill = fill()
            if not full_at and now_fill >= 1.0:
                full_at.append(gauge("recsift_samples_scored_total"))
            if full_at:  # after warm-up: every poll
                fills.append(now_fill)
            if started is not None and n >= marks[len(crossed)]:
                rss, broker_rss, child_rss = service_rss(os.getpid())
                between = sorted(rss_since_mark) or [rss]
                children = sorted(child_since_mark) or [child_rss]
                crossed.append({"events": n, "seconds": time.perf_counter() - started, "rss_bytes": rss,
                                "rss_median_bytes": between[len(between) // 2], "rss_max_bytes": between[-1],
                                "fetch_child_rss_bytes": child_rss,
                                "fetch_child_rss_median_bytes": children[len(children) // 2],
                                "broker_rss_bytes": broker_rss, "scored": gauge("recsift_samples_scored_total"),
                                "coreset_fill": now_fill})
                rss_since_mark.clear()
                child_since_mark.clear()
                say(f"growth: {n:,.0f} events at {crossed[-1]['seconds']:.0f} s, service RSS {rss / 2**20:.0f} MB "
                    f"(fetch child {child_rss / 2**20:.0f} MB; broker {broker_rss / 2**20:.0f} MB), coreset {now_fill:.1%} full")
            time.sleep(0.25)  # polling the registry costs the GIL: more often would slow the run it measures

    with EmbeddedBroker() as broker:
        s = cfg.stream.model_copy(update={"source": "kafka", "bootstrap_servers": broker.bootstrap_servers,
                                          "catalog_path": catalog})
        ensure_topic(s, True, s.topic, s.partitions)
        ensure_topic(s, True, s.dead_letter_topic, 1)
        say(f"producing up to {events:,} events of {feed.name} into {s.partitions} partitions (before the clock starts)")
        events = produce_events(s, True, feed.payloads, s.topic)  # a dataset may hold fewer
        cfg = cfg.model_copy(update={"stream": s})
        marks.extend([m for m in MARKS if m < events] + [events])
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        summary = service.run(cfg, max_events=events, metrics=metrics)
        done.set()
        sampler.join(5)
    segments, previous = [], {"events": 0.0, "seconds": 0.0}
    for point in crossed:
        segments.append({"from": previous["events"], "to": point["events"],
                         "events_per_s": (point["events"] - previous["events"]) / (point["seconds"] - previous["seconds"]),
                         "rss_mb": point["rss_bytes"] / 2**20, "rss_median_mb": point["rss_median_bytes"] / 2**20,
                         "rss_max_mb": point["rss_max_bytes"] / 2**20,
                         "fetch_child_rss_median_mb": point["fetch_child_rss_median_bytes"] / 2**20,
                         "broker_rss_mb": point["broker_rss_bytes"] / 2**20})
        previous = point
    out: dict[str, Any] = {
        "feed": feed.name,
        "events": summary.ingest.consumed, "samples_scored": summary.scored, "marks": crossed, "segments": segments,
        "events_per_s": [s["events_per_s"] for s in segments], "coreset": summary.coreset,
        "budget": cfg.selection.budget, "coreset_fill": [m["coreset_fill"] for m in crossed],
        "coreset_fill_min_after_warmup": min(fills) if fills else None, "fill_polls_after_warmup": len(fills),
        "warmup_samples": full_at[0] if full_at else None,
        "scoring_busy_s": summary.scoring_busy_s}
    by_events = {m: point for m, point in zip(marks, crossed, strict=False)}
    if 300_000 in by_events and 3_000_000 in by_events:
        # the median RSS over the segment that ends at each mark: one reading swings by half with the heap trims
        # after each checkpoint; the reading at the mark itself is kept beside it
        out["rss_growth_300k_to_3M"] = by_events[3_000_000]["rss_median_bytes"] / by_events[300_000]["rss_median_bytes"] - 1
        out["rss_growth_300k_to_3M_at_marks"] = by_events[3_000_000]["rss_bytes"] / by_events[300_000]["rss_bytes"] - 1
        out["rss_max_growth_300k_to_3M"] = by_events[3_000_000]["rss_max_bytes"] / by_events[300_000]["rss_max_bytes"] - 1
        # the same, the fetch child left out: where the growth is
        main = {m: by_events[m]["rss_median_bytes"] - by_events[m]["fetch_child_rss_median_bytes"]
                for m in (300_000, 3_000_000)}
        out["rss_growth_300k_to_3M_without_fetch_child"] = main[3_000_000] / main[300_000] - 1
    if len(segments) >= 3:  # per-event cost after warm-up (the first segment fills the coreset): last vs second
        out["per_event_cost_growth"] = segments[1]["events_per_s"] / segments[-1]["events_per_s"] - 1
    # side by side in this run: the scoring stage alone on the same stream, from the same start
    at = min(STAGE_EVENTS, events)
    later = [p for m, p in by_events.items() if m >= at] or crossed[-1:]
    if later:
        point = later[0]
        alone = stage_alone(cfg, int(point["events"]), service.embedded_feed(cfg, int(point["events"])).payloads)
        out.update(alone)
        out["in_service_samples_per_s"] = point["scored"] / point["seconds"]
        out["in_service_vs_stage"] = out["in_service_samples_per_s"] / alone["stage_samples_per_s"]
    return out


def stage_alone(cfg: Any, events: int, payloads: Iterable[tuple[bytes | None, bytes]]) -> dict[str, Any]:
    """The scoring stage alone (surrogate updates, re-estimates at the configured cadence, scoring and
    embedding: everything the service's scoring thread does before selection) over the samples the windows
    make from ``payloads``, the first ``events`` records of the service's own feed (the synthetic stream at its
    configured full length: its shape, the popularity shift included, depends on it), from a fresh start as
    the service's."""
    from recsift.service import build_scoring, build_stream_scorer
    from recsift.stream.catalog import Catalog
    from recsift.stream.events import Event, parse_event
    from recsift.stream.windows import StreamState

    state = StreamState(cfg.window)
    parsed = (parse_event(value, cfg.stream.max_message_bytes) for _, value in payloads)
    samples = [s for e in parsed if isinstance(e, Event) for b in state.process(e, 0, now=0.0) for s in b]
    stage, _ = build_scoring(cfg, build_stream_scorer(cfg, Catalog()))
    say(f"the scoring stage alone on the samples of the first {events:,} events ({len(samples):,})")
    started = time.perf_counter()
    stage(samples)
    seconds = time.perf_counter() - started
    return {"stage_events": events, "stage_samples": stage.scored, "stage_s": seconds,
            "stage_samples_per_s": stage.scored / seconds}


def repeated(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The in-service ratio over repeated growth runs: each run's ratio is paired (the service and the stage
    alone in one process, on one stream), and the runs are independent, so a t-interval over them."""
    from scipy import stats

    ratios = [r["in_service_vs_stage"] for r in runs]
    mean = statistics.mean(ratios)
    half = stats.t.ppf(0.975, len(ratios) - 1) * statistics.stdev(ratios) / len(ratios) ** 0.5
    keep = ("in_service_vs_stage", "in_service_samples_per_s", "stage_samples_per_s", "events_per_s", "scoring_busy_s")
    return {"repeats": [{k: r.get(k) for k in keep} for r in runs], "in_service_vs_stage_mean": mean,
            "in_service_vs_stage_ci95": [mean - half, mean + half]}


def run_bench(name: str, light: bool) -> float:
    args = BENCHES[name][1 if light else 0]
    say(f"running bench/{name}.py {' '.join(args)}")
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *args], check=True, cwd=ROOT)
    return time.perf_counter() - started


def load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def command_of(name: str, result: dict[str, Any]) -> str:
    """The command that wrote a results file: its own record of it, else the benchmark's default run."""
    if name == "growth":
        if "command" in result:
            return str(result["command"])
        feed = result.get("feed", "synthetic")
        return (f"python bench/perf.py --only growth --growth-events {int(result.get('events', MARKS[-1]))}"
                + ("" if feed == "synthetic" else f" --growth-feed {feed}"))
    return str(result.get("command") or " ".join(["python", f"bench/{name}.py", *BENCHES[name][0]]))


def table(results: dict[str, dict[str, Any]], growth: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(figure, value, ratio or note, the command behind it) rows."""
    rows: list[tuple[str, str, str]] = []
    tagged: list[tuple[str, str, str, str]] = []

    def tag(name: str, result: dict[str, Any]) -> None:  # the rows added since the last tag come from ``name``
        tagged.extend((*row, command_of(name, result)) for row in rows[len(tagged):])
    ing = results.get("ingest", {})
    for r in ing.get("rows", []):
        if r["fetch"] == "process":
            rows.append((f"ingest events/s (crc {r['crc']})", f"{r['pipeline_rate']:,.0f}",
                         f"{r['ratio_median']:.2f}x the bare consumer ({r['bare_rate']:,.0f}/s)"))
    tag("ingest", ing)
    sc = results.get("scoring", {})
    if sc:
        rows += [("surrogate epoch on Games", f"{sc['surrogate_epoch_s']:.1f} s", "target <= 25 s"),
                 ("influence samples/s (one JVP per batch)", f"{sc['influence_jvp_samples_per_s']:,.0f}",
                  f"{sc['jvp_speedup']:.0f}x the per-sample loop ({sc['influence_loop_samples_per_s']:,.0f}/s)"),
                 ("GraNd / EL2N samples/s", f"{sc['grand_samples_per_s']:,.0f} / {sc['el2n_samples_per_s']:,.0f}", ""),
                 ("effort samples/s (SmolLM2-135M)", f"{sc['effort_samples_per_s']:.2f}",
                  f"{sc['effort_batched_speedup']:.2f}x one at a time"),
                 ("scoring stage samples/s (synthetic)", f"{sc['stream_stage_samples_per_s']:,.0f}", "")]
        if "jvp_over_forward" in sc:
            rows += [("influence JVP / one forward pass (same rows)", f"{sc['jvp_over_forward']:.2f}x",
                      f"goal <= 3x; padded rows {sc['jvp_over_forward_padded']:.2f}x"),
                     ("influence JVP / per-sample loop (same padded rows)", f"{sc['jvp_over_loop_same_rows']:.4f}x",
                      f"length bucketing alone {sc['bucketing_speedup_jvp']:.1f}x")]
    tag("scoring", sc)
    sel = results.get("selection", {})
    if sel:
        rows += [("selector offers/s (budget 1,024)", f"{sel['offer_samples_per_s_budget_1024']:,.0f}",
                  f"{sel['select_share_of_pipeline']:.2%} of the pipeline's per-sample time"),
                 ("batch vs. streaming selection on Games", f"{sel['batch_select_games_s']:.3f} s vs. "
                  f"{sel['stream_select_games_s']:.3f} s", ""),
                 ("GORACS 10k x 2k", f"{sel['goracs_10k_x_2k_s']:.1f} s", "")]
    tag("selection", sel)
    ref = results.get("refresh", {})
    if ref and "refresh_1024_s" in ref:
        full = "measured" if not ref["full_epoch_is_extrapolated"] else "extrapolated"
        rows += [("LoRA training samples/s (SmolLM2-135M)", f"{ref['train_samples_per_s']:.2f}",
                  f"{ref['train_tokens_per_s']:.0f} tokens/s, {ref['device']}"),
                 (f"refresh of {ref['refresh_samples']:,} samples (measured)", f"{ref['refresh_1024_s'] / 60:.1f} min",
                  f"{ref['refresh_over_full_epoch']:.1%} of a full-data epoch ({full}: "
                  f"{ref['full_epoch_s_extrapolated'] / 3600:.1f} h)"),
                 ("DEALRec pruning (surrogate, influence, effort)", f"{ref['pruning_s'] / 60:.1f} min",
                  f"surrogate + influence {ref['surrogate_influence_total_s']:.0f} s measured; "
                  f"effort {ref.get('effort_all_s_extrapolated', 0) / 60:.0f} min extrapolated"),
                 ("pruning + refresh vs. a full-data epoch", f"{ref['pruning_and_refresh_over_full_epoch']:.1%}",
                  f"full epoch {full}"),
                 ("prompt grounding s/user", f"{ref['prompt_ground_s_per_user']:.2f}",
                  f"generation + grounding {ref['generate_and_ground_s_per_user']:.1f} s/user")]
    tag("refresh", ref)
    if growth:
        segs = growth["segments"]
        for s in segs:
            rows.append((f"pipeline events/s, {s['from']:,.0f} → {s['to']:,.0f}", f"{s['events_per_s']:,.0f}",
                         f"RSS {s['rss_mb']:,.0f} MB at the mark" + (f", median {s['rss_median_mb']:,.0f} / max "
                                                                     f"{s['rss_max_mb']:,.0f} MB over the segment"
                                                                     if "rss_median_mb" in s else "")))
        if growth.get("coreset_fill"):
            rows.append(("coreset fill at each mark", ", ".join(f"{f:.1%}" for f in growth["coreset_fill"]),
                         f"min after warm-up {growth['coreset_fill_min_after_warmup']:.1%}"
                         if growth.get("coreset_fill_min_after_warmup") is not None else ""))
        if "in_service_vs_stage" in growth:
            rows.append(("in-service scoring / the stage alone", f"{growth['in_service_vs_stage']:.2f}",
                         f"{growth['in_service_samples_per_s']:,.0f} vs {growth['stage_samples_per_s']:,.0f} samples/s "
                         f"over {growth['stage_events']:,} events; goal >= 0.8"
                         + ("; NOT the same stream (in_service_vs_stage_caveat)" if "in_service_vs_stage_caveat" in growth
                            else "")))
        if "in_service_vs_stage_mean" in growth:
            low, high = growth["in_service_vs_stage_ci95"]
            rows.append((f"in-service / stage alone, mean of {len(growth['repeats'])} runs",
                         f"{growth['in_service_vs_stage_mean']:.2f} [{low:.2f}, {high:.2f}]",
                         "95% t-interval over the runs; goal >= 0.8; the rows above are the first run's"))
        if "rss_growth_300k_to_3M" in growth:
            rows.append(("RSS growth, 300k → 3M events (segment medians)", f"{growth['rss_growth_300k_to_3M']:+.1%}",
                         f"goal within ±10%; at the marks {growth['rss_growth_300k_to_3M_at_marks']:+.1%}, "
                         f"segment maxima {growth['rss_max_growth_300k_to_3M']:+.1%}"))
        if "per_event_cost_growth" in growth:
            rows.append(("per-event cost, last segment vs the second", f"{growth['per_event_cost_growth']:+.1%}",
                         "goal within ±10% (the first segment is the warm-up)"))
        if len(segs) > 1:
            rows.append(("per-event cost, last segment / first", f"{segs[0]['events_per_s'] / segs[-1]['events_per_s']:.2f}",
                         f"RSS last / first {segs[-1]['rss_mb'] / segs[0]['rss_mb']:.2f}"))
        tag("growth", growth)
    return tagged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tabulate", action="store_true", help="print the table from the committed results; run nothing")
    ap.add_argument("--light", action="store_true", help="smaller sub-benchmarks")
    ap.add_argument("--only", help="comma-separated subset of: ingest, scoring, selection, refresh, growth")
    ap.add_argument("--growth-events", type=int, default=MARKS[-1])
    ap.add_argument("--growth-feed", default="synthetic",
                    help="the growth run's stream: synthetic, a shared dataset (games, ml-100k) or a dataset directory")
    ap.add_argument("--growth-out", default="perf", help="results file name under bench/results/ (default perf)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="growth runs; with more than one, in_service_vs_stage gets a mean and a 95%% interval")
    ap.add_argument("--growth-worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.growth_worker:
        print(json.dumps(growth_worker(args.growth_worker, args.growth_feed)))
        return
    wanted = set((args.only or ",".join([*BENCHES, "growth"])).split(","))
    durations: dict[str, float] = {}
    previous = load(args.growth_out)
    growth = previous.get("growth")
    if not args.tabulate:
        for name in BENCHES:
            if name in wanted:
                durations[name] = run_bench(name, args.light)
        if "growth" in wanted:
            runs = []
            for repeat in range(args.repeats):
                say(f"growth run {repeat + 1} of {args.repeats}: {args.growth_events:,} events of {args.growth_feed} "
                    "through the whole pipeline")
                out = subprocess.run([sys.executable, __file__, "--growth-worker", str(args.growth_events),
                                      "--growth-feed", args.growth_feed], check=True,
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            growth = {**runs[0], **repeated(runs)} if len(runs) > 1 else runs[0]
            growth["command"] = " ".join(["python", "bench/perf.py", *sys.argv[1:]])  # --growth-out included
    results = {name: load(name) for name in BENCHES}
    rows = table(results, growth)
    cores = os.cpu_count()
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"recsift performance, {cores} cores ({time.strftime('%Y-%m-%d')})")
    for figure, value, note, command in rows:
        print(f"  {figure:<{width}}  {value:>22}  {note}")
        print(f"  {'':<{width}}  {'':>22}  ← {command}")
    if not args.tabulate:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.growth_out}.json").write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "cores": cores, "light": args.light, "durations_s": durations,
            "growth": growth, "table": [{"figure": f, "value": v, "note": n, "command": c} for f, v, n, c in rows],
            "sources": {name: {"date": results[name].get("date")} for name in BENCHES}}, indent=2))


if __name__ == "__main__":
    main()
