from __future__ import annotations

import torch

from recsift.scoring.sampling import TensorReservoir


def one_at_a_time(capacity: int, batches: list[torch.Tensor], generator: torch.Generator) -> list[int]:
    """Algorithm R row by row, drawing the same numbers the vectorised reservoir draws."""
    kept: list[int] = []
    seen = 0
    for batch in batches:
        free = max(0, capacity - len(kept))
        kept += batch[:free].tolist()
        rest = batch[free:]
        if len(rest):
            counts = seen + min(free, len(batch)) + torch.arange(1, len(rest) + 1)
            slots = (torch.rand(len(rest), generator=generator, dtype=torch.float64) * counts).long()
            for value, slot in zip(rest.tolist(), slots.tolist(), strict=True):
                if slot < capacity:
                    kept[slot] = value
        seen += len(batch)
    return kept


def test_the_vectorised_reservoir_equals_algorithm_r_row_by_row_and_keeps_columns_aligned() -> None:
    batches = [torch.arange(start, start + size) for start, size in ((0, 7), (7, 40), (47, 300), (347, 5))]
    reservoir = TensorReservoir(16, {"ids": torch.zeros(0, dtype=torch.long), "twice": torch.zeros((0, 2))})
    g = torch.Generator().manual_seed(3)
    for b in batches:
        reservoir.add({"ids": b, "twice": torch.stack([b * 2.0, b * 2.0], 1)}, g)
    expected = one_at_a_time(16, batches, torch.Generator().manual_seed(3))
    assert reservoir.columns["ids"].tolist() == expected  # with many rows per slot in the 300-row batch
    assert torch.equal(reservoir.columns["twice"][:, 0], reservoir.columns["ids"] * 2.0)
    assert len(reservoir) == 16 and reservoir.seen == 352
