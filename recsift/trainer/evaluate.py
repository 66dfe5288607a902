"""Top-K metrics over the full catalogue, as the DEALRec evaluation code computes them.

A user may have several target items (the test period's interactions). Recall@K = hits in the top K /
number of targets; NDCG@K = DCG of the hits / ideal DCG over min(number of targets, K) positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


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
