"""The scorers and surrogates recsift knows: a new scorer is a module with its class and ``Config``, and one
entry in ``SCORERS``; a new surrogate is a module with a :class:`SequentialSurrogate` subclass, and one entry in
``SURROGATES``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from recsift.registry import Registry
from recsift.scoring.baselines import EL2NScorer, GraNdScorer, LossScorer, RandomScorer
from recsift.scoring.bert4rec import BERT4RecSurrogate
from recsift.scoring.dealrec import DEALRecScorer
from recsift.scoring.gru4rec import GRU4RecSurrogate
from recsift.scoring.sasrec import SASRecSurrogate
from recsift.scoring.scorer import Scorer
from recsift.scoring.sequential import SequentialSurrogate

SCORERS: Registry[Scorer] = Registry("scorer", [DEALRecScorer, RandomScorer, LossScorer, EL2NScorer, GraNdScorer])


def make_scorer(spec: BaseModel | Mapping[str, Any] | str, seed: int = 0) -> Scorer:
    """The scorer ``spec`` describes (a config, ``{"type": ..., options}`` or a bare name), seeded."""
    return SCORERS.build(spec, seed=seed)


SURROGATES: dict[str, type[SequentialSurrogate]] = {
    s.name: s for s in (SASRecSurrogate, GRU4RecSurrogate, BERT4RecSurrogate)}


def make_surrogate(name: str, n_items: int, **options: Any) -> SequentialSurrogate:
    """The surrogate registered as ``name`` over ``n_items`` items; ``options`` are its constructor's
    (hidden, layers, heads, max_len, dropout, lr, replay, seed, initial_rows)."""
    if name not in SURROGATES:
        raise ValueError(f"unknown surrogate {name!r}; registered: {', '.join(sorted(SURROGATES))}")
    return SURROGATES[name](n_items, **options)
