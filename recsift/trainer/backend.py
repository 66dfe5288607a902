"""Trainer backends: what a refresh fine-tunes, judges and saves, behind one protocol.

A refresh (:mod:`recsift.trainer.refresh`) is the same for every backend: snapshot the coreset, take the
serving version (or a fresh model), measure its validation loss, train on the snapshot, measure again, report
candidate metrics, save a new registry version and promote it unless it is worse. What differs is the model:

- ``bigrec`` (:mod:`recsift.trainer.bigrec`): a LoRA adapter on the base LLM, which generates a title that is
  grounded to an item (BIGRec);
- ``tiger`` (:mod:`recsift.trainer.tiger.backend`): a small T5 over semantic IDs, which generates the next
  item's ID by constrained beam search (TIGER).

A backend is one module with a class that has a ``name``, an ``open`` method and an ``effort`` method (DEALRec's
effort score on its model), registered in
``recsift.trainer.refresh.BACKENDS`` by its import path (imported on use, so the ingest service does not load
model libraries).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import Tensor

from recsift.scoring.effort import EffortScorer
from recsift.stream.windows import Sample
from recsift.trainer.registry import AdapterRegistry

if TYPE_CHECKING:
    from recsift.config import Settings
    from recsift.stream.catalog import Catalog
    from recsift.trainer.llm import LLM


@dataclass
class TrainResult:
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    steps: int = 0
    learning_rates: list[float] = field(default_factory=list)  # after each step
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


Progress = Callable[[str], None]


class BestEpoch:
    """Early stopping: the parameters of the epoch with the lowest validation loss so far, and whether
    ``patience`` epochs in a row have not beaten it."""

    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.stale = patience, math.inf, 0
        self.state: dict[str, Tensor] | None = None

    def stop_after(self, loss: float, params: Mapping[str, Tensor]) -> bool:
        """Record an epoch's validation ``loss`` (keeping a copy of ``params`` when it is the best); True: stop."""
        if loss < self.best:
            self.best, self.stale = loss, 0
            self.state = {n: p.detach().clone() for n, p in params.items()}
            return False
        self.stale += 1
        return self.stale > self.patience

    def restore(self, params: Mapping[str, Tensor]) -> None:
        """Put the best epoch's values back (nothing when no epoch was judged)."""
        if self.state is not None:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(self.state[n])


class RefreshModel(Protocol):
    """The model one refresh trains: the serving version's (or a fresh one), on ``device``."""

    device: str
    serving: str | None  # the registry version it started from; None: a fresh model

    def mean_loss(self, samples: Sequence[Sample]) -> float:
        """Mean loss of the samples' targets given their histories (eval mode, no gradients)."""

    def serving_loss(self, samples: Sequence[Sample]) -> float:
        """The serving version's mean loss on ``samples``, what the trained model must not be worse than."""

    def train(self, samples: Sequence[Sample], validation: Sequence[Sample], progress: Progress) -> TrainResult:
        """Fine-tune on ``samples``, keeping the epoch that is best on ``validation``."""

    def validation_metrics(self, validation: Sequence[Sample], train: Sequence[Sample]) -> dict[str, float]:
        """Candidate metrics on the validation samples (:mod:`recsift.trainer.evaluate`), and any figures of
        the backend's own an operator should see."""

    def save(self, path: Path) -> None:
        """Write the trained model into the (empty) directory of a new registry version."""


class Backend(Protocol):
    name: ClassVar[str]

    def __init__(self, cfg: Settings, catalog: Catalog, llm: LLM | None = None) -> None:
        """``llm``: a base model already loaded (tests build one); otherwise the backend loads what it needs."""

    def open(self, registry: AdapterRegistry, samples: Sequence[Sample], progress: Progress) -> RefreshModel:
        """The model to refresh: the registry's serving version when there is one, else a fresh model; ready for
        every item of ``samples`` (the snapshot and validation samples it is trained and judged on)."""

    def effort(self, registry: AdapterRegistry) -> EffortScorer:
        """DEALRec's effort scorer on this backend's model, fixed for the run so a sample's effort is a function
        of the sample (``scoring.effort_weight > 0``)."""
