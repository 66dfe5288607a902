"""Evaluation metrics: top-K over the full catalogue (as the DEALRec evaluation code computes them) and
candidate-likelihood metrics (the target among sampled negatives, ranked by the model's likelihood).

Full catalogue: a user may have several target items (the test period's interactions). Recall@K = hits in
the top K / number of targets; NDCG@K = DCG of the hits / ideal DCG over min(number of targets, K).

Candidates: each user's target and C − 1 negatives (half by popularity, half uniform over the catalogue,
never an item of the user's history or targets), fixed by a seed so every model sees the same ones. A
model scores each candidate; the target's rank r counts the negatives scored higher plus ties (a model
that cannot tell them apart gets no credit). HR@K = [r < K], NDCG@K = 1/log2(r + 2) when r < K, and the
rank percentile = the share of negatives the target beats (ties half): 1 is perfect, 0.5 is chance.

A candidate's score is its title's log-likelihood given the prompt (``loglik``) or that minus the title's
likelihood given the same prompt with an empty history (``pmi``, the default: what the history adds).
Title length confounds both when the negatives are drawn without regard to it: on Games, test targets
have longer titles than the sampled negatives (18.7 tokens against 13.2 and 14.1), "the shorter title
wins" alone scores a rank percentile of 0.36, and per user it correlates +0.78 with the base model's
``loglik`` ranking and -0.31 with its ``pmi`` ranking (``length_confound`` in
``bench/results/quality-games-cpu-v2.json``). Given a title length, the sampler draws negatives within
one token of the target's, which leaves nothing to win by length.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from recsift.stream.catalog import Catalog
from recsift.stream.windows import Sample


def recall_ndcg(ranked: Sequence[Sequence[str]], targets: Sequence[Sequence[str]],
                ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """Mean Recall@K and NDCG@K over users with at least one target."""
    if len(ranked) != len(targets):
        raise ValueError("one ranking per user is needed")
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    users = 0
    for items, wanted in zip(ranked, targets, strict=True):
        truth = set(wanted)
        if not truth:
            continue
        users += 1
        for k in ks:
            top = list(items[:k])
            hits = [i for i, item in enumerate(top) if item in truth]
            sums[f"recall@{k}"] += len(hits) / len(truth)
            dcg = sum(1.0 / math.log2(i + 2) for i in hits)
            idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(truth), k)))
            sums[f"ndcg@{k}"] += dcg / idcg
    if users == 0:
        raise ValueError("no user has a target item")
    return {name: total / users for name, total in sums.items()}


def sample_test_users(test: dict[str, list[str]], n: int | None, seed: int) -> list[str]:
    """A fixed, seeded sample of users that have test items (all of them when ``n`` is None)."""
    import random

    users = sorted((u for u, items in test.items() if items), key=lambda u: (len(u), u))
    if n is not None and n < len(users):
        users = sorted(random.Random(seed).sample(users, n), key=lambda u: (len(u), u))
    return users


def evaluate_dealrec(recommend: Callable[[Sequence[str], int], list[str]], train: dict[str, list[str]],
                     valid: dict[str, list[str]], test: dict[str, list[str]], users: Sequence[str],
                     ks: Sequence[int] = (10, 20), progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Recall/NDCG@K on the test period: history = train + valid items, targets = the user's test items."""
    ranked, targets = [], []
    for i, u in enumerate(users):
        history = train.get(u, []) + valid.get(u, [])
        ranked.append(recommend(history, max(ks)) if history else [])
        targets.append(test[u])
        if progress is not None:
            progress(i + 1)
    return recall_ndcg(ranked, targets, ks)


CANDIDATE_SCORES = ("pmi", "loglik")


def candidate_scores(logliks: np.ndarray, priors: np.ndarray | None, rule: str) -> np.ndarray:
    """Candidate scores under ``rule``: ``loglik`` = log p(title | prompt); ``pmi`` = that minus
    log p(title | prompt with an empty history) (``priors``, same shape)."""
    if rule == "loglik":
        return np.asarray(logliks, dtype=np.float64)
    if rule == "pmi":
        if priors is None or np.shape(priors) != np.shape(logliks):
            raise ValueError("the pmi rule needs one prior per log-likelihood")
        return np.asarray(logliks, dtype=np.float64) - np.asarray(priors, dtype=np.float64)
    raise ValueError(f"unknown candidate score rule {rule!r}; one of {CANDIDATE_SCORES}")


CANDIDATE_METRICS = ("rank_percentile", "hr@1", "hr@5", "ndcg@5", "ndcg@10", "target_nll")


def candidate_metrics(scores: np.ndarray, target_nll: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-user candidate metrics from scores [users, C] whose column 0 is the target (higher = better)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError("scores must be [users, candidates] with the target and at least one negative")
    target, negatives = scores[:, :1], scores[:, 1:]
    higher, ties = (negatives > target).sum(1), (negatives == target).sum(1)
    rank = higher + ties
    out = {"rank_percentile": 1.0 - (higher + 0.5 * ties) / negatives.shape[1]}
    for k in (1, 5):
        out[f"hr@{k}"] = (rank < k).astype(np.float64)
    for k in (5, 10):
        out[f"ndcg@{k}"] = np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)
    out["target_nll"] = np.full(len(scores), np.nan) if target_nll is None else np.asarray(target_nll, np.float64)
    return out


class NegativeSampler:
    """Seeded negatives for candidate evaluation: ``popular`` drawn by popularity, the rest uniform."""

    def __init__(self, items: Sequence[str], popularity: dict[str, float], seed: int = 0,
                 length: Callable[[str], int] | None = None, tolerance: int = 1) -> None:
        """``length`` (a title's token count): draw negatives whose length is within ``tolerance`` of the
        target's (widened until at least 4x the candidates qualify), so no score can win by title length."""
        if len(items) < 2:
            raise ValueError("negative sampling needs a catalogue of at least two items")
        self.items = list(items)
        self.popularity = popularity
        self.seed, self.length, self.tolerance = seed, length, tolerance
        self.everything = self.split(self.items)
        self.by_length: dict[int, list[str]] = {}
        if length is not None:
            for item in self.items:
                self.by_length.setdefault(length(item), []).append(item)

    def pools(self, target: str, size: int) -> tuple[list[str], list[str], list[float]]:
        """The items negatives are drawn from: all, or those of about the target's length; the popular ones
        among them and their weights."""
        if self.length is None:
            return self.everything
        wanted, width = self.length(target), self.tolerance
        while True:
            items = [i for n in range(wanted - width, wanted + width + 1) for i in self.by_length.get(n, ())]
            if len(items) >= 4 * size or len(items) == len(self.items):
                return self.split(items)
            width += 1

    def split(self, items: list[str]) -> tuple[list[str], list[str], list[float]]:
        popular = [i for i in items if self.popularity.get(i, 0) > 0]
        return items, popular, [float(self.popularity[i]) for i in popular]

    def candidates(self, key: str, exclude: set[str], target: str, size: int = 20) -> list[str]:
        """``[target, negatives...]``: size // 2 by popularity, the rest uniform, all distinct and
        outside ``exclude``; the same ``key`` (a user) always gets the same negatives."""
        rng = random.Random(f"{self.seed}:{key}")
        n_pop = size // 2
        chosen: list[str] = []
        taken = set(exclude) | {target}
        limit = len(self.items) - len(taken & set(self.items))
        if size - 1 > limit:
            raise ValueError(f"only {limit} items can be negatives; {size - 1} were asked for")
        items, popular, weights = self.pools(target, size)
        for pool, w, wanted in ((popular, weights, n_pop), (items, None, size - 1)):
            tries = 0
            while len(chosen) < wanted and pool and tries < 50 * size:
                tries += 1
                item = rng.choices(pool, w)[0] if w else pool[rng.randrange(len(pool))]
                if item not in taken:
                    taken.add(item)
                    chosen.append(item)
        while len(chosen) < size - 1:  # a tiny catalogue: take what is left in order
            item = next(i for i in self.items if i not in taken)
            taken.add(item)
            chosen.append(item)
        return [target, *chosen]


def negative_sampler(validation: Sequence[Sample], train: Sequence[Sample], catalog: Catalog, seed: int,
                     length: Callable[[str], int] | None = None) -> NegativeSampler:
    """Negatives for the validation samples: by popularity in the training and validation samples and uniform
    over the catalogue (or over the items seen, when there is no catalogue)."""
    popularity: Counter[str] = Counter()
    for s in (*train, *validation):
        popularity.update(s.history)
        popularity[s.target] += 1
    items = [it.item_id for it in catalog] if len(catalog) else sorted(popularity)
    return NegativeSampler(items, dict(popularity), seed, length=length)
