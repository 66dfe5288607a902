"""BIGRec prompts as the DEALRec code writes them (Alpaca template), tokenised for training and scoring.

A sample's prompt asks the model to name the next item from the user's history; the response is the
target item's title followed by end-of-sequence. With ``train_on_inputs`` (the reference setting, as in
the alpaca-lora code BIGRec and DEALRec train with) the loss covers prompt and response; without it the
prompt labels are -100. Judging a model (validation loss, candidate likelihood) always uses the response
alone: ``batch(samples, response_only=True)``. When the prompt is too long for ``max_prompt_tokens``,
the oldest history items are dropped first, keeping at least the most recent one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from recsift.stream.windows import Sample

IGNORE = -100

PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n")


@dataclass(frozen=True)
class Domain:
    """The words a domain's prompt uses: ``noun`` (plural), ``singular`` and the interaction ``verb``."""

    noun: str = "items"
    singular: str = "item"
    verb: str = "interacted with"

    def instruction(self) -> str:
        return (f"Given a list of {self.noun} the user has {self.verb} before, please recommend a new "
                f"{self.singular} that the user likes to the user.")

    def history_prefix(self) -> str:
        return f"The user has {self.verb} the following {self.noun} before, with titles as: "


DOMAINS: dict[str, Domain] = {
    "items": Domain(),
    "games": Domain("video games", "video game", "played"),
    "movies": Domain("movies", "movie", "watched"),
}


def domain_named(name: str) -> Domain:
    if name not in DOMAINS:
        raise ValueError(f"unknown prompt domain {name!r}; one of {sorted(DOMAINS)}")
    return DOMAINS[name]


@dataclass(frozen=True)
class Example:
    """A tokenised training example: prompt + response ids, labels -100 on the prompt."""

    input_ids: list[int]
    labels: list[int]
    history_used: int  # how many of the most recent history items the prompt kept


class PromptBuilder:
    """Turns (history item ids, target item id) into prompt text and tokenised examples."""

    def __init__(self, encode: Callable[[str], list[int]], title: Callable[[str], str], eos_token_id: int,
                 domain: Domain = Domain(), max_prompt_tokens: int = 256, max_history: int | None = None,
                 pad_token_id: int | None = None, train_on_inputs: bool = False) -> None:
        if max_prompt_tokens < 16:
            raise ValueError("max_prompt_tokens must be at least 16")
        self.encode, self.title, self.eos = encode, title, eos_token_id
        self.pad = eos_token_id if pad_token_id is None else pad_token_id
        self.domain, self.max_prompt_tokens, self.max_history = domain, max_prompt_tokens, max_history
        self.train_on_inputs = train_on_inputs

    def prompt_text(self, history: Sequence[str]) -> str:
        titles = "; ".join(self.title(i) for i in history)
        return (f"{PREAMBLE}### Instruction:\n{self.domain.instruction()}\n\n### Input:\n"
                f"{self.domain.history_prefix()}{titles}\n\n### Response:\n")

    def prompt_ids(self, history: Sequence[str]) -> tuple[list[int], int]:
        """Token ids of the prompt for the longest recent suffix of ``history`` that fits; and its length."""
        if not history:
            raise ValueError("a prompt needs at least one history item")
        if self.max_history is not None:
            history = history[-self.max_history:]
        keep = len(history)
        ids = self.encode(self.prompt_text(history))
        while len(ids) > self.max_prompt_tokens and keep > 1:
            # drop enough of the oldest titles at once (estimated from their token counts), then re-check
            excess = len(ids) - self.max_prompt_tokens
            drop = 0
            while drop < keep - 1 and excess > 0:
                excess -= len(self.encode(self.title(history[len(history) - keep + drop]) + "; "))
                drop += 1
            keep -= max(drop, 1)
            ids = self.encode(self.prompt_text(history[len(history) - keep:]))
        while keep < len(history):  # the estimate may have dropped one too many: take back what still fits
            longer = self.encode(self.prompt_text(history[len(history) - keep - 1:]))
            if len(longer) > self.max_prompt_tokens:
                break
            ids, keep = longer, keep + 1
        return ids, keep

    def prior_prompt_ids(self) -> list[int]:
        """The prompt with an empty history: the context of a title's prior likelihood (the PMI rule)."""
        return self.encode(self.prompt_text([]))

    def response_ids(self, item: str) -> list[int]:
        """The response for ``item``: its title's tokens and end-of-sequence."""
        return [*self.encode(self.title(item)), self.eos]

    def response_length(self, item: str) -> int:
        """Tokens in ``item``'s response: what length-matched negatives are matched on."""
        return len(self.response_ids(item))

    def example(self, history: Sequence[str], target: str, response_only: bool | None = None) -> Example:
        prompt, used = self.prompt_ids(history)
        response = self.response_ids(target)
        on_inputs = self.train_on_inputs if response_only is None else not response_only
        return Example(prompt + response, (prompt if on_inputs else [IGNORE] * len(prompt)) + response, used)

    def batch(self, samples: Sequence[Sample], response_only: bool | None = None) -> dict[str, Tensor]:
        """A padded batch of stream samples (what the effort scorer and the trainer consume); labels as
        ``train_on_inputs`` says unless ``response_only`` is given."""
        return collate([self.example(s.history, s.target, response_only) for s in samples], self.pad)


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, Tensor]:
    """Right-padded batch tensors; padded labels are -100 and padded positions are masked."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def builder_for(encode: Callable[[str], list[int]], title: Callable[[str], str], eos_token_id: int,
                pad_token_id: int, cfg: PromptSettings) -> PromptBuilder:
    """The prompt builder the trainer's settings describe (one place for the service, CLI and benchmarks)."""
    return PromptBuilder(encode, title, eos_token_id, domain_named(cfg.domain), cfg.max_prompt_tokens,
                         max_history=cfg.prompt_history, pad_token_id=pad_token_id,
                         train_on_inputs=cfg.train_on_inputs)


class PromptSettings(Protocol):
    """What :func:`builder_for` reads (``TrainerConfig`` has it; read-only, as the frozen config is)."""

    @property
    def domain(self) -> str: ...

    @property
    def max_prompt_tokens(self) -> int: ...

    @property
    def prompt_history(self) -> int | None: ...

    @property
    def train_on_inputs(self) -> bool: ...
