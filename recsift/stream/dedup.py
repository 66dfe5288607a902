"""Duplicate detection: the recently accepted event ids, bounded, checkpointed incrementally."""

from __future__ import annotations

from collections.abc import Iterable

from recsift.state import State


class DedupIndex:
    """Recently accepted event ids, each tagged with its source partition, in two generations.

    Lookups check both generations; when the current one holds ``capacity / 2`` ids it becomes the previous
    one and the old previous generation is forgotten at once. So between ``capacity / 2`` and ``capacity``
    of the most recent ids are remembered (a duplicate arriving later than that is not detected), memory is
    bounded, and every operation is a plain dict access. Ids added since the last checkpoint are tracked
    for an incremental save; a forgotten generation is deleted there by its number.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._half = max(1, capacity // 2)
        self.generation = 0
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}
        self.added: dict[tuple[int, int], list[str]] = {}  # (partition, generation) → ids since the last checkpoint
        self.forgotten_below = 0  # generations below this number are gone

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def ids(self) -> dict[str, int]:
        return {**self._previous, **self._current}

    def seen_before(self, event_id: str, partition: int) -> bool:
        """True if the id is remembered; otherwise remember it and return False."""
        if self.capacity == 0:
            return False
        if event_id in self._current or event_id in self._previous:
            return True
        if len(self._current) >= self._half:
            self._previous = self._current
            self._current = {}
            self.generation += 1
            self.forgotten_below = self.generation - 1
            self.added = {k: v for k, v in self.added.items() if k[1] >= self.forgotten_below}
        self._current[event_id] = partition
        key = (partition, self.generation)
        ids = self.added.get(key)
        if ids is None:
            ids = self.added[key] = []
        ids.append(event_id)
        return False

    def restore(self, generation: int, rows: Iterable[tuple[str, int, int]]) -> None:
        """Load remembered ids ``(event_id, partition, generation)`` without marking them as changed."""
        self.generation = max(self.generation, generation)
        self.forgotten_below = max(0, self.generation - 1)
        for event_id, partition, gen in rows:
            if gen == self.generation:
                self._current[event_id] = partition
            elif gen == self.generation - 1:
                self._previous[event_id] = partition

    def drop_partitions(self, partitions: set[int]) -> None:
        for gen in (self._current, self._previous):
            for event_id in [e for e, p in gen.items() if p in partitions]:
                del gen[event_id]
        self.added = {k: v for k, v in self.added.items() if k[0] not in partitions}

    def clear_changes(self) -> None:
        self.added = {}

    def state_dict(self) -> State:
        """The remembered ids by generation (the changes since the last checkpoint are not state)."""
        return State(meta={"capacity": self.capacity, "generation": self.generation,
                           "forgotten_below": self.forgotten_below, "current": self._current,
                           "previous": self._previous})

    def load_state_dict(self, state: State) -> None:
        meta = state.meta
        self.capacity, self._half = meta["capacity"], max(1, meta["capacity"] // 2)
        self.generation, self.forgotten_below = meta["generation"], meta["forgotten_below"]
        self._current, self._previous = dict(meta["current"]), dict(meta["previous"])
        self.added = {}
