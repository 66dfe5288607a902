"""The SASRec surrogate: it learns, it is deterministic and batch-invariant, its state round-trips, bad input is refused."""

from __future__ import annotations

import random
from typing import cast

import pytest
import torch

from recsift.scoring.sasrec import SASRec, SASRecSurrogate
from recsift.scoring.surrogate import OOV, PAD, SeqBatch, Surrogate, hashed_negatives
from recsift.state import State, differences


def random_surrogate(seed: int = 0, n: int = 200) -> tuple[Surrogate, SeqBatch]:
    rnd = random.Random(seed)
    s = SASRecSurrogate(80, hidden=16, max_len=20, seed=seed, replay=64)
    histories = [[f"i{rnd.randrange(80)}" for _ in range(rnd.randint(1, 25))] for _ in range(n)]
    enc = s.encode(histories, [f"i{rnd.randrange(80)}" for _ in histories], range(n))
    return s, enc.batch


def test_losses_are_deterministic_and_batch_invariant() -> None:
    a, batch = random_surrogate()
    b, _ = random_surrogate()
    a.fit(batch, epochs=2, batch_size=32)
    b.fit(batch, epochs=2, batch_size=32)
    whole = a.losses(batch)
    assert torch.equal(whole, b.losses(batch))  # same seed, same data: same model
    pieces = torch.cat([a.losses(batch.select(torch.arange(i, min(i + 13, len(batch))))) for i in range(0, len(batch), 13)])
    assert torch.allclose(whole, pieces, atol=1e-5)
    assert a.embed(batch).shape == (len(batch), 16)
    assert a.score_items(batch).shape == (len(batch), a.rows)


def test_hashed_negatives_ignore_padding_width_and_avoid_reserved_rows() -> None:
    ids = torch.tensor([5, 6])
    wide, narrow = hashed_negatives(ids, 10, 100, 0), hashed_negatives(ids, 4, 100, 0)
    assert torch.equal(wide[:, -4:], narrow)
    assert int(wide.min()) >= 2 and int(wide.max()) < 100


def test_partial_fit_learns_a_repeating_stream_with_a_bounded_replay_buffer() -> None:
    s, batch = random_surrogate(seed=3)
    before = s.loss(batch).item()
    for _ in range(30):
        for start in range(0, len(batch), 40):
            s.partial_fit(batch.select(torch.arange(start, min(start + 40, len(batch)))))
    assert s.loss(batch).item() < before
    assert len(s.replay) == s.replay.capacity == 64 and s.replay.seen == 30 * len(batch)


def test_state_round_trips_through_safetensors() -> None:
    a, batch = random_surrogate(seed=4)
    a.fit(batch, epochs=1, batch_size=32)
    a.partial_fit(batch)  # something in the replay buffer
    blob = a.state_dict().to_bytes()
    b, _ = random_surrogate(seed=9)
    b.load_state_dict(State.from_bytes(blob))
    assert differences(a.state_dict(), b.state_dict()) == []
    assert differences(a.state_dict(), random_surrogate(seed=9)[0].state_dict())  # and it does see a difference
    assert torch.equal(a.losses(batch), b.losses(batch))
    step = batch.select(torch.arange(20))
    assert a.partial_fit(step) == b.partial_fit(step)  # optimiser state and RNG restored: the same future
    assert torch.equal(a.losses(batch), b.losses(batch))


def new_item_stream(seed: int) -> list[tuple[list[list[str]], list[str], range]]:
    """Four batches of 40 samples, each bringing 30 items not seen before (120 items)."""
    rnd = random.Random(seed)
    out = []
    for k in range(4):
        items = [f"i{rnd.randrange(30 * (k + 1))}" for _ in range(400)]
        histories = [items[i:i + rnd.randint(1, 9)] for i in range(0, 400, 10)]
        out.append((histories, [f"i{rnd.randrange(30 * (k + 1))}" for _ in histories], range(100 * k, 100 * k + 40)))
    return out


def growing(seed: int, initial_rows: int | None = 8) -> SASRecSurrogate:
    return SASRecSurrogate(100, hidden=16, max_len=20, seed=seed, replay=64, initial_rows=initial_rows)


def feed(s: SASRecSurrogate, batches: list[tuple[list[list[str]], list[str], range]]) -> list[SeqBatch]:
    encoded = []
    for b in batches:  # each batch's new items arrive, then it is learnt: the table grows on the way
        encoded.append(s.encode(*b).batch)
        s.partial_fit(encoded[-1])
    return encoded


def test_the_item_table_grows_with_the_items_seen_up_to_the_capacity_and_restarts_exactly() -> None:
    stream = new_item_stream(7)
    s = growing(7)
    feed(s, stream)
    assert s.rows == s.vocab.rows == 102 and len(s.vocab) == 100 and s.vocab.overflow > 0  # 8 → 16 → … → 102
    assert s.optimizer.state[s.model.item_emb.weight]["exp_avg"].shape == (102, 16)  # Adam's moments grew too
    same = growing(7)
    feed(same, stream)
    assert differences(s.state_dict(), same.state_dict()) == []  # growth is deterministic
    # a restart from a checkpoint taken halfway continues exactly as the uninterrupted run
    early = growing(7)
    feed(early, stream[:2])
    assert early.rows < 102  # the table had not reached the capacity yet
    assert differences(early.state_dict(), s.state_dict())  # (halfway is not the end: the check below can fail)
    restarted = growing(7)
    restarted.load_state_dict(State.from_bytes(early.state_dict().to_bytes()))
    assert restarted.rows == early.rows and differences(restarted.state_dict(), early.state_dict()) == []
    feed(restarted, stream[2:])
    assert differences(restarted.state_dict(), s.state_dict()) == []
    # while few items are in use the state is a fraction of a table allocated at the capacity
    assert len(early.state_dict().to_bytes()) * 50 < len(SASRecSurrogate(100_000, hidden=16, max_len=20).state_dict().to_bytes())


def test_a_checkpoint_of_a_full_size_table_loads_into_a_growing_surrogate() -> None:
    stream = new_item_stream(3)
    full = growing(3, initial_rows=None)
    batches = feed(full, stream)
    small = growing(3)
    small.load_state_dict(State.from_bytes(full.state_dict().to_bytes()))
    assert small.rows == 102 and torch.equal(small.losses(batches[-1]), full.losses(batches[-1]))
    assert small.partial_fit(batches[0]) == full.partial_fit(batches[0])


def test_short_histories_are_excluded_and_counted_and_unknown_items_share_the_oov_row() -> None:
    s = SASRecSurrogate(3, hidden=8, seed=0)
    enc = s.encode([[], ["a"], ["b", "c"]], ["x", "y", "z"], [1, 2, 3])
    assert enc.too_short == 1 and enc.kept.tolist() == [1, 2]
    assert len(s.vocab) == 3 and s.vocab.overflow >= 1  # capacity 3: later new items fall back to OOV
    frozen = s.encode([["never-seen"]], ["a"], [4], grow=False)
    assert frozen.batch.seqs[0, -2].item() == OOV


def test_bad_input_is_refused() -> None:
    s, batch = random_surrogate(seed=5)
    with pytest.raises(ValueError, match="empty batch"):
        s.losses(batch.select(torch.arange(0)))
    with pytest.raises(ValueError, match="outside the embedding table"):
        s.losses(SeqBatch(torch.tensor([[3, 10_000]]), torch.tensor([1])))
    with torch.no_grad():
        s.model.item_emb.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="refusing the update"):
        s.partial_fit(batch)


def test_sasrec_represents_a_row_by_its_last_position_alone_as_the_full_forward_does() -> None:
    """`represent` runs the last block for the last position only; the state is the full forward's last one,
    on rows of many lengths, after training moved the weights away from their initialisation."""
    s, batch = random_surrogate(seed=3)
    s.fit(batch, epochs=2, batch_size=32)
    model = cast(SASRec, s.model)
    model.eval()
    rows = batch.seqs[:, -20:]
    assert len(set((rows != PAD).sum(1).tolist())) > 10  # rows of many paddings
    with torch.no_grad():
        full = model.features(rows)[:, -1]
        last = model.features(rows, last_only=True)
        assert last.shape == (len(rows), 1, 16)
        torch.testing.assert_close(last[:, 0], full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.represent(rows), full, rtol=1e-5, atol=1e-5)
        # the last position still attends to the whole row: without its keys the state is another one
        assert not torch.allclose(model.features(rows[:, -1:])[:, -1], full, atol=1e-3)
