"""The partitioned selector: one reservoir per source partition, whose state moves with the partition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsift.selection.checks import synthetic_offers
from recsift.selection.partitioned import FOREIGN_VERSION, PartitionedSelector
from recsift.selection.reservoir import StratifiedReservoir
from recsift.selection.selector import Offer
from recsift.selection.stage import SelectionStage
from recsift.selection.store import CoresetStore
from recsift.state import differences
from recsift.stream.checkpoint import Checkpoint

PARTITIONS = 3


def make(budget: int) -> StratifiedReservoir:
    return StratifiedReservoir(budget, strata=8, seed=3, sketch_size=512, rebucket_every=300)


def partitioned_stream(n: int = 6000, seed: int = 1) -> list[list[Offer]]:
    """Synthetic offers whose samples come from three partitions (by user, as a keyed topic routes them)."""
    return [[Offer(o.sample._replace(partition=int(o.sample.user_id[1:]) % PARTITIONS), o.score, o.version,
                   o.embedding) for o in batch] for batch in synthetic_offers(n, seed=seed)]


def worker(owned: set[int], budget: int = 96) -> PartitionedSelector:
    sel = PartitionedSelector(make, budget, partitions=PARTITIONS)
    for p in sorted(owned):
        sel.adopt(p, None)
    return sel


def offer_owned(sel: PartitionedSelector, batches: list[list[Offer]]) -> None:
    for batch in batches:
        mine = [o for o in batch if o.sample.partition in sel.parts]
        if mine:
            sel.offer(mine)


def test_the_coreset_is_one_reservoir_per_partition_and_the_shares_add_up_to_the_budget() -> None:
    stream = partitioned_stream()
    sel = worker({0, 1, 2}, budget=97)
    alone = {p: make(sel.share(p)) for p in range(PARTITIONS)}
    for batch in stream:
        sel.offer(batch)
        assert len(sel) <= sel.budget == 97 and sum(sel.strata_sizes()) == len(sel)
        for p, reservoir in alone.items():
            reservoir.offer([o for o in batch if o.sample.partition == p])
    assert [sel.share(p) for p in range(PARTITIONS)] == [33, 32, 32]
    assert sel.members.keys() == {sid for r in alone.values() for sid in r.members}
    assert len(sel) == 97  # full
    assert sel.stats.offered == sum(len(b) for b in stream)
    with pytest.raises(ValueError, match="does not own"):
        worker({0}).offer(stream[0])  # a partition's samples never reach a worker that does not own it


def test_an_unknown_partition_count_gives_a_partition_the_whole_budget_until_it_is_known() -> None:
    sel = PartitionedSelector(make, 90)
    sel.adopt(1, None)
    offer_owned(sel, partitioned_stream(3000))
    assert sel.budget == 90 and len(sel) == 90
    sel.set_partition_count(PARTITIONS)
    assert sel.budget == 30 and len(sel) == 30


def checkpointed(path: Path, sel: PartitionedSelector) -> tuple[Checkpoint, CoresetStore]:
    store = CoresetStore(SelectionStage(sel, validation_fraction=0.0))
    return Checkpoint(path, [store]), store


def test_a_partition_released_and_adopted_again_continues_exactly_as_if_it_had_stayed(tmp_path: Path) -> None:
    """Its reservoir (members, spares, sketch, counts, quotas) is the row the revoke's checkpoint wrote; a
    worker that gets it back with nothing written since goes on exactly like one that never gave it up."""
    stream = partitioned_stream()
    half = len(stream) // 2
    stayed = worker({0, 1, 2})
    for batch in stream:
        stayed.offer(batch)

    moved = worker(set())
    ckpt, _ = checkpointed(tmp_path / "w.sqlite", moved)
    ckpt.load({0, 1, 2})
    for batch in stream[:half]:
        moved.offer(batch)
    ckpt.commit({})
    ckpt.release({1})
    assert sorted(moved.parts) == [0, 2] and all(m.sample.partition != 1 for m in moved.members.values())
    ckpt.load({1})
    for batch in stream[half:]:
        moved.offer(batch)
    ckpt.close()
    for p in range(PARTITIONS):
        assert not differences(moved.part_state(p), stayed.part_state(p)), p
    assert moved.members.keys() == stayed.members.keys()


def test_a_partition_from_another_worker_is_rescored_by_this_worker_before_its_next_offer(tmp_path: Path) -> None:
    """A restored reservoir holds the other worker's scores: even when the two scorers' version numbers are
    equal, this worker re-scores every member and spare before the partition's next offer."""
    stream = partitioned_stream()
    half = len(stream) // 2
    a = worker(set())
    ckpt_a, store_a = checkpointed(tmp_path / "a.sqlite", a)
    ckpt_a.load({0, 1, 2})
    offer_owned(a, stream[:half])
    ckpt_a.commit({})
    held = a.parts[2]
    expected = dict(held.members)

    b = worker(set())
    ckpt_b, store_b = checkpointed(tmp_path / "b.sqlite", b)
    store_b.replace_partition(ckpt_b.conn, 2, store_a.partition_records(ckpt_a.conn, 2))  # restored from the changelog
    ckpt_b.load({2})
    adopted = b.parts[2]
    assert adopted.members.keys() == expected.keys() and adopted.version == FOREIGN_VERSION
    assert not differences(adopted.state_dict().part("sketch"), held.state_dict().part("sketch"))

    rescored: list[int] = []

    def rescore(samples: list) -> tuple[list[float], int]:
        rescored.extend(s.sample_id for s in samples)
        return [0.5 * (s.sample_id % 7) for s in samples], 1  # this worker's scorer, also at version 1

    b.offer([o for o in stream[half] if o.sample.partition == 2], rescore)
    assert set(rescored) >= expected.keys()  # every member it came with (and every spare) got this worker's score
    assert len(rescored) == len(held.members) + len(held.spare)
    assert b.version == 1 and adopted.version == 1
    assert len(b) == b.budget == 32
    ckpt_a.close()
    ckpt_b.close()


def test_a_stage_with_a_partitioned_selector_round_trips_through_its_checkpoint(tmp_path: Path) -> None:
    """The stage's own state (counters, validation, the worker's selector counts) and each partition's
    reservoir restore into an equal state on a fresh process."""
    stream = partitioned_stream(3000)
    sel = worker(set())
    ckpt, store = checkpointed(tmp_path / "r.sqlite", sel)
    ckpt.load({0, 2})
    offer_owned(sel, stream)
    ckpt.commit({})
    ckpt.close()
    again = worker(set())
    ckpt, restored = checkpointed(tmp_path / "r.sqlite", again)
    ckpt.load({0, 2})
    ckpt.close()
    assert not differences(restored.stage.state_dict(), store.stage.state_dict())
    assert sorted(again.parts) == [0, 2]
    for p in (0, 2):
        assert not differences(again.part_state(p), sel.part_state(p))
    assert again.stats == sel.stats and np.isclose(len(again), len(sel))


def test_the_validation_reservoir_moves_with_its_partition_and_is_the_same_whoever_owns_what(
    tmp_path: Path
) -> None:
    """Each partition keeps its share of the validation reservoir beside its coreset share (``s`` record):
    one worker owning all three partitions, and two workers that split them, the second taking partition 1
    over half-way through, hold the same validation samples and the same reservoirs, partition by partition."""
    from recsift.scoring.stage import ScoredSample
    from recsift.selection.validation import PartitionedValidation

    stream = [[ScoredSample(o.sample, o.score, o.version, o.embedding) for o in batch]  # type: ignore[arg-type]
              for batch in partitioned_stream()]
    half = len(stream) // 2

    def stage(path: Path) -> tuple[Checkpoint, CoresetStore]:
        store = CoresetStore(SelectionStage(PartitionedSelector(make, 96, partitions=PARTITIONS),
                                            validation=PartitionedValidation(30, partitions=PARTITIONS),
                                            validation_fraction=0.2, seed=5))
        return Checkpoint(path, [store]), store

    def feed(store: CoresetStore, batches: list[list[ScoredSample]]) -> None:
        for batch in batches:
            if mine := [s for s in batch if s.sample.partition in store.stage.selector.parts]:  # type: ignore[attr-defined]
                store.stage(mine)

    ckpt_one, one = stage(tmp_path / "one.sqlite")
    ckpt_one.load({0, 1, 2})
    feed(one, stream)

    ckpt_a, a = stage(tmp_path / "a.sqlite")
    ckpt_a.load({0, 1, 2})
    feed(a, stream[:half])
    ckpt_a.commit({})
    ckpt_a.release({1})  # revoked after its checkpoint: the row is what the next owner restores
    moved = ckpt_a.conn.execute("SELECT state FROM selection_partitions WHERE partition = 1").fetchone()[0]
    assert 1 not in a.stage.validation.parts  # type: ignore[union-attr]
    ckpt_b, b = stage(tmp_path / "b.sqlite")
    ckpt_b.conn.execute("INSERT INTO selection_partitions VALUES (1, ?, 0)", (moved,))  # as the changelog brings it
    ckpt_b.load({1})
    feed(a, stream[half:])
    feed(b, stream[half:])

    for p in range(PARTITIONS):
        owner = b if p == 1 else a
        assert not differences(owner.part_state(p), one.part_state(p)), p
    split = a.stage.validation.samples + b.stage.validation.samples
    assert sorted(s.sample_id for s in split) == sorted(s.sample_id for s in one.stage.validation.samples)
    assert len(one.stage.validation) == 30  # the shares add up to the size (10 each)
    assert one.stage.validation.seen == a.stage.validation.seen + b.stage.validation.seen
    for ckpt in (ckpt_one, ckpt_a, ckpt_b):
        ckpt.close()
