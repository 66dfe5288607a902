"""Quality benchmark on Games (the DEALRec paper's split): which coreset gives the best LLM recommender?

Trains the SASRec surrogate on the training sequences, scores them (DEALRec influence + λ·effort, GraNd,
EL2N), selects a coreset with each method, LoRA fine-tunes SmolLM2-135M on it with identical settings,
and evaluates Recall/NDCG@10/20 over the full catalogue on a fixed, seeded set of test users, grounding
as in BIGRec (title embeddings from the base model, L2 nearest items). Methods:

- ``dealrec``: batch DEALRec (λ = 0.3, K = 50 strata, 10% hard prune: the authors' Games settings);
- ``streaming``: recsift's streaming stratified reservoir, offered the same scores in training-data
  order in batches of 512 (the selector under test, not a different scorer);
- ``goracs``: OT coreset against validation samples in surrogate-embedding space, biased toward high
  LLM gradient norms (the effort score);
- ``random``, ``grand`` (top GraNd), ``el2n`` (top EL2N), ``ccs`` (coverage-centric over EL2N);
- ``base``: SmolLM2 without fine-tuning; ``full`` (``--full`` mode): every candidate sample, one epoch.

Reported: mean ± std over seeds, and a paired bootstrap 95% interval of each method's difference to
Random on the same test users (and of streaming − batch DEALRec).

Modes (SmolLM2 LoRA runs at a few samples/s on a 2-core CPU, hundreds on a GPU):
  --quick  budget 256, last 5 history titles, 1 epoch, 1 seed, 2,000 test users, prompt-state grounding
           (no generation); scores and effort over a seeded pool of 4,096 training samples, which every
           method selects from (the effort pass over all 45,774 would take two hours here)
  --full   budget 1,024, the paper's prompt, 3 seeds, all test users with test items, generation +
           grounding, all training samples as candidates, and the full-data reference
Any setting can be narrowed (``--test-users``, ``--seeds``, ``--pool``, ``--budget``, ``--full-limit``,
``--tag``) to run a reduced slice of ``--full`` on a CPU.

Usage:  python bench/quality.py --quick            (writes bench/results/quality-games-quick.{json,md,png})
        python bench/quality.py --full [--tag slice --test-users 40 --seeds 1 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recsift.config import load_config  # noqa: E402
from recsift.data.datasets import catalog_for, read_dealrec_split  # noqa: E402
from recsift.scoring.effort import EffortScorer  # noqa: E402
from recsift.scoring.scorer import combine, make_scorer  # noqa: E402
from recsift.scoring.surrogate import Surrogate  # noqa: E402
from recsift.selection.goracs import goracs_select  # noqa: E402
from recsift.selection.reservoir import Offer, StratifiedReservoir  # noqa: E402
from recsift.selection.stratified import dealrec_select, random_select, topk_select  # noqa: E402
from recsift.stream.events import Catalog  # noqa: E402
from recsift.stream.windows import Sample  # noqa: E402
from recsift.trainer.evaluate import recall_ndcg, sample_test_users  # noqa: E402
from recsift.trainer.llm import LLM, add_lora, load_llm  # noqa: E402
from recsift.trainer.prompts import PromptBuilder, domain_named  # noqa: E402
from recsift.trainer.recommender import Recommender  # noqa: E402
from recsift.trainer.refresh import train_lora  # noqa: E402

RESULTS = ROOT / "bench" / "results"
METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
SELECTORS = ("dealrec", "streaming", "goracs", "random", "grand", "el2n", "ccs")
# DEALRec's Games settings (the authors' scripts): λ = 0.3 effort weight, K = 50 strata, 10% hard prune
EFFORT_WEIGHT, STRATA, HARD_PRUNE = 0.3, 50, 0.1
GORACS_CANDIDATES = 8192  # the OT problem is candidates × validation; beyond this, a seeded subsample


@dataclass
class Mode:
    budget: int
    max_history: int | None
    epochs: int
    seeds: list[int]
    test_users: int | None
    generate: bool
    pool: int | None
    full_data: bool
    learning_rate: float


MODES = {
    "quick": Mode(256, 5, 1, [0], 2000, False, 4096, False, 1e-3),
    "full": Mode(1024, None, 1, [0, 1, 2], None, True, None, True, 1e-3),
}


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Bench:
    """The shared parts: data, surrogate scores over the candidate pool, the LLM and the evaluation."""

    def __init__(self, data: Path, mode: Mode, surrogate_epochs: int) -> None:
        self.mode = mode
        self.train = read_dealrec_split(data, "train")
        self.valid = read_dealrec_split(data, "valid")
        self.test = read_dealrec_split(data, "test")
        catalog = catalog_for(data)
        assert catalog is not None, "Games needs items.tsv for titles"
        self.catalog: Catalog = catalog
        users = [u for u in self.train if len(self.train[u]) > 1]  # a one-item sequence has no input
        self.samples = [Sample(i, u, tuple(self.train[u][:-1]), self.train[u][-1], 0.0) for i, u in enumerate(users)]
        if mode.pool is not None and mode.pool < len(self.samples):
            picked = sorted(random.Random(1234).sample(range(len(self.samples)), mode.pool))  # keeps file order
            self.pool = [self.samples[i] for i in picked]
        else:
            self.pool = list(self.samples)
        self.pool_index = {s.sample_id: k for k, s in enumerate(self.pool)}
        say(f"{len(self.samples):,} training samples; {len(self.pool):,} candidates")
        cfg = load_config(overrides={"trainer.domain": "games", "trainer.epochs": mode.epochs,
                                     "trainer.learning_rate": mode.learning_rate})
        self.t = cfg.trainer
        self.surrogate = Surrogate(len(self.catalog), seed=0)
        train_enc = self.surrogate.encode([s.history for s in self.samples], [s.target for s in self.samples],
                                          range(len(self.samples)))
        started = time.perf_counter()
        self.surrogate.fit(train_enc.batch, surrogate_epochs, 128,
                           progress=lambda e, loss, s: say(f"surrogate epoch {e + 1}/{surrogate_epochs}: loss {loss:.4f}"))
        self.timings: dict[str, float] = {"surrogate_s": time.perf_counter() - started}
        enc = self.surrogate.encode([s.history for s in self.pool], [s.target for s in self.pool],
                                    range(len(self.pool)))
        assert len(enc.batch) == len(self.pool)
        g = torch.Generator().manual_seed(0)
        reference = train_enc.batch.select(torch.randperm(len(train_enc.batch), generator=g)[:4096])
        self.scores: dict[str, np.ndarray] = {}
        for name, params in (("influence", {"seed": 0, "depth": 500}), ("grand", {"seed": 0}), ("el2n", {"seed": 0})):
            started = time.perf_counter()
            scorer = make_scorer("dealrec" if name == "influence" else name, **params)
            scorer.prepare(self.surrogate, reference)
            self.scores[name] = scorer.score(self.surrogate, enc.batch).values.double().numpy()
            self.timings[f"{name}_s"] = time.perf_counter() - started
            say(f"{name} scores: {self.timings[f'{name}_s']:.1f} s")
        self.embeddings = self.surrogate.embed(enc.batch).numpy()
        val_users = sorted((u for u in self.valid if u in self.train), key=lambda u: (len(u), u))
        val_users = random.Random(0).sample(val_users, min(2000, len(val_users)))
        val = self.surrogate.encode([self.train[u] for u in val_users], [self.valid[u][0] for u in val_users],
                                    range(len(val_users)))
        self.validation_embeddings = self.surrogate.embed(val.batch).numpy()

        started = time.perf_counter()
        self.llm = self.load()
        self.builder = PromptBuilder(self.llm.encode, self.catalog.title, self.llm.eos_token_id, domain_named("games"),
                                     self.t.max_prompt_tokens, max_history=mode.max_history,
                                     pad_token_id=self.llm.pad_token_id)
        effort = EffortScorer(add_lora(self.llm.model, self.t.lora_r, self.t.lora_alpha, self.t.lora_dropout,
                                       self.t.target_modules, self.t.seed),
                              self.builder.batch, batch_size=self.t.effort_batch_size,
                              autocast_dtype=self.llm.autocast_dtype)
        values = []
        for start in range(0, len(self.pool), 256):
            values.append(effort(self.pool[start:start + 256]))
            say(f"effort: {start + len(values[-1]):,}/{len(self.pool):,} "
                f"({(start + len(values[-1])) / (time.perf_counter() - started):.1f}/s)")
        self.scores["effort"] = torch.cat(values).double().numpy()
        self.timings["effort_s"] = time.perf_counter() - started
        self.scores["dealrec"] = combine(torch.from_numpy(self.scores["influence"]),
                                         torch.from_numpy(self.scores["effort"]), EFFORT_WEIGHT).numpy()
        self.llm = self.load()  # the effort pass wrapped the base model: start the trainings from a clean one
        self.test_users = sample_test_users(self.test, mode.test_users, seed=0)
        self.recommender: Recommender | None = None
        say(f"{len(self.test_users):,} test users")

    def load(self) -> LLM:
        return load_llm(self.t.base_model, self.t.cache_dir, self.t.dtype)

    def select(self, method: str, seed: int) -> list[int]:
        """Indices into the pool."""
        ids, budget = np.arange(len(self.pool)), self.mode.budget
        if method == "random":
            return random_select(ids, budget, seed).ids.tolist()
        if method == "dealrec":
            return dealrec_select(ids, self.scores["dealrec"], budget, STRATA, HARD_PRUNE, seed).ids.tolist()
        if method == "ccs":
            return dealrec_select(ids, self.scores["el2n"], budget, STRATA, HARD_PRUNE, seed).ids.tolist()
        if method in ("grand", "el2n"):
            return topk_select(ids, self.scores[method], budget).ids.tolist()
        if method == "goracs":  # exact OT over at most GORACS_CANDIDATES (a seeded subsample beyond that)
            rows = np.arange(len(self.pool))
            if len(rows) > GORACS_CANDIDATES:
                rows = np.sort(np.random.default_rng(seed).choice(rows, GORACS_CANDIDATES, replace=False))
            result = goracs_select(self.embeddings[rows], self.validation_embeddings, budget,
                                   grad_norms=self.scores["effort"][rows], lam=0.1)
            return rows[result.selected].tolist()
        if method == "streaming":
            reservoir = StratifiedReservoir(budget, STRATA, HARD_PRUNE, seed=seed)
            for start in range(0, len(self.pool), 512):
                reservoir.offer([Offer(self.pool[i], float(self.scores["dealrec"][i]), 1, self.embeddings[i])
                                 for i in range(start, min(start + 512, len(self.pool)))])
            return sorted(self.pool_index[m.sample.sample_id] for m in reservoir.members.values())
        raise ValueError(method)

    def finetune(self, samples: Sequence[Sample], seed: int) -> tuple[Any, dict[str, float]]:
        llm = self.load()
        model = add_lora(llm.model, self.t.lora_r, self.t.lora_alpha, self.t.lora_dropout, self.t.target_modules, seed)
        cfg = self.t.model_copy(update={"seed": seed})
        result = train_lora(model, self.builder, list(samples), [], cfg, llm.autocast_dtype, progress=say)
        self.llm = llm
        return model, {"train_s": result.seconds, "samples_per_s": result.samples_per_s,
                       "train_loss": result.train_losses[-1] if result.train_losses else float("nan")}

    def evaluate(self, model: Any, label: str) -> dict[str, np.ndarray]:
        """Per-user metrics (arrays aligned with ``test_users``)."""
        started = time.perf_counter()
        rec = Recommender(self.llm, model, self.catalog, self.builder, cache_dir=self.t.cache_dir / "titles",
                          max_new_tokens=self.t.max_new_tokens)
        histories = [self.train.get(u, []) + self.valid.get(u, []) for u in self.test_users]
        ranked: list[list[str]] = []
        for start in range(0, len(histories), 256):
            chunk = histories[start:start + 256]
            if self.mode.generate:
                ranked += [rec.recommend(h, 20, generate=True) for h in chunk]
            else:
                ranked += rec.rank_from_prompts(chunk, 20, batch_size=32)
            say(f"{label}: evaluated {len(ranked):,}/{len(histories):,} users")
        per_user = {m: np.zeros(len(ranked)) for m in METRICS}
        for i, (items, u) in enumerate(zip(ranked, self.test_users, strict=True)):
            for m, v in recall_ndcg([items], [self.test[u]], (10, 20)).items():
                per_user[m][i] = v
        say(f"{label}: " + ", ".join(f"{m} {per_user[m].mean():.4f}" for m in METRICS)
            + f" ({time.perf_counter() - started:.0f} s)")
        return per_user


def bootstrap_diff(a: np.ndarray, b: np.ndarray, rounds: int = 2000, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap over users of mean(a − b): the mean difference and its 95% interval."""
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(rounds, len(diff)))].mean(axis=1)
    return {"diff": float(diff.mean()), "low": float(np.percentile(means, 2.5)), "high": float(np.percentile(means, 97.5))}


def summarise(per_seed: dict[str, list[dict[str, np.ndarray]]]) -> dict[str, Any]:
    """Mean ± std over seeds; per-user means over seeds for the paired intervals."""
    user_means = {name: {m: np.mean([r[m] for r in runs], axis=0) for m in METRICS} for name, runs in per_seed.items()}
    out: dict[str, Any] = {}
    for name, runs in per_seed.items():
        seed_means = {m: [float(r[m].mean()) for r in runs] for m in METRICS}
        out[name] = {m: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v} for m, v in seed_means.items()}
        if "random" in user_means and name != "random":
            out[name]["vs_random"] = {m: bootstrap_diff(user_means[name][m], user_means["random"][m]) for m in METRICS}
    if "streaming" in user_means and "dealrec" in user_means:
        out["streaming"]["vs_dealrec"] = {m: bootstrap_diff(user_means["streaming"][m], user_means["dealrec"][m])
                                          for m in METRICS}
    return out


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# Games quality benchmark ({meta['mode']}{'-' + meta['tag'] if meta['tag'] else ''})", "",
             f"{meta['date']}, commit {meta['commit']}, {meta['cores']} cores; budget {meta['budget']}, "
             f"{meta['test_users']:,} test users, seeds {meta['seeds']}, "
             f"{'generation + grounding' if meta['generate'] else 'prompt-state grounding'}.", "",
             "| method | " + " | ".join(METRICS) + " | R@20 − Random [95% CI] |",
             "| --- | " + " | ".join("---" for _ in METRICS) + " | --- |"]
    for name, row in summary.items():
        cells = [f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}" for m in METRICS]
        vs = row.get("vs_random", {}).get("recall@20")
        ci = f"{vs['diff']:+.4f} [{vs['low']:+.4f}, {vs['high']:+.4f}]" if vs else "–"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ci} |")
    s = summary.get("streaming", {}).get("vs_dealrec")
    if s:
        lines += ["", "Streaming − batch DEALRec: " + ", ".join(
            f"{m} {s[m]['diff']:+.4f} [{s[m]['low']:+.4f}, {s[m]['high']:+.4f}]" for m in METRICS)]
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 1.1), 4))
    width = 0.2
    for k, m in enumerate(METRICS):
        x = np.arange(len(names)) + (k - 1.5) * width
        ax.bar(x, [summary[n][m]["mean"] for n in names], width, yerr=[summary[n][m]["std"] for n in names],
               label=m, capsize=2)
    ax.set_xticks(np.arange(len(names)), names, rotation=20)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--quick", action="store_const", dest="mode", const="quick")
    which.add_argument("--full", action="store_const", dest="mode", const="full")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "games")
    ap.add_argument("--budget", type=int)
    ap.add_argument("--test-users", type=int, help="a seeded sample of this many test users")
    ap.add_argument("--seeds", type=int, help="number of seeds (0, 1, ...)")
    ap.add_argument("--pool", type=int, help="candidates: a seeded uniform pool of this many training samples")
    ap.add_argument("--full-limit", type=int, help="train the full-data reference on this many samples only")
    ap.add_argument("--methods", default=",".join(SELECTORS))
    ap.add_argument("--surrogate-epochs", type=int, default=10)
    ap.add_argument("--tag", default="", help="suffix of the result files (for a reduced slice)")
    args = ap.parse_args(argv)
    if not (args.data / "train.txt").is_file():
        sys.exit(f"the Games dataset is not at {args.data} (../shared/data is absent)")
    mode = MODES[args.mode]
    if args.budget:
        mode.budget = args.budget
    if args.test_users:
        mode.test_users = args.test_users
    if args.seeds:
        mode.seeds = list(range(args.seeds))
    if args.pool:
        mode.pool = args.pool
    torch.manual_seed(0)
    started = time.perf_counter()
    bench = Bench(args.data, mode, args.surrogate_epochs)
    per_seed: dict[str, list[dict[str, np.ndarray]]] = {"base": [bench.evaluate(bench.llm.model, "base")]}
    runs: list[dict[str, Any]] = []
    methods = [m for m in args.methods.split(",") if m]
    for seed in mode.seeds:
        for method in methods:
            t0 = time.perf_counter()
            chosen = bench.select(method, seed)
            select_s = time.perf_counter() - t0
            samples = [bench.pool[i] for i in chosen]
            say(f"seed {seed} {method}: {len(samples)} samples selected in {select_s:.2f} s; fine-tuning")
            model, train = bench.finetune(samples, seed)
            per_seed.setdefault(method, []).append(bench.evaluate(model, f"seed {seed} {method}"))
            runs.append({"seed": seed, "method": method, "selected": len(samples), "select_s": select_s, **train})
    if mode.full_data:
        samples = bench.pool[: args.full_limit] if args.full_limit else bench.pool
        model, train = bench.finetune(samples, 0)
        per_seed["full"] = [bench.evaluate(model, "full data")]
        runs.append({"seed": 0, "method": "full", "selected": len(samples), **train})
    summary = summarise(per_seed)
    meta = {"mode": args.mode, "tag": args.tag, "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
            "cores": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "budget": mode.budget, "max_history": mode.max_history,
            "epochs": mode.epochs, "learning_rate": mode.learning_rate, "seeds": mode.seeds,
            "test_users": len(bench.test_users), "generate": mode.generate, "candidates": len(bench.pool),
            "training_samples": len(bench.samples), "effort_weight": EFFORT_WEIGHT, "strata": STRATA,
            "hard_prune": HARD_PRUNE, "full_limit": args.full_limit, "base_model": bench.t.base_model,
            "timings": bench.timings, "wall_s": time.perf_counter() - started,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "command": " ".join(["python", "bench/quality.py", *(argv if argv is not None else sys.argv[1:])])}
    name = f"quality-games-{args.mode}{'-' + args.tag if args.tag else ''}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown(summary, meta))
    chart(summary, RESULTS / f"{name}.png", f"Games, SmolLM2-135M, budget {mode.budget} ({args.mode})")
    print(markdown(summary, meta))
    say(f"done in {meta['wall_s'] / 60:.1f} min: {RESULTS / name}.json")


if __name__ == "__main__":
    main()
