"""A worker's coreset as one reservoir per source partition, so that each partition's share moves with it.

Workers of one consumer group each own some partitions of the interactions topic. Partition ``p`` keeps
its part of the global budget (:func:`~recsift.selection.stratified.partition_budget`: ⌊budget / partitions⌋,
the remainder one each to the lowest-numbered) in a reservoir of its own, which sees exactly the samples of
that partition. The global coreset is the union of every partition's reservoir: one budget, whoever owns
what. When a partition moves to another worker, its reservoir's state goes with it (the coreset store writes
it to the partition's changelog, :mod:`recsift.selection.store`), so a sample is offered to exactly one
reservoir, once, and no member is left behind by a worker that died.

How this approximates one global stratified selection: each partition stratifies by its own score sketch
and allocates its own share fewest-first. Partitions of one stream carry the same score distribution, so the
union's per-stratum counts stay close to the global allocation; ``bench/fidelity.py`` measures it against
batch DEALRec (``Workers`` there routes a score stream by partition in the same way).

A reservoir that arrives from another worker holds scores of that worker's surrogate: it is marked so that
the next offer re-scores and re-buckets its members and spares with this worker's scorer, even when the two
scorers' version numbers happen to be equal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, fields
from typing import Any, ClassVar

from recsift.registry import ComponentConfig
from recsift.selection.reservoir import StratifiedConfig
from recsift.selection.selector import Member, Offer, Rescore, Selector, SelectorStats
from recsift.selection.stratified import partition_budget
from recsift.state import State

FOREIGN_VERSION = -1  # the version of a reservoir another worker scored: never equal to a scorer's own


class PartitionedSelector:
    """The :class:`~recsift.selection.selector.Selector` of a worker that owns partitions of a topic."""

    Config: ClassVar[type[ComponentConfig]] = StratifiedConfig

    def __init__(self, make: Callable[[int], Selector], budget: int, partitions: int | None = None) -> None:
        """``make(budget)`` builds an empty reservoir; ``budget`` is the global budget; ``partitions`` the topic's
        partition count (None until known: a partition then holds the whole budget, cut to its share later)."""
        if budget < 1:
            raise ValueError("budget must be positive")
        self.make, self.global_budget, self.partitions = make, budget, partitions
        self.parts: dict[int, Selector] = {}
        self.strata = make(1).strata
        self.version = 0
        self.stats = SelectorStats()  # this worker's own counts (each part's travel with the part)
        self._protect: Callable[[Member], bool] | None = None

    # ------------------------------------------------------------------ ownership

    def share(self, partition: int) -> int:
        """Partition ``partition``'s part of the global budget."""
        if self.partitions is None:
            return self.global_budget
        return partition_budget(self.global_budget, self.partitions, {partition})

    def set_partition_count(self, partitions: int) -> None:
        """The topic's partition count became known (or changed): every part is resized to its share."""
        self.partitions = partitions
        for p, part in self.parts.items():
            part.resize(self.share(p))

    def adopt(self, partition: int, state: State | None, foreign: bool = False) -> None:
        """Own ``partition``: its reservoir is restored from ``state`` (None: a new, empty one). ``foreign``:
        the state was written by another worker, whose scores this worker's scorer must replace."""
        if state is None:
            part = self.make(self.share(partition))
        else:  # built at the budget it was saved with, then cut or grown to this worker's view of its share
            part = self.make(int(state.meta["budget"]))
            part.load_state_dict(state.part("reservoir"))
            part.resize(self.share(partition))
            if foreign:
                part.version = FOREIGN_VERSION
        part.protect = self._protect
        self.parts[partition] = part

    def release(self, partitions: Iterable[int]) -> None:
        """Give partitions up (their state was checkpointed, and travels through the changelog)."""
        for p in partitions:
            self.parts.pop(p, None)

    # ------------------------------------------------------------------ the Selector protocol

    @property
    def budget(self) -> int:
        return sum(part.budget for part in self.parts.values())

    @property
    def members(self) -> dict[int, Member]:
        out: dict[int, Member] = {}
        for part in self.parts.values():
            out.update(part.members)
        return out

    @property
    def protect(self) -> Callable[[Member], bool] | None:
        return self._protect

    @protect.setter
    def protect(self, hook: Callable[[Member], bool] | None) -> None:
        self._protect = hook
        for part in self.parts.values():
            part.protect = hook

    def offer(self, offers: Iterable[Offer], rescore: Rescore | None = None) -> None:
        """Each offer goes to its partition's reservoir, in stream order. A sample of a partition this worker
        does not own is a programming error: a partition's pending samples leave with it."""
        by_part: dict[int, list[Offer]] = {}
        for o in offers:
            by_part.setdefault(o.sample.partition, []).append(o)
        missing = sorted(set(by_part) - set(self.parts))
        if missing:
            raise ValueError(f"offers for partitions {missing}, which this worker does not own "
                             f"(it owns {sorted(self.parts)})")
        for p, group in by_part.items():
            part = self.parts[p]
            before = asdict(part.stats)
            part.offer(group, rescore)
            after = asdict(part.stats)
            for f in fields(SelectorStats):
                setattr(self.stats, f.name, getattr(self.stats, f.name) + after[f.name] - before[f.name])
            self.version = group[-1].version

    def resize(self, budget: int) -> None:
        """A new global budget, split over the partitions as ever."""
        if budget < 1:
            raise ValueError("budget must be positive")
        self.global_budget = budget
        for p, part in self.parts.items():
            part.resize(self.share(p))

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts.values())

    def strata_sizes(self) -> list[int]:
        sizes = [0] * self.strata
        for part in self.parts.values():
            for k, n in enumerate(part.strata_sizes()):
                sizes[k] += n
        return sizes

    # ------------------------------------------------------------------ state

    def state_dict(self) -> State:
        """This worker's own counters. The parts' states are saved per partition (:meth:`part_state`)."""
        meta: dict[str, Any] = {"version": self.version, "stats": asdict(self.stats), "partitions": self.partitions,
                                "global_budget": self.global_budget}
        return State(meta=meta)

    def load_state_dict(self, state: State) -> None:
        meta = state.meta
        self.version, self.stats = int(meta["version"]), SelectorStats(**meta["stats"])
        self.partitions, self.global_budget = meta["partitions"], int(meta["global_budget"])

    def part_state(self, partition: int) -> State:
        """Partition ``partition``'s reservoir and the budget it holds (what :meth:`adopt` takes)."""
        part = self.parts[partition]
        return State(meta={"budget": part.budget}).put("reservoir", part.state_dict())
