"""The streaming selector protocol and what flows through it: offers (scored samples) in, members out.

Implementations: :class:`~recsift.selection.reservoir.StratifiedReservoir` (registered in
``registry.py``). A selector is handed batches of :class:`Offer` of one scorer version, keeps at most
``budget`` :class:`Member` s, and re-scores what it holds through a :data:`Rescore` callback when the
version changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from recsift.registry import ComponentConfig
from recsift.stream.windows import Sample


@dataclass
class Member:
    """A coreset member: the sample, its current score and stratum, and what the selector needs."""

    sample: Sample
    score: float
    version: int
    key: float
    stratum: int
    embedding: np.ndarray | None = None
    inserted_ts: float = 0.0
    effort: float = float("nan")


@dataclass(frozen=True)
class Offer:
    """One scored sample offered to the selector."""

    sample: Sample
    score: float
    version: int
    embedding: np.ndarray | None = None
    effort: float = float("nan")


@dataclass
class SelectorStats:
    offered: int = 0
    accepted: int = 0
    evicted: int = 0
    pruned: int = 0
    capped: int = 0
    rebuckets: int = 0
    rescored: int = 0
    refilled: int = 0


Rescore = Callable[[list[Sample]], tuple[list[float], int]]  # samples → (scores, version)


class Selector(Protocol):
    Config: ClassVar[type[ComponentConfig]]
    budget: int
    strata: int
    version: int
    members: dict[int, Member]
    stats: SelectorStats
    protect: Callable[[Member], bool] | None  # a coverage guard: True = do not evict

    def offer(self, offers: Iterable[Offer], rescore: Rescore | None = None) -> None:
        """Consider a batch of scored samples (one scorer version), in stream order."""

    def __len__(self) -> int: ...

    def strata_sizes(self) -> list[int]: ...
