"""LiSSA on the stream: how many steps a re-estimate of H⁻¹v needs, from v (cold) or from the last estimate (warm).

On a stream H⁻¹v is re-estimated every ``scoring.reestimate_every`` batches, ``scoring.scorer.depth`` LiSSA
steps each (500 until this bench's results made it 100: about a fifth of the scoring stage's time). This
measures, on the scorer the service builds (its defaults) fed the windows' samples of a stream (the synthetic
one, or ``--dataset DIR``):

1. a cold estimate on the first batch (the service's version 1), then ``--batches`` more surrogate updates;
2. on the moved surrogate, against a cold estimate of ``--reference-depth`` (500) steps: a second one
   with another LiSSA seed (the noise floor), cold estimates of each ``--depths``, warm ones of as many
   steps that start from step 1's H⁻¹v, and step 1's H⁻¹v itself with no steps (the negative control: what
   skipping the re-estimate would give);
3. for each: the cosine of H⁻¹v, the Spearman rank correlation of the influence scores of the next batch
   (the selector buckets by score, so ranks are what matter), and the seconds it took.

Usage:  python bench/lissa.py [--dataset DIR] [--batches 10] [--depths 50,100,200]
Writes ``bench/results/lissa-<synthetic|dataset name>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recsift.config import load_config  # noqa: E402
from recsift.scoring.dealrec import DEALRecScorer  # noqa: E402
from recsift.scoring.influence import InfluenceEstimator, cosine, spearman  # noqa: E402
from recsift.service import build_stream_scorer, embedded_feed  # noqa: E402
from recsift.state import State  # noqa: E402
from recsift.stream.catalog import Catalog  # noqa: E402
from recsift.stream.events import Event, parse_event  # noqa: E402
from recsift.stream.windows import Sample, StreamState  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def samples_of(cfg: Any, limit: int) -> Iterator[Sample]:
    state = StreamState(cfg.window)
    for _, value in embedded_feed(cfg, limit).payloads:
        event = parse_event(value, cfg.stream.max_message_bytes)
        if isinstance(event, Event):
            for batch in state.process(event, 0, now=0.0):
                yield from batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, help="a dataset directory in the shared format (default: synthetic)")
    ap.add_argument("--batches", type=int, default=10, help="surrogate updates between the two estimates")
    ap.add_argument("--depths", default="25,50,100,200")
    ap.add_argument("--reference-depth", type=int, default=500,
                    help="steps of the cold estimate the others are compared with (500: the default until 2026-12-06)")
    args = ap.parse_args()
    overrides: dict[str, Any] = {"stream.synthetic.events": 3_000_000}
    if args.dataset is not None:
        overrides.update({"stream.feed": args.dataset.name, "stream.data_dir": str(args.dataset.parent)})
    cfg = load_config(overrides=overrides)
    size = cfg.scoring.batch_size
    scorer = build_stream_scorer(cfg, Catalog())
    assert isinstance(scorer.scorer, DEALRecScorer)
    dealrec = scorer.scorer
    stream = samples_of(cfg, 10 * size * (args.batches + 3))
    say(f"{args.batches + 1} scoring batches of {size} samples (the first makes the cold version 1)")
    for i in range(args.batches + 1):
        batch = list(islice(stream, size))
        if len(batch) < size:
            raise SystemExit(f"the stream ran out after {i} batches")
        scorer.batches_since_estimate = -10**9  # no re-estimate on the way: version 1 stays
        scorer(batch)
    start = dealrec.estimator.ihvp if dealrec.estimator is not None else None
    assert start is not None
    surrogate, reference = scorer.surrogate, scorer.reference
    nxt = list(islice(stream, size))  # the next batch: its scores under each estimate are compared
    probe = surrogate.encode([s.history for s in nxt], [s.target for s in nxt], [s.sample_id for s in nxt],
                             grow=False).batch
    depths = [int(d) for d in args.depths.split(",")]

    def estimate(seed: int, depth: int | None, warm: bool = False) -> tuple[torch.Tensor, float]:
        """A DEALRec estimate as the service makes it (``depth`` steps; None: the configured depth) with the
        scorer's own LiSSA mini-batches; ``warm``: the recursion starts from step 1's H⁻¹v."""
        est = DEALRecScorer(seed=seed, damping=dealrec.damping, scale=dealrec.scale, depth=depth or args.reference_depth,
                            batch_size=dealrec.batch_size, repeats=dealrec.repeats)
        started = time.perf_counter()
        if warm:  # the scorer has no warm start: the estimator it uses, with the same settings and mini-batches
            estimator = InfluenceEstimator(surrogate.loss_model, surrogate.influence_block(), est.damping, est.scale,
                                           est.depth, est.repeats, seed)
            size = min(est.batch_size, len(reference))
            ihvp = estimator.estimate(surrogate.loss_inputs(reference), lambda g: surrogate.loss_inputs(
                reference.select(torch.randint(0, len(reference), (size,), generator=g))), start=start, depth=depth)
            return ihvp, time.perf_counter() - started
        est.prepare(surrogate, reference)
        assert est.estimator is not None and est.estimator.ihvp is not None
        return est.estimator.ihvp, time.perf_counter() - started

    def scores(ihvp: torch.Tensor) -> torch.Tensor:
        """The probe batch's influence under ``ihvp``, through the scorer's restore path (as after a restart)."""
        est = DEALRecScorer(seed=0)
        est.load_state_dict(State(tensors={"ihvp": ihvp}, meta={"version": 1}))
        return est.influence(surrogate, probe)

    say(f"cold estimates ({args.reference_depth} steps), two seeds")
    cold, cold_s = estimate(0, None)
    other, other_s = estimate(1, None)
    rows: list[dict[str, Any]] = []
    base = scores(cold)

    def row(name: str, ihvp: torch.Tensor, seconds: float, steps: int) -> None:
        rows.append({"estimate": name, "steps": steps, "seconds": seconds, "cosine_vs_cold": cosine(ihvp, cold),
                     "score_spearman_vs_cold": spearman(scores(ihvp), base)})
        say(f"{name}: cosine {rows[-1]['cosine_vs_cold']:.4f}, score Spearman "
            f"{rows[-1]['score_spearman_vs_cold']:.4f}, {seconds:.1f} s")

    row(f"cold, {args.reference_depth} steps, another seed (noise floor)", other, other_s, args.reference_depth)
    for depth in depths:
        row(f"cold, {depth} steps", *estimate(1, depth), depth)
        row(f"warm (from the last estimate), {depth} steps", *estimate(1, depth, warm=True), depth)
    row("stale: the previous estimate, no steps (negative control)", start, 0.0, 0)
    out = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", "bench/lissa.py", *sys.argv[1:]]),
           "dataset": str(args.dataset) if args.dataset else "synthetic", "batch_size": size,
           "batches_between": args.batches, "depth": args.reference_depth, "cold_s": cold_s, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"lissa-{args.dataset.name if args.dataset else 'synthetic'}.json").write_text(json.dumps(out, indent=2))
    print(f"{'estimate':<60} {'steps':>6} {'seconds':>8} {'cos H⁻¹v':>9} {'Spearman':>9}")
    for r in rows:
        print(f"{r['estimate']:<60} {r['steps']:>6} {r['seconds']:>8.1f} {r['cosine_vs_cold']:>9.4f} "
              f"{r['score_spearman_vs_cold']:>9.4f}")


if __name__ == "__main__":
    main()
