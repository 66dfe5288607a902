"""Generation + grounding on a tiny Llama, title-embedding cache, adapter hot-swap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recsift.stream.catalog import Catalog, Item
from recsift.trainer.llm import add_lora, wrap_llm
from recsift.trainer.prompts import PromptBuilder
from recsift.trainer.recommender import Recommender, last_token_states
from tests.helpers import tiny_llm

TITLES = ["zelda", "mario racing", "halo", "doom space quest", "tetris", "portal chess", "chess", "space racing"]


def make(tmp_path: Path) -> Recommender:
    base, tokenizer = tiny_llm(seed=4, lora=False)
    llm = wrap_llm("tiny", base, tokenizer, "fp32")
    model = add_lora(base, 4, 8, 0.0, ("q_proj", "v_proj"), seed=0)
    catalog = Catalog(Item(str(i), t) for i, t in enumerate(TITLES))
    builder = PromptBuilder(llm.encode, catalog.title, llm.eos_token_id, max_prompt_tokens=400,
                            pad_token_id=llm.pad_token_id)
    return Recommender(llm, model, catalog, builder, cache_dir=tmp_path, max_new_tokens=4)


def test_grounding_returns_the_exact_item_when_the_text_is_its_title(tmp_path: Path) -> None:
    rec = make(tmp_path)
    vectors = last_token_states(rec.llm, rec.model, TITLES)
    for i, ranked in enumerate(rec.ground(vectors, 3)):
        assert ranked[0] == str(i)
    got = rec.recommend(["0", "1"], k=5)
    assert len(got) == 5 and len(set(got)) == 5 and set(got) <= {str(i) for i in range(8)}
    assert len(rec.recommend(["0"], k=20, generate=False)) == 8  # k beyond the catalogue


def test_title_embeddings_are_cached_and_rebuilt_when_the_catalog_changes(tmp_path: Path) -> None:
    rec = make(tmp_path)
    cached = list(tmp_path.glob("titles-*.npy"))
    assert len(cached) == 1
    again = make(tmp_path)  # same model and catalogue: loads the cache
    assert np.array_equal(np.load(cached[0]), np.load(next(tmp_path.glob("titles-*.npy"))))
    again.catalog.add(Item("8", "new racing game"))
    again.refresh_titles()
    assert len(list(tmp_path.glob("titles-*.npy"))) == 2 and "8" in again.item_ids
    assert rec.index is not None and rec.index.ntotal == 8


def test_hot_swap_to_a_promoted_adapter(tmp_path: Path) -> None:
    rec = make(tmp_path)
    prompt = torch.tensor([rec.llm.encode(rec.builder.prompt_text(["0"]))])
    with torch.no_grad():
        before = rec.model(prompt).logits
        for name, p in rec.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rec.model.save_pretrained(tmp_path / "v1")  # what the registry holds after a refresh
    with torch.no_grad():
        for name, p in rec.model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    rec.use_adapter(tmp_path / "v1", "v0001")
    with torch.no_grad():
        after = rec.model(prompt).logits
    assert rec.adapter == "v0001" and not torch.allclose(before, after)


def test_batched_prompt_ranking_equals_one_history_at_a_time(tmp_path: Path) -> None:
    rec = make(tmp_path)
    histories = [["0"], ["1", "2", "3"], ["4", "5", "6", "7", "0", "1"], ["3", "3"]]
    batched = rec.rank_from_prompts(histories, k=5, batch_size=3)
    assert batched == [rec.recommend(h, k=5, generate=False) for h in histories]


def test_candidate_logliks_equal_a_full_forward_per_candidate(tmp_path: Path) -> None:
    from recsift.trainer.recommender import candidate_logliks

    rec = make(tmp_path)
    history, items = ["0", "1", "2"], ["3", "6", "4", "7"]
    got, lengths = candidate_logliks(rec.llm, rec.model, rec.builder, history, items)
    assert len(set(lengths.tolist())) > 1  # candidates of different lengths, so the packing is exercised
    prompt, _ = rec.builder.prompt_ids(history)
    for item, value, n in zip(items, got, lengths, strict=True):
        response = rec.builder.response_ids(item)
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = rec.model(input_ids=ids).logits[0].log_softmax(-1)
        expected = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(response))
        assert n == len(response) and value == np.float64(value) and abs(value - expected) < 1e-4


def test_title_priors_equal_a_full_forward_after_the_empty_history_prompt(tmp_path: Path) -> None:
    from recsift.trainer.recommender import title_priors

    rec = make(tmp_path)
    items = ["3", "6", "3", "4", "7", "0"]  # a repeat: priors are per distinct item
    got = title_priors(rec.llm, rec.model, rec.builder, items, pack=4)  # two packs
    assert list(got) == ["3", "6", "4", "7", "0"]
    prompt = rec.builder.prior_prompt_ids()
    assert prompt == rec.llm.encode(rec.builder.prompt_text([]))
    for item, value in got.items():
        response = rec.builder.response_ids(item)
        with torch.no_grad():
            logp = rec.model(input_ids=torch.tensor([prompt + response])).logits[0].log_softmax(-1)
        expected = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(response))
        assert abs(value - expected) < 1e-4


def test_generated_text_is_embedded_by_the_base_model(tmp_path: Path) -> None:
    rec = make(tmp_path)
    with torch.no_grad():  # make the adapter matter, so base and adapted embeddings differ
        for name, p in rec.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    text = rec.generate(["0", "1"])
    with rec._base_only():
        base = last_token_states(rec.llm, rec.model, [text or "x"])
    adapted = last_token_states(rec.llm, rec.model, [text or "x"])
    assert not np.allclose(base, adapted)
    assert rec.recommend(["0", "1"], k=8) == rec.ground(base, 8)[0]
