"""The scorer contract, what every scorer shares, and DEALRec's score combination.

Implementations: DEALRec's influence (``dealrec.py``) and the coreset baselines (``baselines.py``),
registered in ``registry.py``. Every scorer is a small class whose constructor arguments are its
configuration (its ``Config``, a pydantic model with a ``type`` discriminator) plus a ``seed``.
``prepare(surrogate, reference)`` builds what a score depends on (for DEALRec the
H⁻¹v estimate) and starts a new *version*; ``score(surrogate, batch)`` returns raw scores carrying that
version. Higher means more valuable to keep (DEALRec's influence) or harder (GraNd, EL2N, loss): the
selection stage decides what to do with the order.

``combine`` is DEALRec's overall score: minmax(influence) + λ·minmax(effort), normalised over the samples
scored with one version. The effort term comes from the LLM (``effort.py``); it is combined outside the
scorer because it needs the samples' text, not the surrogate's batch. On a stream the range of a version
is not known in advance: :class:`Bounds` fixes it from the reference reservoir when the version starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from recsift import batching
from recsift.batching import length_buckets
from recsift.registry import ComponentConfig
from recsift.scoring.surrogate import PAD, SeqBatch, Surrogate
from recsift.state import State


@dataclass(frozen=True)
class Scores:
    values: Tensor  # [B] raw scores, float64
    version: int


class Scorer(Protocol):
    Config: ClassVar[type[ComponentConfig]]
    seed: int
    version: int

    def prepare(self, surrogate: Surrogate, reference: SeqBatch) -> None: ...

    def score(self, surrogate: Surrogate, batch: SeqBatch) -> Scores: ...

    def state_dict(self) -> State:
        """What the checkpoint must keep to score the same way after a restart."""

    def load_state_dict(self, state: State) -> None: ...


class Versioned:
    """State of a scorer that keeps nothing but its version."""

    version: int

    def state_dict(self) -> State:
        return State(meta={"version": self.version})

    def load_state_dict(self, state: State) -> None:
        self.version = int(state.meta["version"])


class FollowsSurrogate(Versioned):
    """A scorer computed from the current surrogate alone: each prepare starts a new version."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.version = 0

    def prepare(self, surrogate: Surrogate, reference: SeqBatch) -> None:
        self.version += 1


def check_batch(batch: SeqBatch) -> None:
    if len(batch) == 0:
        raise ValueError("empty batch: nothing to score")


def by_length(fn: Callable[[SeqBatch], Tensor], batch: SeqBatch, bucket: int | None = None) -> Tensor:
    """Apply a batch-invariant scoring function to rows grouped by length, each group trimmed to its
    longest row, and return the scores in the input order. Stream histories are mostly short, so this
    avoids computing on padding (several times faster on Games). ``bucket``: rows per call of ``fn``
    (default ``batching.ROWS_PER_PASS``)."""
    check_batch(batch)
    out = torch.empty(len(batch), dtype=torch.float64)
    for chunk in length_buckets((batch.seqs != PAD).sum(1), bucket or batching.ROWS_PER_PASS):
        out[chunk] = fn(batch.select(chunk)).double()
    return out


@dataclass(frozen=True)
class Bounds:
    """The min-max range of one scorer version, taken from a reference set when the version starts."""

    low: float
    high: float

    @classmethod
    def of(cls, values: Tensor) -> Bounds:
        if not len(values) or not torch.isfinite(values).all():
            raise ValueError("bounds need a non-empty, finite reference")
        return cls(float(values.min()), float(values.max()))

    def normalise(self, x: Tensor) -> Tensor:
        span = self.high - self.low
        return (x.double() - self.low) / span if span > 0 else torch.zeros_like(x, dtype=torch.float64)


def combine(influence: Tensor, effort: Tensor | None, effort_weight: float, bounds: Bounds | None = None,
            effort_bounds: Bounds | None = None) -> Tensor:
    """DEALRec's overall score: normalised influence + λ·normalised effort, each by its scorer version's
    bounds (by default the values' own minimum and maximum: min-max over one batch, as batch DEALRec)."""
    if not torch.isfinite(influence).all() or (effort is not None and not torch.isfinite(effort).all()):
        raise ValueError("scores must be finite to combine")
    overall = (bounds or Bounds.of(influence)).normalise(influence)
    if effort is not None and effort_weight > 0:
        overall = overall + effort_weight * (effort_bounds or Bounds.of(effort)).normalise(effort)
    return overall


