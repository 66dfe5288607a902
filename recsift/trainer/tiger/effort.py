"""TIGER's effort score: how hard the T5 finds a sample, as the norm of its loss gradient on one block.

effort_i = ‖∂ loss_i / ∂ W‖₂, where loss_i is the mean cross-entropy of the target's ID tokens given the history
(the loss a refresh trains, :func:`~recsift.trainer.tiger.generator.id_losses`) and W is the output projection
``o`` of the last decoder layer's cross-attention. The same batched per-sample gradient as BIGRec's
(:class:`recsift.scoring.effort.EffortScorer`) applies: W is linear, so each row's gradient is Σ_t g_tᵀ a_t.

Why that block: DEALRec measures the LLM's gradient on the last layer's LoRA-B of ``v_proj``, the last place
where the sample's context enters the prediction. In TIGER's T5 the history reaches the generated ID only
through the decoder's cross-attention, and its last output projection is where it enters last. The output head
would be the other candidate; its gradient norm mostly tracks the loss itself (how far the ID tokens' softmax is
from one-hot), not what the sample asks the model to change in how it reads a history.

The model is fixed for a state directory, so a sample's effort is a function of the sample alone (cached by
sample id), in one run and across restarts: the first time, the registry's serving TIGER version, or the fresh
seeded T5 and semantic IDs a first refresh builds, is saved in the state directory, and every later start loads
it (:meth:`TigerBackend.effort`; delete ``state/tiger-effort`` to take the serving version again). An item the
model has no ID for is read with the ID the quantiser would give it (:meth:`SemanticIds.peek`), without
assigning it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from recsift.stream.windows import Sample
from recsift.trainer.tiger.generator import EOS, TigerModel, pad

_BLOCK = re.compile(r"decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.o$")


def cross_attention_block(model: nn.Module) -> str:
    """Name of the last decoder layer's cross-attention output projection of a T5."""
    found = [(int(m.group(1)), name) for name, _ in model.named_modules() if (m := _BLOCK.search(name))]
    if not found:
        raise ValueError("the model has no decoder cross-attention (a T5 encoder-decoder is needed)")
    return max(found)[1]


class TigerBatches:
    """Samples → T5 batches (history tokens, target ID tokens), items without an ID read by their peeked ID."""

    def __init__(self, tiger: TigerModel, embed: Callable[[Sequence[str]], tuple[list[str], Tensor]]) -> None:
        """``embed``: items → (the same items, in its order; their title embeddings)."""
        self.tiger, self.embed = tiger, embed
        self.peeked: dict[str, tuple[int, ...]] = {}  # a function of the fixed quantiser: a cache, not state

    def _ids(self, items: Sequence[str]) -> list[tuple[int, ...]]:
        known = self.tiger.ids.ids
        new = sorted({i for i in items if i not in known and i not in self.peeked})
        if new:
            for item, vector in zip(*self.embed(new), strict=True):
                self.peeked[item] = self.tiger.ids.peek(item, vector)
        return [known.get(i) or self.peeked[i] for i in items]

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Tensor]:
        t = self.tiger
        histories = [list(s.history)[-t.history:] for s in samples]
        ids = self._ids([i for h in histories for i in h] + [s.target for s in samples])
        rows, at = [], 0
        for h in histories:
            rows.append([tok for sid in ids[at:at + len(h)] for tok in t.tokens(sid)] or [EOS])
            at += len(h)
        input_ids, mask = pad(rows)
        labels = torch.tensor([t.tokens(sid) for sid in ids[at:]], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
