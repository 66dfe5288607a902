"""Scoring on the stream: each sample batch updates the surrogate, then is scored with the current estimate.

For every batch: map items to rows (new items take free rows), ``partial_fit`` the surrogate (with its
replay buffer), compute the LLM effort when an effort scorer is given (λ > 0), add the rows to a bounded
reference reservoir, re-estimate the scorer (H⁻¹v for DEALRec) every ``reestimate_every`` batches, then
score the batch and embed it (the embedding feeds coverage and drift in the selection stage).

The overall score is DEALRec's minmax(influence) + λ·minmax(effort) per scorer version. A stream has no
final range to normalise by, so each version fixes its range (:class:`Bounds`) from the reference
reservoir when it starts; scores of one version are then comparable, and a selector re-buckets its
members when the version changes. Scores carry the version they were computed with.

:class:`ScoringStore` puts the surrogate (weights, optimiser, replay buffer, RNG), the scorer's state and
the reference reservoir into the checkpoint transaction as safetensors blobs — never pickle — so a
restart scores exactly as an uninterrupted run would.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import orjson
import torch
from torch import Tensor

from recsift.monitoring.metrics import Metrics
from recsift.scoring.sampling import TensorReservoir
from recsift.scoring.scorer import Bounds, Scorer, combine
from recsift.scoring.surrogate import (
    SeqBatch,
    Surrogate,
    left_pad,
)
from recsift.state import State
from recsift.stream.windows import Sample
from recsift.vocab import Stage


@dataclass(frozen=True)
class ScoredSample:
    sample: Sample
    score: float  # overall: normalised influence (or baseline score) + λ·normalised effort
    version: int
    embedding: np.ndarray  # float32 [hidden]
    raw: float = float("nan")  # the scorer's raw value (influence for DEALRec)
    effort: float = float("nan")  # the LLM's gradient norm; NaN when λ = 0


EffortFn = Callable[[Sequence[Sample]], Tensor]


class StreamScorer:
    """Learns from and scores sample batches; bounded memory (replay buffer and reference reservoir)."""

    def __init__(self, surrogate: Surrogate, scorer: Scorer, *, reestimate_every: int = 50, reference_size: int = 1024,
                 seed: int = 0, effort: EffortFn | None = None, effort_weight: float = 0.0,
                 train_rows: int | None = None) -> None:
        if reestimate_every < 1 or reference_size < 1:
            raise ValueError("reestimate_every and reference_size must be positive")
        if effort_weight > 0 and effort is None:
            raise ValueError("effort_weight > 0 needs an effort scorer (the LLM's gradient norm)")
        self.surrogate = surrogate
        self.scorer = scorer
        self.train_rows = train_rows
        self.effort = effort if effort_weight > 0 else None  # λ = 0: never computed
        self.effort_weight = effort_weight
        self.bounds: Bounds | None = None
        self.effort_bounds: Bounds | None = None
        self.reestimate_every = reestimate_every
        self.reference_size = reference_size
        self.generator = torch.Generator().manual_seed(seed)
        width = surrogate.max_len + 1
        self.references = TensorReservoir(reference_size, {"seqs": torch.zeros((0, width), dtype=torch.int64),
                                                           "ids": torch.zeros(0, dtype=torch.int64),
                                                           "effort": torch.zeros(0, dtype=torch.float64)})
        self.batches = 0
        self.batches_since_estimate = 0
        self.excluded = 0
        self.last_loss = float("nan")

    def __call__(self, samples: Sequence[Sample]) -> list[ScoredSample]:
        if not samples:
            return []
        enc = self.surrogate.encode([s.history for s in samples], [s.target for s in samples],
                                    [s.sample_id for s in samples])
        self.excluded += enc.too_short
        if not len(enc.batch):
            return []
        kept = enc.kept.tolist()
        self.last_loss = self.surrogate.partial_fit(enc.batch, max_rows=self.train_rows)
        effort = self.effort([samples[i] for i in kept]) if self.effort is not None else None
        self._remember(enc.batch, effort)
        self.batches += 1
        self.batches_since_estimate += 1
        if self.scorer.version == 0 or self.batches_since_estimate >= self.reestimate_every:
            self.reestimate()
        scores = self.scorer.score(self.surrogate, enc.batch)
        overall = self.overall(scores.values, effort)
        embeddings = self.surrogate.embed(enc.batch).numpy()
        efforts = effort.tolist() if effort is not None else [float("nan")] * len(kept)
        # Each sample gets its own copy of its row: a view would keep the batch's whole [rows, hidden] matrix alive
        # for as long as the coreset or the validation reservoir keeps the sample, one matrix per batch they draw
        # from, which grew the service's memory with the stream (bench/results/memory-census-before.json).
        return [
            ScoredSample(samples[i], o, scores.version, embeddings[row].copy(), r, e)
            for row, (i, o, r, e) in enumerate(zip(kept, overall.tolist(), scores.values.tolist(), efforts, strict=True))
        ]

    def rescore(self, samples: Sequence[Sample]) -> tuple[list[float], int]:
        """Overall scores of earlier samples under the current version (no training): for re-bucketing
        coreset members when the version changes. Unscorable samples get the version's minimum (0)."""
        if self.bounds is None or not samples:
            return [0.0] * len(samples), self.scorer.version
        enc = self.surrogate.encode([s.history for s in samples], [s.target for s in samples],
                                    [s.sample_id for s in samples], grow=False)
        out = [0.0] * len(samples)
        if len(enc.batch):
            effort = self.effort([samples[i] for i in enc.kept.tolist()]) if self.effort is not None else None
            overall = self.overall(self.scorer.score(self.surrogate, enc.batch).values, effort)
            for i, v in zip(enc.kept.tolist(), overall.tolist(), strict=True):
                out[i] = v
        return out, self.scorer.version

    def reestimate(self) -> None:
        """Start a new scorer version: re-prepare on the reference reservoir and fix its score range."""
        self.scorer.prepare(self.surrogate, self.reference)
        self.batches_since_estimate = 0
        self.bounds = Bounds.of(self.scorer.score(self.surrogate, self.reference).values)
        self.effort_bounds = Bounds.of(self.reference_effort) if self.effort is not None else None

    def overall(self, raw: Tensor, effort: Tensor | None) -> Tensor:
        """DEALRec's combination with the current version's bounds."""
        assert self.bounds is not None
        if not torch.isfinite(raw).all():
            raise FloatingPointError("the scorer produced non-finite scores")
        return combine(raw, effort, self.effort_weight, self.bounds, self.effort_bounds)

    def _remember(self, batch: SeqBatch, effort: Tensor | None) -> None:
        """A uniform reservoir of recent rows: the reference set for v, the Hessian batches and the bounds."""
        seqs = left_pad(batch.seqs, self.surrogate.max_len + 1)
        values = effort if effort is not None else torch.zeros(len(seqs), dtype=torch.float64)
        self.references.add({"seqs": seqs, "ids": batch.sample_ids, "effort": values.double()}, self.generator)

    @property
    def reference(self) -> SeqBatch:
        return SeqBatch(self.references.columns["seqs"], self.references.columns["ids"])

    @property
    def reference_effort(self) -> Tensor:
        return self.references.columns["effort"]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> State:
        """Its surrogate's and scorer's state, the reference reservoir, the bounds, RNG and counters."""
        tensors = {**{f"reference.{k}": v for k, v in self.references.columns.items()},
                   "rng": self.generator.get_state()}
        meta = {"reference_seen": self.references.seen, "batches": self.batches,
                "batches_since_estimate": self.batches_since_estimate, "excluded": self.excluded,
                "last_loss": self.last_loss,
                "bounds": [self.bounds.low, self.bounds.high] if self.bounds is not None else None,
                "effort_bounds": [self.effort_bounds.low, self.effort_bounds.high]
                if self.effort_bounds is not None else None}
        return State(tensors, meta).put("surrogate", self.surrogate.state_dict()).put("scorer", self.scorer.state_dict())

    def load_state_dict(self, state: State) -> None:
        t, meta = state.tensors, state.meta
        self.surrogate.load_state_dict(state.part("surrogate"))
        self.scorer.load_state_dict(state.part("scorer"))
        self.references.columns = {k: t[f"reference.{k}"] for k in self.references.columns}
        self.generator.set_state(t["rng"])
        self.bounds = Bounds(*meta["bounds"]) if meta["bounds"] is not None else None
        self.effort_bounds = Bounds(*meta["effort_bounds"]) if meta["effort_bounds"] is not None else None
        self.references.seen, self.batches = meta["reference_seen"], meta["batches"]
        self.batches_since_estimate, self.excluded = meta["batches_since_estimate"], meta["excluded"]
        self.last_loss = meta["last_loss"]


ScoredHandler = Callable[[list[ScoredSample]], None]


class ScoringStage:
    """The pipeline's sample handler: gathers window batches into scoring batches of ``batch_size``.

    Window batches are small (≤ ``window.max_batch``); per-batch overhead (a surrogate step, one JVP) is
    paid once per scoring batch instead, which keeps scoring ahead of ingestion. The boundary of a
    scoring batch depends only on the sample order, never on timing: samples still waiting are part of
    the checkpoint, so a restart forms the same batches.
    """

    def __init__(self, scorer: StreamScorer, *, batch_size: int, downstream: Sequence[ScoredHandler] = (),
                 metrics: Metrics | None = None, threads: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        if threads is not None and threads < 1:
            raise ValueError("threads must be positive")
        self.scorer, self.batch_size, self.downstream, self.metrics = scorer, batch_size, list(downstream), metrics
        self.threads = threads  # torch threads of the thread that calls it (the service's scoring thread)
        self._threads_of: int | None = None  # the thread they were set in
        self.pending: list[Sample] = []
        self.scored = 0
        self.busy_s = 0.0

    def __call__(self, batch: Sequence[Sample]) -> None:
        if self.threads is not None and self._threads_of != threading.get_ident():
            torch.set_num_threads(self.threads)  # per calling thread: see recsift.process.one_torch_pool
            self._threads_of = threading.get_ident()
        self.pending.extend(batch)
        while len(self.pending) >= self.batch_size:
            ready, self.pending = self.pending[:self.batch_size], self.pending[self.batch_size:]
            self._score(ready)

    def _score(self, samples: list[Sample]) -> None:
        started = time.perf_counter()
        version, excluded, hits = self.scorer.scorer.version, self.scorer.excluded, self._effort_hits()
        out = self.scorer(samples)
        self.scored += len(out)
        took = time.perf_counter() - started
        self.busy_s += took
        m = self.metrics
        if m is not None:
            m.stage_duration.labels(Stage.SCORE).observe(took)
            m.samples_scored.inc(len(out))
            m.samples_unscorable.inc(self.scorer.excluded - excluded)
            m.effort_cache_hits.inc(self._effort_hits() - hits)
            if np.isfinite(self.scorer.last_loss):
                m.surrogate_loss.set(self.scorer.last_loss)
            if self.scorer.scorer.version != version:
                m.estimate_version.set(self.scorer.scorer.version)
                m.estimate_timestamp.set(time.time())
        for handler in self.downstream:
            handler(out)

    def _effort_hits(self) -> int:
        return int(getattr(self.scorer.effort, "hits", 0))

    def state_dict(self) -> State:
        """The samples waiting for the next scoring batch (the scorer's state is its own)."""
        return State(meta={"pending": [s.to_json() for s in self.pending]})

    def load_state_dict(self, state: State) -> None:
        self.pending = [Sample.from_json(s) for s in state.meta["pending"]]


PENDING_KEY = b"p"  # a partition's changelog record of its samples waiting for the next scoring batch


class ScoringStore:
    """Checkpoint participant for the scoring stage: the stream scorer's state (surrogate and scorer
    included) and the stage's pending samples, each as the bytes of its ``state_dict()``.

    The scorer's state is rewritten only when it has changed since the last checkpoint (every change
    comes with a surrogate update or an exclusion count). The scorer belongs to this worker (with a changelog,
    the scorer and the stage's order of its pending samples are also this worker's own state in the worker
    topic: :class:`~recsift.stream.checkpoint.WorkerStore`, so an empty disk continues from them); the pending
    samples belong to their partitions: each owned partition's are also kept in a row of their own and, with
    a changelog, as its ``p`` record (:class:`~recsift.stream.checkpoint.PartitionStore`), so that when a
    partition moves to another worker its samples that were handed on but not yet scored go with it and are
    scored there, once.
    """

    worker_part_names = ("scorer", "stage")  # its rows of scoring_state, this worker's own state

    def __init__(self, stream_scorer: StreamScorer, stage: ScoringStage | None = None) -> None:
        self.stream_scorer = stream_scorer
        self.stage = stage
        self._saved_at: tuple[int, int] | None = None
        self._pending: tuple[int, int] | None = None
        self._loaded = False
        self.owned: set[int] = set()
        self.changes: dict[int, list[tuple[bytes, bytes | None]]] = {}
        self._written: dict[int, bytes] = {}  # partition → its last committed pending record
        self._writing: dict[int, bytes] = {}
        self.worker_changes: dict[str, bytes] = {}  # this worker's own parts that this checkpoint changed
        self._stage_written: bytes | None = None

    def _fingerprint(self) -> tuple[int, int]:
        return self.stream_scorer.surrogate.version, self.stream_scorer.excluded

    def create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS scoring_state (name TEXT PRIMARY KEY, state BLOB NOT NULL)")
        conn.execute("CREATE TABLE IF NOT EXISTS partition_pending (partition INTEGER PRIMARY KEY, samples BLOB NOT NULL)")

    def save(self, conn: sqlite3.Connection) -> None:
        self.changes, self._writing, self.worker_changes = {}, {}, {}
        if self.stage is not None:
            stage = self.stage.state_dict().to_bytes()
            conn.execute("INSERT OR REPLACE INTO scoring_state VALUES ('stage', ?)", (stage,))
            if stage != self._stage_written:
                self.worker_changes["stage"] = stage
            for p in sorted(self.owned):
                value = orjson.dumps([s.to_json() for s in self.stage.pending if s.partition == p])
                conn.execute("INSERT OR REPLACE INTO partition_pending VALUES (?, ?)", (p, value))
                if self._written.get(p) != value:
                    self.changes[p] = [(PENDING_KEY, value)]
                    self._writing[p] = value
        if self._fingerprint() == self._saved_at:
            return
        scorer = self.stream_scorer.state_dict().to_bytes()
        conn.execute("INSERT OR REPLACE INTO scoring_state VALUES ('scorer', ?)", (scorer,))
        self.worker_changes["scorer"] = scorer
        self._pending = self._fingerprint()

    def committed(self) -> None:
        self._saved_at = self._pending
        self._stage_written = self.worker_changes.get("stage", self._stage_written)
        self._written.update(self._writing)
        self._writing = {}

    def load(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        """The scorer once per process (later assignments keep the live one); each assigned partition's pending
        samples from its row. The stage row keeps their order across partitions: a restart on the same
        partitions forms exactly the batches an uninterrupted run forms; samples that arrived from another
        worker follow the ones held."""
        first = not self._loaded
        self._loaded = True
        saved = dict(conn.execute("SELECT name, state FROM scoring_state").fetchall()) if first else {}
        if "scorer" in saved:
            self.stream_scorer.load_state_dict(State.from_bytes(saved["scorer"]))
            self._saved_at = self._fingerprint()
        self.owned |= partitions
        self._written = {p: v for p, v in self._written.items() if p not in partitions}
        if self.stage is None:
            return
        if first:
            if "stage" in saved:
                self.stage.load_state_dict(State.from_bytes(saved["stage"]))
            self.stage.pending = [s for s in self.stage.pending if s.partition in partitions]
        rows = dict(conn.execute(f"SELECT partition, samples FROM partition_pending WHERE partition IN "
                                 f"({','.join(str(int(p)) for p in sorted(partitions)) or 'NULL'})").fetchall())
        held = {p: [Sample.from_json(s) for s in orjson.loads(rows[p])] for p in sorted(partitions) if p in rows}
        ids = {p: {s.sample_id for s in samples} for p, samples in held.items()}
        kept = [s for s in self.stage.pending if s.partition not in held or s.sample_id in ids[s.partition]]
        have = {s.sample_id for s in kept}
        self.stage.pending = kept + [s for samples in held.values() for s in samples if s.sample_id not in have]

    @staticmethod
    def saved_surrogate(conn: sqlite3.Connection) -> str | None:
        """The kind of surrogate (``sasrec``, ...) a checkpoint's scorer was built on; None when it holds none."""
        has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'scoring_state'").fetchone()
        row = conn.execute("SELECT state FROM scoring_state WHERE name = 'scorer'").fetchone() if has_table else None
        if row is None:
            return None
        return str(State.meta_of(bytes(row[0])).get("surrogate", {}).get("surrogate", "sasrec"))

    def release(self, partitions: set[int]) -> None:
        """Revoked partitions take their pending samples with them (saved by the revoke's checkpoint)."""
        self.owned -= partitions
        self._written = {p: v for p, v in self._written.items() if p not in partitions}
        if self.stage is not None:
            self.stage.pending = [s for s in self.stage.pending if s.partition not in partitions]

    # ------------------------------------------------------------------ the changelog (PartitionStore, WorkerStore)

    def worker_parts(self, conn: sqlite3.Connection) -> dict[str, bytes]:
        return {str(name): bytes(blob) for name, blob in conn.execute("SELECT name, state FROM scoring_state")
                if name in self.worker_part_names}

    def replace_worker_parts(self, conn: sqlite3.Connection, parts: dict[str, bytes]) -> None:
        conn.executemany("INSERT OR REPLACE INTO scoring_state VALUES (?, ?)", list(parts.items()))

    def restored_own(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        """Nothing to do: pending samples carry no scores."""

    def owns(self, key: bytes) -> bool:
        return key == PENDING_KEY

    def partition_records(self, conn: sqlite3.Connection, partition: int) -> dict[bytes, bytes]:
        row = conn.execute("SELECT samples FROM partition_pending WHERE partition = ?", (int(partition),)).fetchone()
        return {PENDING_KEY: bytes(row[0])} if row is not None else {}

    def replace_partition(self, conn: sqlite3.Connection, partition: int, records: dict[bytes, bytes]) -> None:
        conn.execute("INSERT OR REPLACE INTO partition_pending VALUES (?, ?)",
                     (int(partition), records.get(PENDING_KEY, b"[]")))
