"""TIGER's semantic IDs: unique for every item, learnt (reconstruction error falls), given to new items without
retraining, carried through a checkpoint, and flagged for retraining when new items no longer fit."""

from __future__ import annotations

import pytest
import torch

from recsift.state import State
from recsift.trainer.tiger.rqvae import RQVAEConfig, SemanticIds

SMALL = RQVAEConfig(levels=3, codes=32, latent=8, hidden=32, epochs=40, batch_size=128, seed=0)


def catalogue(n: int = 400, dim: int = 16, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """Items around 12 topic centres (content embeddings cluster by topic), two of them exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn((12, dim), generator=g) * 3
    x = centres[torch.randint(0, 12, (n,), generator=g)] + torch.randn((n, dim), generator=g) * 0.5
    x[1] = x[0]  # two items with the same content: their codes must collide, their IDs must not
    return [f"item{i}" for i in range(n)], x


def test_every_catalogue_item_gets_a_unique_id_and_training_lowers_the_reconstruction_error() -> None:
    items, x = catalogue()
    ids = SemanticIds(SMALL)
    training = ids.fit(items, x)
    assert len(ids.ids) == len(items) and all(len(t) == SMALL.levels + 1 for t in ids.ids.values())
    assert len(set(ids.ids.values())) == len(items)  # unique, the collision suffix included
    assert ids.ids["item0"][:-1] == ids.ids["item1"][:-1] and {ids.ids["item0"][-1], ids.ids["item1"][-1]} == {0, 1}
    assert 0 < training.collision_rate < 1  # (the duplicates at least) — without the suffix IDs would not be unique
    assert all(0 <= c < SMALL.codes for t in ids.ids.values() for c in t)
    assert training.reconstruction[-1] < 0.5 * training.reconstruction[0], training.reconstruction


def test_a_new_item_gets_an_id_without_retraining_and_ids_survive_a_checkpoint() -> None:
    items, x = catalogue(seed=1)
    ids = SemanticIds(SMALL)
    ids.fit(items, x)
    weights = {k: v.clone() for k, v in ids.state_dict().tensors.items() if k.startswith("model.")}
    twin = ids.assign("new-twin-of-item5", x[5])  # the same content as item5: its codes, the next suffix
    assert twin[:-1] == ids.ids["item5"][:-1] and twin not in {ids.ids[i] for i in items}
    assert ids.version == 1 and all(torch.equal(v, ids.state_dict().tensors[k]) for k, v in weights.items())
    assert ids.assign("item7", torch.zeros(16)) == ids.ids["item7"]  # a known item keeps its ID
    restored = SemanticIds.from_state(State.from_bytes(ids.state_dict().to_bytes()))
    assert restored.ids == ids.ids and restored.version == 1
    fresh = torch.randn(16, generator=torch.Generator().manual_seed(9))
    assert restored.assign("later", fresh) == ids.assign("later", fresh)  # the same next ID after the restart
    assert restored.collision_rate == ids.collision_rate


def test_items_the_quantiser_does_not_fit_ask_for_retraining() -> None:
    items, x = catalogue(seed=2)
    ids = SemanticIds(SMALL)
    ids.fit(items, x)
    assert ids.needs_retraining(max_collision_rate=0.9, max_error_ratio=3.0) is None
    for i in range(20):  # a new kind of item, far from everything the quantiser saw
        ids.assign(f"odd{i}", torch.full((16,), 25.0) + i)
    assert "reconstruction error" in (ids.needs_retraining(max_collision_rate=0.9, max_error_ratio=3.0) or "")
    assert "collision rate" in (ids.needs_retraining(max_collision_rate=0.0, max_error_ratio=3.0) or "")


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="one embedding per item"):
        SemanticIds(SMALL).fit(["a", "b"], torch.zeros((3, 4)))
    with pytest.raises(ValueError, match="unique"):
        SemanticIds(SMALL).fit(["a", "a"], torch.zeros((2, 4)))
    with pytest.raises(RuntimeError, match="fit"):
        SemanticIds(SMALL).assign("a", torch.zeros(4))
    with pytest.raises(ValueError, match="levels"):
        RQVAEConfig(levels=0)
