"""Effort scores on a tiny Llama built in the test, wrapped with real peft LoRA."""

from __future__ import annotations

import pytest
import torch

from recsift.scoring.effort import EffortScorer, default_effort_block, response_losses
from recsift.stream.windows import Sample
from recsift.trainer.prompts import DOMAINS, PromptBuilder, collate
from tests.helpers import tiny_llm

TITLES = {"1": "zelda", "2": "mario racing", "3": "halo", "4": "doom space quest", "5": "tetris", "6": "portal chess"}


@pytest.fixture(scope="module")
def setup() -> tuple[object, object, PromptBuilder]:
    model, tokenizer = tiny_llm(seed=3)
    with torch.no_grad():  # LoRA-B starts at zero; make the adapter non-trivial so gradients reach A too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    builder = PromptBuilder(lambda t: tokenizer(t, add_special_tokens=False).input_ids, TITLES.__getitem__,
                            tokenizer.eos_token_id, DOMAINS["games"], max_prompt_tokens=200)
    return model, tokenizer, builder


def samples() -> list[Sample]:
    return [Sample(10, "u1", ("1",), "2", 0.0), Sample(11, "u2", ("1", "2", "3", "4"), "5", 0.0),
            Sample(12, "u3", ("6", "5"), "3", 0.0), Sample(13, "u4", ("4",), "6", 0.0)]


def scorer(setup: tuple, batch_size: int) -> EffortScorer:
    model, tokenizer, builder = setup
    return EffortScorer(model, lambda rows: collate([builder.example(s.history, s.target) for s in rows],
                                                    tokenizer.pad_token_id), batch_size=batch_size)


def test_default_block_is_the_last_layers_v_proj_lora_b(setup: tuple) -> None:
    assert default_effort_block(setup[0]) == "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default"
    plain, _ = tiny_llm(lora=False)
    with pytest.raises(ValueError, match="no v_proj LoRA-B"):
        default_effort_block(plain)


def test_batched_norms_equal_a_per_sample_autograd_loop(setup: tuple) -> None:
    model, tokenizer, builder = setup
    effort = scorer(setup, batch_size=4)
    batched = effort(samples())
    block = effort.block.weight
    expected = []
    for s in samples():
        batch = collate([builder.example(s.history, s.target)], tokenizer.pad_token_id)
        model.eval()
        (g,) = torch.autograd.grad(response_losses(model, batch)[0], block)
        expected.append(g.double().norm().item())
    assert batched.tolist() == pytest.approx(expected, rel=1e-5)
    assert (batched > 0).all()
    assert len(set(batched.tolist())) == 4  # different samples, different effort


def test_results_are_cached_by_sample_id_and_batch_size_invariant(setup: tuple) -> None:
    one, four = scorer(setup, 1), scorer(setup, 4)
    first = four(samples())
    assert four.computed == 4 and four.hits == 0
    again = four(list(reversed(samples())))
    assert four.computed == 4 and four.hits == 4
    assert again.flip(0).tolist() == first.tolist()
    assert one(samples()).tolist() == pytest.approx(first.tolist(), rel=1e-5)


def test_effort_leaves_the_model_as_it_found_it(setup: tuple) -> None:
    model = setup[0]
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scorer(setup, 2)(samples())
    assert model.training
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_bad_input_is_a_clear_error(setup: tuple) -> None:
    model, _tokenizer, _ = setup
    with pytest.raises(ValueError, match="not a linear module"):
        EffortScorer(model, lambda rows: {}, block="nope")
    effort = scorer(setup, 2)
    no_response = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
                   "labels": torch.full((1, 3), -100)}
    with pytest.raises(ValueError, match="response token"):
        effort.norms(no_response)
