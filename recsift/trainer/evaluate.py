"""Top-K metrics over the full catalogue, as the DEALRec evaluation code computes them.

A user may have several target items (the test period's interactions). Recall@K = hits in the top K /
number of targets; NDCG@K = DCG of the hits / ideal DCG over min(number of targets, K) positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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
