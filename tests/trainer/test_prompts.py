"""BIGRec prompts: template, response-only loss, oldest-first truncation, padding."""

from __future__ import annotations

import pytest

from recsift.trainer.prompts import (
    DOMAINS,
    IGNORE,
    PromptBuilder,
    collate,
    domain_named,
)
from tests.helpers import tiny_llm

TITLES = {str(i): f"game number {i}" for i in range(1, 60)}


@pytest.fixture(scope="module")
def tokenizer() -> object:
    return tiny_llm(lora=False)[1]


def builder(tokenizer: object, max_tokens: int = 512, max_history: int | None = None) -> PromptBuilder:
    return PromptBuilder(lambda t: tokenizer(t, add_special_tokens=False).input_ids, TITLES.__getitem__,
                         tokenizer.eos_token_id, DOMAINS["games"], max_tokens, max_history)


def test_prompt_follows_the_alpaca_template_with_domain_words(tokenizer: object) -> None:
    text = builder(tokenizer).prompt_text(["1", "2"])
    assert text.startswith("Below is an instruction that describes a task")
    assert "### Instruction:\nGiven a list of video games the user has played before" in text
    assert "### Input:\nThe user has played the following video games before, with titles as: " \
           "game number 1; game number 2\n\n### Response:\n" in text
    with pytest.raises(ValueError, match="unknown prompt domain"):
        domain_named("cars")


def test_loss_covers_only_the_response_and_eos(tokenizer: object) -> None:
    b = builder(tokenizer)
    ex = b.example(["1", "2"], "3")
    response = [*tokenizer("game number 3", add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    assert ex.input_ids[-len(response):] == response
    assert ex.labels[-len(response):] == response
    assert set(ex.labels[:-len(response)]) == {IGNORE}
    assert ex.history_used == 2


def test_oldest_items_are_dropped_until_the_prompt_fits(tokenizer: object) -> None:
    history = [str(i) for i in range(1, 50)]
    one_item = len(builder(tokenizer).prompt_ids(history[-1:])[0])
    limit = one_item + 40
    b = builder(tokenizer, max_tokens=limit)
    ids, used = b.prompt_ids(history)
    assert len(ids) <= limit and 1 < used < 49
    assert ids == tokenizer(b.prompt_text(history[-used:]), add_special_tokens=False).input_ids
    assert len(tokenizer(b.prompt_text(history[-used - 1:]), add_special_tokens=False).input_ids) > limit  # minimal drop
    _, one = builder(tokenizer, max_tokens=16).prompt_ids(history)
    assert one == 1  # the most recent item is always kept
    assert builder(tokenizer, max_history=5).prompt_ids(history)[1] == 5
    with pytest.raises(ValueError, match="at least one history item"):
        b.prompt_ids([])


def test_collate_pads_right_and_masks(tokenizer: object) -> None:
    b = builder(tokenizer)
    batch = collate([b.example(["1"], "2"), b.example(["1", "2", "3"], "4")], tokenizer.pad_token_id)
    short = len(b.example(["1"], "2").input_ids)
    assert batch["input_ids"].shape[0] == 2
    assert batch["attention_mask"][0, :short].all() and not batch["attention_mask"][0, short:].any()
    assert (batch["labels"][0, short:] == IGNORE).all()
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()
