"""The streaming selector: conformance, equivalence with the batch selection, options, the store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ks_2samp

from recsift.selection.checks import check_selector, synthetic_offers
from recsift.selection.registry import make_selector
from recsift.selection.reservoir import StratifiedReservoir
from recsift.selection.selector import Offer
from recsift.selection.stage import SelectionStage
from recsift.selection.store import (
    CoresetStore,
    export_snapshot,
    live_members,
    read_snapshot,
    take_snapshot,
)
from recsift.selection.stratified import (
    allocate,
    dealrec_select,
    hard_prune_cut,
    stratum_of,
)
from recsift.stream.checkpoint import Checkpoint
from recsift.stream.windows import Sample


@pytest.mark.parametrize("options", [{}, {"half_life_s": 500.0}, {"user_cap": 2}, {"edges": (-2.0, 2.5)}])
def test_conformance(options: dict, tmp_path: Path) -> None:
    check_selector(lambda: StratifiedReservoir(budget=64, strata=8, seed=3, sketch_size=512, rebucket_every=300,
                                               **options),
                   synthetic_offers(4000, seed=1), str(tmp_path / "c.sqlite"))


def static_stream(seed: int, n: int = 6000) -> tuple[np.ndarray, list[list[Offer]]]:
    batches = synthetic_offers(n, seed=seed, batch=250)
    scores = np.array([o.score for b in batches for o in b])
    return scores, batches


def test_on_a_static_stream_allocation_equals_the_batch_one_and_scores_match() -> None:
    budget, strata, prune = 300, 20, 0.1
    streamed, batched = [], []
    for seed in range(20):
        scores, batches = static_stream(seed)
        cut = hard_prune_cut(scores, prune)
        low = float(scores[scores <= cut].min())
        selector = StratifiedReservoir(budget, strata, prune, seed=seed, edges=(low, cut))
        for b in batches:
            selector.offer(b)
        batch = dealrec_select(np.arange(len(scores)), scores, budget, strata, prune, seed=seed)
        assert selector.quotas == list(batch.quotas)
        assert selector.strata_sizes() == list(batch.quotas)
        streamed.extend(m.score for m in selector.members.values())
        batched.extend(batch.scores.tolist())
    assert ks_2samp(streamed, batched).pvalue > 0.05


def test_sketch_edges_track_the_stream_and_members_are_rebucketed() -> None:
    selector = StratifiedReservoir(budget=100, strata=10, hard_prune=0.1, sketch_size=1000, rebucket_every=200)
    for b in synthetic_offers(3000, seed=0):
        selector.offer(b)
    first = selector.edges
    shifted = [[Offer(o.sample._replace(sample_id=o.sample.sample_id + 10**6), o.score + 5.0, 1) for o in b]
               for b in synthetic_offers(3000, seed=1)]
    for b in shifted:
        selector.offer(b)
    assert first is not None and selector.edges is not None and selector.edges[0] > first[0] + 3
    assert selector.stats.rebuckets >= 2
    low, high = selector.edges
    for m in selector.members.values():
        assert m.score <= high
        assert m.stratum == int(stratum_of(np.array([m.score]), low, high, 10)[0])
    assert len(selector) <= 100


def test_a_new_version_rescores_members() -> None:
    selector = StratifiedReservoir(budget=50, strata=5, sketch_size=500)
    for b in synthetic_offers(1000, seed=0):
        selector.offer(b)
    calls: list[int] = []

    def rescore(samples: list[Sample]) -> tuple[list[float], int]:
        calls.append(len(samples))
        return [float(s.sample_id % 7) for s in samples], 2

    held = len(selector.members) + len(selector.spare)
    assert len(selector.spare) > 0
    selector.offer(synthetic_offers(200, seed=5, version=2)[0], rescore)
    assert calls == [held] and selector.version == 2 and selector.stats.rescored == held  # spares too
    # the sketch (and so the edges) restarts from the new version's scores: the held samples' and the batch's
    batch, rescored = {o.score for o in synthetic_offers(200, seed=5, version=2)[0]}, {float(k) for k in range(7)}
    values = set(selector.sketch.values.tolist())
    assert values <= rescored | batch and values & rescored and values & batch
    assert all(m.version == 2 for m in [*selector.members.values(), *selector.spare.values()]
               if m.sample.sample_id < 1000)


def test_decay_favours_recent_samples() -> None:
    plain, decayed = StratifiedReservoir(200, 5, seed=1), StratifiedReservoir(200, 5, seed=1, half_life_s=300.0)
    for b in synthetic_offers(6000, seed=2):
        plain.offer(b)
        decayed.offer(b)
    age = lambda s: np.median([6000 - m.sample.sample_id for m in s.members.values()])  # noqa: E731
    assert age(decayed) < age(plain) / 3


def test_user_cap_and_bad_scores() -> None:
    capped = StratifiedReservoir(100, 5, user_cap=1)
    for b in synthetic_offers(3000, seed=0):
        capped.offer(b)
    users = [m.sample.user_id for m in capped.members.values()]
    assert len(users) == len(set(users)) and capped.stats.capped > 0
    bad = Offer(Sample(1, "u", ("a",), "b", 0.0), float("nan"), 1)
    with pytest.raises(ValueError, match="finite"):
        capped.offer([bad])
    with pytest.raises(ValueError, match="unknown selector"):
        make_selector("nope", budget=4)


def test_the_registry_builds_a_selector_from_its_config_and_names_a_bad_option() -> None:
    sel = make_selector({"type": "stratified", "strata": 5, "spares": 0}, budget=40, seed=3)
    assert isinstance(sel, StratifiedReservoir) and (sel.budget, sel.strata, sel.spares, sel.seed) == (40, 5, 0, 3)
    with pytest.raises(ValueError, match="strata"):
        make_selector({"type": "stratified", "strata": 0}, budget=40)
    with pytest.raises(ValueError, match="stratas"):  # a misspelt option is refused, not ignored
        make_selector({"type": "stratified", "stratas": 5}, budget=40)


def test_budget_at_least_the_stream_keeps_everything_not_pruned() -> None:
    selector = StratifiedReservoir(budget=10_000, strata=10, hard_prune=0.0, edges=(-10.0, 10.0))
    batches = synthetic_offers(2000, seed=0)
    for b in batches:
        selector.offer(b)
    assert len(selector) == 2000
    assert selector.quotas == allocate(np.floor(selector.counts).astype(int).tolist(), 10_000)


def test_store_rolls_back_with_the_checkpoint_and_snapshots(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite"
    selector = StratifiedReservoir(budget=40, strata=4)
    ckpt = Checkpoint(db, [CoresetStore(SelectionStage(selector))])
    batches = synthetic_offers(2000, seed=0)
    for b in batches[:10]:
        selector.offer(b)
    ckpt.commit({("t", 0): 1000})
    committed = sorted(selector.members)
    for b in batches[10:]:  # updated but never committed: a crash here
        selector.offer(b)
    assert sorted(selector.members) != committed
    ckpt.close()
    assert [r[0] for r in live_members(db)] == committed
    restored = StratifiedReservoir(budget=40, strata=4)
    ckpt = Checkpoint(db, [CoresetStore(SelectionStage(restored))])
    ckpt.load({0})
    assert ckpt.offsets("t") == {0: 1000}  # members roll back together with the offsets
    ckpt.close()
    assert sorted(restored.members) == committed

    info = take_snapshot(db, "test")
    assert info.snapshot_id == 1 and info.size == len(committed)
    assert take_snapshot(db).snapshot_id == 2
    got, members = read_snapshot(db, 1)
    assert got == info and [m.sample.sample_id for m in members] == committed
    out = export_snapshot(db, tmp_path / "snap.jsonl")
    assert out.snapshot_id == 2 and len((tmp_path / "snap.jsonl").read_text().splitlines()) == len(committed)
    with pytest.raises(LookupError):
        read_snapshot(db, 99)


def test_a_checkpoint_from_before_the_sketch_ring_loads_into_the_same_state() -> None:
    """State written before 2026-11-24 kept the sketch as a bare tensor plus ``sketch_pos``; it still loads."""
    from recsift.state import State, differences

    selector = StratifiedReservoir(200, 5, sketch_size=300, seed=3)
    for batch in synthetic_offers(1000, seed=2):
        selector.offer(batch)
    new = selector.state_dict()
    ring = new.part("sketch")
    old = State({k: v for k, v in new.tensors.items() if not k.startswith("sketch.")} | {"sketch": ring.tensors["values"]},
                {k: v for k, v in new.meta.items() if k != "sketch"} | {"sketch_pos": ring.meta["pos"]})
    restored = StratifiedReservoir(200, 5, sketch_size=300, seed=3)
    restored.load_state_dict(State.from_bytes(old.to_bytes()))
    assert differences(restored.state_dict(), new) == []


def test_resize_shrinks_to_the_smaller_reservoir_and_grows_back_from_the_spares() -> None:
    """A worker's share of the budget moves with its partitions. Shrinking must leave exactly what a
    reservoir of the smaller budget would hold on the same stream (the top-quota keys per stratum), and
    growing back within the spares must restore the larger one's members."""
    scores, batches = static_stream(3)
    cut = hard_prune_cut(scores, 0.1)
    edges = (float(scores[scores <= cut].min()), cut)
    big = StratifiedReservoir(300, 20, 0.1, seed=3, edges=edges)
    small = StratifiedReservoir(150, 20, 0.1, seed=3, edges=edges)
    for b in batches:
        big.offer(b)
        small.offer(b)
    before = set(big.members)
    big.resize(150)
    assert big.budget == 150 and len(big) == 150
    assert big.quotas == small.quotas and set(big.members) == set(small.members)
    big.resize(300)
    assert len(big) == 300 and set(big.members) == before
    with pytest.raises(ValueError, match="positive"):
        big.resize(0)


def test_partition_budgets_add_up_to_the_global_budget() -> None:
    from recsift.selection.stratified import partition_budget

    for budget, partitions in ((1024, 3), (64, 2), (10, 4), (5, 8)):
        parts = [partition_budget(budget, partitions, {p}) for p in range(partitions)]
        assert sum(parts) == budget or budget < partitions  # fewer samples than partitions: 1 each at least
        assert max(parts) - min(parts) <= 1
        assert partition_budget(budget, partitions, range(partitions)) == budget
    assert partition_budget(1024, 3, {0, 2}) == 342 + 341
    assert partition_budget(1024, 3, set()) == 0
    with pytest.raises(ValueError, match="not all among"):
        partition_budget(1024, 3, {3})


def test_the_stage_applies_a_partition_count_before_its_next_batch() -> None:
    """The topic's partition count fixes each partition's share of the budget; the ingest thread learns it,
    the selection thread applies it between batches."""
    from recsift.scoring.stage import ScoredSample
    from recsift.selection.partitioned import PartitionedSelector

    selector = PartitionedSelector(lambda b: StratifiedReservoir(b, 10, 0.1, seed=0), budget=200)
    selector.adopt(0, None)
    stage = SelectionStage(selector, validation_fraction=0.0)
    batches = synthetic_offers(2000, seed=0, batch=500)

    def scored(batch: list[Offer]) -> list[ScoredSample]:
        return [ScoredSample(o.sample, o.score, o.version, o.embedding) for o in batch]  # type: ignore[arg-type]

    stage(scored(batches[0]))
    assert len(selector) == 200  # the count unknown: partition 0 holds the whole budget
    stage.partition_count_target = 3  # set by the ingest thread once it has read the topic's metadata
    assert len(selector) == 200  # nothing changes under the selection thread's feet
    stage(scored(batches[1]))
    assert selector.budget == 67 and len(selector) == 67  # partition 0's share: 66 + the remainder's one
