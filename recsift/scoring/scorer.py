"""Scorers: DEALRec's influence score (here) and the coreset baselines (``baselines.py``), behind one contract.

Every scorer is a small class whose constructor arguments are its configuration (a ``seed`` included),
registered by name. ``prepare(surrogate, reference)`` builds what a score depends on (for DEALRec the
H⁻¹v estimate) and starts a new *version*; ``score(surrogate, batch)`` returns raw scores carrying that
version. Higher means more valuable to keep (DEALRec's influence) or harder (GraNd, EL2N, loss): the
selection stage decides what to do with the order.

``combine`` is DEALRec's overall score: minmax(influence) + λ·minmax(effort), normalised over the samples
scored with one version. The effort term comes from the LLM (``effort.py``); it is combined outside the
scorer because it needs the samples' text, not the surrogate's batch. On a stream the range of a version
is not known in advance: :class:`Bounds` fixes it from the reference reservoir when the version starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from recsift.scoring.influence import InfluenceEstimator, default_block
from recsift.scoring.surrogate import PAD, SeqBatch, Surrogate


@dataclass(frozen=True)
class Scores:
    values: Tensor  # [B] raw scores, float64
    version: int


class Scorer(Protocol):
    name: ClassVar[str]
    seed: int
    version: int

    def prepare(self, surrogate: Surrogate, reference: SeqBatch) -> None: ...

    def score(self, surrogate: Surrogate, batch: SeqBatch) -> Scores: ...

    def state_tensors(self) -> dict[str, Tensor]:
        """What the checkpoint must keep to score the same way after a restart."""

    def load_state_tensors(self, surrogate: Surrogate, tensors: dict[str, Tensor]) -> None: ...


class _Versioned:
    """State of a scorer that keeps nothing but its version."""

    version: int

    def state_tensors(self) -> dict[str, Tensor]:
        return {"version": torch.tensor(self.version)}

    def load_state_tensors(self, surrogate: Surrogate, tensors: dict[str, Tensor]) -> None:
        self.version = int(tensors["version"])


class _FollowsSurrogate(_Versioned):
    """A scorer computed from the current surrogate alone: each prepare starts a new version."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.version = 0

    def prepare(self, surrogate: Surrogate, reference: SeqBatch) -> None:
        self.version += 1


SCORERS: dict[str, type] = {}


def register(cls: type) -> type:
    SCORERS[cls.name] = cls  # type: ignore[attr-defined]
    return cls


def make_scorer(name: str, **config: object) -> Scorer:
    """A registered scorer by name; ``config`` are its constructor arguments."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; registered: {sorted(SCORERS)}")
    return SCORERS[name](**config)  # type: ignore[no-any-return]


def _check_batch(batch: SeqBatch) -> None:
    if len(batch) == 0:
        raise ValueError("empty batch: nothing to score")


BUCKET = 1024  # rows per length bucket: larger ones thrash the cache on 2 cores (bench/scoring.py)


def by_length(fn: Callable[[SeqBatch], Tensor], batch: SeqBatch, bucket: int = BUCKET) -> Tensor:
    """Apply a batch-invariant scoring function to rows grouped by length, each group trimmed to its
    longest row, and return the scores in the input order. Stream histories are mostly short, so this
    avoids computing on padding (several times faster on Games)."""
    _check_batch(batch)
    lengths = (batch.seqs != PAD).sum(1)
    order = torch.argsort(lengths, stable=True)
    out = torch.empty(len(batch), dtype=torch.float64)
    for chunk in torch.split(order, bucket):
        out[chunk] = fn(batch.select(chunk)).double()
    return out


@register
class DEALRecScorer(_Versioned):
    """DEALRec's influence on the surrogate: score_i = ⟨∇loss_i, H⁻¹v⟩ (see ``influence.py``)."""

    name = "dealrec"

    def __init__(self, seed: int = 0, damping: float = 0.01, scale: float = 25.0, depth: int = 500,
                 batch_size: int = 64, repeats: int = 1, block: Sequence[str] | None = None) -> None:
        self.seed = seed
        self.damping, self.scale, self.depth, self.batch_size, self.repeats = damping, scale, depth, batch_size, repeats
        self.block = list(block) if block else None
        self.estimator: InfluenceEstimator | None = None
        self.version = 0

    def prepare(self, surrogate: Surrogate, reference: SeqBatch) -> None:
        """Re-estimate H⁻¹v: v from ``reference``, Hessian mini-batches sampled from it too."""
        _check_batch(reference)
        model = surrogate.model
        self.estimator = InfluenceEstimator(model, self.block or default_block(model), self.damping, self.scale,
                                            self.depth, self.repeats, self.seed)
        size = min(self.batch_size, len(reference))

        def sample(g: torch.Generator) -> tuple[Tensor, Tensor]:
            rows = reference.select(torch.randint(0, len(reference), (size,), generator=g))
            return rows.seqs, surrogate.negatives(rows)

        self.estimator.estimate((reference.seqs, surrogate.negatives(reference)), sample)
        self.version += 1

    def state_tensors(self) -> dict[str, Tensor]:
        out = super().state_tensors()
        if self.estimator is not None and self.estimator.ihvp is not None:
            out["ihvp"] = self.estimator.ihvp
        return out

    def load_state_tensors(self, surrogate: Surrogate, tensors: dict[str, Tensor]) -> None:
        super().load_state_tensors(surrogate, tensors)
        if "ihvp" in tensors:
            model = surrogate.model
            self.estimator = InfluenceEstimator(model, self.block or default_block(model), self.damping, self.scale,
                                                self.depth, self.repeats, self.seed)
            self.estimator.set_ihvp(tensors["ihvp"])

    def influence(self, surrogate: Surrogate, batch: SeqBatch) -> Tensor:
        estimator = self.estimator
        if estimator is None:
            raise RuntimeError("call prepare() before scoring")
        return by_length(lambda rows: estimator.scores((rows.seqs, surrogate.negatives(rows))), batch)

    def score(self, surrogate: Surrogate, batch: SeqBatch) -> Scores:
        """Raw influence (the effort term joins in :func:`combine`)."""
        return Scores(self.influence(surrogate, batch), self.version)


def minmax(x: Tensor) -> Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def combine(influence: Tensor, effort: Tensor | None, effort_weight: float) -> Tensor:
    """DEALRec's overall score over the samples of one scorer version: minmax(influence) + λ·minmax(effort)."""
    if not torch.isfinite(influence).all() or (effort is not None and not torch.isfinite(effort).all()):
        raise ValueError("scores must be finite to combine")
    overall = minmax(influence.double())
    if effort is not None and effort_weight > 0:
        overall = overall + effort_weight * minmax(effort.double())
    return overall



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


# the baselines register themselves on import; the registry must exist first
from recsift.scoring import baselines as _baselines  # noqa: F401
