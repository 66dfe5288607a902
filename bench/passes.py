"""Rows per forward pass of the scoring stage (``batching.ROWS_PER_PASS``): its speed and its memory.

The stream's scoring stage (surrogate step, influence scores, embeddings) runs its surrogate over a batch
of 4,096 samples in passes of at most ``ROWS_PER_PASS`` rows. This runs the stage alone over the samples
of the first ``--events`` events of a feed once per size, the sizes interleaved and repeated, each from a
fresh stage with the C heap trimmed first, and records samples/s and the process's RSS after each batch
(glibc keeps what a batch freed, so that RSS is the batch's high-water mark).

Usage:  python bench/passes.py [--feed synthetic|games|DIR] [--events 60000] [--sizes 1024,512,256,128]
                               [--repeats 2] [--out passes]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feed", default="synthetic", help="synthetic, a shared dataset (games, ml-100k) or a directory")
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--sizes", default="1024,512,256,128")
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
    print(f"{len(samples):,} samples of {feed.name}, batches of {size:,}, rows per pass {sizes}, "
          f"{args.repeats} repeats", flush=True)
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    for repeat in range(args.repeats):
        for n in sizes:
            batching.ROWS_PER_PASS = n
            stage, _ = service.build_scoring(cfg, service.build_stream_scorer(cfg, Catalog()))
            release_free_memory()
            before = rss_mb()
            after_batch = []
            started = time.perf_counter()
            for i in range(0, len(samples), size):
                stage(samples[i:i + size])
                after_batch.append(rss_mb())
            seconds = time.perf_counter() - started
            run = {"samples_per_s": stage.scored / seconds, "rss_before_mb": before,
                   "rss_median_mb": statistics.median(after_batch), "rss_max_mb": max(after_batch)}
            runs[n].append(run)
            print(f"  repeat {repeat}, {n:>5} rows per pass: {run['samples_per_s']:,.0f} samples/s, "
                  f"RSS {before:,.0f} MB before, {run['rss_median_mb']:,.0f} MB median after a batch", flush=True)
    summary: dict[str, Any] = {
        str(n): {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "feed": feed.name, "events": args.events,
        "samples": len(samples), "batch": size, "command": " ".join(["python", "bench/passes.py", *sys.argv[1:]]),
        "mean_by_rows_per_pass": summary, "runs": {str(n): rs for n, rs in runs.items()}}, indent=2))
    for rows, mean in summary.items():
        print(f"{rows:>5} rows per pass: {mean['samples_per_s']:,.0f} samples/s, RSS median {mean['rss_median_mb']:,.0f} MB")


if __name__ == "__main__":
    main()
