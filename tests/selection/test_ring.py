"""ArrayRing keeps exactly the last ``capacity`` rows, however they arrive."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from recsift.selection.ring import ArrayRing
from recsift.state import State


@pytest.mark.parametrize("width", [None, 3])
def test_holds_the_last_capacity_rows_for_any_batching(width: int | None) -> None:
    rng = np.random.default_rng(0)
    ring, reference = ArrayRing(50), deque(maxlen=50)
    for _ in range(200):
        n = int(rng.integers(0, 80))
        rows = rng.normal(size=(n,) if width is None else (n, width))
        ring.extend(rows)
        reference.extend(rows)
        held = ring.values.reshape(len(ring), -1)
        expected = np.asarray(reference).reshape(len(reference), -1)
        assert len(ring) == len(reference)
        assert sorted(map(tuple, held)) == sorted(map(tuple, expected))


def test_overwrites_the_oldest_slot_in_place() -> None:
    ring = ArrayRing(4)
    ring.extend(np.arange(4.0))
    ring.extend(np.arange(4.0, 6.0))
    assert ring.values.tolist() == [4.0, 5.0, 2.0, 3.0]
    ring.extend(np.arange(6.0, 16.0))  # more than fits: only the last 4, from the next slot on
    assert ring.values.tolist() == [14.0, 15.0, 12.0, 13.0]
    ring.reset(np.arange(10.0, 12.0))
    assert ring.values.tolist() == [10.0, 11.0]


def test_state_round_trip_continues_identically() -> None:
    ring = ArrayRing(5, np.float32)
    ring.extend(np.arange(7.0))
    restored = ArrayRing(5, np.float32)
    restored.load_state_dict(State.from_bytes(ring.state_dict().to_bytes()))
    for r in (ring, restored):
        r.extend(np.arange(100.0, 103.0))
    assert restored.values.tolist() == ring.values.tolist() and restored.pos == ring.pos
    empty = ArrayRing(3)
    empty.load_state_dict(ArrayRing(3).state_dict())
    assert len(empty) == 0 and empty.values.shape == (0,)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ArrayRing(0)
