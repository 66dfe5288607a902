"""Refresh benchmark on Games with SmolLM2-135M: what a DEALRec refresh costs against full-data fine-tuning.

Every figure of the selected side is measured, end to end, on the configured defaults:

1. **Pruning** (``recsift prune``'s pipeline): the SASRec surrogate trained on every Games training sample,
   the LiSSA estimate and the influence of every sample; then the LLM effort score (SmolLM2-135M gradient
   norms) on ``--effort-samples`` of them. Effort over all samples is not affordable on a CPU: its time is
   extrapolated from the measured rate and flagged ``effort_all_s_extrapolated``; ``pruning_s`` includes it
   and says so (``pruning_s_extrapolated``).
2. **A real refresh** (``recsift.trainer.refresh.refresh``, the function the scheduler runs): a checkpoint
   holds the ``--samples`` (default 1,024) DEALRec selected as its coreset and ``trainer.eval_samples`` Games
   validation samples as its reservoir; the refresh loads the model, judges the serving adapter, trains,
   judges the new one (loss and candidate metrics) and saves it. ``refresh_1024_s`` is its wall time.
3. **The full-data side**: one epoch over every scorable training sample at the refresh's own measured
   training rate, extrapolated (``full_epoch_s_extrapolated``); with ``--full-epoch`` (a GPU) the epoch is
   trained for real and timed (``full_epoch_s``).

Also times generation + grounding per user on a catalogue slice (``--titles``; the full-catalogue embedding
time is extrapolated) and reports peak RSS.

Usage:  python bench/refresh.py [--samples 1024] [--effort-samples 256] [--users 5] [--titles 2000]
                                [--surrogate-epochs 10] [--device auto|cpu|cuda] [--full-epoch] [--dataset DIR]
Writes ``bench/results/refresh.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recsift.config import Settings, load_config  # noqa: E402
from recsift.data.datasets import catalog_for, read_dealrec_split, resolve_dataset  # noqa: E402
from recsift.selection.prune import METHODS, prune  # noqa: E402
from recsift.selection.reservoir import StratifiedReservoir  # noqa: E402
from recsift.selection.selector import Offer  # noqa: E402
from recsift.selection.stage import SelectionStage  # noqa: E402
from recsift.selection.store import CoresetStore  # noqa: E402
from recsift.selection.validation import ValidationReservoir  # noqa: E402
from recsift.service import build_effort, scorer_options, stratified_options, surrogate_options  # noqa: E402
from recsift.stream.catalog import Catalog  # noqa: E402
from recsift.stream.checkpoint import Checkpoint  # noqa: E402
from recsift.stream.windows import Sample  # noqa: E402
from recsift.trainer.bigrec import model_for, train_lora  # noqa: E402
from recsift.trainer.llm import load_llm, resolve_device  # noqa: E402
from recsift.trainer.prompts import builder_for  # noqa: E402
from recsift.trainer.recommender import Recommender  # noqa: E402
from recsift.trainer.refresh import refresh, registry_for  # noqa: E402

RESULTS = ROOT / "bench" / "results"
Split = dict[str, list[str]]  # a DEALRec split: user → items in order


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def pruning_figures(cfg: Settings, path: Path, train: Split, budget: int, epochs: int, effort_samples: int,
                    out: Path) -> tuple[dict[str, Any], list[int]]:
    """The batch DEALRec pipeline, timed: surrogate + LiSSA + influence over every sample (measured), effort
    on a slice (measured) and over every sample (extrapolated). Returns the figures and the selected rows."""
    strata = stratified_options(cfg)
    started = time.perf_counter()
    report = prune(path, "dealrec", budget, out, epochs=epochs, seed=cfg.scoring.seed,
                   scorer_options=scorer_options(cfg, METHODS["dealrec"].scorer),
                   surrogate=cfg.scoring.surrogate, surrogate_options=surrogate_options(cfg),
                   strata=strata.strata, hard_prune=strata.hard_prune, progress=say)
    influence_s = time.perf_counter() - started
    selected = [json.loads(line)["sample_id"] for line in Path(report.selected_path).read_text().splitlines()]
    rows: dict[str, Any] = {
        "pruning_samples": report.scored, "surrogate_epochs": report.epochs,
        "surrogate_train_s": sum(report.epoch_seconds), "lissa_s": report.prepare_seconds,
        "influence_score_s": report.score_seconds, "surrogate_influence_total_s": influence_s,
    }
    if effort_samples:
        users = [u for u in train if len(train[u]) > 1]
        picked = random.Random(1).sample(users, min(effort_samples, len(users)))
        samples = [Sample(i, u, tuple(train[u][:-1]), train[u][-1], 0.0) for i, u in enumerate(picked)]
        effort = build_effort(cfg, catalog_for(path) or Catalog())
        effort(samples[:8])  # warm-up (first-call allocations)
        started = time.perf_counter()
        effort(samples)
        effort_s = time.perf_counter() - started
        rows.update({"effort_samples": len(samples), "effort_s": effort_s,
                     "effort_samples_per_s": len(samples) / effort_s,
                     "effort_all_s_extrapolated": report.scored * effort_s / len(samples)})
        rows["pruning_s"] = influence_s + rows["effort_all_s_extrapolated"]
        rows["pruning_s_extrapolated"] = "effort over all samples is extrapolated from effort_samples"
    else:
        rows["pruning_s"] = influence_s
        rows["pruning_s_extrapolated"] = "no: without the effort score (lambda = 0)"
    return rows, selected


def state_with(path: Path, train: Split, state: Path, selected: list[int], validation: int, seed: int
               ) -> tuple[int, int]:
    """A checkpoint whose coreset is the selected training samples and whose validation reservoir holds
    ``validation`` Games validation samples (a user's training history → their validation item)."""
    valid = read_dealrec_split(path, "valid")
    users = list(train)
    members = [Sample(row, users[row], tuple(train[users[row]][:-1]), train[users[row]][-1], 0.0) for row in selected]
    selector = StratifiedReservoir(budget=len(members), strata=1, seed=seed)
    held_out = ValidationReservoir(validation)
    ckpt = Checkpoint(state / "recsift.sqlite", [CoresetStore(SelectionStage(selector, validation=held_out))])
    selector.offer([Offer(s, 0.0, 1) for s in members])
    rng = random.Random(seed)
    judged = [u for u in rng.sample(users, len(users)) if valid.get(u) and train[u]][:validation]
    for k, u in enumerate(judged):
        held_out.add(Sample(10**9 + k, u, tuple(train[u]), valid[u][0], 0.0), np.zeros(4, dtype=np.float32))
    ckpt.commit({})
    ckpt.close()
    return len(selector), len(held_out)


def refresh_figures(cfg: Settings, path: Path, train: Split, selected: list[int], work: Path) -> dict[str, Any]:
    """One real refresh (snapshot → judge → train → judge → save) on the selected coreset."""
    state = work / "state"
    state.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"state_dir": state})})
    members, held = state_with(path, train, state, selected, cfg.trainer.eval_samples, cfg.trainer.seed)
    say(f"refresh: coreset {members:,} samples, validation {held:,}")
    outcome = refresh(cfg, "manual", catalog_for(path), progress=say)
    if outcome.outcome not in ("promoted", "rejected"):
        raise SystemExit(f"the refresh failed: {outcome.error}")
    run = outcome.train
    return {"refresh_samples": members, "refresh_validation_samples": held, "refresh_1024_s": outcome.seconds,
            "refresh_outcome": str(outcome.outcome), "refresh_train_s": run["seconds"],
            "refresh_epochs": cfg.trainer.epochs, "refresh_steps": run["steps"],
            "train_samples_per_s": run["samples_per_s"], "train_tokens_per_s": run["tokens_per_s"],
            "mean_tokens_per_sample": run["tokens"] / max(run["samples"], 1),
            "refresh_validation_metrics": outcome.metrics,
            "refresh_other_s": outcome.seconds - run["seconds"]}


def full_epoch(cfg: Settings, path: Path, train: Split) -> float:
    """One real epoch of LoRA training over every scorable training sample (for a GPU: hours on a CPU)."""
    t = cfg.trainer
    samples = [Sample(i, u, tuple(v[:-1]), v[-1], 0.0) for i, (u, v) in enumerate(train.items()) if len(v) > 1]
    llm = load_llm(t.base_model, t.cache_dir, t.dtype, t.device)
    catalog = catalog_for(path) or Catalog()
    builder = builder_for(llm.encode, catalog.title, llm.eos_token_id, llm.pad_token_id, t)
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = model_for(llm, t, registry_for(cfg.model_copy(
            update={"checkpoint": cfg.checkpoint.model_copy(update={"state_dir": Path(tmp)})})))
        result = train_lora(model, builder, samples, [], t.model_copy(update={"epochs": 1}), llm.autocast_dtype,
                            progress=say)
    return result.seconds


def grounding_figures(cfg: Settings, path: Path, train: Split, titles: int, users: int) -> dict[str, Any]:
    """Title embedding on a catalogue slice, generation + grounding and prompt grounding per user."""
    t = cfg.trainer
    catalog = catalog_for(path)
    assert catalog is not None
    llm = load_llm(t.base_model, t.cache_dir, t.dtype, t.device)
    builder = builder_for(llm.encode, catalog.title, llm.eos_token_id, llm.pad_token_id, t)
    items = sorted(catalog, key=lambda it: it.item_id)[:titles]
    started = time.perf_counter()
    rec = Recommender(llm, llm.model, Catalog(items), builder, cache_dir=None, max_new_tokens=t.max_new_tokens,
                      num_beams=t.num_beams)
    titles_s = time.perf_counter() - started
    picked = [u for u in train if len(train[u]) > 1][:users]
    started = time.perf_counter()
    for u in picked:
        rec.recommend(train[u], 20, generate=True)
    per_user_gen = (time.perf_counter() - started) / len(picked)
    started = time.perf_counter()
    for u in picked:
        rec.recommend(train[u], 20, generate=False)
    per_user_prompt = (time.perf_counter() - started) / len(picked)
    return {"title_embedding_s": titles_s, "titles_embedded": len(items),
            "title_embedding_all_s_extrapolated": titles_s * len(catalog) / len(items),
            "generate_and_ground_s_per_user": per_user_gen, "prompt_ground_s_per_user": per_user_prompt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="games", help="games, or any directory in the DEALRec format")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--samples", type=int, default=1024, help="the refresh's coreset (DEALRec's budget)")
    ap.add_argument("--surrogate-epochs", type=int, default=10, help="as `recsift prune --epochs`")
    ap.add_argument("--effort-samples", type=int, default=256, help="effort measured on this many (0: λ = 0)")
    ap.add_argument("--users", type=int, default=5)
    ap.add_argument("--titles", type=int, default=2000)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--full-epoch", action="store_true", help="train a real full-data epoch (a GPU)")
    args = ap.parse_args()
    path = resolve_dataset(args.dataset, Path(args.data_dir))
    cfg = load_config(overrides={"trainer.domain": "games" if path.name == "games" else "items",
                                 "trainer.base_model": "smollm2", "trainer.device": args.device})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recsift-refresh-bench-") as tmp:
        work = Path(tmp)
        train = read_dealrec_split(path, "train")
        rows, selected = pruning_figures(cfg, path, train, args.samples, args.surrogate_epochs, args.effort_samples,
                                         work / "prune")
        say(f"pruning: {rows['pruning_s']:.0f} s ({rows['pruning_s_extrapolated']})")
        rows.update(refresh_figures(cfg, path, train, selected, work))
        say(f"refresh of {rows['refresh_samples']:,} samples: {rows['refresh_1024_s']:.0f} s")
        scorable = rows["pruning_samples"]
        rows["full_epoch_samples"] = scorable
        rows["full_epoch_s_extrapolated"] = scorable / rows["train_samples_per_s"]
        if args.full_epoch:
            rows["full_epoch_s"] = full_epoch(cfg, path, train)
        full = rows.get("full_epoch_s", rows["full_epoch_s_extrapolated"])
        rows["refresh_over_full_epoch"] = rows["refresh_1024_s"] / full
        rows["pruning_and_refresh_over_full_epoch"] = (rows["pruning_s"] + rows["refresh_1024_s"]) / full
        rows["full_epoch_is_extrapolated"] = "full_epoch_s" not in rows
        rows.update(grounding_figures(cfg, path, train, args.titles, args.users))
    rows.update({"device": str(resolve_device(cfg.trainer.device)), "trainer_epochs": cfg.trainer.epochs,
                 "learning_rate": cfg.trainer.learning_rate, "wall_s": time.perf_counter() - started,
                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    print(f"\nrefresh benchmark on {path.name} (SmolLM2-135M, {rows['device']}, {os.cpu_count()} cores)")
    for k, v in rows.items():
        if isinstance(v, float):
            print(f"{k:40s} {v:>14,.3f}")
        elif not isinstance(v, dict):
            print(f"{k:40s} {v!s:>14}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python bench/refresh.py " + " ".join(sys.argv[1:])
    (RESULTS / "refresh.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "dataset": path.name, "command": command.strip(),
         **rows}, indent=2))
    print(f"\nwrote {RESULTS / 'refresh.json'}")


if __name__ == "__main__":
    main()
