"""A bounded uniform sample of a stream of tensor rows: Algorithm R (Vitter), vectorised per batch.

The surrogate's replay buffer and the stream scorer's reference reservoir are both this. Several rows of
one batch can draw the same slot; the last of them wins, as if the rows had been added one at a time.
(Assigning with duplicate indices, ``x[slots] = rows``, leaves the winner unspecified in torch: two
aligned columns could then keep different rows for one slot, and a restart could differ from an
uninterrupted run.)
"""

from __future__ import annotations

import torch
from torch import Tensor


class TensorReservoir:
    """Aligned columns (``name → [n, ...]`` tensors) of at most ``capacity`` rows, uniform over all rows added."""

    def __init__(self, capacity: int, columns: dict[str, Tensor]) -> None:
        if capacity < 1:
            raise ValueError("a reservoir needs a positive capacity")
        self.capacity = capacity
        self.columns = {k: v[:0].clone() for k, v in columns.items()}  # empty, with each column's shape and dtype
        self.seen = 0

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def add(self, rows: dict[str, Tensor], generator: torch.Generator) -> None:
        n = len(next(iter(rows.values())))
        free = max(0, self.capacity - len(self))
        if free:
            self.columns = {k: torch.cat([v, rows[k][:free]]) for k, v in self.columns.items()}
        rest = n - min(free, n)
        if rest:
            seen = self.seen + min(free, n) + torch.arange(1, rest + 1)
            slots = (torch.rand(rest, generator=generator, dtype=torch.float64) * seen).long()
            source = torch.arange(min(free, n), n)
            keep = slots < self.capacity
            slots, source = slots[keep], source[keep]
            if len(slots):
                # the last row drawing each slot: first occurrence in the reversed order
                reversed_slots = slots.flip(0)
                unique, inverse = torch.unique(reversed_slots, return_inverse=True)
                first = torch.full((len(unique),), len(slots), dtype=torch.long).scatter_reduce(
                    0, inverse, torch.arange(len(slots)), reduce="amin")
                winners = source.flip(0)[first]
                for k, v in self.columns.items():
                    v[unique] = rows[k][winners]
        self.seen += n

    def sample(self, k: int, generator: torch.Generator) -> dict[str, Tensor]:
        """``k`` rows drawn uniformly with replacement."""
        pick = torch.randint(0, len(self), (k,), generator=generator)
        return {name: v[pick] for name, v in self.columns.items()}
