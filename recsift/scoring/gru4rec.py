"""GRU4Rec, a recurrent surrogate: the same next-item task as SASRec read by a GRU instead of attention.

Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks", ICLR 2016, in the form of
RecBole's sequential GRU4Rec (item embedding → dropout → stacked GRU → a dense projection; the state at each
position scores the next item by a dot product with the item table).

Departures, and why:
- The loss is SASRec's (mean BCE over the positions, one negative each: hashed for scoring, random for
  training) rather than GRU4Rec's session-parallel BPR-max/TOP1: scorers compare per-sample losses, so every
  surrogate must give one that is deterministic and independent of the batch.
- Rows are left-padded (as every surrogate's); the GRU reads them right-aligned, so it starts at a row's first
  item from a zero state and a row's outputs do not depend on how much padding its batch gives it (run over
  left padding, the gate biases would move the state before the first item). ``nn.GRU`` on unpacked rows:
  ``torch.func``'s forward-mode derivatives (the influence JVP) do not go through packed sequences.
- Influence is taken over the dense projection after the GRU: like SASRec's last attention output projection,
  it is the last hidden-to-hidden map before the item dot products (hidden² + hidden parameters).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recsift.scoring.sequential import CausalSurrogate, causal_losses, init_xavier
from recsift.scoring.surrogate import PAD


class GRU4Rec(nn.Module):
    """The network. ``forward(seqs, negatives)`` returns per-sample losses."""

    def __init__(self, n_rows: int, hidden: int = 64, layers: int = 1, dropout: float = 0.3) -> None:
        super().__init__()
        self.hidden = hidden
        self.item_emb = nn.Embedding(n_rows, hidden, padding_idx=PAD)
        self.emb_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True)
        self.dense = nn.Linear(hidden, hidden)
        init_xavier(self)

    def features(self, inputs: Tensor) -> Tensor:
        """The state ``[B, L, H]`` after each position of input rows ``[B, L]`` (left-padded).

        Rows are turned right-aligned for the GRU, so that it starts at each row's first item from a zero state
        (what follows a row's end is never read), then back: a row's states do not depend on its padding."""
        width = inputs.shape[1]
        shift = (inputs == PAD).sum(1, keepdim=True)  # left padding: a row's items are its last columns
        columns = torch.arange(width).view(1, -1)
        aligned = inputs.gather(1, (columns + shift).clamp_max(width - 1))
        states, _ = self.gru(self.emb_dropout(self.item_emb(aligned)))
        back = (columns - shift).clamp_min(0).unsqueeze(-1).expand(-1, -1, self.hidden)
        out: Tensor = self.dense(states.gather(1, back))
        return out

    def forward(self, seqs: Tensor, negatives: Tensor) -> Tensor:
        """Per-sample mean BCE over the positions that have an input item; ``negatives`` is ``[B, L - 1]``."""
        return causal_losses(self, self.item_emb, seqs, negatives)


class GRU4RecSurrogate(CausalSurrogate):
    """GRU4Rec behind the :class:`~recsift.scoring.surrogate.Surrogate` protocol (``heads`` is unused)."""

    name = "gru4rec"

    def network(self, rows: int) -> nn.Module:
        return GRU4Rec(rows, self.hidden, self.layers, self.dropout)

    def influence_block(self) -> list[str]:
        """The dense projection after the GRU (the last hidden-to-hidden map)."""
        return ["dense.weight", "dense.bias"]
