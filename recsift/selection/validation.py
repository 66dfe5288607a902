"""The recent validation reservoir: a fixed, hash-chosen share of samples that never enters the coreset.

Refresh evaluation, GORACS's target distribution and drift compare against its most recent samples.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import torch

from recsift.hashing import uniform
from recsift.selection.selector import embeddings_from_tensors, embeddings_to_tensors
from recsift.state import State
from recsift.stream.windows import Sample


class ValidationReservoir:
    """The most recent ``size`` validation samples, with their embeddings."""

    def __init__(self, size: int = 2048) -> None:
        if size < 1:
            raise ValueError("validation size must be positive")
        self.size = size
        self.samples: deque[Sample] = deque(maxlen=size)
        self.embeddings: deque[np.ndarray] = deque(maxlen=size)
        self.seen = 0

    def add(self, sample: Sample, embedding: np.ndarray) -> None:
        self.seen += 1
        self.samples.append(sample)
        self.embeddings.append(embedding)

    def __len__(self) -> int:
        return len(self.samples)

    def numbered(self) -> list[tuple[Sample, int]]:
        """(sample, sequence number) oldest first; the number counts the validation samples before it."""
        first = self.seen - len(self.samples)
        return [(s, first + i) for i, s in enumerate(self.samples)]

    def state_dict(self) -> State:
        return State(embeddings_to_tensors(list(self.embeddings), "embeddings"),
                     {"samples": [s.to_json() for s in self.samples], "seen": self.seen})

    def load_state_dict(self, state: State) -> None:
        self.samples = deque((Sample.from_json(s) for s in state.meta["samples"]), maxlen=self.size)
        self.embeddings = deque((e if e is not None else np.zeros(0, np.float32)
                                 for e in embeddings_from_tensors(state.tensors, "embeddings")), maxlen=self.size)
        self.seen = state.meta["seen"]


def validation_mask(sample_ids: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Which samples are validation samples: hash-chosen, so the same sample is always on the same side,
    across restarts and replicas."""
    if fraction <= 0 or not sample_ids:
        return np.zeros(len(sample_ids), dtype=bool)
    return uniform(torch.tensor(list(sample_ids)), seed ^ 0x5EED).numpy() < fraction


def is_validation(sample_id: int, fraction: float, seed: int) -> bool:
    """``validation_mask`` of one sample."""
    return bool(validation_mask([sample_id], fraction, seed)[0])
