"""The recent validation reservoir: a fixed, hash-chosen share of samples that never enters the coreset.

Refresh evaluation, GORACS's target distribution and drift compare against its most recent samples.
Readers see it oldest first by event time (:func:`validation_order`), whoever kept which part: a worker of
a consumer group keeps one reservoir per owned partition (:class:`PartitionedValidation`), which moves with
the partition like its coreset reservoir.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from recsift.hashing import uniform
from recsift.selection.selector import embeddings_from_tensors, embeddings_to_tensors
from recsift.selection.stratified import partition_budget
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

    def ordered(self) -> list[tuple[Sample, int]]:
        """:meth:`numbered` in reading order (:func:`validation_order`)."""
        return sorted(self.numbered(), key=validation_order)

    def resize(self, size: int) -> None:
        """Keep the most recent ``size`` samples from now on."""
        if size < 1:
            raise ValueError("validation size must be positive")
        self.size = size
        self.samples = deque(self.samples, maxlen=size)
        self.embeddings = deque(self.embeddings, maxlen=size)

    def state_dict(self) -> State:
        return State(embeddings_to_tensors(list(self.embeddings), "embeddings"),
                     {"samples": [s.to_json() for s in self.samples], "seen": self.seen})

    def load_state_dict(self, state: State) -> None:
        self.samples = deque((Sample.from_json(s) for s in state.meta["samples"]), maxlen=self.size)
        self.embeddings = deque((e if e is not None else np.zeros(0, np.float32)
                                 for e in embeddings_from_tensors(state.tensors, "embeddings")), maxlen=self.size)
        self.seen = state.meta["seen"]


def validation_order(numbered: tuple[Sample, int]) -> tuple[float, int, int]:
    """The reading order of validation samples, given as (sample, sequence number): event time, then the
    sequence number, then the sample id. One order for the worker's table and the trainer's mirror, and the
    same whether one reservoir or several (one per partition, each numbering its own) held them."""
    sample, seq = numbered
    return sample.ts, seq, sample.sample_id


class PartitionedValidation:
    """A worker's validation reservoir as one :class:`ValidationReservoir` per owned source partition.

    Partition ``p`` keeps its share of ``size`` (``partition_budget``, like its coreset share), so the workers
    of a group together keep ``size`` recent samples, and a partition's samples move with it."""

    def __init__(self, size: int, partitions: int | None = None) -> None:
        if size < 1:
            raise ValueError("validation size must be positive")
        self.size, self.partitions = size, partitions
        self.parts: dict[int, ValidationReservoir] = {}
        self.seen = 0  # validation samples this worker added (each part counts its own, and travels with it)

    def share(self, partition: int) -> int:
        """Partition ``partition``'s part of ``size`` (the whole of it while the partition count is unknown)."""
        return self.size if self.partitions is None else partition_budget(self.size, self.partitions, {partition})

    def set_partition_count(self, partitions: int) -> None:
        self.partitions = partitions
        for p, part in self.parts.items():
            part.resize(self.share(p))

    def adopt(self, partition: int, state: State | None) -> None:
        """Own ``partition``: its reservoir restored from ``state`` (None: a new, empty one)."""
        if state is None:
            part = ValidationReservoir(self.share(partition))
        else:
            part = ValidationReservoir(int(state.meta["size"]))
            part.load_state_dict(state.part("reservoir"))
            part.resize(self.share(partition))
        self.parts[partition] = part

    def release(self, partitions: Iterable[int]) -> None:
        for p in partitions:
            self.parts.pop(p, None)

    def part_state(self, partition: int) -> State:
        part = self.parts[partition]
        return State(meta={"size": part.size}).put("reservoir", part.state_dict())

    def add(self, sample: Sample, embedding: np.ndarray) -> None:
        part = self.parts.get(sample.partition)
        if part is None:
            raise ValueError(f"a validation sample of partition {sample.partition}, which this worker does not "
                             f"own (it owns {sorted(self.parts)})")
        part.add(sample, embedding)
        self.seen += 1

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts.values())

    def _merged(self) -> list[tuple[tuple[Sample, int], np.ndarray]]:
        rows = [(n, e) for part in self.parts.values() for n, e in zip(part.numbered(), part.embeddings, strict=True)]
        return sorted(rows, key=lambda row: validation_order(row[0]))

    def numbered(self) -> list[tuple[Sample, int]]:
        """(sample, its partition's sequence number) of every owned partition, in reading order."""
        return [n for n, _ in self._merged()]

    ordered = numbered

    @property
    def samples(self) -> list[Sample]:
        return [s for (s, _), _ in self._merged()]

    @property
    def embeddings(self) -> list[np.ndarray]:
        return [e for _, e in self._merged()]

    def state_dict(self) -> State:
        """This worker's own counter and view of the partition count; the parts are saved per partition."""
        meta: dict[str, Any] = {"seen": self.seen, "partitions": self.partitions}
        return State(meta=meta)

    def load_state_dict(self, state: State) -> None:
        self.seen, self.partitions = int(state.meta["seen"]), state.meta.get("partitions")


def validation_mask(sample_ids: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Which samples are validation samples: hash-chosen, so the same sample is always on the same side,
    across restarts and replicas."""
    if fraction <= 0 or not sample_ids:
        return np.zeros(len(sample_ids), dtype=bool)
    return uniform(torch.tensor(list(sample_ids)), seed ^ 0x5EED).numpy() < fraction


def is_validation(sample_id: int, fraction: float, seed: int) -> bool:
    """``validation_mask`` of one sample."""
    return bool(validation_mask([sample_id], fraction, seed)[0])
