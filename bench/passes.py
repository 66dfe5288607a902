"""Rows per forward pass of the scoring stage (``batching.ROWS_PER_PASS``): its speed and its memory.

The stream's scoring stage (surrogate step, influence scores, embeddings) runs its surrogate over a batch
of 4,096 samples in passes of at most ``ROWS_PER_PASS`` rows. This runs the stage alone over the samples
of the first ``--events`` events of a feed once per size, the sizes interleaved and repeated, each from a
fresh stage with the C heap trimmed first, and records samples/s and the process's RSS after each batch
(glibc keeps what a batch freed, so that RSS is the batch's high-water mark), and the seconds spent in each
phase of the stage (the surrogate's training step, influence re-estimates, influence scores, embeddings).
``--train-chunks bucketed,input`` adds a second dimension: the surrogate training step's passes grouped by row
length (now) or in input order (before; ``batching.TRAIN_BUCKETS``), each pair of arms side by side.

Usage:  python bench/passes.py [--feed synthetic|games|DIR] [--events 60000] [--sizes 1024,512,256,128]
                               [--train-chunks bucketed] [--repeats 2] [--out passes]
Writes ``bench/results/passes.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


PHASES = {"training step": ("surrogate", "partial_fit"), "re-estimate": ("scorer", "prepare"),
          "scores": ("scorer", "score"), "embeddings": ("surrogate", "embed")}


def timed_phases(stage: Any) -> dict[str, float]:
    """Wrap the stage's surrogate and scorer methods of ``PHASES`` so each adds its wall time to the returned
    dict (scores include the re-estimate's scoring of the reference set, which sets the score bounds)."""
    spent = {name: 0.0 for name in PHASES}
    for name, (owner, method) in PHASES.items():
        obj = getattr(stage.scorer, owner)
        inner = getattr(obj, method)

        def wrapper(*a: Any, _inner: Any = inner, _name: str = name, **k: Any) -> Any:
            started = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - started

        setattr(obj, method, wrapper)
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feed", default="synthetic", help="synthetic, a shared dataset (games, ml-100k) or a directory")
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--sizes", default="1024,512,256,128")
    ap.add_argument("--train-chunks", default="bucketed", help="bucketed, input, or both (comma-separated)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="passes")
    args = ap.parse_args()

    from recsift import batching, service
    from recsift.config import load_config
    from recsift.process import release_free_memory
    from recsift.stream.catalog import Catalog
    from recsift.stream.events import Event, parse_event
    from recsift.stream.windows import StreamState

    feed_dir = Path(args.feed) if Path(args.feed).is_dir() else None
    # the synthetic stream at the growth run's length: its shape (the popularity shift) depends on it
    cfg = load_config(overrides={"monitoring.progress": False, "stream.synthetic.events": 300_000,
                                 "stream.feed": feed_dir.name if feed_dir else args.feed,
                                 **({"stream.data_dir": str(feed_dir.parent)} if feed_dir else {})})
    feed = service.embedded_feed(cfg, args.events)
    state = StreamState(cfg.window)
    parsed = (parse_event(value, cfg.stream.max_message_bytes) for _, value in feed.payloads)
    samples = [s for e in parsed if isinstance(e, Event) for b in state.process(e, 0, now=0.0) for s in b]
    size = cfg.scoring.batch_size
    sizes = [int(x) for x in args.sizes.split(",")]
    modes = args.train_chunks.split(",")
    if not set(modes) <= {"bucketed", "input"}:
        sys.exit(f"--train-chunks takes bucketed and/or input, not {args.train_chunks!r}")
    arms = [(n, mode) for n in sizes for mode in modes]

    def key(n: int, mode: str) -> str:  # the sizes alone when the training step's chunking is not compared
        return str(n) if len(modes) == 1 else f"{n}/{mode}"

    print(f"{len(samples):,} samples of {feed.name}, batches of {size:,}, rows per pass {sizes}, training step's "
          f"passes {modes}, {args.repeats} repeats", flush=True)
    runs: dict[str, list[dict[str, float]]] = {key(*arm): [] for arm in arms}
    for repeat in range(args.repeats):
        for n, mode in arms:
            batching.ROWS_PER_PASS = n
            batching.TRAIN_BUCKETS = mode == "bucketed"
            stage, _ = service.build_scoring(cfg, service.build_stream_scorer(cfg, Catalog()))
            phases = timed_phases(stage)
            release_free_memory()
            before = rss_mb()
            after_batch = []
            started = time.perf_counter()
            for i in range(0, len(samples), size):
                stage(samples[i:i + size])
                after_batch.append(rss_mb())
            seconds = time.perf_counter() - started
            run = {"samples_per_s": stage.scored / seconds, "rss_before_mb": before,
                   "rss_median_mb": statistics.median(after_batch), "rss_max_mb": max(after_batch),
                   "seconds": seconds, **{f"{name} s": round(v, 2) for name, v in phases.items()}}
            runs[key(n, mode)].append(run)
            print(f"  repeat {repeat}, {key(n, mode):>12} rows per pass: {run['samples_per_s']:,.0f} samples/s, "
                  f"RSS {before:,.0f} MB before, {run['rss_median_mb']:,.0f} MB median after a batch; seconds by phase "
                  f"{', '.join(f'{k} {v:.1f}' for k, v in phases.items())} of {seconds:.1f}", flush=True)
    summary: dict[str, Any] = {
        n: {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "feed": feed.name, "events": args.events,
        "samples": len(samples), "batch": size, "command": " ".join(["python", "bench/passes.py", *sys.argv[1:]]),
        "mean_by_rows_per_pass": summary, "runs": runs}, indent=2))
    for rows, mean in summary.items():
        print(f"{rows:>12} rows per pass: {mean['samples_per_s']:,.0f} samples/s, RSS median {mean['rss_median_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
