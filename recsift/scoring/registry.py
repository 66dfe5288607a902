"""The scorers recsift knows: a new one is a module with its class and ``Config``, and one entry here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from recsift.registry import Registry
from recsift.scoring.baselines import EL2NScorer, GraNdScorer, LossScorer, RandomScorer
from recsift.scoring.dealrec import DEALRecScorer
from recsift.scoring.scorer import Scorer

SCORERS: Registry[Scorer] = Registry("scorer", [DEALRecScorer, RandomScorer, LossScorer, EL2NScorer, GraNdScorer])


def make_scorer(spec: BaseModel | Mapping[str, Any] | str, seed: int = 0) -> Scorer:
    """The scorer ``spec`` describes (a config, ``{"type": ..., options}`` or a bare name), seeded."""
    return SCORERS.build(spec, seed=seed)
