"""The recent validation reservoir: a fixed, hash-chosen share of samples that never enters the coreset.

Refresh evaluation, GORACS's target distribution and drift compare against its most recent samples.
"""

from __future__ import annotations

import numpy as np

from recsift.selection.reservoir import uniform_key
from recsift.selection.selector import embeddings_from_tensors, embeddings_to_tensors
from recsift.state import State
from recsift.stream.windows import Sample


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

    def state_dict(self) -> State:
        return State(embeddings_to_tensors(self.embeddings, "embeddings"),
                     {"samples": [s.to_json() for s in self.samples], "pos": self.pos, "seen": self.seen})

    def load_state_dict(self, state: State) -> None:
        self.samples = [Sample.from_json(s) for s in state.meta["samples"]]
        self.embeddings = [e if e is not None else np.zeros(0, np.float32)
                           for e in embeddings_from_tensors(state.tensors, "embeddings")]
        self.pos, self.seen = state.meta["pos"], state.meta["seen"]


def is_validation(sample_id: int, fraction: float, seed: int) -> bool:
    """Hash-chosen: the same sample is always on the same side, across restarts and replicas."""
    return fraction > 0 and uniform_key(sample_id, seed ^ 0x5EED) < fraction
