"""Batch pruning on a DEALRec dataset: train the surrogate, score every training sample, write the scores.

A training sample is a user's training sequence (history → last item), as in the DEALRec paper. Users
whose sequence has a single item cannot form an input; they are excluded and counted in the report,
never given a silent score. Selection of the budget joins once the selection stage exists; until then
the output is the scores, which the selection stage reads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from recsift.data.datasets import catalog_for, read_dealrec_split
from recsift.scoring.scorer import DEALRecScorer, make_scorer
from recsift.scoring.surrogate import Surrogate

METHOD_SCORERS = {"dealrec": "dealrec", "random": "random", "grand": "grand", "el2n": "el2n", "ccs": "el2n", "loss": "loss"}


@dataclass
class PruneReport:
    dataset: str
    method: str
    scorer: str
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

    @property
    def rate(self) -> float:
        return self.scored / self.score_seconds if self.score_seconds else 0.0


def prune(data_dir: Path, method: str, budget: int, out_dir: Path, epochs: int = 10, seed: int = 0,
          reference_size: int = 4096, lissa_depth: int = 500, hidden: int = 64,
          progress: Callable[[str], None] = print) -> PruneReport:
    """Run the pipeline and write ``scores.jsonl`` (user, sample id, score) and ``report.json`` into ``out_dir``."""
    if method not in METHOD_SCORERS:
        raise ValueError(f"unknown method {method!r}; one of {sorted(METHOD_SCORERS)}")
    train = read_dealrec_split(data_dir, "train")
    catalog = catalog_for(data_dir)
    n_items = len(catalog) if catalog is not None else len({i for v in train.values() for i in v})
    users = list(train)
    surrogate = Surrogate(n_items, hidden=hidden, seed=seed)
    enc = surrogate.encode([train[u][:-1] for u in users], [train[u][-1] for u in users], range(len(users)))
    scorer_name = METHOD_SCORERS[method]
    report = PruneReport(str(data_dir), method, scorer_name, budget, len(users), len(enc.batch), enc.too_short, epochs)
    progress(f"{len(users):,} users, {len(enc.batch):,} training sequences, {enc.too_short:,} excluded (one item)")

    def on_epoch(epoch: int, loss: float, seconds: float) -> None:
        report.epoch_seconds.append(seconds)
        report.final_loss = loss
        progress(f"surrogate epoch {epoch + 1}/{epochs}: loss {loss:.4f} ({seconds:.1f} s)")

    surrogate.fit(enc.batch, epochs, 128, progress=on_epoch)
    config: dict[str, object] = {"seed": seed}
    if scorer_name == "dealrec":
        config["depth"] = lissa_depth
    scorer = make_scorer(scorer_name, **config)
    g = torch.Generator().manual_seed(seed)
    reference = enc.batch.select(torch.randperm(len(enc.batch), generator=g)[:reference_size])
    started = time.perf_counter()
    scorer.prepare(surrogate, reference)
    report.prepare_seconds = time.perf_counter() - started
    if isinstance(scorer, DEALRecScorer):
        progress(f"LiSSA H⁻¹v ({lissa_depth} steps): {report.prepare_seconds:.1f} s")
    started = time.perf_counter()
    scores = scorer.score(surrogate, enc.batch)
    report.score_seconds = time.perf_counter() - started
    report.score_version = scores.version
    progress(f"scored {len(enc.batch):,} samples in {report.score_seconds:.1f} s ({report.rate:,.0f}/s)")

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "scores.jsonl"
    with path.open("w") as fh:
        for row, value in zip(enc.kept.tolist(), scores.values.tolist(), strict=True):
            fh.write(json.dumps({"user_id": users[row], "sample_id": row, "score": value}) + "\n")
    report.scores_path = str(path)
    (out_dir / "report.json").write_text(json.dumps({**asdict(report), "rate": report.rate}, indent=2))
    return report
