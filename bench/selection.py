"""Selection benchmark: streaming ``offer`` throughput at budgets 1k and 10k, batch vs. streaming selection
time on Games-sized scores, GORACS time for 10k candidates x 2k validation, and selector memory against
stream length.

Usage:  python bench/selection.py [--samples 200000]

Writes ``bench/results/selection.json`` and prints a table. The per-sample cost is compared with the
pipeline's per-sample cost from ``bench/results/scoring.json`` (the stream stage) when it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recsift.selection.checks import synthetic_offers  # noqa: E402
from recsift.selection.goracs import goracs_select  # noqa: E402
from recsift.selection.reservoir import StratifiedReservoir  # noqa: E402
from recsift.selection.stratified import dealrec_select  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def offer_rate(budget: int, batches: list) -> tuple[float, int]:
    selector = StratifiedReservoir(budget=budget, strata=50)
    n = sum(len(b) for b in batches)
    started = time.perf_counter()
    for b in batches:
        selector.offer(b)
    return n / (time.perf_counter() - started), len(selector)


def selector_memory(n: int, budget: int = 1024) -> int:
    """Peak traced bytes of a selector fed ``n`` samples (offers generated lazily, outside the trace)."""
    selector = StratifiedReservoir(budget=budget, strata=50)
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    for start in range(0, n, 20_000):
        tracemalloc.stop()
        chunk = synthetic_offers(min(20_000, n - start), seed=start, batch=512)
        chunk = [[o.__class__(o.sample._replace(sample_id=o.sample.sample_id + start), o.score, 1, None) for o in b]
                 for b in chunk]
        tracemalloc.start()
        for b in chunk:
            selector.offer(b)
    size = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200_000)
    args = ap.parse_args()
    batches = synthetic_offers(args.samples, seed=0, batch=4096)
    rows: dict[str, float] = {}
    for budget in (1024, 10_240):
        rows[f"offer_samples_per_s_budget_{budget}"], _ = offer_rate(budget, batches)

    rng = np.random.default_rng(0)
    scores = rng.normal(size=45_774)  # the Games training sequences that can be scored
    started = time.perf_counter()
    dealrec_select(np.arange(len(scores)), scores, 1024, 50, 0.1)
    rows["batch_select_games_s"] = time.perf_counter() - started
    games_stream = synthetic_offers(45_774, seed=1, batch=4096)
    started = time.perf_counter()
    selector = StratifiedReservoir(1024, 50)
    for b in games_stream:
        selector.offer(b)
    rows["stream_select_games_s"] = time.perf_counter() - started

    cands, val = rng.normal(size=(10_000, 64)), rng.normal(size=(2_000, 64))
    started = time.perf_counter()
    result = goracs_select(cands, val, 1024, rng.random(10_000), lam=0.1, max_exchanges=5, exchange_candidates=3)
    rows["goracs_10k_x_2k_s"] = time.perf_counter() - started
    rows["goracs_exchanges"] = len(result.history) - 1
    rows["goracs_tried"] = result.tried

    for n in (100_000, 300_000, 1_000_000):
        rows[f"selector_bytes_after_{n}"] = selector_memory(n)

    scoring = RESULTS / "scoring.json"
    if scoring.exists():
        stage_rate = json.loads(scoring.read_text()).get("stream_stage_samples_per_s")
        if stage_rate:
            per_sample_select = 1.0 / rows["offer_samples_per_s_budget_1024"]
            rows["select_share_of_pipeline"] = per_sample_select / (per_sample_select + 1.0 / stage_rate)

    print(f"\nselection benchmark, {os.cpu_count()} cores")
    for k, v in rows.items():
        print(f"{k:36s} {v:>14,.4f}" if isinstance(v, float) and v < 100 else f"{k:36s} {v:>14,.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "selection.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                                                        **rows}, indent=2))
    print(f"\nwrote {RESULTS / 'selection.json'}")


if __name__ == "__main__":
    main()
