"""The surrogate protocol, and the item sequences every surrogate reads.

A surrogate is the small sequential recommender DEALRec scores samples with (SASRec in the paper, which
reports the selection robust to the choice). Scorers use it only through :class:`Surrogate`: per-sample
losses, embeddings, next-item scores, and for influence-style scores the loss module, its inputs for a
batch and the parameter block the influence is taken over. Implementations: :mod:`recsift.scoring.sasrec`,
:mod:`recsift.scoring.gru4rec`, :mod:`recsift.scoring.bert4rec` (on :mod:`recsift.scoring.sequential`).

Rows are item ids mapped through an :class:`ItemVocab` (0 padding, 1 out-of-vocabulary), left-padded
into a :class:`SeqBatch` of history + target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from recsift.hashing import GOLDEN, MIX1, MIX2, as_int64, shift_right, splitmix64
from recsift.state import State

PAD, OOV = 0, 1


class Surrogate(Protocol):
    """What scorers and the stream scorer need from a surrogate recommender."""

    name: ClassVar[str]
    seed: int
    max_len: int  # history items a row holds (a row is history + target)
    version: int  # bumped by every update
    vocab: ItemVocab

    def losses(self, batch: SeqBatch) -> Tensor:
        """Per-sample losses ``[B]``, deterministic (eval mode, hashed negatives), batch-invariant."""

    def embed(self, batch: SeqBatch) -> Tensor:
        """The sequence representation ``[B, H]`` of history + target."""

    def score_items(self, batch: SeqBatch) -> Tensor:
        """Scores ``[B, rows]`` of every item as the next one after the whole row."""

    @property
    def loss_model(self) -> nn.Module:
        """The module whose ``forward(*loss_inputs(batch))`` returns :meth:`losses` (for ``torch.func``)."""

    def loss_inputs(self, batch: SeqBatch) -> tuple[Tensor, ...]: ...

    def influence_block(self) -> list[str]:
        """Names of the ``loss_model`` parameters influence and gradient norms are taken over."""

    def partial_fit(self, batch: SeqBatch, replay_ratio: float = 1.0, max_rows: int | None = None) -> float:
        """One training step on a stream batch (plus replay); returns its loss."""

    def fit(self, batch: SeqBatch, epochs: int, batch_size: int = 128,
            progress: Callable[[int, float, float], None] | None = None) -> list[float]: ...

    def encode(self, histories: Iterable[Sequence[str]], targets: Iterable[str], sample_ids: Iterable[int],
               grow: bool = True) -> Encoded: ...

    def state_dict(self) -> State: ...

    def load_state_dict(self, state: State) -> None: ...


class ItemVocab:
    """item id (str) → embedding row. Row 0 is padding, row 1 is shared by items beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"vocabulary capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.index: dict[str, int] = {}
        self.overflow = 0  # lookups of items that found the table full

    @property
    def rows(self) -> int:
        return self.capacity + 2

    def __len__(self) -> int:
        return len(self.index)

    def add(self, item_id: str) -> int:
        row = self.index.get(item_id)
        if row is not None:
            return row
        if len(self.index) >= self.capacity:
            self.overflow += 1
            return OOV
        row = self.index[item_id] = len(self.index) + 2
        return row

    def lookup(self, item_id: str) -> int:
        return self.index.get(item_id, OOV)

    def to_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "items": list(self.index), "overflow": self.overflow}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ItemVocab:
        vocab = cls(int(data["capacity"]))
        for item in data["items"]:
            vocab.add(item)
        vocab.overflow = int(data.get("overflow", 0))
        return vocab


@dataclass(frozen=True)
class SeqBatch:
    """Left-padded item rows ``[B, max_len + 1]`` (history then target) and each row's sample id."""

    seqs: Tensor
    sample_ids: Tensor

    def __len__(self) -> int:
        return int(self.seqs.shape[0])

    def select(self, index: Tensor) -> SeqBatch:
        """Rows ``index``, trimmed to the longest of them."""
        return SeqBatch(trim_padding(self.seqs[index]), self.sample_ids[index])


def trim_padding(seqs: Tensor) -> Tensor:
    """Drop the leading columns that are padding in every row (left padding carries no information)."""
    if not len(seqs):
        return seqs
    width = max(2, int((seqs != PAD).sum(1).max()))
    return seqs[:, seqs.shape[1] - width:]


@dataclass(frozen=True)
class Encoded:
    batch: SeqBatch
    kept: np.ndarray  # indices into the input of the rows in ``batch``
    too_short: int  # inputs with fewer than two items: no input to predict from, excluded


def encode_sequences(
    sequences: Sequence[Sequence[int]], sample_ids: Sequence[int], max_len: int
) -> Encoded:
    """Pad row sequences (already mapped through an :class:`ItemVocab`) into a batch; keep the last ``max_len + 1``."""
    kept = [i for i, s in enumerate(sequences) if len(s) >= 2]
    width = min(max_len + 1, max((len(sequences[i]) for i in kept), default=2))
    out = np.zeros((len(kept), width), dtype=np.int64)
    for row, i in enumerate(kept):
        s = sequences[i][-width:]
        out[row, width - len(s):] = s
    ids = np.asarray([sample_ids[i] for i in kept], dtype=np.int64)
    return Encoded(SeqBatch(torch.from_numpy(out), torch.from_numpy(ids)), np.asarray(kept, dtype=np.int64),
                   len(sequences) - len(kept))


def left_pad(seqs: Tensor, width: int) -> Tensor:
    """Left-pad (or left-trim) rows to ``width`` columns."""
    if seqs.shape[1] >= width:
        return seqs[:, seqs.shape[1] - width:]
    return torch.cat([torch.zeros((seqs.shape[0], width - seqs.shape[1]), dtype=seqs.dtype), seqs], 1)


def hashed_negatives(sample_ids: Tensor, positions: int, n_rows: int, seed: int) -> Tensor:
    """Deterministic negatives ``[B, positions]`` in ``[2, n_rows)`` from (seed, sample id, position counted from
    the end of the row, so that trimming padding never changes them)."""
    from_end = torch.arange(positions - 1, -1, -1).view(1, -1)
    x = splitmix64(sample_ids.view(-1, 1) * as_int64(GOLDEN) + from_end * as_int64(MIX1) + seed)
    return 2 + torch.remainder(shift_right(x, 1), n_rows - 2)




def hashed_fractions(sample_ids: Tensor, positions: int, seed: int) -> Tensor:
    """Deterministic uniforms ``[B, positions]`` in [0, 1) from (seed, sample id, position counted from the end of
    the row), drawn apart from :func:`hashed_negatives` (BERT4Rec's cloze masks for scoring)."""
    from_end = torch.arange(positions - 1, -1, -1).view(1, -1)
    x = splitmix64(sample_ids.view(-1, 1) * as_int64(MIX2) + from_end * as_int64(GOLDEN) + seed)
    return shift_right(x, 11).to(torch.float64) / float(1 << 53)
