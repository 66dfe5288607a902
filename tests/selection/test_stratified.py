"""Batch DEALRec selection: the paper's allocation rule, edge cases, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from recsift.selection.stratified import (
    allocate,
    dealrec_select,
    hard_prune_cut,
    random_select,
    stratum_of,
    topk_select,
)


def test_fewest_first_allocation() -> None:
    # strata of 0, 5, 100, 3, 1000 with budget 100: 0, then 3 and 5 in full, then ⌊92/2⌋ = 46 each
    assert allocate([0, 5, 100, 3, 1000], 100) == [0, 5, 46, 3, 46]
    assert allocate([10, 10, 10], 100) == [10, 10, 10]  # budget ≥ stream: everything
    assert allocate([7, 7, 7], 10) == [3, 3, 4]  # floor shares: the remainder flows to the last stratum
    assert allocate([], 5) == []
    with pytest.raises(ValueError):
        allocate([1], -1)


def test_selection_follows_the_paper() -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 5000), rng.normal(4, 0.3, 500)])
    ids = np.arange(len(scores)) + 1000
    sel = dealrec_select(ids, scores, budget=300, strata=10, hard_prune=0.1, seed=1)
    cut = np.sort(scores)[len(scores) - 550 - 1]
    assert (sel.scores <= cut).all()  # the hardest 10% are gone
    kept = scores[scores <= cut]
    strata = stratum_of(kept, kept.min(), kept.max(), 10)
    assert list(sel.quotas) == allocate(np.bincount(strata, minlength=10).tolist(), 300)
    assert np.bincount(sel.strata, minlength=10).tolist() == list(sel.quotas)
    assert len(set(sel.ids.tolist())) == len(sel) == sum(sel.quotas)
    assert np.array_equal(scores[sel.ids - 1000], sel.scores)
    assert np.array_equal(dealrec_select(ids, scores, 300, 10, 0.1, seed=1).ids, sel.ids)  # seeded
    assert not np.array_equal(dealrec_select(ids, scores, 300, 10, 0.1, seed=2).ids, sel.ids)
    # coverage: sparse strata are over-represented relative to a uniform draw
    assert sel.quotas[0] == np.bincount(strata, minlength=10)[0]


def test_edge_cases() -> None:
    ids = np.arange(50)
    assert len(dealrec_select(ids, np.linspace(0, 1, 50), budget=100, strata=5, hard_prune=0.0)) == 50
    same = dealrec_select(ids, np.ones(50), budget=10, strata=5, hard_prune=0.0)
    assert len(same) == 10 and set(same.strata.tolist()) == {0}  # all scores equal: one stratum
    assert len(dealrec_select(ids[:0], np.zeros(0), budget=10)) == 0
    assert hard_prune_cut(np.arange(10.0), 0.0) == np.inf
    with pytest.raises(ValueError, match="finite"):
        dealrec_select(ids, np.r_[np.ones(49), np.nan], budget=10)
    with pytest.raises(ValueError, match="differ in length"):
        dealrec_select(ids, np.ones(49), budget=10)


def test_ccs_topk_random() -> None:
    scores = np.arange(100.0)
    assert topk_select(np.arange(100), scores, 5).ids.tolist() == [99, 98, 97, 96, 95]
    assert topk_select(np.arange(100), scores, 5, highest=False).ids.tolist() == [0, 1, 2, 3, 4]
    assert len(random_select(np.arange(100), 10, seed=0)) == 10
