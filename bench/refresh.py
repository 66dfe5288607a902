"""Refresh benchmark on Games with SmolLM2-135M: few-shot LoRA refresh vs. full-data fine-tuning.

Trains on a slice of Games training samples (``--slice``, default 64) with the refresh's own training
loop and extrapolates linearly to a 1,024-sample refresh and to one epoch over all 45,774 scorable
training samples (the cost per sample is measured, the extrapolation is stated as such). Also times
generation + grounding per user (title embeddings of ``--titles`` items; the full-catalogue embedding
time is extrapolated from them) and reports peak RSS.

Usage:  python bench/refresh.py [--slice 64] [--users 5] [--titles 2000]
Writes ``bench/results/refresh.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recsift.config import load_config  # noqa: E402
from recsift.data.datasets import catalog_for, read_dealrec_split  # noqa: E402
from recsift.stream.catalog import Catalog  # noqa: E402
from recsift.stream.windows import Sample  # noqa: E402
from recsift.trainer.llm import add_lora, load_llm  # noqa: E402
from recsift.trainer.prompts import builder_for  # noqa: E402
from recsift.trainer.recommender import Recommender  # noqa: E402
from recsift.trainer.refresh import train_lora  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "games")
    ap.add_argument("--slice", type=int, default=64)
    ap.add_argument("--users", type=int, default=5)
    ap.add_argument("--titles", type=int, default=2000)
    args = ap.parse_args()
    if not (args.data / "train.txt").is_file():
        sys.exit(f"the Games dataset is not at {args.data}")
    cfg = load_config(overrides={"trainer.domain": "games"})
    t = cfg.trainer
    train = read_dealrec_split(args.data, "train")
    catalog = catalog_for(args.data)
    assert catalog is not None
    scorable = [u for u in train if len(train[u]) > 1]
    rng = random.Random(0)
    picked = rng.sample(scorable, args.slice)
    samples = [Sample(i, u, tuple(train[u][:-1]), train[u][-1], 0.0) for i, u in enumerate(picked)]

    started = time.perf_counter()
    llm = load_llm(t.base_model, t.cache_dir, t.dtype)
    load_s = time.perf_counter() - started
    model = add_lora(llm.model, t.lora_r, t.lora_alpha, t.lora_dropout, t.target_modules, t.seed)
    builder = builder_for(llm.encode, catalog.title, llm.eos_token_id, llm.pad_token_id,
                          t.model_copy(update={"domain": "games"}))
    result = train_lora(model, builder, samples, [], t, llm.autocast_dtype,
                        progress=lambda line: print(line, file=sys.stderr, flush=True))
    per_sample = result.seconds / result.samples

    items = sorted(catalog, key=lambda it: it.item_id)[: args.titles]
    small = Catalog(items)
    started = time.perf_counter()
    rec = Recommender(llm, model, small, builder, cache_dir=None, max_new_tokens=t.max_new_tokens)
    titles_s = time.perf_counter() - started
    users = [u for u in picked[: args.users]]
    started = time.perf_counter()
    for u in users:
        rec.recommend(train[u], 20, generate=True)
    per_user_gen = (time.perf_counter() - started) / len(users)
    started = time.perf_counter()
    for u in users:
        rec.recommend(train[u], 20, generate=False)
    per_user_prompt = (time.perf_counter() - started) / len(users)

    rows = {
        "slice_samples": result.samples, "slice_train_s": result.seconds,
        "train_samples_per_s": result.samples_per_s, "train_tokens_per_s": result.tokens_per_s,
        "mean_tokens_per_sample": result.tokens / result.samples,
        "refresh_1024_s_extrapolated": 1024 * per_sample,
        "full_epoch_s_extrapolated": len(scorable) * per_sample, "full_epoch_samples": len(scorable),
        "refresh_cost_share": 1024 / len(scorable),
        "model_load_s": load_s, "dtype": "bf16 autocast" if llm.autocast_dtype is not None else "fp32",
        "title_embedding_s": titles_s, "titles_embedded": len(items),
        "title_embedding_all_s_extrapolated": titles_s * len(catalog) / len(items),
        "generate_and_ground_s_per_user": per_user_gen, "prompt_ground_s_per_user": per_user_prompt,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(f"\nrefresh benchmark (SmolLM2-135M, {rows['dtype']}, {os.cpu_count()} cores)")
    for k, v in rows.items():
        print(f"{k:40s} {v:>14,.3f}" if isinstance(v, float) else f"{k:40s} {v!s:>14}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "refresh.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
                                                      **rows}, indent=2))
    print(f"\nwrote {RESULTS / 'refresh.json'}")


if __name__ == "__main__":
    main()
