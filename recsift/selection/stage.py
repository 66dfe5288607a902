"""The selection stage of the pipeline: scored samples → validation reservoir or streaming selector.

A fixed, hash-chosen fraction of samples (``validation_fraction``, by sample id) never enters the
coreset: the most recent of them form the validation reservoir that refresh evaluation, GORACS and
drift compare against. Every other sample is offered to the selector; members are re-scored through
the stream scorer when the scorer version changes. Coverage clusters and the recent-stream window see
every sample. Metrics: coreset size, members per stratum, coverage, drift, select duration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from recsift.monitoring.metrics import Metrics
from recsift.scoring.stream import ScoredSample
from recsift.selection.coverage import Coverage
from recsift.selection.drift import DriftReport, RecentWindow, drift
from recsift.selection.goracs import goracs_select
from recsift.selection.reservoir import StratifiedReservoir, uniform_key
from recsift.selection.selector import Offer, Rescore
from recsift.stream.windows import Sample
from recsift.vocab import Stage


class ValidationReservoir:
    """The most recent ``size`` validation samples (a ring), with their scores and embeddings."""

    def __init__(self, size: int = 2048) -> None:
        if size < 1:
            raise ValueError("validation size must be positive")
        self.size = size
        self.samples: list[Sample] = []
        self.embeddings: list[np.ndarray] = []
        self.pos = 0
        self.seen = 0

    def add(self, sample: Sample, embedding: np.ndarray) -> None:
        self.seen += 1
        if len(self.samples) < self.size:
            self.samples.append(sample)
            self.embeddings.append(embedding)
        else:
            self.samples[self.pos], self.embeddings[self.pos] = sample, embedding
            self.pos = (self.pos + 1) % self.size

    def __len__(self) -> int:
        return len(self.samples)


def is_validation(sample_id: int, fraction: float, seed: int) -> bool:
    """Hash-chosen: the same sample is always on the same side, across restarts and replicas."""
    return fraction > 0 and uniform_key(sample_id, seed ^ 0x5EED) < fraction


@dataclass(frozen=True)
class GoracsSettings:
    size: int
    every: int = 16
    lam: float = 0.1
    max_exchanges: int = 20
    exchange_candidates: int = 5


class SelectionStage:
    def __init__(self, selector: StratifiedReservoir, validation: ValidationReservoir, recent: RecentWindow,
                 coverage: Coverage | None = None, rescore: Rescore | None = None, metrics: Metrics | None = None,
                 validation_fraction: float = 0.05, seed: int = 0, coverage_constraint: bool = False,
                 category: Callable[[str], str | None] = lambda _: None, drift_every: int = 8,
                 goracs: GoracsSettings | None = None,
                 on_drift: Callable[[dict[str, float]], None] | None = None) -> None:
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in [0, 1)")
        self.selector, self.validation, self.recent, self.coverage = selector, validation, recent, coverage
        self.rescore, self.metrics, self.fraction, self.seed = rescore, metrics, validation_fraction, seed
        self.category, self.drift_every, self.goracs = category, drift_every, goracs
        self.on_drift = on_drift
        self.goracs_subset: list[int] = []  # member ids GORACS chose last (the refresh subset when enabled)
        self.goracs_objective = float("nan")
        self.batches = 0
        self.last_snapshot: set[int] = set()
        self.last_drift: DriftReport | None = None
        self.last_coverage = 0.0
        if coverage is not None and coverage_constraint:
            selector.protect = coverage.guard(lambda: selector.members.values(), selector.budget)

    def __call__(self, scored: Sequence[ScoredSample]) -> None:
        started = time.perf_counter()
        offers = []
        for s in scored:
            self.recent.add(s.sample.target, s.score, s.embedding)
            if is_validation(s.sample.sample_id, self.fraction, self.seed):
                self.validation.add(s.sample, s.embedding)
            else:
                offers.append(Offer(s.sample, s.score, s.version, s.embedding, s.effort))
        if self.coverage is not None and scored:
            self.coverage.add(np.stack([s.embedding for s in scored]))
        self.selector.offer(offers, self.rescore)
        self.batches += 1
        if self.batches % self.drift_every == 0:
            report = self.measure()
            if self.on_drift is not None:
                self.on_drift(report.as_dict())
        if self.goracs is not None and self.batches % self.goracs.every == 0:
            self.run_goracs()
        if self.metrics is not None:
            self._export(time.perf_counter() - started)

    def measure(self) -> DriftReport:
        """Drift and coverage now (also run every ``drift_every`` batches)."""
        members = list(self.selector.members.values())
        self.last_drift = drift(members, self.recent, self.last_snapshot, self.category)
        if self.coverage is not None and self.coverage.ready:
            embs = [m.embedding for m in members if m.embedding is not None]
            self.last_coverage = self.coverage.coverage(np.stack(embs)) if embs else 0.0
        return self.last_drift

    def run_goracs(self) -> list[int]:
        """GORACS over the coreset pool against the validation reservoir; remembers the chosen member ids.

        The gradient term uses each member's LLM effort (a gradient norm) when effort is on, else its
        overall score, which for DEALRec is itself a gradient inner product."""
        g = self.goracs
        members = [m for m in self.selector.members.values() if m.embedding is not None]
        if g is None or not members or not len(self.validation):
            return self.goracs_subset
        size = min(g.size, len(members))
        grads = np.array([m.effort if np.isfinite(m.effort) else m.score for m in members])
        grads = grads - grads.min()
        result = goracs_select(np.stack([m.embedding for m in members]), np.stack(self.validation.embeddings), size,
                               grads, g.lam, g.max_exchanges, g.exchange_candidates)
        self.goracs_subset = sorted(members[i].sample.sample_id for i in result.selected)
        self.goracs_objective = result.objective
        if self.metrics is not None:
            self.metrics.goracs_objective.set(result.objective)
        return self.goracs_subset

    def snapshot_taken(self, member_ids: Sequence[int]) -> None:
        """Turnover is measured against the members of the last refresh's snapshot."""
        self.last_snapshot = set(member_ids)

    def _export(self, seconds: float) -> None:
        m, sel = self.metrics, self.selector
        assert m is not None
        m.stage_duration.labels(Stage.SELECT).observe(seconds)
        m.coreset_size.set(len(sel))
        for k, size in enumerate(sel.strata_sizes()):
            m.coreset_stratum_members.labels(str(k)).set(size)
        m.validation_size.set(len(self.validation))
        m.coverage.set(self.last_coverage)
        if self.last_drift is not None:
            for name, value in self.last_drift.as_dict().items():
                m.drift.labels(name).set(value)
