"""The selection stage of the pipeline: scored samples → validation reservoir or streaming selector.

A fixed, hash-chosen fraction of samples (``validation_fraction``, by sample id) never enters the
coreset: the most recent of them form the validation reservoir that refresh evaluation, GORACS and
drift compare against. Every other sample is offered to the selector; members are re-scored through
the stream scorer when the scorer version changes. Coverage clusters and the recent-stream window see
every sample. Metrics: coreset size, members per stratum, coverage, drift, select duration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from recsift.monitoring.metrics import Metrics
from recsift.scoring.stage import ScoredSample
from recsift.selection.coverage import Coverage
from recsift.selection.drift import DriftReport, RecentWindow, drift
from recsift.selection.goracs import goracs_select
from recsift.selection.partitioned import PartitionedSelector
from recsift.selection.selector import Offer, Rescore, Selector
from recsift.selection.validation import PartitionedValidation, ValidationReservoir, validation_mask
from recsift.state import State
from recsift.vocab import Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GoracsSettings:
    size: int
    every: int = 16
    lam: float = 0.1
    max_exchanges: int = 20
    exchange_candidates: int = 5


class SelectionStage:
    def __init__(self, selector: Selector, *,
                 validation: ValidationReservoir | PartitionedValidation | None = None,
                 recent: RecentWindow | None = None, coverage: Coverage | None = None,
                 rescore: Rescore | None = None, metrics: Metrics | None = None,
                 validation_fraction: float = 0.05, seed: int = 0, coverage_constraint: bool = False,
                 category: Callable[[str], str | None] = lambda _: None, drift_every: int = 8,
                 goracs: GoracsSettings | None = None,
                 on_drift: Callable[[dict[str, float]], object] | None = None) -> None:
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError("validation_fraction must be in [0, 1)")
        self.selector, self.coverage = selector, coverage
        self.validation = validation if validation is not None else ValidationReservoir()
        self.recent = recent if recent is not None else RecentWindow()
        self.rescore, self.metrics, self.fraction, self.seed = rescore, metrics, validation_fraction, seed
        self.category, self.drift_every, self.goracs = category, drift_every, goracs
        self.on_drift = on_drift
        self.goracs_subset: list[int] = []  # member ids GORACS chose last (the refresh subset when enabled)
        self.goracs_objective = float("nan")
        self.batches = 0
        self.last_snapshot: set[int] = set()
        self.last_drift: DriftReport | None = None
        self.last_coverage = 0.0
        # the topic's partition count, learnt (in the ingest thread) once this worker owns a partition; handed to
        # a partitioned selector before the next batch, in the thread that owns the selector
        self.partition_count_target: int | None = None
        if coverage is not None and coverage_constraint:
            selector.protect = coverage.guard(lambda: selector.members.values(), lambda: selector.budget)

    def __call__(self, scored: Sequence[ScoredSample]) -> None:
        started = time.perf_counter()
        count, sel = self.partition_count_target, self.selector
        if count is not None and isinstance(sel, PartitionedSelector) and count != sel.partitions:
            sel.set_partition_count(count)
            if isinstance(self.validation, PartitionedValidation):
                self.validation.set_partition_count(count)
            log.info("coreset: %d partitions in the topic; this worker's %s hold %d of the budget",
                     count, sorted(sel.parts), sel.budget)
        offers = []
        held_out = validation_mask([s.sample.sample_id for s in scored], self.fraction, self.seed)
        for s, validation in zip(scored, held_out.tolist(), strict=True):
            self.recent.add(s.sample.target, s.score, s.embedding)
            if validation:
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
        embeddings = [m.embedding for m in members if m.embedding is not None]
        result = goracs_select(np.stack(embeddings), np.stack(self.validation.embeddings), size,
                               grads, g.lam, g.max_exchanges, g.exchange_candidates)
        self.goracs_subset = sorted(members[i].sample.sample_id for i in result.selected)
        self.goracs_objective = result.objective
        if self.metrics is not None:
            self.metrics.goracs_objective.set(result.objective)
        return self.goracs_subset

    def snapshot_taken(self, member_ids: Sequence[int]) -> None:
        """Turnover is measured against the members of the last refresh's snapshot."""
        self.last_snapshot = set(member_ids)

    def state_dict(self) -> State:
        """The selector's, validation reservoir's, recent window's and coverage's states, and the stage's
        counters (the drift and GORACS cadence, the last snapshot's members, GORACS's last subset)."""
        state = State(meta={"batches": self.batches, "last_snapshot": sorted(self.last_snapshot),
                            "goracs_subset": self.goracs_subset, "goracs_objective": self.goracs_objective,
                            "last_coverage": self.last_coverage,
                            "last_drift": self.last_drift.as_dict() if self.last_drift is not None else None})
        state.put("selector", self.selector.state_dict()).put("validation", self.validation.state_dict())
        state.put("recent", self.recent.state_dict())
        if self.coverage is not None:
            state.put("coverage", self.coverage.state_dict())
        return state

    def load_state_dict(self, state: State) -> None:
        meta = state.meta
        self.selector.load_state_dict(state.part("selector"))
        self.validation.load_state_dict(state.part("validation"))
        self.recent.load_state_dict(state.part("recent"))
        if self.coverage is not None and "coverage" in meta:
            self.coverage.load_state_dict(state.part("coverage"))
        self.batches, self.last_snapshot = meta["batches"], set(meta["last_snapshot"])
        self.goracs_subset, self.goracs_objective = list(meta["goracs_subset"]), meta["goracs_objective"]
        self.last_coverage = meta["last_coverage"]
        self.last_drift = DriftReport(**meta["last_drift"]) if meta["last_drift"] is not None else None

    def _export(self, seconds: float) -> None:
        m, sel = self.metrics, self.selector
        assert m is not None
        m.stage_duration.labels(Stage.SELECT).observe(seconds)
        m.coreset_size.set(len(sel))
        m.coreset_capacity.set(sel.budget)
        for k, size in enumerate(sel.strata_sizes()):
            m.coreset_stratum_members.labels(str(k)).set(size)
        m.validation_size.set(len(self.validation))
        m.coverage.set(self.last_coverage)
        if self.last_drift is not None:
            for name, value in self.last_drift.as_dict().items():
                m.drift.labels(name).set(value)
