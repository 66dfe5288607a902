"""Batch pruning on a DEALRec dataset: train the surrogate, score every training sample, select the budget.

A training sample is a user's training sequence (history → last item), as in the DEALRec paper. Users
whose sequence has a single item cannot form an input; they are excluded and counted in the report,
never given a silent score. Selection: DEALRec's coverage-enhanced sampling for ``dealrec`` (and for
``ccs``, over EL2N), top-k hardest for GraNd/EL2N/loss (as those baselines are used in the paper),
uniform for ``random``. The effort term (λ > 0) needs an effort function over the samples.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from recsift.data.datasets import catalog_for, read_dealrec_split
from recsift.scoring.dealrec import DEALRecScorer
from recsift.scoring.registry import make_scorer, make_surrogate
from recsift.scoring.scorer import combine
from recsift.scoring.stage import EffortFn
from recsift.selection.stratified import dealrec_select, random_select, topk_select
from recsift.stream.windows import Sample


class Method(NamedTuple):
    """A method of the DEALRec paper's comparison: a score and the rule that selects by it."""

    scorer: str  # a registered scorer type
    rule: Literal["strata", "uniform", "top"]  # coverage-enhanced sampling, uniform, the highest scores


METHODS = {"dealrec": Method("dealrec", "strata"), "ccs": Method("el2n", "strata"), "random": Method("random", "uniform"),
           "grand": Method("grand", "top"), "el2n": Method("el2n", "top"), "loss": Method("loss", "top")}


def influence_scores(data_dir: Path, epochs: int = 1, depth: int = 100, reference_size: int = 1024,
                     seed: int = 0) -> np.ndarray:
    """DEALRec influence of every training sample of a DEALRec dataset (file order; one-item users excluded)
    on a SASRec surrogate trained for ``epochs``: the score stream the fidelity checks replay."""
    train = read_dealrec_split(data_dir, "train")
    catalog = catalog_for(data_dir)
    n_items = len(catalog) if catalog is not None else len({i for v in train.values() for i in v})
    users = list(train)
    surrogate = make_surrogate("sasrec", n_items, seed=seed)
    enc = surrogate.encode([train[u][:-1] for u in users], [train[u][-1] for u in users], range(len(users)))
    surrogate.fit(enc.batch, epochs, 128)
    scorer = make_scorer({"type": "dealrec", "depth": depth}, seed=seed)
    g = torch.Generator().manual_seed(seed)
    scorer.prepare(surrogate, enc.batch.select(torch.randperm(len(enc.batch), generator=g)[:reference_size]))
    return scorer.score(surrogate, enc.batch).values.numpy()


@dataclass
class PruneReport:
    dataset: str
    method: str
    scorer: str
    surrogate: str
    budget: int
    users: int
    scored: int
    too_short: int
    epochs: int
    epoch_seconds: list[float] = field(default_factory=list)
    final_loss: float = 0.0
    prepare_seconds: float = 0.0
    score_seconds: float = 0.0
    score_version: int = 0
    scores_path: str = ""
    selected: int = 0
    selected_path: str = ""

    @property
    def rate(self) -> float:
        return self.scored / self.score_seconds if self.score_seconds else 0.0


def prune(data_dir: Path, method: str, budget: int, out_dir: Path, epochs: int = 10, seed: int = 0,
          reference_size: int = 4096, scorer_options: Mapping[str, Any] | None = None, surrogate: str = "sasrec",
          surrogate_options: Mapping[str, Any] | None = None, strata: int = 50,
          hard_prune: float = 0.1, effort_weight: float = 0.0, effort: EffortFn | None = None,
          progress: Callable[[str], None] = print) -> PruneReport:
    """Run the pipeline; write ``scores.jsonl`` (every sample), ``selected.jsonl`` (the budget) and ``report.json``.
    ``scorer_options`` are the options of the method's scorer (e.g. ``{"depth": 500}`` for DEALRec)."""
    if effort_weight > 0 and effort is None:
        raise ValueError("effort_weight > 0 needs an effort function (the LLM's gradient norm)")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {sorted(METHODS)}")
    train = read_dealrec_split(data_dir, "train")
    catalog = catalog_for(data_dir)
    n_items = len(catalog) if catalog is not None else len({i for v in train.values() for i in v})
    users = list(train)
    model = make_surrogate(surrogate, n_items, **(surrogate_options or {}), seed=seed)
    enc = model.encode([train[u][:-1] for u in users], [train[u][-1] for u in users], range(len(users)))
    scorer_name, rule = METHODS[method]
    report = PruneReport(str(data_dir), method, scorer_name, surrogate, budget, len(users), len(enc.batch), enc.too_short, epochs)
    progress(f"{len(users):,} users, {len(enc.batch):,} training sequences, {enc.too_short:,} excluded (one item)")

    def on_epoch(epoch: int, loss: float, seconds: float) -> None:
        report.epoch_seconds.append(seconds)
        report.final_loss = loss
        progress(f"surrogate epoch {epoch + 1}/{epochs}: loss {loss:.4f} ({seconds:.1f} s)")

    model.fit(enc.batch, epochs, 128, progress=on_epoch)
    scorer = make_scorer({**(scorer_options or {}), "type": scorer_name}, seed=seed)
    g = torch.Generator().manual_seed(seed)
    reference = enc.batch.select(torch.randperm(len(enc.batch), generator=g)[:reference_size])
    started = time.perf_counter()
    scorer.prepare(model, reference)
    report.prepare_seconds = time.perf_counter() - started
    if isinstance(scorer, DEALRecScorer):
        progress(f"LiSSA H⁻¹v ({scorer.depth} steps): {report.prepare_seconds:.1f} s")
    started = time.perf_counter()
    scores = scorer.score(model, enc.batch)
    report.score_seconds = time.perf_counter() - started
    report.score_version = scores.version
    progress(f"scored {len(enc.batch):,} samples in {report.score_seconds:.1f} s ({report.rate:,.0f}/s)")

    kept = enc.kept.tolist()
    overall = scores.values
    if effort_weight > 0 and effort is not None and scorer_name == "dealrec":
        samples = [Sample(row, users[row], tuple(train[users[row]][:-1]), train[users[row]][-1], 0.0) for row in kept]
        progress(f"effort on {len(samples):,} samples (LLM gradient norms) ...")
        overall = combine(scores.values, effort(samples), effort_weight)
    values = overall.numpy()
    ids = np.asarray(kept, dtype=np.int64)
    if rule == "strata":
        selection = dealrec_select(ids, values, budget, strata, hard_prune, seed)
    elif rule == "uniform":
        selection = random_select(ids, budget, seed)
    else:
        selection = topk_select(ids, values, budget)
    report.selected = len(selection)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "scores.jsonl"
    with path.open("w") as fh:
        for row, raw, value in zip(kept, scores.values.tolist(), values.tolist(), strict=True):
            fh.write(json.dumps({"user_id": users[row], "sample_id": row, "raw": raw, "score": value}) + "\n")
    report.scores_path = str(path)
    chosen = out_dir / "selected.jsonl"
    with chosen.open("w") as fh:
        for sid, value, stratum in zip(selection.ids.tolist(), selection.scores.tolist(), selection.strata.tolist(),
                                       strict=True):
            fh.write(json.dumps({"user_id": users[sid], "sample_id": sid, "score": value, "stratum": stratum}) + "\n")
    report.selected_path = str(chosen)
    progress(f"selected {len(selection):,} of {len(kept):,} samples ({method})")
    (out_dir / "report.json").write_text(json.dumps({**asdict(report), "rate": report.rate}, indent=2))
    return report
