"""Checks every streaming selector passes (as River's estimator checks).

``check_selector`` (conformance): capacity is never exceeded, the same seed and stream give the same
coreset, and a selector restored from its checkpoint state continues exactly as the original does.

``fidelity`` (equivalence with batch DEALRec on the production path): a selector built with its own
settings (sketch edges, nothing taken from the batch run) is fed a score stream in a given order, and is
compared with :func:`dealrec_select` on the same scores: members per batch stratum against the batch
quotas, member scores against the batch members' (two-sample KS), inclusion against stream position
(chi-square over position deciles, expected counts from the batch inclusion probabilities, so a stream
whose scores drift with position is judged fairly), and how full the coreset stays after warm-up. A
selector that keeps the first or the last samples of each stratum fails the position test. :class:`Workers`
judges the same way what several workers of one group select together.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy.stats import chisquare, ks_2samp

from recsift.selection.reservoir import StratifiedReservoir
from recsift.selection.selector import Offer
from recsift.selection.stage import SelectionStage
from recsift.selection.store import CoresetStore
from recsift.selection.stratified import dealrec_select, hard_prune_cut, partition_budget, stratum_of
from recsift.stream.checkpoint import Checkpoint
from recsift.stream.windows import Sample


def synthetic_offers(n: int, seed: int = 0, batch: int = 100, version: int = 1) -> list[list[Offer]]:
    """A static stream of scored samples: a score mixture, 200 users, increasing timestamps."""
    rng = np.random.default_rng(seed)
    scores = np.where(rng.random(n) < 0.8, rng.normal(0.0, 1.0, n), rng.normal(3.0, 0.5, n))
    offers = [Offer(Sample(i, f"u{i % 200}", (f"i{i % 97}",), f"i{(i * 7) % 101}", 1_000.0 + i), float(scores[i]),
                    version, rng.normal(size=4).astype(np.float32)) for i in range(n)]
    return [offers[i:i + batch] for i in range(0, n, batch)]


def _ids(selector: StratifiedReservoir) -> list[int]:
    return sorted(selector.members)


def check_selector(make: Callable[[], StratifiedReservoir], stream: Sequence[list[Offer]], tmp_db: str) -> None:
    """Raise AssertionError when ``make()``'s selector breaks the shared contract."""
    a, b = make(), make()
    for batch in stream:
        a.offer(batch)
        assert len(a) <= a.budget, f"{len(a)} members exceed the budget {a.budget}"
        assert sum(a.strata_sizes()) == len(a)
    for batch in stream:
        b.offer(batch)
    assert _ids(a) == _ids(b), "the same seed and stream must give the same coreset"

    half = len(stream) // 2
    first = make()
    ckpt = Checkpoint(tmp_db, [CoresetStore(SelectionStage(first))])
    for batch in stream[:half]:
        first.offer(batch)
    ckpt.commit({})
    ckpt.close()
    resumed = make()
    ckpt = Checkpoint(tmp_db, [CoresetStore(SelectionStage(resumed))])
    ckpt.load(set())
    ckpt.close()
    assert _ids(resumed) == _ids(first), "the checkpoint must restore the members"
    for batch in stream[half:]:
        resumed.offer(batch)
    assert _ids(resumed) == _ids(a), "a restored selector must continue exactly as the original"
    assert resumed.quotas == a.quotas


@dataclass(frozen=True)
class Fidelity:
    """One streamed order compared with batch DEALRec on the same scores."""

    max_stratum_error: float  # max over strata of |streamed members − batch quota| / budget
    ks_pvalue: float  # member scores, streamed vs batch
    position_pvalue: float  # chi-square of member positions over deciles vs the batch inclusion probabilities
    min_fill: float  # smallest len / budget after warm-up, over every batch
    size: int


def stream_scores(sel: StratifiedReservoir | Workers, scores: np.ndarray, order: np.ndarray, batch: int = 512,
                  warmup: int = 0) -> list[float]:
    """Offer ``scores[order]`` (sample id = index, user ``u<id>``) in batches; the fill after each batch past
    ``warmup`` samples."""
    fills = []
    for start in range(0, len(order), batch):
        sel.offer([Offer(Sample(int(i), f"u{i}", ("h",), "t", float(start + k)), float(scores[i]), 1)
                   for k, i in enumerate(order[start:start + batch])])
        if start + batch >= warmup:
            fills.append(len(sel) / sel.budget)
    return fills


def compare_coresets(scores: np.ndarray, a: Sequence[int], b: Sequence[int], budget: int, strata: int,
                     prune: float) -> tuple[float, float]:
    """Two coresets of the same scores: (largest difference of members per batch stratum, as a share of the
    budget; two-sample KS p-value of their member scores)."""
    kept = scores <= hard_prune_cut(scores, prune)
    low, high = float(scores[kept].min()), float(scores[kept].max())
    count = [np.bincount(stratum_of(scores[np.asarray(m)], low, high, strata), minlength=strata) for m in (a, b)]
    return (float(np.abs(count[0] - count[1]).max()) / budget,
            float(ks_2samp(scores[np.asarray(a)], scores[np.asarray(b)]).pvalue))


def fidelity(make: Callable[[], StratifiedReservoir | Workers], scores: np.ndarray, order: np.ndarray, seed: int,
             batch: int = 512, warmup: int | None = None) -> Fidelity:
    """Stream ``scores[order]`` (sample id = index) through ``make()`` in batches; compare with batch DEALRec."""
    sel = make()
    budget, strata, prune = sel.budget, sel.strata, sel.hard_prune
    fills = stream_scores(sel, scores, order, batch, 4 * budget if warmup is None else warmup)
    ids = np.arange(len(scores))
    reference = dealrec_select(ids, scores, budget, strata, prune, seed)
    kept = scores <= hard_prune_cut(scores, prune)
    low, high = float(scores[kept].min()), float(scores[kept].max())
    members = np.array(sorted(sel.members))
    got = np.bincount(stratum_of(scores[members], low, high, strata), minlength=strata)
    error = float(np.abs(got - np.asarray(reference.quotas)).max()) / budget
    # inclusion probability of each sample in batch DEALRec: quota / count of its stratum (0 when pruned)
    stratum = stratum_of(scores, low, high, strata)
    counts = np.bincount(stratum[kept], minlength=strata)
    prob = np.where(kept, np.asarray(reference.quotas)[stratum] / np.maximum(counts[stratum], 1), 0.0)
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    decile = position * 10 // len(order)
    expected = np.bincount(decile, prob, minlength=10)
    observed = np.bincount(decile[members], minlength=10)
    expected = expected * observed.sum() / expected.sum()
    return Fidelity(error, float(ks_2samp(scores[members], reference.scores).pvalue),
                    float(chisquare(observed, expected).pvalue), float(min(fills)) if fills else 0.0, len(sel))


class Workers:
    """What ``workers`` workers of one consumer group hold together (the global coreset of the coreset topic):
    one reservoir per worker, sized by its partitions' share of the budget (:func:`partition_budget`) and fed
    only the samples of its partitions (a sample's partition: a hash of its user id, as Kafka's key
    partitioner would place it). Quacks like a selector for :func:`fidelity`: the union is judged."""

    def __init__(self, make: Callable[[int, int], StratifiedReservoir], budget: int, workers: int = 3,
                 partitions: int = 3, seed: int = 0) -> None:
        owned = [[p for p in range(partitions) if p % workers == w] for w in range(workers)]
        self.parts = [make(partition_budget(budget, partitions, mine), seed * workers + w) for w, mine in enumerate(owned)]
        self.worker_of = {p: w for w, mine in enumerate(owned) for p in mine}
        self.partitions = partitions
        self.budget, self.strata, self.hard_prune = budget, self.parts[0].strata, self.parts[0].hard_prune

    def offer(self, batch: Sequence[Offer]) -> None:
        routed: list[list[Offer]] = [[] for _ in self.parts]
        for o in batch:
            routed[self.worker_of[zlib.crc32(o.sample.user_id.encode()) % self.partitions]].append(o)
        for part, offers in zip(self.parts, routed, strict=True):
            if offers:
                part.offer(offers)

    @property
    def members(self) -> dict[int, object]:
        return {sid: m for part in self.parts for sid, m in part.members.items()}

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)


class KeepFirst(StratifiedReservoir):
    """Negative control for :func:`fidelity` (never registered): each stratum keeps its first arrivals."""

    arrivals = 0

    def _key(self, gumbel: float, ts: float) -> float:
        self.arrivals += 1
        return -float(self.arrivals)


class KeepLast(StratifiedReservoir):
    """Negative control for :func:`fidelity` (never registered): each stratum keeps its latest arrivals."""

    arrivals = 0

    def _key(self, gumbel: float, ts: float) -> float:
        self.arrivals += 1
        return float(self.arrivals)


def fidelity_orders(make: Callable[[int], StratifiedReservoir | Workers], scores: np.ndarray,
                    shuffles: int = 20) -> list[Fidelity]:
    """:func:`fidelity` in data order (seed 0) and in ``shuffles`` seeded shuffles (seeds 0, 1, ...)."""
    results = []
    for seed in [-1, *range(shuffles)]:
        order = np.arange(len(scores)) if seed < 0 else np.random.default_rng(seed).permutation(len(scores))
        results.append(fidelity(partial(make, max(seed, 0)), scores, order, max(seed, 0)))
    return results


def fidelity_failures(results: Sequence[Fidelity], max_stratum_error: float = 0.02, min_fill: float = 0.99,
                      alpha: float = 0.01, max_rejections: float = 0.1) -> list[str]:
    """What is wrong with a selector, judged over many streamed orders (empty: it is faithful).

    Strata and fill must hold in every order. The KS and position tests give one p-value per order: a
    faithful selector's are spread over (0, 1] (at most ``max_rejections`` of them below ``alpha``, the
    median above 0.1); one pooled test could hide a selector that is wrong in every order."""
    failures = []
    worst = max(r.max_stratum_error for r in results)
    if worst > max_stratum_error:
        failures.append(f"stratum counts off the batch allocation by {worst:.1%} of the budget")
    fill = min(r.min_fill for r in results)
    if fill < min_fill:
        failures.append(f"the coreset fell to {fill:.1%} of its budget after warm-up")
    for name in ("ks_pvalue", "position_pvalue"):
        p = np.array([getattr(r, name) for r in results])
        if (p < alpha).mean() > max_rejections or np.median(p) <= 0.1:
            failures.append(f"{name}: median {np.median(p):.3g}, {(p < alpha).sum()} of {len(p)} below {alpha}")
    return failures
