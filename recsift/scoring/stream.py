"""Scoring on the stream: each sample batch updates the surrogate, then is scored with the current estimate.

For every batch: map items to rows (new items take free rows), ``partial_fit`` the surrogate (with its
replay buffer), add the rows to a bounded reference reservoir, re-estimate the scorer (H⁻¹v for DEALRec)
every ``reestimate_every`` batches, then score the batch and embed it (the embedding feeds coverage and
drift in the selection stage). Scores carry the scorer version they were computed with.

:class:`ScoringStore` puts the surrogate (weights, optimiser, replay buffer, RNG), the scorer's state and
the reference reservoir into the checkpoint transaction as safetensors blobs — never pickle — so a
restart scores exactly as an uninterrupted run would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from recsift.scoring.scorer import Scorer
from recsift.scoring.surrogate import SeqBatch, Surrogate, left_pad, safetensors_metadata
from recsift.stream.windows import Sample


@dataclass(frozen=True)
class ScoredSample:
    sample: Sample
    score: float
    version: int
    embedding: np.ndarray  # float32 [hidden]


class StreamScorer:
    """Learns from and scores sample batches; bounded memory (replay buffer and reference reservoir)."""

    def __init__(self, surrogate: Surrogate, scorer: Scorer, reestimate_every: int = 50, reference_size: int = 1024,
                 seed: int = 0) -> None:
        if reestimate_every < 1 or reference_size < 1:
            raise ValueError("reestimate_every and reference_size must be positive")
        self.surrogate = surrogate
        self.scorer = scorer
        self.reestimate_every = reestimate_every
        self.reference_size = reference_size
        self.generator = torch.Generator().manual_seed(seed)
        width = surrogate.max_len + 1
        self.reference = SeqBatch(torch.zeros((0, width), dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        self.reference_seen = 0
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
        self.last_loss = self.surrogate.partial_fit(enc.batch)
        self._remember(enc.batch)
        self.batches += 1
        self.batches_since_estimate += 1
        if self.scorer.version == 0 or self.batches_since_estimate >= self.reestimate_every:
            self.scorer.prepare(self.surrogate, self.reference)
            self.batches_since_estimate = 0
        scores = self.scorer.score(self.surrogate, enc.batch)
        embeddings = self.surrogate.embed(enc.batch).numpy()
        return [
            ScoredSample(samples[i], float(v), scores.version, embeddings[row])
            for row, (i, v) in enumerate(zip(enc.kept.tolist(), scores.values.tolist(), strict=True))
        ]

    def _remember(self, batch: SeqBatch) -> None:
        """Reservoir (Algorithm R) of recent rows: the reference set for v and the Hessian mini-batches."""
        seqs = left_pad(batch.seqs, self.surrogate.max_len + 1)
        ref_seqs, ref_ids = self.reference.seqs, self.reference.sample_ids
        free = max(0, self.reference_size - len(ref_seqs))
        if free:
            ref_seqs = torch.cat([ref_seqs, seqs[:free]])
            ref_ids = torch.cat([ref_ids, batch.sample_ids[:free]])
        rest = slice(free, len(seqs))
        if len(seqs[rest]):
            seen = self.reference_seen + min(free, len(seqs)) + torch.arange(1, len(seqs[rest]) + 1)
            slots = (torch.rand(len(seen), generator=self.generator, dtype=torch.float64) * seen).long()
            keep = slots < self.reference_size
            ref_seqs[slots[keep]] = seqs[rest][keep]
            ref_ids[slots[keep]] = batch.sample_ids[rest][keep]
        self.reference = SeqBatch(ref_seqs, ref_ids)
        self.reference_seen += len(seqs)

    # ------------------------------------------------------------------ state

    def state_bytes(self) -> bytes:
        tensors = {f"scorer.{k}": v for k, v in self.scorer.state_tensors().items()}
        tensors.update({"reference.seqs": self.reference.seqs, "reference.ids": self.reference.sample_ids,
                        "rng": self.generator.get_state()})
        meta = {"reference_seen": str(self.reference_seen), "batches": str(self.batches),
                "batches_since_estimate": str(self.batches_since_estimate), "excluded": str(self.excluded)}
        return st_save(tensors, metadata=meta)

    def load_state_bytes(self, blob: bytes) -> None:
        tensors = st_load(blob)
        meta = safetensors_metadata(blob)
        self.scorer.load_state_tensors(self.surrogate, {k[7:]: v for k, v in tensors.items() if k.startswith("scorer.")})
        self.reference = SeqBatch(tensors["reference.seqs"], tensors["reference.ids"])
        self.generator.set_state(tensors["rng"])
        self.reference_seen, self.batches = int(meta["reference_seen"]), int(meta["batches"])
        self.batches_since_estimate, self.excluded = int(meta["batches_since_estimate"]), int(meta["excluded"])


class ScoringStore:
    """Checkpoint participant for the stream scorer: rewritten only when the surrogate has changed."""

    def __init__(self, stream_scorer: StreamScorer) -> None:
        self.stream_scorer = stream_scorer
        self._saved_at = -1
        self._pending = -1

    def create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS scoring (id INTEGER PRIMARY KEY CHECK (id = 1), surrogate BLOB NOT NULL,"
            " scorer BLOB NOT NULL, surrogate_version INTEGER NOT NULL)"
        )

    def save(self, conn: sqlite3.Connection) -> None:
        surrogate = self.stream_scorer.surrogate
        if surrogate.version == self._saved_at:
            return
        conn.execute("INSERT OR REPLACE INTO scoring VALUES (1, ?, ?, ?)",
                     (surrogate.state_bytes(), self.stream_scorer.state_bytes(), surrogate.version))
        self._pending = surrogate.version

    def committed(self) -> None:
        self._saved_at = self._pending

    def load(self, conn: sqlite3.Connection, partitions: set[int]) -> None:
        row = conn.execute("SELECT surrogate, scorer, surrogate_version FROM scoring WHERE id = 1").fetchone()
        if row is None:
            return
        self.stream_scorer.surrogate.load_state_bytes(row[0])
        self.stream_scorer.load_state_bytes(row[1])
        self._saved_at = int(row[2])
