"""SASRec, the small surrogate recommender that DEALRec scores samples with.

Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018; used as DEALRec's surrogate
(Lin et al., SIGIR 2024) with hidden size 64, 2 blocks, 2 heads, maximum length 50, dropout 0.5, and a
binary cross-entropy loss with one sampled negative per position. The architecture follows the
reference PyTorch port that DEALRec builds on (pmixer/SASRec.pytorch): scaled item embeddings plus
learned positions, pre-norm causal self-attention, point-wise feed-forward, a final layer norm, and
logits as dot products with the item embeddings.

Departures, and why:
- A sample's loss is the *mean* BCE over its positions (the reference averages over all positions of a
  batch): per-sample losses must not depend on what else is in the batch, and long and short histories
  must be comparable.
- Positions whose input is padding are not trained or scored (the reference trains the first item from an
  empty context), and attention never looks at padding (the reference lets zero-vector padding keys take
  softmax weight, so a row's output depends on how much padding its batch gives it). A sequence needs at least
  two items; shorter ones cannot form an input and are excluded
  by :func:`encode_sequences`, which reports how many — the reference code silently scores such users 0.
- Negatives for *scoring* are a deterministic hash of (seed, sample id, position), so a sample's loss, and
  every score derived from it, is the same whatever batch it sits in; training draws fresh random negatives.
- Negative sampling and batching are vectorised tensor operations (the reference samples in Python).
- ``partial_fit`` learns from each stream batch plus a bounded replay buffer of earlier sequences, so the
  surrogate follows the stream without forgetting.
- Item ids map to rows through :class:`ItemVocab` (0 padding, 1 out-of-vocabulary); new items of a stream
  take free rows until the table is full, after which they share the OOV row (and are counted).
- On a stream the embedding table can start small (``initial_rows``) and double as new items arrive, up to the
  capacity (:class:`~recsift.scoring.sequential.SequentialSurrogate`): at the default 100,000 rows, every
  checkpoint rewrote 100,000 rows and their Adam moments. Negatives are drawn over the rows of the current table.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from recsift.scoring.sequential import CausalSurrogate, causal_losses, init_xavier
from recsift.scoring.surrogate import PAD


class _PointWiseFeedForward(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.ReLU(), nn.Linear(hidden, hidden), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class SASRec(nn.Module):
    """The network. ``forward(seqs, negatives)`` returns per-sample losses, so ``torch.func`` can use it directly."""

    def __init__(self, n_rows: int, hidden: int = 64, layers: int = 2, heads: int = 2, max_len: int = 50,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.hidden, self.max_len, self.heads = hidden, max_len, heads
        self.item_emb = nn.Embedding(n_rows, hidden, padding_idx=PAD)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.attention_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(layers))
        self.attentions = nn.ModuleList(
            nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True) for _ in range(layers)
        )
        self.forward_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(layers))
        self.forwards = nn.ModuleList(_PointWiseFeedForward(hidden, dropout) for _ in range(layers))
        self.last_norm = nn.LayerNorm(hidden, eps=1e-8)
        causal = torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal_mask", causal, persistent=False)
        init_xavier(self)

    def features(self, inputs: Tensor, last_only: bool = False) -> Tensor:
        """Hidden states ``[B, L, H]`` for input rows ``[B, L]`` (L ≤ max_len, left-padded). ``last_only``: the
        last position's state alone, ``[B, 1, H]``; the last block then computes only that position's query and
        feed-forward (every earlier block still needs all positions, as the last one's keys), which is what a
        row's representation reads."""
        length = inputs.shape[1]
        x = self.item_emb(inputs) * math.sqrt(self.hidden)
        x = x + self.pos_emb.weight[self.max_len - length:].unsqueeze(0)
        x = self.emb_dropout(x)
        pad = inputs == PAD
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        x = x * keep
        # causal, and padding keys hidden (every position still sees itself, so no row is fully masked):
        # without this, how much padding a row carries would change its outputs
        eye = torch.eye(length, dtype=torch.bool)
        mask = self.get_buffer("causal_mask")[:length, :length].unsqueeze(0) | (pad.unsqueeze(1) & ~eye)
        mask = mask.repeat_interleave(self.heads, dim=0)
        last_block = len(self.attentions) - 1
        for block, (norm, attention, fnorm, ffn) in enumerate(zip(self.attention_norms, self.attentions,
                                                                  self.forward_norms, self.forwards, strict=True)):
            q = norm(x)
            if last_only and block == last_block:
                q, mask, keep = q[:, -1:], mask[:, -1:], keep[:, -1:]
            out, _ = attention(q, x, x, attn_mask=mask, need_weights=False)
            x = fnorm(q + out)
            x = ffn(x) * keep
        return self.last_norm(x)

    def forward(self, seqs: Tensor, negatives: Tensor) -> Tensor:
        """Per-sample mean BCE over the positions that have an input item; ``negatives`` is ``[B, L - 1]``."""
        return causal_losses(self, self.item_emb, seqs, negatives)


class SASRecSurrogate(CausalSurrogate):
    """SASRec behind the :class:`~recsift.scoring.surrogate.Surrogate` protocol."""

    name = "sasrec"

    def network(self, rows: int) -> nn.Module:
        return SASRec(rows, self.hidden, self.layers, self.heads, self.max_len, self.dropout)

    def represent(self, rows: Tensor) -> Tensor:
        """The state after the whole row, computed for the last position only."""
        return cast(SASRec, self.model).features(rows, last_only=True)[:, -1]

    def influence_block(self) -> list[str]:
        """DEALRec's parameter block: the output projection of the last attention layer."""
        return last_out_projection(self.model)


def last_out_projection(model: nn.Module) -> list[str]:
    """The output projection of a model's last ``attentions.{i}`` layer."""
    names = [k for k, _ in model.named_parameters() if k.startswith("attentions.") and ".out_proj." in k]
    last = max(int(k.split(".")[1]) for k in names)
    return [k for k in names if int(k.split(".")[1]) == last]
