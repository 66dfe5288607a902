"""The streaming selector protocol and what flows through it: offers (scored samples) in, members out.

Implementations: :class:`~recsift.selection.reservoir.StratifiedReservoir` (registered in
``registry.py``). A selector is handed batches of :class:`Offer` of one scorer version, keeps at most
``budget`` :class:`Member` s, and re-scores what it holds through a :data:`Rescore` callback when the
version changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from recsift.registry import ComponentConfig
from recsift.state import State
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

    def to_json(self) -> list[Any]:
        """Everything but the embedding (which travels as a tensor, see :func:`embeddings_to_tensors`)."""
        return [self.sample.to_json(), self.score, self.version, self.key, self.stratum, self.inserted_ts, self.effort]

    @classmethod
    def from_json(cls, data: list[Any], embedding: np.ndarray | None = None) -> Member:
        sample, score, version, key, stratum, inserted_ts, effort = data
        return cls(Sample.from_json(sample), float(score), int(version), float(key), int(stratum), embedding,
                   float(inserted_ts), float(effort))


def embeddings_to_tensors(embeddings: Sequence[np.ndarray | None], name: str) -> dict[str, Tensor]:
    """Optional, equal-length float32 vectors as ``{name: [n, d], name.present: [n] bool}``."""
    present = [e is not None and len(e) > 0 for e in embeddings]
    dim = next((len(e) for e, p in zip(embeddings, present, strict=True) if p and e is not None), 0)
    out = torch.zeros((len(embeddings), dim), dtype=torch.float32)
    for row, (e, p) in enumerate(zip(embeddings, present, strict=True)):
        if p and e is not None:
            out[row] = torch.from_numpy(np.asarray(e, dtype=np.float32))
    return {name: out, f"{name}.present": torch.tensor(present, dtype=torch.bool)}


def embeddings_from_tensors(tensors: dict[str, Tensor], name: str) -> list[np.ndarray | None]:
    values, present = tensors[name].numpy(), tensors[f"{name}.present"].tolist()
    return [values[row].copy() if p else None for row, p in enumerate(present)]


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
    strata: int
    version: int
    stats: SelectorStats

    @property
    def budget(self) -> int: ...

    @property
    def members(self) -> dict[int, Member]: ...

    protect: Callable[[Member], bool] | None  # a coverage guard: True = do not evict

    def offer(self, offers: Iterable[Offer], rescore: Rescore | None = None) -> None:
        """Consider a batch of scored samples (one scorer version), in stream order."""

    def resize(self, budget: int) -> None:
        """Change the capacity: shrink by evicting, grow by refilling from what is still held."""

    def __len__(self) -> int: ...

    def strata_sizes(self) -> list[int]: ...

    def state_dict(self) -> State: ...

    def load_state_dict(self, state: State) -> None: ...
