"""Length buckets hold rows of similar length, every row exactly once; a training step's passes are buckets."""

from __future__ import annotations

import pytest
import torch

from recsift import batching
from recsift.batching import length_buckets, step_chunks


def padded_share(lengths: torch.Tensor, chunks: list[torch.Tensor]) -> float:
    """The share of computed positions that are padding when each chunk is trimmed to its longest row."""
    computed = sum(int(lengths[c].max()) * len(c) for c in chunks)
    return 1 - int(lengths.sum()) / computed


def test_buckets_are_sorted_with_ties_in_input_order() -> None:
    lengths = torch.tensor([3, 1, 2, 1, 3, 2])
    assert [c.tolist() for c in length_buckets(lengths, 4)] == [[1, 3, 2, 5], [0, 4]]


def test_buckets_cut_padding_and_keep_every_row_once() -> None:
    lengths = torch.randint(1, 51, (4000,), generator=torch.Generator().manual_seed(0))
    chunks = length_buckets(lengths, 128)
    assert all(len(c) <= 128 for c in chunks)
    assert sorted(torch.cat(chunks).tolist()) == list(range(len(lengths)))
    assert padded_share(lengths, chunks) < 0.05
    # a control: input-order chunks of the same size pay about half of every batch in padding
    assert padded_share(lengths, list(torch.split(torch.arange(len(lengths)), 128))) > 0.4


def test_bucket_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        length_buckets(torch.tensor([1, 2]), 0)


def test_a_step_that_fits_one_pass_is_one_pass_in_input_order(monkeypatch: pytest.MonkeyPatch) -> None:
    lengths = torch.tensor([3, 1, 2])
    assert [c.tolist() for c in step_chunks(lengths, 3)] == [[0, 1, 2]]
    assert [c.tolist() for c in step_chunks(lengths, 2)] == [[1, 2], [0]]
    monkeypatch.setattr(batching, "TRAIN_BUCKETS", False)  # the step before: input order
    assert [c.tolist() for c in step_chunks(lengths, 2)] == [[0, 1], [2]]
    with pytest.raises(ValueError, match="positive"):
        step_chunks(lengths, 0)
