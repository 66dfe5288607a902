"""Quality benchmark: does a coreset chosen by DEALRec (batch or recsift's streaming selector) fine-tune a
better LLM recommender than a random sample of the same size?

``--cpu``: a paired protocol with power on a 2-core CPU (SmolLM2-135M).
  - A seeded pool of 4,096 training samples (a user's training sequence: history → last item). The SASRec (or --surrogate)
    surrogate (trained on every training sequence), DEALRec influence and the LLM effort score over the
    pool are computed once and cached on disk, keyed by their inputs (the time is reported apart).
  - Arms, each training LoRA r8/α16 on q,v for 3 epochs (warm-up + linear decay, prompt + response
    loss) on ``--budget`` samples of the pool; the seed fixes the LoRA init, the data order and the
    selection RNG and is shared across arms: ``random`` × 3 seeds, ``dealrec`` (batch, λ = 0.3, K = 50,
    10% hard prune) × 3, ``streaming`` (the same scores fed in data order, batches of 512, through the
    real reservoir with sketch edges) × 3, ``goracs`` × 1, and the positive control ``random4x`` (4× the
    budget) × 1 (it has only to be detected); ``base`` (no training) and ``popularity`` (no model).
  - Evaluation: 1,000 seeded test users (history = train + valid items, target = the first test item);
    candidates = the target + 19 negatives (10 by train+valid popularity, 9 uniform) whose titles are
    within one token of the target's, never an item of the user's history or test items, fixed per user
    and shared by every arm. Each candidate's teacher-forced log-likelihood of its title + EOS given the
    prompt (prompt encoded once, its KV cache shared) and its title's prior (the same given the prompt
    with an empty history) are kept in the arm's record; the score is their difference (PMI). Metrics per
    user: rank percentile (primary), HR@1/5, NDCG@5/10, target NLL; the summary reports every metric
    under both rules and how much of each arm's ranking is title length (``length_confound``).
    Protocol history: v1 (``bench/results/quality-games-cpu-v1*``) scored by the log-likelihood alone,
    against unmatched negatives: Games test targets have longer titles than the typical item (18.7 tokens
    against 13.2 and 14.1), so it ranked by length (per-user correlation 0.78 with "the shorter title
    wins"). v2 (``-v2*``) scored by PMI, which leaned the other way (-0.31 for the base model). v3
    matches lengths, so no rule can win or lose by them.
  - Statistics: a hierarchical bootstrap (seeds, then users) of per-user differences against Random on the
    same seed, and of streaming − batch DEALRec, with 95% intervals and each seed's difference. Gates:
    Random beats the base model and popularity, and the positive control beats Random; when a gate fails
    the table says "not measurable at this scale" instead of ranking methods.
  - Every (arm, seed) result is written to ``bench/results/quality-<dataset>-cpu/`` as it finishes, so an
    interrupted run resumes where it stopped; the summary is rewritten after every arm. To stop cleanly
    between arms (the machine is needed for something else), create ``STOP`` in that directory: the run
    ends after the arm in progress, and the next run resumes. Per-arm times are only honest for arms that
    ran alone on the machine.

``--cpu --backend tiger``: the same pool, candidates, arms, statistics and gates with TIGER (semantic IDs from an
RQ-VAE over the catalogue's SmolLM2 title embeddings, fitted once; every arm trains a fresh seeded T5 on its
samples; candidates ranked by the log-likelihood of their ID given the history; the effort term is the fresh T5's
gradient norm, recsift.trainer.tiger.effort). Results in ``quality-<dataset>-cpu-tiger*``.

``--full`` (meant for a GPU; ``trainer.device`` auto picks CUDA): budget 1,024, 3 seeds, every test user,
BIGRec generation (4 beams, 128 new tokens) + base-model grounding, Recall/NDCG@10/20 over the full
catalogue, and the full-data reference.

Usage:  python bench/quality.py --cpu [--dataset games|DIR] [--arms random,dealrec] [--seeds 1] [--users 200]
        python bench/quality.py --cpu --backend tiger [--dataset games|DIR]
        python bench/quality.py --full [--dataset DIR] [--test-users N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recsift.config import Settings, TrainerConfig, load_config  # noqa: E402
from recsift.data.datasets import catalog_for, read_dealrec_split, resolve_dataset  # noqa: E402
from recsift.scoring.effort import EffortScorer  # noqa: E402
from recsift.scoring.registry import SURROGATES, make_scorer, make_surrogate  # noqa: E402
from recsift.scoring.scorer import combine  # noqa: E402
from recsift.selection.goracs import goracs_select  # noqa: E402
from recsift.selection.reservoir import StratifiedReservoir  # noqa: E402
from recsift.selection.selector import Offer  # noqa: E402
from recsift.selection.stratified import dealrec_select, random_select  # noqa: E402
from recsift.stream.catalog import Catalog  # noqa: E402
from recsift.stream.windows import Sample  # noqa: E402
from recsift.trainer.bigrec import train_lora  # noqa: E402
from recsift.trainer.evaluate import (  # noqa: E402
    CANDIDATE_METRICS,
    CANDIDATE_SCORES,
    NegativeSampler,
    candidate_metrics,
    candidate_scores,
    evaluate_dealrec,
    sample_test_users,
)
from recsift.trainer.llm import LLM, add_lora, load_llm  # noqa: E402
from recsift.trainer.prompts import PromptBuilder, builder_for  # noqa: E402
from recsift.trainer.recommender import Recommender, candidate_table  # noqa: E402
from recsift.trainer.registry import AdapterRegistry  # noqa: E402
from recsift.trainer.tiger.backend import TigerBackend, TigerRefreshModel  # noqa: E402
from recsift.trainer.tiger.effort import TigerBatches  # noqa: E402
from recsift.trainer.tiger.generator import TigerModel  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PRIMARY = "rank_percentile"
# DEALRec's Games settings (the authors' scripts): λ = 0.3 effort weight, K = 50 strata, 10% hard prune
EFFORT_WEIGHT, STRATA, HARD_PRUNE = 0.3, 50, 0.1
TRAINED_ARMS = ("random", "random4x", "dealrec", "streaming", "goracs")  # the order they run in
ALL_ARMS = ("popularity", "base", *TRAINED_ARMS)
SINGLE_SEED = ("goracs", "random4x")  # the control has only to be detected; each seed trains on 4x the samples
LOWER_IS_BETTER = ("target_nll",)


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dataclass
class Protocol:
    """Everything a result depends on; its digest keys the cached results (bump ``version`` when the code
    that produces a result changes its meaning)."""

    dataset: str
    data_digest: str
    pool: int = 4096
    budget: int = 256
    epochs: int = 3
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    batch_size: int = 8
    prompt_history: int | None = 5
    users: int = 1000
    candidates: int = 20
    surrogate_epochs: int = 10
    base_model: str = "smollm2"
    score: str = "pmi"  # the candidate score rule (recsift.trainer.evaluate.candidate_scores)
    match_length: bool = True  # negatives of about the target's title length (±1 token)
    version: int = 3  # 2: every candidate's log-likelihood and title prior kept, PMI primary; 3: matched lengths
    train_on_inputs: bool = True  # prompt + response loss (the reference); False: a response-only diagnostic
    surrogate: str = "sasrec"  # the surrogate influence and the embeddings are taken on (scoring.surrogate)
    backend: str = "bigrec"  # what the arms train (trainer.backend): LoRA on the LLM, or TIGER's T5 from scratch

    def key(self) -> str:
        """The digest of every field; a field added after v3 enters it only when it differs from its
        default, so results computed before the field existed keep their keys."""
        fields = asdict(self)
        for name, default in (("train_on_inputs", True), ("surrogate", "sasrec"), ("backend", "bigrec")):
            if fields[name] == default:
                del fields[name]
        return digest(fields)


class Data:
    """The dataset, the pool, the test users and their fixed candidates."""

    def __init__(self, path: Path, protocol: Protocol) -> None:
        self.train = read_dealrec_split(path, "train")
        self.valid = read_dealrec_split(path, "valid")
        self.test = read_dealrec_split(path, "test")
        catalog = catalog_for(path)
        if catalog is None:
            raise SystemExit(f"{path} has no items.tsv: the benchmark needs titles")
        self.catalog: Catalog = catalog
        users = [u for u in self.train if len(self.train[u]) > 1]  # a one-item sequence has no input
        self.samples = [Sample(i, u, tuple(self.train[u][:-1]), self.train[u][-1], 0.0) for i, u in enumerate(users)]
        picked = sorted(random.Random(1234).sample(range(len(self.samples)), min(protocol.pool, len(self.samples))))
        self.pool = [self.samples[i] for i in picked]  # file (data) order kept
        popularity: Counter[str] = Counter()
        for split in (self.train, self.valid):
            for items in split.values():
                popularity.update(items)
        self.popularity = popularity
        users = sample_test_users(self.test, protocol.users, seed=0)
        self.users = [u for u in users if self.train.get(u) or self.valid.get(u)]
        self.histories = [self.train.get(u, []) + self.valid.get(u, []) for u in self.users]
        self.candidates: list[list[str]] = []

    def draw_candidates(self, size: int, length: Callable[[str], int] | None) -> None:
        """Each test user's target and ``size`` − 1 negatives (of about the target's title length when
        ``length`` is given), fixed by seed 0."""
        sampler = NegativeSampler([it.item_id for it in self.catalog], dict(self.popularity), seed=0, length=length)
        self.candidates = [sampler.candidates(u, set(h) | set(self.test[u]), self.test[u][0], size)
                           for u, h in zip(self.users, self.histories, strict=True)]


def write_scores(path: Path, scores: dict[str, np.ndarray], timings: dict[str, float]) -> None:
    """The pool's scores as safetensors: influence and effort in float64 (selection ranks them), embeddings in
    float32 (what the surrogate produces); the scoring times in the metadata."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32 if v.ndim == 2 else np.float64))
               for k, v in scores.items()}
    save_file(tensors, str(path), metadata={"timings": json.dumps(timings)})


def read_scores(path: Path) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    with safe_open(str(path), framework="pt") as f:
        return ({k: f.get_tensor(k).numpy() for k in f.keys()},  # noqa: SIM118 (safe_open is not a dict)
                json.loads((f.metadata() or {})["timings"]))


class CpuBench:
    def __init__(self, data: Data, protocol: Protocol, out: Path) -> None:
        self.data, self.p, self.out = data, protocol, out
        self.out.mkdir(parents=True, exist_ok=True)
        self.t: TrainerConfig = load_config(overrides={
            "trainer.domain": "games", "trainer.epochs": protocol.epochs, "trainer.learning_rate": protocol.learning_rate,
            "trainer.warmup_steps": protocol.warmup_steps, "trainer.batch_size": protocol.batch_size,
            "trainer.prompt_history": protocol.prompt_history, "trainer.train_on_inputs": protocol.train_on_inputs,
            "trainer.base_model": protocol.base_model, "trainer.early_stopping_patience": 100}).trainer
        self.llm = self.load()
        self.builder = self.make_builder(self.llm)
        data.draw_candidates(protocol.candidates,
                             self.builder.response_length if protocol.match_length else None)
        self.scores: dict[str, np.ndarray] = {}
        self.timings: dict[str, float] = {}

    def load(self) -> LLM:
        return load_llm(self.t.base_model, self.t.cache_dir, self.t.dtype, self.t.device)

    def make_builder(self, llm: LLM) -> PromptBuilder:
        return builder_for(llm.encode, self.data.catalog.title, llm.eos_token_id, llm.pad_token_id, self.t)

    # ------------------------------------------------------------------ cached scoring

    def score_pool(self) -> None:
        """Surrogate, influence, effort and embeddings over the pool; cached by the protocol's digest."""
        d, p = self.data, self.p
        key = digest(p.data_digest, p.pool, p.surrogate_epochs, p.prompt_history, p.base_model,
                     *([p.surrogate] if p.surrogate != "sasrec" else []), *([p.backend] if p.backend != "bigrec" else []))
        path = self.out / f"scores-{key}.safetensors"
        if path.is_file():
            self.scores, self.timings = read_scores(path)
            say(f"pool scores from the cache ({path.name})")
            return
        started = time.perf_counter()
        surrogate = make_surrogate(p.surrogate, len(d.catalog), seed=0)
        train_enc = surrogate.encode([s.history for s in d.samples], [s.target for s in d.samples],
                                     range(len(d.samples)))
        surrogate.fit(train_enc.batch, p.surrogate_epochs, 128,
                      progress=lambda e, loss, s: say(f"surrogate epoch {e + 1}/{p.surrogate_epochs}: loss {loss:.4f}"))
        self.timings["surrogate_s"] = time.perf_counter() - started
        enc = surrogate.encode([s.history for s in d.pool], [s.target for s in d.pool], range(len(d.pool)))
        reference = train_enc.batch.select(torch.randperm(len(train_enc.batch),
                                                          generator=torch.Generator().manual_seed(0))[:4096])
        started = time.perf_counter()
        scorer = make_scorer({"type": "dealrec", "depth": 500}, seed=0)
        scorer.prepare(surrogate, reference)
        self.scores["influence"] = scorer.score(surrogate, enc.batch).values.double().numpy()
        self.timings["influence_s"] = time.perf_counter() - started
        self.scores["embedding"] = surrogate.embed(enc.batch).numpy()
        val_users = sorted((u for u in d.valid if u in d.train), key=lambda u: (len(u), u))
        val_users = random.Random(0).sample(val_users, min(2000, len(val_users)))
        val = surrogate.encode([d.train[u] for u in val_users], [d.valid[u][0] for u in val_users],
                               range(len(val_users)))
        self.scores["validation_embedding"] = surrogate.embed(val.batch).numpy()
        started = time.perf_counter()
        effort = self.effort_scorer()
        values = []
        for start in range(0, len(d.pool), 256):
            values.append(effort(d.pool[start:start + 256]))
            done = start + len(values[-1])
            say(f"effort: {done:,}/{len(d.pool):,} ({done / (time.perf_counter() - started):.1f}/s)")
        self.scores["effort"] = torch.cat(values).double().numpy()
        self.timings["effort_s"] = time.perf_counter() - started
        write_scores(path, self.scores, self.timings)

    def effort_scorer(self) -> EffortScorer:
        """BIGRec's effort model: the base LLM with a fresh seeded LoRA adapter."""
        llm = self.load()
        return EffortScorer(add_lora(llm.model, self.t.lora_r, self.t.lora_alpha, self.t.lora_dropout,
                                     self.t.target_modules, self.t.seed),
                            self.make_builder(llm).batch, batch_size=self.t.effort_batch_size,
                            autocast_dtype=llm.autocast_dtype)

    @property
    def dealrec_scores(self) -> np.ndarray:
        return combine(torch.from_numpy(self.scores["influence"]), torch.from_numpy(self.scores["effort"]),
                       EFFORT_WEIGHT).numpy()

    # ------------------------------------------------------------------ arms

    def select(self, arm: str, seed: int) -> list[int]:
        """Indices into the pool."""
        ids, budget = np.arange(len(self.data.pool)), self.p.budget
        if arm == "random":
            return random_select(ids, budget, seed).ids.tolist()
        if arm == "random4x":
            return random_select(ids, 4 * budget, seed).ids.tolist()
        if arm == "dealrec":
            return dealrec_select(ids, self.dealrec_scores, budget, STRATA, HARD_PRUNE, seed).ids.tolist()
        if arm == "streaming":
            reservoir = StratifiedReservoir(budget, STRATA, HARD_PRUNE, seed=seed)
            scores, index = self.dealrec_scores, {s.sample_id: k for k, s in enumerate(self.data.pool)}
            for start in range(0, len(self.data.pool), 512):
                reservoir.offer([Offer(self.data.pool[i], float(scores[i]), 1)
                                 for i in range(start, min(start + 512, len(self.data.pool)))])
            return sorted(index[m.sample.sample_id] for m in reservoir.members.values())
        if arm == "goracs":
            torch.manual_seed(seed)
            return goracs_select(self.scores["embedding"], self.scores["validation_embedding"], budget,
                                 grad_norms=self.scores["effort"], lam=0.1).selected.tolist()
        raise ValueError(f"unknown arm {arm!r}")

    def evaluate(self, model: Any, label: str) -> dict[str, Any]:
        """Every candidate's log-likelihood and title prior (kept, so any rule can be recomputed), and the
        per-user metrics under the protocol's rule."""
        d = self.data
        started = time.perf_counter()

        def progress(done: int) -> None:
            if done % 100 == 0 or done == len(d.users):
                say(f"{label}: evaluated {done:,}/{len(d.users):,} users ({done / (time.perf_counter() - started):.2f}/s)"
                    + ("; title priors next" if done == len(d.users) else ""))

        logliks, priors, nll = candidate_table(self.llm, model, self.builder, d.histories, d.candidates,
                                               progress=progress)
        assert priors is not None
        return {"logliks": np.round(logliks, 4).tolist(), "priors": np.round(priors, 4).tolist(),
                "target_nll": np.round(nll, 6).tolist(), **self.metrics(logliks, priors, nll)}

    def metrics(self, logliks: np.ndarray, priors: np.ndarray, nll: np.ndarray) -> dict[str, Any]:
        """Per-user metrics under the protocol's rule, and the mean of each metric under every rule."""
        by_rule = {rule: candidate_metrics(candidate_scores(logliks, priors, rule), nll) for rule in CANDIDATE_SCORES}
        return {"per_user": {m: np.round(v, 6).tolist() for m, v in by_rule[self.p.score].items()},
                "mean_by_rule": {rule: {m: float(np.mean(v)) for m, v in values.items()}
                                 for rule, values in by_rule.items()}}

    def base_model(self) -> Any:
        """The untrained model the ``base`` arm evaluates."""
        return self.llm.model

    def train_arm(self, samples: list[Sample], seed: int, label: str) -> tuple[Any, dict[str, Any]]:
        """A LoRA adapter (seeded init and order) trained on ``samples``; the model and its training record."""
        llm = self.load()
        model = add_lora(llm.model, self.t.lora_r, self.t.lora_alpha, self.t.lora_dropout, self.t.target_modules, seed)
        result = train_lora(model, self.make_builder(llm), samples, [], self.t.model_copy(update={"seed": seed}),
                            llm.autocast_dtype, progress=lambda line: say(f"{label}: {line}"))
        self.llm = llm
        return model, {"train_s": result.seconds, "train_tokens_per_s": result.tokens_per_s,
                       "train_loss": result.train_losses}

    def popularity(self) -> dict[str, list[float]]:
        d = self.data
        scores = np.array([[d.popularity.get(c, 0) for c in cands] for cands in d.candidates], dtype=np.float64)
        return {m: np.round(v, 6).tolist() for m, v in candidate_metrics(scores).items()}

    def run_arm(self, arm: str, seed: int) -> dict[str, Any]:
        path = self.out / f"{arm}-s{seed}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("protocol") == self.p.key():
                say(f"{arm} seed {seed}: from {path.name}")
                return cached
        started = time.perf_counter()
        record: dict[str, Any] = {"arm": arm, "seed": seed, "protocol": self.p.key()}
        if arm == "popularity":
            record["per_user"] = self.popularity()
        elif arm == "base":
            record.update(self.evaluate(self.base_model(), "base"))
            record["eval_s"] = time.perf_counter() - started
        else:
            chosen = self.select(arm, seed)
            record["selected"] = len(chosen)
            say(f"{arm} seed {seed}: {len(chosen)} samples; fine-tuning")
            model, trained = self.train_arm([self.data.pool[i] for i in chosen], seed, f"{arm} seed {seed}")
            record.update(trained)
            evaluated = time.perf_counter()
            record.update(self.evaluate(model, f"{arm} seed {seed}"))
            record["eval_s"] = time.perf_counter() - evaluated
        record["seconds"] = time.perf_counter() - started
        record["mean"] = {m: float(np.mean(v)) for m, v in record["per_user"].items()}
        path.write_text(json.dumps(record))
        say(f"{arm} seed {seed}: " + ", ".join(f"{m} {v:.4f}" for m, v in record["mean"].items())
            + f" ({record['seconds']:.0f} s)")
        return record


class TigerBench(CpuBench):
    """The same protocol with TIGER arms (``--backend tiger``): semantic IDs fitted once on the catalogue's title
    embeddings (the base model's, cached per catalogue); every arm trains a fresh T5 (``trainer.tiger`` defaults,
    the seed fixing its init and data order) on its samples; a candidate's score is the log-likelihood of its ID
    given the history; the effort score is TIGER's (:meth:`TigerBackend.effort` on an empty registry: the fresh
    seeded T5 a first refresh would train)."""

    def __init__(self, data: Data, protocol: Protocol, out: Path) -> None:
        super().__init__(data, protocol, out)
        self.scratch = Path(tempfile.mkdtemp(prefix="quality-tiger-"))
        self.registry = AdapterRegistry(self.scratch / "adapters")  # empty: every arm starts from scratch
        self.backend = TigerBackend(self.settings(0), data.catalog, self.llm)
        self.effort = self.backend.effort(self.registry)  # fits the IDs on the whole catalogue, once
        batches = self.effort.make_batch
        assert isinstance(batches, TigerBatches)
        self.ids = batches.tiger.ids
        say(f"semantic IDs for {len(self.ids.ids):,} items, collision rate {self.ids.collision_rate:.3f}")

    def settings(self, seed: int) -> Settings:
        """TIGER's defaults; the state directory (where the effort model is kept) is this run's scratch."""
        return load_config(overrides={"trainer.backend": "tiger", "trainer.base_model": self.p.base_model,
                                      "trainer.seed": seed, "checkpoint.state_dir": str(self.scratch)})

    def effort_scorer(self) -> EffortScorer:
        return self.effort

    def fresh(self, seed: int) -> TigerModel:
        tc = self.settings(seed).trainer.tiger
        return TigerModel.build(self.ids, d_model=tc.d_model, layers=tc.layers, heads=tc.heads, history=tc.history,
                                dropout=tc.dropout, seed=seed)

    def base_model(self) -> Any:
        return self.fresh(0)

    def train_arm(self, samples: list[Sample], seed: int, label: str) -> tuple[Any, dict[str, Any]]:
        model = self.fresh(seed)
        result = TigerRefreshModel(model, None, self.settings(seed), self.data.catalog).train(
            samples, [], lambda line: say(f"{label}: {line}"))
        return model, {"train_s": result.seconds, "train_loss": result.train_losses, "steps": result.steps}

    def evaluate(self, model: Any, label: str) -> dict[str, Any]:
        """Each candidate's ID log-likelihood given the user's history (kept), and the per-user metrics."""
        d, started = self.data, time.perf_counter()
        logliks = np.zeros((len(d.users), len(d.candidates[0])))
        for u, (history, candidates) in enumerate(zip(d.histories, d.candidates, strict=True)):
            logliks[u] = model.candidate_logliks(history, candidates)
            if (u + 1) % 250 == 0 or u + 1 == len(d.users):
                say(f"{label}: evaluated {u + 1:,}/{len(d.users):,} users ({(u + 1) / (time.perf_counter() - started):.1f}/s)")
        nll = -logliks[:, 0] / model.width  # the target ID's mean token NLL
        per_user = candidate_metrics(logliks, nll)
        return {"logliks": np.round(logliks, 4).tolist(), "target_nll": np.round(nll, 6).tolist(),
                "per_user": {m: np.round(v, 6).tolist() for m, v in per_user.items()}}


# ---------------------------------------------------------------------- statistics


def hierarchical_bootstrap(diffs: Sequence[np.ndarray], rounds: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean of per-user differences, resampling seeds and then users within each seed; 95% interval."""
    rng = np.random.default_rng(seed)
    means = np.empty(rounds)
    for r in range(rounds):
        picked = rng.integers(0, len(diffs), len(diffs))
        means[r] = np.mean([diffs[k][rng.integers(0, len(diffs[k]), len(diffs[k]))].mean() for k in picked])
    point = float(np.mean([d.mean() for d in diffs]))
    low, high = (float(x) for x in np.percentile(means, [2.5, 97.5]))
    return {"diff": point, "ci95": [low, high], "per_seed": [float(d.mean()) for d in diffs],
            "significant": bool(low > 0 or high < 0)}


def compare(records: dict[str, dict[int, dict[str, Any]]], a: str, b: str) -> dict[str, Any]:
    """a − b on every metric; seeds paired where both arms have them, else every seed of the seeded arm
    against the unseeded (or single-seed) one."""
    sa, sb = records[a], records[b]
    shared = sorted(set(sa) & set(sb))
    pairs = [(sa[s], sb[s]) for s in shared] if len(shared) > 1 or (len(sa) == 1 and len(sb) == 1) else \
        [(ra, rb) for ra in sa.values() for rb in sb.values()]
    out: dict[str, Any] = {"a": a, "b": b, "seeds": [[ra["seed"], rb["seed"]] for ra, rb in pairs]}
    for m in CANDIDATE_METRICS:
        out[m] = hierarchical_bootstrap([np.asarray(ra["per_user"][m]) - np.asarray(rb["per_user"][m])
                                         for ra, rb in pairs])
    out["ci95"] = out[PRIMARY]["ci95"]
    return out


def summarise(records: dict[str, dict[int, dict[str, Any]]], meta: dict[str, Any]) -> dict[str, Any]:
    arms = {arm: {"seeds": sorted(runs), "per_seed": {str(s): r["mean"] for s, r in sorted(runs.items())},
                  "mean": {m: float(np.mean([r["mean"][m] for r in runs.values()])) for m in CANDIDATE_METRICS},
                  "mean_by_rule": {rule: {m: float(np.mean([r["mean_by_rule"][rule][m] for r in runs.values()]))
                                          for m in CANDIDATE_METRICS} for rule in CANDIDATE_SCORES}
                  if all("mean_by_rule" in r for r in runs.values()) else None,
                  "train_s": [r.get("train_s") for r in runs.values()], "eval_s": [r.get("eval_s") for r in runs.values()]}
            for arm, runs in records.items()}
    comparisons = {f"{a} - random": compare(records, a, "random") for a in records if a != "random" and "random" in records}
    if "streaming" in records and "dealrec" in records:
        comparisons["streaming - dealrec"] = compare(records, "streaming", "dealrec")

    def beats(a: str) -> bool | None:
        c = comparisons.get(f"{a} - random")
        return None if c is None else bool(c[PRIMARY]["ci95"][1] < 0)  # (a − random) entirely below 0

    control = comparisons.get("random4x - random")
    gates = {"random beats base": beats("base"), "random beats popularity": beats("popularity"),
             "positive control beats random": None if control is None else bool(control[PRIMARY]["ci95"][0] > 0)}
    complete = all(v is not None for v in gates.values())
    measurable = complete and all(gates.values())
    return {"arms": arms, "comparisons": comparisons,
            "gates": {**gates, "complete": complete, "measurable": measurable}, **meta}


def markdown(summary: dict[str, Any]) -> str:
    gates = summary["gates"]
    tiger = summary["protocol"].get("backend") == "tiger"
    if tiger:
        t = summary["tiger"]
        training = (f"a fresh T5 per arm, {t['epochs']} epochs (d_model {t['d_model']}, {t['layers']} layers; IDs "
                    f"{t['levels']} × {t['codes']} codes on {summary['base_model']} title embeddings)")
    else:
        training = f"{summary['epochs']} epochs"
    lines = [f"# Quality on {summary['dataset']} (--cpu protocol{', TIGER arms' if tiger else ''})", "",
             f"{summary['date']}, commit {summary['commit']}, {summary['cores']} cores, {summary['base_model']}; "
             f"pool {summary['pool']:,}, budget {summary['budget']}, {training}, "
             f"{summary['users']:,} test users × {summary['candidates']} candidates. Primary metric: {PRIMARY} "
             "(share of the 19 negatives the target outranks; 0.5 = chance), candidates scored by "
             f"{summary['protocol']['score']}.", ""]
    if not gates["complete"]:
        lines += ["**Incomplete run**: arms still missing; gates not evaluated.", ""]
    elif not gates["measurable"]:
        lines += ["**Not measurable at this scale**: a gate failed (below), so no method is ranked.", ""]
    lines += ["| arm | seeds | " + " | ".join(CANDIDATE_METRICS) + " |",
              "| --- | --- | " + " | ".join("---" for _ in CANDIDATE_METRICS) + " |"]
    for arm, row in summary["arms"].items():
        lines.append(f"| {arm} | {len(row['seeds'])} | " + " | ".join(f"{row['mean'][m]:.4f}" for m in CANDIDATE_METRICS)
                     + " |")
    scored = [arm for arm, row in summary["arms"].items() if row.get("mean_by_rule")]
    if scored:
        lines += ["", f"{PRIMARY} under each candidate score rule (mean over seeds; the primary rule is "
                  f"{summary['protocol']['score']}):", "", "| arm | " + " | ".join(CANDIDATE_SCORES) + " |",
                  "| --- | " + " | ".join("---" for _ in CANDIDATE_SCORES) + " |"]
        lines += [f"| {arm} | " + " | ".join(f"{summary['arms'][arm]['mean_by_rule'][rule][PRIMARY]:.4f}"
                                            for rule in CANDIDATE_SCORES) + " |" for arm in scored]
    if "length_confound" in summary:
        lc = summary["length_confound"]
        lines += ["", f"Title length: targets {lc['target_tokens']:.1f} tokens, popularity-drawn negatives "
                  f"{lc['popular_negative_tokens']:.1f}, uniform negatives {lc['uniform_negative_tokens']:.1f}; "
                  f"\"the shorter title wins\" scores {lc['shorter_title_wins_rank_percentile']:.4f}."]
    lines += ["", f"Differences in {PRIMARY} (hierarchical bootstrap over seeds and users, 95% interval; "
              "per-seed differences listed):", "", "| comparison | difference | 95% interval | per seed | significant |",
              "| --- | --- | --- | --- | --- |"]
    for name, c in summary["comparisons"].items():
        p = c[PRIMARY]
        verdict = ("yes" if p["significant"] else "no") if gates["measurable"] else "not measurable at this scale"
        lines.append(f"| {name} | {p['diff']:+.4f} | [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}] | "
                     + ", ".join(f"{x:+.4f}" for x in p["per_seed"]) + f" | {verdict} |")
    lines += ["", "Gates: " + "; ".join(f"{k}: {v}" for k, v in gates.items()), ""]
    return "\n".join(lines)


def chart(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = list(summary["comparisons"].items())
    if not comps:
        return
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(comps) + 1.5))
    for y, (_name, c) in enumerate(comps):
        p = c[PRIMARY]
        ax.errorbar(p["diff"], y, xerr=[[p["diff"] - p["ci95"][0]], [p["ci95"][1] - p["diff"]]], fmt="o", capsize=3)
        ax.scatter(p["per_seed"], [y] * len(p["per_seed"]), s=8, color="grey")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(comps)), [n for n, _ in comps])
    ax.set_xlabel(f"difference in {PRIMARY} (95% interval; grey: seeds)")
    ax.set_title(f"{summary['dataset']}, {summary['base_model']}, budget {summary['budget']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_cpu(args: argparse.Namespace, path: Path) -> None:
    started = time.perf_counter()
    protocol = Protocol(dataset=path.name, data_digest=digest(*(file_digest(path / f) for f in
                                                                 ("train.txt", "valid.txt", "test.txt", "items.tsv"))),
                        users=args.users, budget=args.budget, epochs=args.epochs, learning_rate=args.lr,
                        prompt_history=args.history, pool=args.pool, surrogate_epochs=args.surrogate_epochs,
                        train_on_inputs=not args.response_only, surrogate=args.surrogate, backend=args.backend,
                        score="id_loglik" if args.backend == "tiger" else "pmi")
    tag = "-".join(t for t in (args.backend if args.backend != "bigrec" else "", args.tag) if t)
    name = f"quality-{path.name}-cpu{'-' + tag if tag else ''}"
    say(f"protocol {protocol.key()}: {asdict(protocol)}")
    data = Data(path, protocol)
    bench = (TigerBench if args.backend == "tiger" else CpuBench)(data, protocol, RESULTS / name)
    say(f"{len(data.samples):,} training samples, pool {len(data.pool):,}, {len(data.users):,} test users")
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ALL_ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; known: {', '.join(ALL_ARMS)}")
    plan = [(a, 0) for a in arms if a in ("popularity", "base")]  # need no pool scores: they run first
    for seed in range(args.seeds):  # seed by seed in TRAINED_ARMS order, so the gates come early
        plan += [(a, seed) for a in TRAINED_ARMS if a in arms and (a not in SINGLE_SEED or seed == 0)]
    records: dict[str, dict[int, dict[str, Any]]] = {}
    stop = bench.out / "STOP"
    for arm, seed in plan:
        if stop.exists() and not (bench.out / f"{arm}-s{seed}.json").exists():
            stop.unlink()
            say(f"{stop} found: stopping before {arm} seed {seed}; run the same command again to resume")
            break
        if arm in TRAINED_ARMS and not bench.scores:
            bench.score_pool()
        records.setdefault(arm, {})[seed] = bench.run_arm(arm, seed)
        write_summary(records, protocol, bench, name, started, data)
    say(f"summary: {RESULTS / name}.json")


def length_confound(data: Data, builder: PromptBuilder,
                    records: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """How much of each rule's ranking is title length: the candidates' token counts, the rank percentile of
    "the shorter title wins", and its per-user correlation with each evaluated arm's rank percentile."""
    lengths = np.array([[builder.response_length(c) for c in cands] for cands in data.candidates], dtype=np.float64)
    shorter = candidate_metrics(-lengths)["rank_percentile"]
    popular = 1 + lengths.shape[1] // 2  # NegativeSampler: target, then the popularity-drawn negatives
    out: dict[str, Any] = {"target_tokens": float(lengths[:, 0].mean()),
                           "popular_negative_tokens": float(lengths[:, 1:popular].mean()),
                           "uniform_negative_tokens": float(lengths[:, popular:].mean()),
                           "shorter_title_wins_rank_percentile": float(shorter.mean()), "correlation": {}}
    for arm, runs in records.items():
        for seed, r in sorted(runs.items()):
            if "logliks" in r:
                for rule in CANDIDATE_SCORES:
                    ranks = candidate_metrics(candidate_scores(np.array(r["logliks"]), np.array(r["priors"]),
                                                               rule))["rank_percentile"]
                    out["correlation"][f"{arm}-s{seed} {rule}"] = float(np.corrcoef(ranks, shorter)[0, 1])
    return out


def write_summary(records: dict[str, dict[int, dict[str, Any]]], protocol: Protocol, bench: CpuBench, name: str,
                  started: float, data: Data) -> None:
    arm_seconds = sum(r.get("seconds", 0.0) for runs in records.values() for r in runs.values())
    meta = {"dataset": protocol.dataset, "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
            "cores": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "protocol": asdict(protocol), "protocol_key": protocol.key(),
            "base_model": protocol.base_model, "pool": len(data.pool), "budget": protocol.budget,
            "epochs": protocol.epochs, "users": len(data.users), "candidates": protocol.candidates,
            "scoring_timings_s": bench.timings, "wall_s": arm_seconds,
            "this_invocation_s": time.perf_counter() - started,
            "command": " ".join(["python", "bench/quality.py", *sys.argv[1:]])}
    if isinstance(bench, TigerBench):
        meta["tiger"] = bench.settings(0).trainer.tiger.model_dump()
    summary = summarise(records, meta)
    if protocol.backend == "bigrec":  # TIGER's candidates are ID tuples of one length: titles play no part
        summary["length_confound"] = length_confound(data, bench.builder, records)
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(summary))
    chart(summary, RESULTS / f"{name}.png")


def run_full(args: argparse.Namespace, path: Path) -> None:
    """Budget 1,024 from every training sample, generation + base-model grounding, Recall/NDCG@10/20 over the
    full catalogue, and the full-data reference; on ``trainer.device`` (CUDA when present)."""
    started = time.perf_counter()
    protocol = Protocol(dataset=path.name, data_digest=digest(*(file_digest(path / f) for f in
                                                                 ("train.txt", "valid.txt", "test.txt", "items.tsv"))),
                        users=args.test_users or 10**9, budget=args.budget, epochs=args.epochs, learning_rate=args.lr,
                        prompt_history=None, pool=10**9, surrogate_epochs=args.surrogate_epochs)
    name = f"quality-{path.name}-full{'-' + args.tag if args.tag else ''}"
    data = Data(path, protocol)
    bench = CpuBench(data, protocol, RESULTS / name)
    say(f"--full on {bench.llm.device}: {len(data.pool):,} candidates, {len(data.users):,} test users")
    bench.score_pool()
    users = sample_test_users(data.test, args.test_users, seed=0)
    results: dict[str, list[dict[str, float]]] = {}
    plan = [("base", 0), *((a, s) for s in range(args.seeds) for a in ("random", "dealrec", "streaming")), ("full", 0)]
    for arm, seed in plan:
        model, llm = bench.llm.model, bench.llm
        if arm != "base":
            chosen = list(range(len(data.pool))) if arm == "full" else bench.select(arm, seed)
            llm = bench.load()
            model = add_lora(llm.model, bench.t.lora_r, bench.t.lora_alpha, bench.t.lora_dropout,
                             bench.t.target_modules, seed)
            train_lora(model, bench.make_builder(llm), [data.pool[i] for i in chosen], [],
                       bench.t.model_copy(update={"seed": seed}), llm.autocast_dtype, progress=say)
        rec = Recommender(llm, model, data.catalog, bench.make_builder(llm), bench.t.cache_dir / "titles",
                          bench.t.max_new_tokens, bench.t.num_beams)
        results.setdefault(arm, []).append(evaluate_dealrec(rec.recommend, data.train,
                                                            data.valid, data.test, users))
        say(f"{arm} seed {seed}: {results[arm][-1]}")
        (RESULTS / f"{name}.json").write_text(json.dumps({
            "results": results, "protocol": asdict(protocol), "device": str(llm.device), "users": len(users),
            "scoring_timings_s": bench.timings, "wall_s": time.perf_counter() - started}, indent=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--cpu", action="store_const", dest="mode", const="cpu")
    which.add_argument("--full", action="store_const", dest="mode", const="full")
    ap.add_argument("--dataset", default="games", help="games, or any directory in the DEALRec format "
                    "(train/valid/test.txt + items.tsv)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--arms", default=",".join(ALL_ARMS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--users", type=int, default=1000, help="--cpu: seeded test users")
    ap.add_argument("--test-users", type=int, help="--full: a seeded sample of test users (default: all)")
    ap.add_argument("--pool", type=int, default=4096)
    ap.add_argument("--budget", type=int, help="default: 256 (--cpu), 1,024 (--full)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--history", type=int, default=5, help="--cpu: most recent history items in a prompt")
    ap.add_argument("--surrogate-epochs", type=int, default=10)
    ap.add_argument("--surrogate", default="sasrec", choices=sorted(SURROGATES),
                    help="--cpu: the surrogate the pool is scored on (tag the run, e.g. --tag gru4rec)")
    ap.add_argument("--backend", default="bigrec", choices=("bigrec", "tiger"),
                    help="--cpu: what the arms train: LoRA adapters on the LLM (BIGRec) or TIGER's T5 (results in "
                         "quality-DATASET-cpu-tiger*)")
    ap.add_argument("--response-only", action="store_true",
                    help="--cpu diagnostic: train on the response's loss only (the protocol trains on prompt + "
                         "response; the cached effort scores stay prompt + response)")
    ap.add_argument("--tag", default="", help="suffix of the result files (a reduced slice)")
    args = ap.parse_args(argv)
    path = resolve_dataset(args.dataset, args.data_dir)
    if not (path / "train.txt").is_file():
        sys.exit(f"no DEALRec-format dataset at {path} (train.txt missing; ../shared/data absent?)")
    args.budget = args.budget or (256 if args.mode == "cpu" else 1024)
    torch.manual_seed(0)
    (run_cpu if args.mode == "cpu" else run_full)(args, path)


if __name__ == "__main__":
    main()
