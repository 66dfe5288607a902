"""Scorers: DEALRec's influence score and the coreset baselines of the DEALRec paper, behind one contract.

Every scorer is a small class whose constructor arguments are its configuration (a ``seed`` included),
registered by name. ``prepare(surrogate, reference)`` builds what a score depends on (for DEALRec the
H⁻¹v estimate) and starts a new *version*; ``score(surrogate, batch)`` returns raw scores carrying that
version. Higher means more valuable to keep (DEALRec's influence) or harder (GraNd, EL2N, loss): the
selection stage decides what to do with the order.

Baselines (as compared in DEALRec's Table 2):
- ``random``: a uniform number from (seed, sample id): a selector built on it samples uniformly;
- ``loss``: the surrogate's per-sample loss;
- ``el2n``: the L2 norm of the error vector softmax(logits) − onehot(target) over the catalogue
  (Paul et al., 2021), for predicting the target from the history;
- ``grand``: the per-sample gradient norm over a parameter block (Paul et al., 2021), with
  ``torch.func.vmap(grad)``.

``combine`` is DEALRec's overall score: minmax(influence) + λ·minmax(effort), normalised over the samples
scored with one version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from recsift.scoring.influence import InfluenceEstimator, default_block
from recsift.scoring.surrogate import PAD, SeqBatch, Surrogate, hashed_negatives


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
class RandomScorer(_Versioned):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.version = 1

    def prepare(self, surrogate: Surrogate, reference: SeqBatch) -> None:
        return None  # nothing depends on the surrogate

    def score(self, surrogate: Surrogate, batch: SeqBatch) -> Scores:
        _check_batch(batch)
        draws = hashed_negatives(batch.sample_ids, 1, 2**31, self.seed)[:, 0]
        return Scores(draws.double() / 2**31, self.version)


@register
class LossScorer(_FollowsSurrogate):
    name = "loss"

    def score(self, surrogate: Surrogate, batch: SeqBatch) -> Scores:
        return Scores(by_length(surrogate.losses, batch), self.version)


@register
class EL2NScorer(_FollowsSurrogate):
    name = "el2n"

    def score(self, surrogate: Surrogate, batch: SeqBatch) -> Scores:
        def el2n(rows: SeqBatch) -> Tensor:
            logits = surrogate.score_items(SeqBatch(rows.seqs[:, :-1], rows.sample_ids))  # next item after the history
            logits[:, PAD] = -torch.inf
            probs = torch.softmax(logits.double(), dim=1)
            probs[torch.arange(len(rows)), rows.seqs[:, -1]] -= 1.0
            return probs.norm(dim=1)

        return Scores(by_length(el2n, batch, 512), self.version)


@register
class GraNdScorer(_FollowsSurrogate):
    name = "grand"

    def __init__(self, seed: int = 0, block: Sequence[str] | None = None) -> None:
        super().__init__(seed)
        self.block = list(block) if block else None

    def score(self, surrogate: Surrogate, batch: SeqBatch) -> Scores:
        model = surrogate.model
        model.eval()
        names = self.block or default_block(model)
        params = {k: v.detach() for k, v in model.named_parameters()}
        block = {k: params[k] for k in names}
        buffers = dict(model.named_buffers())

        def one(p: dict[str, Tensor], seq: Tensor, neg: Tensor) -> Tensor:
            return functional_call(model, {**params, **buffers, **p}, (seq[None], neg[None]))[0]

        def norms(rows: SeqBatch) -> Tensor:
            grads = vmap(grad(one), in_dims=(None, 0, 0))(block, rows.seqs, surrogate.negatives(rows))
            return torch.stack([g.reshape(len(rows), -1).double().pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()

        return Scores(by_length(norms, batch, 512), self.version)


EffortFn = Callable[[SeqBatch], Tensor]


@register
class DEALRecScorer(_Versioned):
    """Influence on the surrogate (+ λ·effort from the LLM when an effort function is given and λ > 0)."""

    name = "dealrec"

    def __init__(self, seed: int = 0, effort_weight: float = 0.0, damping: float = 0.01, scale: float = 25.0,
                 depth: int = 500, batch_size: int = 64, repeats: int = 1, block: Sequence[str] | None = None,
                 effort: EffortFn | None = None) -> None:
        if effort_weight > 0 and effort is None:
            raise ValueError("effort_weight > 0 needs an effort function (the LLM's gradient norm); "
                             "use effort_weight=0 for influence only")
        self.seed, self.effort_weight = seed, effort_weight
        self.damping, self.scale, self.depth, self.batch_size, self.repeats = damping, scale, depth, batch_size, repeats
        self.block = list(block) if block else None
        self.effort = effort
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
        """Raw influence (the effort term joins in :func:`combine`, which needs a whole version's range)."""
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

