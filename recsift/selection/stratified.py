"""Batch selection: DEALRec's coverage-enhanced sampling, CCS, and top-k for ablation.

DEALRec (Lin et al., SIGIR 2024, §3.3), following CCS (Zheng et al., ICLR 2023): drop the ``hard_prune``
fraction of samples with the highest score, split the remaining score range into K equal-width strata,
then repeatedly take the stratum holding the fewest samples, give it min(its size, ⌊remaining budget /
remaining strata⌋) samples drawn uniformly at random, and remove it. CCS is the same procedure over a
difficulty score (EL2N in the DEALRec paper's comparison): ``recsift prune --method ccs`` is
:func:`dealrec_select` over EL2N; the score decides what it means.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Selection:
    """Selected sample ids with their scores and strata (stratum -1: chosen without strata)."""

    ids: np.ndarray
    scores: np.ndarray
    strata: np.ndarray
    quotas: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)


def check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError("scores must be one-dimensional")
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"score at position {bad} is {scores[bad]}: every score must be finite")
    return scores


def allocate(counts: Sequence[int], budget: int) -> list[int]:
    """The fewest-first rule: quota per stratum, in stratum order."""
    if budget < 0:
        raise ValueError("budget must be non-negative")
    quotas = [0] * len(counts)
    remaining = budget
    left = sorted(range(len(counts)), key=lambda k: (counts[k], k))  # ties: lower stratum first
    for position, k in enumerate(left):
        share = remaining // (len(left) - position)
        quotas[k] = min(int(counts[k]), share)
        remaining -= quotas[k]
    return quotas


def hard_prune_cut(scores: np.ndarray, hard_prune: float) -> float:
    """The score above which samples are dropped: the ``hard_prune`` highest fraction goes."""
    if not 0.0 <= hard_prune < 1.0:
        raise ValueError("hard_prune must be in [0, 1)")
    n_drop = int(len(scores) * hard_prune)
    if n_drop == 0:
        return float(np.inf)
    return float(np.sort(scores)[len(scores) - n_drop - 1])


def stratum_of(scores: np.ndarray, low: float, high: float, k: int) -> np.ndarray:
    """Equal-width stratum index in [0, k) over [low, high]; the top edge belongs to the last stratum."""
    if high <= low:
        return np.zeros(len(scores), dtype=np.int64)
    idx = np.floor((np.asarray(scores) - low) / (high - low) * k).astype(np.int64)
    return np.clip(idx, 0, k - 1)


def dealrec_select(ids: np.ndarray, scores: np.ndarray, budget: int, strata: int = 50, hard_prune: float = 0.1,
                   seed: int = 0) -> Selection:
    """DEALRec's coverage-enhanced sampling of ``budget`` samples."""
    if strata < 1:
        raise ValueError("strata must be positive")
    ids, scores = np.asarray(ids), check_scores(scores)
    if len(ids) != len(scores):
        raise ValueError("ids and scores differ in length")
    keep = np.flatnonzero(scores <= hard_prune_cut(scores, hard_prune))
    if not len(keep):
        return Selection(ids[:0], scores[:0], np.zeros(0, dtype=np.int64), tuple([0] * strata))
    kept = scores[keep]
    stratum = stratum_of(kept, float(kept.min()), float(kept.max()), strata)
    counts = np.bincount(stratum, minlength=strata)
    quotas = allocate(counts.tolist(), budget)
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(keep[stratum == k], size=q, replace=False) for k, q in enumerate(quotas) if q]
    picked = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    strata_of_picked = stratum_of(scores[picked], float(kept.min()), float(kept.max()), strata)
    return Selection(ids[picked], scores[picked], strata_of_picked, tuple(quotas))


def topk_select(ids: np.ndarray, scores: np.ndarray, budget: int, highest: bool = True) -> Selection:
    """Greedy ablation: the ``budget`` highest (or lowest) scores, no strata."""
    ids, scores = np.asarray(ids), check_scores(scores)
    order = np.argsort(-scores if highest else scores, kind="stable")[:budget]
    return Selection(ids[order], scores[order], np.full(len(order), -1, dtype=np.int64))


def random_select(ids: np.ndarray, budget: int, seed: int = 0) -> Selection:
    ids = np.asarray(ids)
    picked = np.sort(np.random.default_rng(seed).choice(len(ids), size=min(budget, len(ids)), replace=False))
    return Selection(ids[picked], np.zeros(len(picked)), np.full(len(picked), -1, dtype=np.int64))


def partition_budget(budget: int, partitions: int, owned: Iterable[int]) -> int:
    """The part of a global ``budget`` that belongs to the ``owned`` partitions of a topic with
    ``partitions`` partitions: ⌊budget / partitions⌋ each, the remainder one each to the lowest-numbered,
    so the parts of all partitions add up to ``budget`` exactly (at least 1 for a worker that owns any)."""
    if partitions < 1:
        raise ValueError("a topic has at least one partition")
    owned = set(owned)
    if not owned:
        return 0
    if not all(0 <= p < partitions for p in owned):
        raise ValueError(f"partitions {sorted(owned)} are not all among the topic's {partitions}")
    base, extra = divmod(budget, partitions)
    return max(1, sum(base + (p < extra) for p in owned))
