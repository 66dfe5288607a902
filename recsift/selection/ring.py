"""A ring of the most recent numeric rows (scores, embeddings), kept in one array for vectorised reads."""

from __future__ import annotations

import numpy as np
import torch

from recsift.state import State


class ArrayRing:
    """The last ``capacity`` rows added; once full, each new row overwrites the oldest in place.

    ``values`` is in slot order, not arrival order: readers that need a set of recent rows (a quantile, a
    clustering) get it without a copy. Rows may be scalars (a 1-D ring) or vectors (2-D).
    """

    def __init__(self, capacity: int, dtype: type = np.float64) -> None:
        if capacity < 1:
            raise ValueError(f"ring capacity must be positive, got {capacity}")
        self.capacity, self.dtype = capacity, dtype
        self._values: np.ndarray | None = None
        self.pos = 0  # the slot the next row overwrites, once full

    @property
    def values(self) -> np.ndarray:
        return self._values if self._values is not None else np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return 0 if self._values is None else len(self._values)

    def extend(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=self.dtype)[-self.capacity:]
        if not len(rows):
            return
        if self._values is None:
            self._values = np.zeros((0, *rows.shape[1:]), dtype=self.dtype)
        room = self.capacity - len(self._values)
        if room > 0:
            self._values = np.concatenate([self._values, rows[:room]])
            rows = rows[room:]
        slots = (self.pos + np.arange(len(rows))) % self.capacity
        self._values[slots] = rows
        self.pos = (self.pos + len(rows)) % self.capacity

    def reset(self, rows: np.ndarray) -> None:
        """Start again from ``rows`` (their last ``capacity``)."""
        self._values, self.pos = None, 0
        self.extend(rows)

    def state_dict(self) -> State:
        tensors = {} if self._values is None else {"values": torch.from_numpy(self._values.copy())}
        return State(tensors, {"pos": self.pos})

    def load_state_dict(self, state: State) -> None:
        values = state.tensors.get("values")
        self._values = None if values is None else values.numpy().astype(self.dtype, copy=True)
        self.pos = state.meta["pos"]
