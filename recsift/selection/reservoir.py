"""The streaming selector: a bounded coreset kept by one reservoir per score stratum.

It follows DEALRec's coverage-enhanced sampling on a stream:

- the hard-prune cut and the stratum edges come from a bounded sketch of recent scores (a ring of the
  last ``sketch_size`` scores); ``edges=(low, high)`` fixes them instead (then scores above ``high``
  are hard-pruned and scores below ``low`` fall into the first stratum);
- stratum counts are kept as the stream flows (exactly, while the edges hold; re-estimated from the
  sketch when they move) and the per-stratum quotas are recomputed with the fewest-first rule;
- inside a stratum the members are the samples with the largest keys: key = −ln(−ln u) with u uniform
  from (seed, sample id), which makes each stratum a uniform sample of what it has seen. With a
  half-life, key = (t − t₀)·ln2 / half_life − ln(−ln u): the Efraimidis–Spirakis weighted reservoir with
  weights 2^(t/half_life), in log space, so recent samples are favoured; counts decay with the same
  half-life;
- when the edges move or the scorer version changes, members are re-bucketed (after re-scoring, for a
  new version) in O(budget);
- options: a per-user cap, and a coverage guard that never evicts the last member of a heavy cluster.

Keys are a hash of (seed, sample id), so the selector needs no RNG state: a restart from the checkpoint
draws the same keys.

**Spares keep the coreset full.** Each stratum also keeps up to ``spares`` non-members with the largest
keys it has seen (evicted members and rejected arrivals; default ⌈budget / strata⌉ per stratum). When a
stratum's quota grows (its count grew, or the edges moved and members were re-bucketed), it refills from
its spares, highest key first, so the stratum again holds the top-quota keys of what it has seen: the
same members a reservoir with unbounded memory would hold, as long as the growth between two arrivals
is at most ``spares``. Spares are re-bucketed and re-scored with the members and checkpointed with them.
``spares=0`` is the plain reservoir, which under-fills after quotas grow.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from recsift.hashing import uniform
from recsift.registry import ComponentConfig
from recsift.selection.ring import ArrayRing
from recsift.selection.selector import (
    Member,
    Offer,
    Rescore,
    SelectorStats,
    embeddings_from_tensors,
    embeddings_to_tensors,
)
from recsift.selection.stratified import allocate, stratum_of
from recsift.state import State


class StratifiedConfig(ComponentConfig):
    """DEALRec's coverage-enhanced sampling on a stream (see the module docstring)."""

    type: Literal["stratified"] = "stratified"
    strata: int = Field(50, gt=0)
    hard_prune: float = Field(0.1, ge=0.0, lt=1.0)
    sketch_size: int = Field(8192, ge=16, description="recent scores the stratum edges and the hard-prune cut come from")
    half_life_s: float | None = Field(None, gt=0, description="event-time half-life favouring recent samples; unset: off")
    user_cap: int | None = Field(None, gt=0, description="at most this many members per user; unset: no cap")
    spares: int | None = Field(None, ge=0, description="non-members per stratum kept to refill a stratum whose "
                               "quota grows; unset: ⌈budget / strata⌉; 0: none (the coreset under-fills)")
    edge_tolerance: float = Field(0.02, ge=0.0, description="edges move when the sketch's move by more than "
                                  "this fraction of the span")
    rebucket_every: int = Field(1024, gt=0, description="offers between checks of the sketch edges")


class StratifiedReservoir:
    """Bounded, coverage-preserving coreset of capacity ``budget`` (see the module docstring)."""

    Config: ClassVar[type[ComponentConfig]] = StratifiedConfig

    def __init__(self, budget: int = 1024, strata: int = 50, hard_prune: float = 0.1, seed: int = 0,
                 sketch_size: int = 8192, edges: tuple[float, float] | None = None, half_life_s: float | None = None,
                 user_cap: int | None = None, edge_tolerance: float = 0.02, rebucket_every: int = 1024,
                 spares: int | None = None) -> None:
        if budget < 1 or strata < 1 or sketch_size < 16:
            raise ValueError("budget and strata must be positive and sketch_size at least 16")
        if not 0.0 <= hard_prune < 1.0:
            raise ValueError("hard_prune must be in [0, 1)")
        if half_life_s is not None and half_life_s <= 0:
            raise ValueError("half_life_s must be positive")
        if user_cap is not None and user_cap < 1:
            raise ValueError("user_cap must be positive")
        if edges is not None and not edges[0] < edges[1]:
            raise ValueError("edges must be (low, high) with low < high")
        if spares is not None and spares < 0:
            raise ValueError("spares must be non-negative")
        self.budget, self.strata, self.hard_prune, self.seed = budget, strata, hard_prune, seed
        self.sketch_size, self.fixed_edges, self.half_life_s = sketch_size, edges, half_life_s
        self.user_cap, self.edge_tolerance, self.rebucket_every = user_cap, edge_tolerance, rebucket_every
        self.spares = -(-budget // strata) if spares is None else spares
        self.sketch = ArrayRing(sketch_size)
        self.edges: tuple[float, float] | None = edges
        self.counts = np.zeros(strata, dtype=np.float64)
        self.quotas = [0] * strata
        self.members: dict[int, Member] = {}
        self.heaps: list[list[tuple[float, int]]] = [[] for _ in range(strata)]  # (key, sample id), min-heap
        self.spare: dict[int, Member] = {}  # non-members with the largest keys, per stratum (see the docstring)
        self.spare_heaps: list[list[tuple[float, int]]] = [[] for _ in range(strata)]
        self.users: Counter[str] = Counter()
        self.version = 0
        self.t0: float | None = None
        self.t_counts: float | None = None
        self.since_edges = 0
        self.stats = SelectorStats()
        self.protect: Callable[[Member], bool] | None = None  # coverage guard: True = do not evict

    # ------------------------------------------------------------------ the stream side

    def offer(self, offers: Iterable[Offer], rescore: Rescore | None = None) -> None:
        """Consider a batch of scored samples (one scorer version) in stream order.

        Counts and quotas are updated for the whole batch first, then members are drawn: per-sample work
        is a key and a heap operation, the O(K log K) allocation runs once per batch.
        """
        offers = list(offers)
        if not offers:
            return
        scores = np.fromiter((o.score for o in offers), dtype=np.float64, count=len(offers))
        if not np.isfinite(scores).all():
            bad = offers[int(np.flatnonzero(~np.isfinite(scores))[0])]
            raise ValueError(f"sample {bad.sample.sample_id} has score {bad.score}: scores must be finite")
        if any(o.version != offers[0].version for o in offers):
            raise ValueError("offers of one call must share the scorer version")
        if offers[0].version != self.version:
            self.version = offers[0].version
            self._rescore(rescore, scores)  # the sketch restarts from the new version's scores, this batch's included
        else:
            self.sketch.extend(scores)
        if self.edges is None:
            self._maybe_move_edges(force=True)
        assert self.edges is not None
        low, high = self.edges
        self.stats.offered += len(offers)
        kept = scores <= high
        self.stats.pruned += int((~kept).sum())
        strata = stratum_of(scores, low, high, self.strata)
        ts = np.fromiter((o.sample.ts for o in offers), dtype=np.float64, count=len(offers))
        weights = np.ones(len(offers))
        if self.half_life_s is not None:
            self._decay_to(float(ts.max()))
            weights = 0.5 ** ((float(ts.max()) - ts) / self.half_life_s)
        self.counts += np.bincount(strata[kept], weights[kept], minlength=self.strata)
        self._allocate(np.bincount(strata[kept], minlength=self.strata))
        self._shrink_to_quotas()
        self._refill()
        gumbel = -np.log(-np.log(uniform(torch.tensor([o.sample.sample_id for o in offers]), self.seed).numpy()))
        for o, k, ok, g in zip(offers, strata.tolist(), kept.tolist(), gumbel.tolist(), strict=True):
            if ok:
                self._offer_one(o, k, g)
        self.since_edges += len(offers)
        if self.fixed_edges is None and self.since_edges >= self.rebucket_every:
            self._maybe_move_edges()

    def resize(self, budget: int) -> None:
        """A new capacity (a worker's share of the global budget moved with its partitions): quotas are
        re-allocated for it, strata over their quota evict their lowest keys into the spares, strata under
        it refill from their spares, highest key first."""
        if budget < 1:
            raise ValueError("budget must be positive")
        if budget == self.budget:
            return
        self.budget = budget
        self._allocate()
        self._shrink_to_quotas()
        self._refill()

    def _offer_one(self, o: Offer, k: int, gumbel: float) -> None:
        sid = o.sample.sample_id
        if sid in self.members or sid in self.spare:
            return  # a replay of a sample already kept
        if self.user_cap is not None and self.users[o.sample.user_id] >= self.user_cap:
            self.stats.capped += 1
            return
        key = self._key(gumbel, o.sample.ts)
        m = Member(o.sample, o.score, o.version, key, k, o.embedding, inserted_ts=o.sample.ts, effort=o.effort)
        heap = self.heaps[k]
        if len(heap) < self.quotas[k] or (heap and key > heap[0][0] and self._evict_lowest(k)):
            self._insert(m)
        else:
            self._keep_spare(m)

    def _keep_spare(self, m: Member) -> None:
        """Remember a non-member if its key is among the ``spares`` largest of its stratum."""
        if self.spares == 0:
            return
        heap, item = self.spare_heaps[m.stratum], (m.key, m.sample.sample_id)
        if len(heap) < self.spares:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            del self.spare[heapq.heapreplace(heap, item)[1]]
        else:
            return
        self.spare[m.sample.sample_id] = m

    def _refill(self) -> None:
        """Give every stratum below its quota its highest-key spares (skipping users at their cap)."""
        for k, heap in enumerate(self.heaps):
            spares = self.spare_heaps[k]
            while len(heap) < self.quotas[k] and spares:
                best = max(spares)
                spares.remove(best)
                heapq.heapify(spares)
                m = self.spare.pop(best[1])
                if self.user_cap is not None and self.users[m.sample.user_id] >= self.user_cap:
                    continue
                self._insert(m)
                self.stats.refilled += 1

    def _key(self, gumbel: float, ts: float) -> float:
        """The sample's key from its Gumbel draw −ln(−ln u) (u hashed from the seed and its id)."""
        if self.half_life_s is None:
            return gumbel
        if self.t0 is None:
            self.t0 = ts
        return (ts - self.t0) * math.log(2) / self.half_life_s + gumbel

    def _decay_to(self, ts: float) -> None:
        assert self.half_life_s is not None
        if self.t_counts is not None and ts > self.t_counts:
            self.counts *= 0.5 ** ((ts - self.t_counts) / self.half_life_s)
        if self.t_counts is None or ts > self.t_counts:
            self.t_counts = ts

    def _insert(self, m: Member) -> None:
        self.members[m.sample.sample_id] = m
        heapq.heappush(self.heaps[m.stratum], (m.key, m.sample.sample_id))
        self.users[m.sample.user_id] += 1
        self.stats.accepted += 1

    def _remove(self, sample_id: int) -> Member:
        m = self.members.pop(sample_id)
        self.users[m.sample.user_id] -= 1
        if self.users[m.sample.user_id] <= 0:
            del self.users[m.sample.user_id]
        self.stats.evicted += 1
        return m

    def _evict_lowest(self, k: int) -> bool:
        """Evict the lowest-key member of stratum ``k`` that the coverage guard allows; False if none."""
        heap = self.heaps[k]
        if self.protect is None:
            _, sid = heapq.heappop(heap)
            self._keep_spare(self._remove(sid))
            return True
        for key, sid in heapq.nsmallest(len(heap), heap):
            if not self.protect(self.members[sid]):
                heap.remove((key, sid))
                heapq.heapify(heap)
                self._keep_spare(self._remove(sid))
                return True
        return False

    def _shrink_to_quotas(self) -> None:
        for k, heap in enumerate(self.heaps):
            while len(heap) > self.quotas[k]:
                if not self._evict_lowest(k):
                    break

    # ------------------------------------------------------------------ edges, versions

    def sketch_edges(self) -> tuple[float, float]:
        """(low, high): the sketch's minimum and its hard-prune cut."""
        s = self.sketch.values
        n_drop = int(len(s) * self.hard_prune)
        ordered = np.sort(s)
        high = float(ordered[len(s) - n_drop - 1])
        low = float(ordered[0])
        if high <= low:
            high = low + 1e-12
        return low, high

    def _maybe_move_edges(self, force: bool = False) -> None:
        self.since_edges = 0
        if self.fixed_edges is not None and self.edges is not None:
            return
        if not len(self.sketch):
            return
        new = self.sketch_edges()
        if self.edges is not None and not force:
            span = self.edges[1] - self.edges[0]
            if abs(new[0] - self.edges[0]) <= self.edge_tolerance * span and \
                    abs(new[1] - self.edges[1]) <= self.edge_tolerance * span:
                return
        self.edges = new
        self._rebucket()

    def _rebucket(self) -> None:
        """Recompute strata of members and counts (from the sketch's proportions) for the current edges."""
        assert self.edges is not None
        low, high = self.edges
        total = float(self.counts.sum())
        sk = self.sketch.values[self.sketch.values <= high]
        props = np.bincount(stratum_of(sk, low, high, self.strata), minlength=self.strata) / max(len(sk), 1)
        self.counts = props * total
        for m in list(self.members.values()):
            if m.score > high:
                self._remove(m.sample.sample_id)
            else:
                m.stratum = int(stratum_of(np.array([m.score]), low, high, self.strata)[0])
        spares = [m for m in self.spare.values() if m.score <= high]
        self.spare.clear()
        self._rebuild_heaps()
        for m in spares:
            m.stratum = int(stratum_of(np.array([m.score]), low, high, self.strata)[0])
            self._keep_spare(m)
        self._allocate()
        self._shrink_to_quotas()
        self._refill()
        self.stats.rebuckets += 1

    # ------------------------------------------------------------------ state

    def state_dict(self) -> State:
        """Members and spares (with their embeddings), the sketch, counts, quotas, edges, clocks, stats."""
        held = {"members": list(self.members.values()), "spares": list(self.spare.values())}
        tensors = {"counts": torch.from_numpy(self.counts.copy())}
        for name, ms in held.items():
            tensors.update(embeddings_to_tensors([m.embedding for m in ms], f"{name}.embedding"))
        meta: dict[str, Any] = {name: [m.to_json() for m in ms] for name, ms in held.items()}
        meta.update({"edges": list(self.edges) if self.edges is not None else None, "version": self.version,
                     "t0": self.t0, "t_counts": self.t_counts, "since_edges": self.since_edges,
                     "quotas": list(self.quotas), "stats": asdict(self.stats)})
        return State(tensors, meta).put("sketch", self.sketch.state_dict())

    def load_state_dict(self, state: State) -> None:
        t, meta = state.tensors, state.meta
        self.members.clear()
        self.spare.clear()
        self.users.clear()
        for name, held in (("members", self.members), ("spares", self.spare)):
            embeddings = embeddings_from_tensors(t, f"{name}.embedding")
            for data, emb in zip(meta[name], embeddings, strict=True):
                m = Member.from_json(data, emb)
                held[m.sample.sample_id] = m
        for m in self.members.values():
            self.users[m.sample.user_id] += 1
        if "sketch" in t:  # written before the sketch was an ArrayRing (2026-11-24): a bare tensor and its position
            self.sketch.load_state_dict(State({"values": t["sketch"]}, {"pos": meta["sketch_pos"]}))
        else:
            self.sketch.load_state_dict(state.part("sketch"))
        self.counts = t["counts"].numpy().copy()
        self.edges = (float(meta["edges"][0]), float(meta["edges"][1])) if meta["edges"] is not None else None
        self.version, self.t0, self.t_counts = meta["version"], meta["t0"], meta["t_counts"]
        self.since_edges = meta["since_edges"]
        self.quotas = [int(q) for q in meta["quotas"]]
        self.stats = SelectorStats(**meta["stats"])
        self._rebuild_heaps()

    def _allocate(self, arriving: np.ndarray | None = None) -> None:
        """Quotas by the fewest-first rule over the stratum counts, with one correction: a stratum cannot
        be given more than it holds (members + spares + this batch's arrivals). Counts are exact only while
        the edges hold; after a re-bucketing they are estimates, and a sparse stratum's estimate can exceed
        the samples it still has. Its shortfall then goes to the other strata, as in the batch rule, instead
        of leaving the coreset under-filled; what no count can place goes to strata holding more than their
        quota."""
        counts = np.floor(self.counts + 1e-9).astype(np.int64)
        held = np.array([len(h) + len(s) for h, s in zip(self.heaps, self.spare_heaps, strict=True)], dtype=np.int64)
        if arriving is not None:
            held += arriving
        quotas = allocate(counts.tolist(), self.budget)
        for _ in range(self.strata):
            short = (np.asarray(quotas) > held) & (counts > held)
            if not short.any():
                break
            counts[short] = held[short]
            quotas = allocate(counts.tolist(), self.budget)
        # budget the counts cannot place (the stream's recent scores moved away from what is held, so the
        # strata that hold samples have small estimated counts) goes, fewest-first, to strata holding more
        # than their quota: the coreset stays full with the best it has until arrivals take the places back
        remaining = self.budget - sum(quotas)
        if remaining > 0:
            extra = np.maximum(held - np.asarray(quotas), 0)
            quotas = [q + a for q, a in zip(quotas, allocate(extra.tolist(), remaining), strict=True)]
        self.quotas = quotas

    def _rebuild_heaps(self) -> None:
        self.heaps = [[] for _ in range(self.strata)]
        for sid, m in self.members.items():
            self.heaps[m.stratum].append((m.key, sid))
        self.spare_heaps = [[] for _ in range(self.strata)]
        for sid, m in self.spare.items():
            self.spare_heaps[m.stratum].append((m.key, sid))
        for h in self.heaps + self.spare_heaps:
            heapq.heapify(h)

    def _rescore(self, rescore: Rescore | None, incoming: np.ndarray) -> None:
        """A new scorer version: re-score members and spares (when a re-scorer is given), restart the sketch
        from their new scores and the incoming batch's, re-bucket. The batch matters: held samples are a
        stratified, older sample whose new scores can sit far from the stream's (a surrogate that has learnt
        them scores them lower), and edges from them alone would hard-prune the whole stream."""
        if rescore is not None and (self.members or self.spare):
            held = [*self.members.values(), *self.spare.values()]
            scores, version = rescore([m.sample for m in held])
            for m, score in zip(held, scores, strict=True):
                where = self.members if m.sample.sample_id in self.members else self.spare
                where[m.sample.sample_id] = replace(m, score=float(score), version=version)
            self.stats.rescored += len(held)
            self.sketch.reset(np.asarray(scores))
        self.sketch.extend(incoming)
        if self.fixed_edges is None:
            if len(self.sketch):
                self.edges = self.sketch_edges()
                self._rebucket()
        else:
            self._rebucket()

    # ------------------------------------------------------------------ views

    def __len__(self) -> int:
        return len(self.members)

    def strata_sizes(self) -> list[int]:
        return [len(h) for h in self.heaps]
