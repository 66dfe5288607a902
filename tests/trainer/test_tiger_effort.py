"""TIGER's effort score: the T5 loss's gradient norm on the last decoder layer's cross-attention output, per
sample from one batched backward pass, on a fixed model (the serving version, or the fresh one a first refresh
builds), kept in the state directory across restarts; items without an ID are read by the ID the quantiser
would give them, and nothing is assigned."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from recsift.scoring.effort import EffortScorer
from recsift.stream.windows import Sample
from recsift.trainer.refresh import refresh, registry_for
from recsift.trainer.tiger.backend import TigerBackend, load_tiger
from recsift.trainer.tiger.effort import TigerBatches, cross_attention_block
from recsift.trainer.tiger.generator import id_losses
from tests.trainer.test_refresh import state_with_coreset, tiny
from tests.trainer.test_tiger_refresh import catalog, tiger_settings


def samples() -> list[Sample]:
    return [Sample(10, "u1", ("i1",), "i2", 0.0), Sample(11, "u2", ("i1", "i2", "i3", "i4"), "i5", 0.0),
            Sample(12, "u3", ("i6", "i5"), "i3", 0.0), Sample(13, "u4", ("i4",), "i6", 0.0),
            Sample(14, "u5", ("i7", "i8", "i9"), "i10", 0.0)]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> EffortScorer:
    """The effort scorer on an empty registry: the seeded fresh T5 and IDs of a first refresh."""
    cfg = tiger_settings(state_with_coreset(tmp_path_factory.mktemp("fresh")))
    return TigerBackend(cfg, catalog(101), tiny()).effort(registry_for(cfg))


def test_the_block_is_the_last_decoder_layers_cross_attention_output(tmp_path: Path, fresh: EffortScorer) -> None:
    assert fresh.block_name == "decoder.block.0.layer.1.EncDecAttention.o"  # one decoder layer in the test T5
    cfg = tiger_settings(tmp_path, tiger={"layers": 2})
    two = TigerBackend(cfg, catalog(101), tiny()).effort(registry_for(cfg))
    assert two.block_name == "decoder.block.1.layer.1.EncDecAttention.o"
    with pytest.raises(ValueError, match="no decoder cross-attention"):
        cross_attention_block(torch.nn.Linear(2, 2))


def test_batched_norms_equal_a_per_sample_autograd_loop(fresh: EffortScorer) -> None:
    batched = EffortScorer(fresh.model, fresh.make_batch, block=fresh.block_name, batch_size=5, cache_size=0,
                           losses=id_losses)(samples())
    fresh.model.eval()
    expected = []
    for s in samples():
        (g,) = torch.autograd.grad(id_losses(fresh.model, fresh.make_batch([s]))[0], fresh.block.weight)
        expected.append(g.double().norm().item())
    assert batched.tolist() == pytest.approx(expected, rel=1e-5)
    assert (batched > 0).all() and len(set(batched.tolist())) == len(samples())
    assert all(p.grad is None for p in fresh.model.parameters())  # left as found


def test_the_model_is_kept_in_the_state_directory_so_effort_is_a_function_of_the_sample(tmp_path: Path,
                                                                                        fresh: EffortScorer) -> None:
    """A fresh build is seeded (two state directories agree exactly); the model is kept in the state directory,
    so a restart after a promotion still scores with it; without the kept model, the serving version is taken."""
    from recsift.trainer.tiger.backend import EFFORT_DIR

    cfg = tiger_settings(state_with_coreset(tmp_path))
    first = TigerBackend(cfg, catalog(101), tiny()).effort(registry_for(cfg))
    assert first(samples()).tolist() == fresh(samples()).tolist()
    assert (cfg.checkpoint.state_dir / EFFORT_DIR / "semantic_ids.safetensors").is_file()
    assert refresh(cfg, "manual", catalog(101), llm=tiny()).outcome == "promoted"
    restarted = TigerBackend(cfg, catalog(106), tiny()).effort(registry_for(cfg))  # the catalogue grew, too
    assert restarted(samples()).tolist() == first(samples()).tolist()

    shutil.rmtree(cfg.checkpoint.state_dir / EFFORT_DIR)  # an operator asks for the serving version
    served = TigerBackend(cfg, catalog(101), tiny()).effort(registry_for(cfg))
    serving = registry_for(cfg).current()
    assert serving is not None
    saved = load_tiger(serving.path, 5).model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in served.model.state_dict().items())
    assert served(samples()).tolist() != first(samples()).tolist()


def test_an_item_without_an_id_is_read_by_its_peeked_id_and_nothing_is_assigned(fresh: EffortScorer) -> None:
    batches = fresh.make_batch
    assert isinstance(batches, TigerBatches)
    ids = batches.tiger.ids
    before = dict(ids.ids)
    unknown = Sample(20, "u9", ("i1", "brand-new"), "another-new", 0.0)
    batch = batches([unknown])
    assert dict(ids.ids) == before and ids.new_items == 0  # the model's IDs did not change
    assert set(batches.peeked) == {"brand-new", "another-new"}
    tiger = batches.tiger
    assert batch["labels"][0].tolist() == tiger.tokens(batches.peeked["another-new"])
    assert batch["input_ids"][0].tolist() == [*tiger.tokens(ids.ids["i1"]), *tiger.tokens(batches.peeked["brand-new"])]
    assert torch.isfinite(fresh([unknown])).all()
    # the same sample again, in a new batch: the same effort (a function of the sample, not of arrival order)
    assert EffortScorer(fresh.model, batches, block=fresh.block_name, cache_size=0,
                        losses=id_losses)([unknown]).tolist() == fresh([unknown]).tolist()
