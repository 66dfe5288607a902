"""BERT4Rec, a bidirectional surrogate trained by cloze (masked-item) prediction.

Sun et al., "BERT4Rec: Sequential Recommendation with Bidirectional Encoder Representations from
Transformer", CIKM 2019: items of a sequence are replaced by a [MASK] token at random and a bidirectional
Transformer encoder (post-norm blocks, GELU feed-forward of 4× the hidden size, learned positions) predicts
them from both sides; the last item is also masked so that training matches the next-item task. To
recommend, [MASK] is appended after the sequence and its state is scored against the item table.

Departures, and why:
- The loss is BCE with one negative per masked position (hashed for scoring, random for training), as for
  SASRec and GRU4Rec, not a softmax over the whole catalogue: it keeps every surrogate's per-sample loss on
  one scale and its cost independent of the catalogue's size.
- A sample's *scoring* loss masks its target (the last item: the prediction a sample teaches) and, like
  training, a hashed ``mask_prob`` share of the other items, from (seed, sample id, position from the end):
  the same in any batch and under any padding.
- Attention never looks at padding (every position sees itself), as in SASRec here.
- Item embeddings are scaled by √hidden as in SASRec (the table is initialised the same way); [MASK] is its
  own learned vector, so the item rows and the vocabulary stay those of every other surrogate.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from recsift.scoring.sasrec import last_out_projection
from recsift.scoring.sequential import SequentialSurrogate, init_xavier, next_item_bce
from recsift.scoring.surrogate import PAD, SeqBatch, hashed_fractions, hashed_negatives


class BERT4Rec(nn.Module):
    """The network. ``forward(seqs, negatives, masked)`` returns per-sample losses over the masked positions."""

    def __init__(self, n_rows: int, hidden: int = 64, layers: int = 2, heads: int = 2, max_len: int = 50,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.hidden, self.width, self.heads = hidden, max_len + 1, heads  # a row: history + target
        self.item_emb = nn.Embedding(n_rows, hidden, padding_idx=PAD)
        self.mask_emb = nn.Parameter(torch.zeros(hidden))
        self.pos_emb = nn.Embedding(self.width, hidden)
        self.emb_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.emb_dropout = nn.Dropout(dropout)
        self.attentions = nn.ModuleList(
            nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True) for _ in range(layers))
        self.attention_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(layers))
        self.forwards = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden), nn.Dropout(dropout))
            for _ in range(layers))
        self.forward_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(layers))
        init_xavier(self)
        nn.init.normal_(self.mask_emb, std=1.0 / math.sqrt(hidden))

    def features(self, seqs: Tensor, masked: Tensor) -> Tensor:
        """States ``[B, L, H]`` of rows ``[B, L]`` (left-padded, L ≤ max_len + 1) with ``masked`` positions
        replaced by [MASK]; a masked position counts as present even where the row holds padding."""
        length = seqs.shape[1]
        present = (seqs != PAD) | masked
        x = torch.where(masked.unsqueeze(-1), self.mask_emb, self.item_emb(seqs)) * math.sqrt(self.hidden)
        x = self.emb_dropout(self.emb_norm(x + self.pos_emb.weight[self.width - length:].unsqueeze(0)))
        keep = present.unsqueeze(-1).to(x.dtype)
        x = x * keep
        eye = torch.eye(length, dtype=torch.bool)
        mask = (~present.unsqueeze(1) & ~eye).repeat_interleave(self.heads, dim=0)  # padding keys hidden
        for attention, norm, ffn, fnorm in zip(self.attentions, self.attention_norms, self.forwards,
                                               self.forward_norms, strict=True):
            # keys as a distinct tensor object: self-attention with `query is key` takes MultiheadAttention's
            # native fast path in eval mode, which has no forward-mode AD (the influence JVP needs it)
            keys = x.view_as(x)
            out, _ = attention(x, keys, keys, attn_mask=mask, need_weights=False)
            x = norm(x + out)
            x = fnorm(x + ffn(x)) * keep
        return x

    def forward(self, seqs: Tensor, negatives: Tensor, masked: Tensor) -> Tensor:
        """Per-sample mean BCE over the masked positions (each against its true item and ``negatives``)."""
        masked = masked & (seqs != PAD)
        return next_item_bce(self.features(seqs, masked), self.item_emb, seqs, negatives, masked)


class BERT4RecSurrogate(SequentialSurrogate):
    """BERT4Rec behind the :class:`~recsift.scoring.surrogate.Surrogate` protocol."""

    name = "bert4rec"
    mask_prob = 0.2  # BERT4Rec's cloze share (the paper tunes 0.2 for the denser datasets)

    def network(self, rows: int) -> nn.Module:
        return BERT4Rec(rows, self.hidden, self.layers, self.heads, self.max_len, self.dropout)

    def _with_target(self, drawn: Tensor) -> Tensor:
        drawn[:, -1] = True  # the target: the next-item prediction every sample stands for
        return drawn

    def loss_inputs(self, batch: SeqBatch) -> tuple[Tensor, ...]:
        """The rows, hashed negatives and hashed cloze masks (the target always masked)."""
        width = batch.seqs.shape[1]
        masked = self._with_target(hashed_fractions(batch.sample_ids, width, self.seed) < self.mask_prob)
        return batch.seqs, hashed_negatives(batch.sample_ids, width, self.rows, self.seed), masked

    def train_inputs(self, seqs: Tensor) -> tuple[Tensor, ...]:
        negatives = torch.randint(2, self.rows, seqs.shape, generator=self.generator)
        masked = self._with_target(torch.rand(seqs.shape, generator=self.generator) < self.mask_prob)
        return seqs, negatives, masked

    def represent(self, rows: Tensor) -> Tensor:
        """The state of a [MASK] appended after the row."""
        seqs = torch.cat([rows, rows.new_zeros((len(rows), 1))], 1)
        masked = torch.zeros(seqs.shape, dtype=torch.bool)
        masked[:, -1] = True
        return cast(BERT4Rec, self.model).features(seqs, masked)[:, -1]

    def influence_block(self) -> list[str]:
        """The output projection of the last attention layer, as for SASRec."""
        return last_out_projection(self.model)
