"""GORACS, drift metrics and coverage on controlled data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from recsift.selection.coverage import Coverage
from recsift.selection.drift import (
    RecentWindow,
    drift,
    js_divergence,
    sliced_wasserstein,
)
from recsift.selection.goracs import cost_matrix, goracs_select, objective
from recsift.selection.selector import Member
from recsift.stream.windows import Sample


def blobs(n: int, seed: int, centers: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return centers[rng.integers(0, len(centers), n)] + rng.normal(0, 0.3, (n, centers.shape[1]))


CENTERS = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]])


def test_goracs_objective_never_increases_and_beats_random_subsets() -> None:
    rng = np.random.default_rng(0)
    candidates = np.concatenate([blobs(300, 1, CENTERS[:1]), blobs(100, 2, CENTERS)])  # skewed pool
    validation = blobs(200, 3, CENTERS)  # balanced target
    grads = rng.random(len(candidates))
    result = goracs_select(candidates, validation, 20, grads, lam=0.05, max_exchanges=15, exchange_candidates=8)
    assert len(result.selected) == 20 and len(set(result.selected.tolist())) == 20
    assert all(b <= a + 1e-12 for a, b in zip(result.history, result.history[1:], strict=False))
    cost = cost_matrix(candidates, validation, grads, 0.05)
    assert objective(cost, result.selected)[0] == pytest.approx(result.objective)
    randoms = [objective(cost, rng.choice(len(candidates), 20, replace=False))[0] for _ in range(30)]
    assert result.objective < min(randoms)
    with pytest.raises(ValueError, match="size"):
        goracs_select(candidates, validation, 0)


def member(i: int, target: str, score: float, emb: np.ndarray, ts: float = 100.0) -> Member:
    return Member(Sample(i, f"u{i}", ("x",), target, ts), score, 1, 0.0, 0, emb.astype(np.float32), inserted_ts=ts - i)


def test_drift_is_zero_for_identical_distributions_and_rises_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    items = [f"i{k}" for k in range(20)]
    base = [(items[rng.integers(0, 20)], float(rng.normal()), rng.normal(size=4)) for _ in range(400)]
    members = [member(i, t, s, e) for i, (t, s, e) in enumerate(base)]
    recent = RecentWindow(1000)
    for t, s, e in base:
        recent.add(t, s, e)
    same = drift(members, recent)
    assert same.target_js == pytest.approx(0.0, abs=1e-12) and same.score_ks == 0.0
    assert same.embedding_sw < 0.05
    values = []
    for share in (0.0, 0.25, 0.5, 1.0):  # this share of the recent stream moves to new items and higher values
        window = RecentWindow(1000)
        for i, (t, s, e) in enumerate(base):
            moved = i % 100 < share * 100
            window.add(f"new{i % 7}" if moved else t, s + 2.0 * moved, e + 2.0 * moved)
        values.append(drift(members, window))
    for metric in ("target_js", "embedding_sw", "score_ks"):
        series = [getattr(v, metric) for v in values]
        assert all(b > a for a, b in itertools.pairwise(series)), (metric, series)
    assert js_divergence({"a": 1}, {"b": 1}) == pytest.approx(1.0)
    assert sliced_wasserstein(np.zeros((0, 2)), np.ones((3, 2))) == 0.0
    half = drift(members, recent, last_snapshot=[m.sample.sample_id for m in members[:200]])
    assert half.turnover == pytest.approx(0.5)


def test_coverage_counts_the_mass_of_clusters_with_members() -> None:
    cov = Coverage(clusters=4, sample_size=2000, refresh_every=10**9, seed=0)
    cov.add(blobs(2000, 0, CENTERS).astype(np.float32))
    assert cov.ready
    assert cov.coverage(blobs(50, 1, CENTERS)) == pytest.approx(1.0)
    one_blob = cov.coverage(blobs(50, 1, CENTERS[:1]))
    assert 0.15 < one_blob < 0.35  # one of four equal clusters
    assert cov.coverage(np.zeros((0, 2))) == 0.0
    members = [member(i, "t", 0.0, e) for i, e in enumerate(blobs(8, 2, CENTERS[:1]))]
    protect = cov.guard(lambda: members[:1], budget=lambda: 100)
    assert protect(members[0])  # the only member of a heavy cluster
    protect_many = cov.guard(lambda: members, budget=lambda: 100)
    assert not protect_many(members[0])



def test_the_stage_s_coverage_guard_follows_the_selector_s_budget_after_a_resize() -> None:
    """A cluster is heavy when its mass is at least 1 / budget: with four equal clusters every one is heavy
    at budget 100 and none at budget 2. The guard must read the budget the worker has now (it changes with
    its partitions), not the one it started with."""
    from recsift.selection.reservoir import StratifiedReservoir
    from recsift.selection.stage import SelectionStage

    cov = Coverage(clusters=4, sample_size=2000, refresh_every=10**9, seed=0)
    cov.add(blobs(2000, 0, CENTERS).astype(np.float32))
    selector = StratifiedReservoir(budget=100, strata=2)
    SelectionStage(selector, coverage=cov, coverage_constraint=True)
    assert selector.protect is not None
    only = member(0, "t", 0.0, blobs(1, 2, CENTERS[:1])[0])
    selector.members = {0: only}
    assert selector.protect(only)  # the last member of a heavy cluster at budget 100
    selector.resize(2)
    assert not selector.protect(only)  # at budget 2 no cluster of mass 1/4 is heavy

def test_a_coverage_checkpoint_from_before_the_array_ring_loads_into_the_same_state() -> None:
    """State written before 2026-11-24 kept the recent sample as a bare tensor plus ``pos``; it still loads."""
    from recsift.state import State, differences

    coverage = Coverage(4, sample_size=300, refresh_every=10_000, seed=1)
    coverage.add(np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32))
    new = coverage.state_dict()
    ring = new.part("recent")
    old = State({k: v for k, v in new.tensors.items() if not k.startswith("recent.")} | {"recent": ring.tensors["values"]},
                {"since_refresh": new.meta["since_refresh"], "pos": ring.meta["pos"]})
    restored = Coverage(4, sample_size=300, refresh_every=10_000, seed=1)
    restored.load_state_dict(State.from_bytes(old.to_bytes()))
    assert differences(restored.state_dict(), new) == []
