"""TIGER's generator: a small T5 encoder-decoder that reads a user's history as semantic-ID tokens and generates
the next item's ID, decoded by beam search constrained to the IDs of real items.

Rajput et al., NeurIPS 2023, §3.2: the history is the concatenation of its items' ID tuples, the target the next
item's tuple; each position of a tuple has its own range of tokens (code c at position l is token
``2 + l·codes + c``; 0 is padding and the decoder's start, 1 end-of-sequence). The model is built from a
``T5Config`` (no hub weights) and saved and loaded with ``save_pretrained`` / ``from_pretrained`` (safetensors).
Decoding is beam search whose every step may only extend a prefix of some catalogue item's ID (a prefix trie,
through ``generate``'s ``prefix_allowed_tokens_fn``), so every recommendation is an item; a candidate list is
ranked instead by each candidate's likelihood (the sum of its tokens' log-probabilities).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import T5Config, T5ForConditionalGeneration

from recsift.trainer.tiger.rqvae import SemanticIds

PAD, EOS = 0, 1


def pad(rows: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Token rows right-padded into input ids ``[B, T]`` and their attention mask."""
    ids = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, (ids != PAD).long()


def id_losses(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Each row's mean token cross-entropy of its labels (the target's ID tokens), [B] float32; grad enabled (the
    caller sets the mode)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), batch["labels"], reduction="none").mean(1)


class PrefixTrie:
    """The valid token sequences (one per item) and, for any prefix of them, the tokens that may follow."""

    def __init__(self) -> None:
        self.children: dict[tuple[int, ...], set[int]] = {}
        self.items: dict[tuple[int, ...], str] = {}
        self.length = 0

    def add(self, sequence: Sequence[int], item: str) -> None:
        seq = tuple(sequence)
        if self.length and len(seq) != self.length:
            raise ValueError(f"every ID has {self.length} tokens, got {len(seq)}")
        self.length = len(seq)
        for i in range(len(seq)):
            self.children.setdefault(seq[:i], set()).add(seq[i])
        self.items[seq] = item

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that extend ``prefix`` towards some item's ID; EOS once a whole ID is there; none off the trie."""
        key = tuple(prefix)
        if key in self.items:
            return [EOS]
        return sorted(self.children.get(key, ()))


class TigerModel:
    """The semantic IDs, the T5 over their tokens, and the catalogue's prefix trie."""

    def __init__(self, ids: SemanticIds, model: T5ForConditionalGeneration, history: int = 20) -> None:
        self.ids, self.model, self.history = ids, model, history
        self.width = ids.config.levels + 1
        self.codes = ids.config.codes
        self.trie = PrefixTrie()
        for item, sid in ids.ids.items():
            self.trie.add(self.tokens(sid), item)

    @classmethod
    def build(cls, ids: SemanticIds, d_model: int = 128, layers: int = 2, heads: int = 4, history: int = 20,
              dropout: float = 0.1, seed: int = 0) -> TigerModel:
        """A fresh T5 sized for ``ids``' token vocabulary, initialised from ``seed``."""
        width = ids.config.levels + 1
        config = T5Config(vocab_size=2 + width * ids.config.codes, d_model=d_model, d_kv=d_model // heads,
                          d_ff=4 * d_model, num_layers=layers, num_decoder_layers=layers, num_heads=heads,
                          dropout_rate=dropout, pad_token_id=PAD, eos_token_id=EOS, feed_forward_proj="relu")
        config.decoder_start_token_id = PAD  # (not a keyword of T5Config in transformers 5; T5 starts from padding)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = T5ForConditionalGeneration(config)
        return cls(ids, model, history)

    @classmethod
    def from_pretrained(cls, path: str | Path, ids: SemanticIds, history: int = 20) -> TigerModel:
        """The T5 saved by :meth:`save_pretrained` at ``path`` (safetensors), over ``ids``."""
        return cls(ids, T5ForConditionalGeneration.from_pretrained(path, use_safetensors=True), history)

    def save_pretrained(self, path: str | Path) -> None:
        self.model.save_pretrained(path, safe_serialization=True)

    # ------------------------------------------------------------------ tokens

    def tokens(self, sid: Sequence[int]) -> list[int]:
        return [2 + level * self.codes + code for level, code in enumerate(sid)]

    def encode_histories(self, histories: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
        """Input ids and attention mask ``[B, T]``: each history's last ``history`` items that have an ID, as tokens
        (right-padded; items without an ID are skipped, an empty history is one EOS)."""
        rows = []
        for h in histories:
            known = [self.ids.ids[i] for i in h if i in self.ids.ids][-self.history:]
            rows.append([t for sid in known for t in self.tokens(sid)] or [EOS])
        return pad(rows)

    def encode_targets(self, items: Sequence[str]) -> Tensor:
        """The targets' ID tokens ``[B, width]``; an item without an ID is refused."""
        missing = [i for i in items if i not in self.ids.ids]
        if missing:
            raise KeyError(f"items without a semantic ID (assign them first): {missing[:5]}")
        return torch.tensor([self.tokens(self.ids.ids[i]) for i in items], dtype=torch.long)

    # ------------------------------------------------------------------ training and likelihoods

    def losses(self, histories: Sequence[Sequence[str]], targets: Sequence[str]) -> Tensor:
        """Per-sample mean token NLL of each target's ID given its history (grad enabled; the caller sets the mode)."""
        input_ids, mask = self.encode_histories(histories)
        return id_losses(self.model, {"input_ids": input_ids, "attention_mask": mask,
                                      "labels": self.encode_targets(targets)})

    def fit(self, histories: Sequence[Sequence[str]], targets: Sequence[str], epochs: int, batch_size: int = 64,
            lr: float = 1e-3, seed: int = 0, progress: Callable[[int, float], None] | None = None) -> list[float]:
        """Teacher-forced training on (history → next item) pairs; the mean loss per epoch."""
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        history = []
        for epoch in range(epochs):
            self.model.train()
            total = 0.0
            for chunk in torch.split(torch.randperm(len(targets), generator=generator), batch_size):
                rows = chunk.tolist()
                loss = self.losses([histories[i] for i in rows], [targets[i] for i in rows]).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(rows)
            history.append(total / len(targets))
            if progress is not None:
                progress(epoch, history[-1])
        self.model.eval()
        return history

    def candidate_logliks(self, history: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """log p(candidate's ID | history) for each candidate: the ranking of a candidate list."""
        self.model.eval()
        with torch.no_grad():
            nll = self.losses([history] * len(candidates), candidates)
        return (-nll * self.width).numpy()

    # ------------------------------------------------------------------ recommendation

    def recommend(self, histories: Sequence[Sequence[str]], k: int, beams: int | None = None) -> list[list[str]]:
        """The top ``k`` items after each history: constrained beam search (``beams`` ≥ k, default k); all of them,
        best first, when fewer than ``k`` items have an ID."""
        k = min(k, len(self.trie.items))
        beams = min(max(k, beams or k), len(self.trie.items))
        if k < 1:
            raise ValueError("no item has an ID: nothing to recommend")
        input_ids, mask = self.encode_histories(histories)

        def allowed(_: int, sentence: Tensor) -> list[int]:
            return self.trie.allowed(sentence.tolist()[1:])  # past the decoder's start token

        self.model.eval()
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, num_beams=beams,
                                      num_return_sequences=beams, max_new_tokens=self.width + 1, do_sample=False,
                                      prefix_allowed_tokens_fn=allowed, early_stopping=True)
        ranked = []
        for b in range(len(histories)):
            items = []
            for seq in out[b * beams:(b + 1) * beams].tolist():
                item = self.trie.items.get(tuple(seq[1:1 + self.width]))
                if item is None:
                    raise RuntimeError(f"constrained decoding produced an ID of no item: {seq}")
                items.append(item)
            ranked.append(items[:k])
        return ranked
