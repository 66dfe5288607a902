"""Length bucketing: batches of rows of similar length, so each batch is trimmed to its longest row.

Stream histories and titles are mostly short; padding every row to the longest of the whole set would
spend most of the compute on padding. The scorers and the title embeddings batch through ``length_buckets``, and
so do the passes of one surrogate training step (``step_chunks``: the step's gradient is the sum over its rows,
whichever pass a row goes through). The surrogate's offline epochs do not bucket their *batches*: see
``SequentialSurrogate.fit``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per forward (and backward) pass of the scoring stage's surrogate: its training step, influence scores
# and embeddings. One pass's activations are most of the stage's memory, and on 2 cores smaller passes also
# stay in cache: 256 rows against 1,024 ran the stage 13-15% faster in 34-39% less RSS, on the synthetic stream
# and on Games (bench/results/passes.json, passes-games.json).
ROWS_PER_PASS = 256

# A training step split into passes groups its rows by length (True) or keeps them in input order (False: what
# the step did before; the switch is there for bench/passes.py's paired comparison).
TRAIN_BUCKETS = True


def length_buckets(lengths: Tensor, size: int) -> list[Tensor]:
    """Row indices in chunks of at most ``size`` rows, in ascending length (ties in input order)."""
    if size < 1:
        raise ValueError(f"bucket size must be positive, got {size}")
    return list(torch.split(torch.argsort(lengths, stable=True), size))


def step_chunks(lengths: Tensor, size: int) -> list[Tensor]:
    """Row indices of one training step's forward and backward passes of at most ``size`` rows: all rows in one
    pass when they fit, else length buckets (``TRAIN_BUCKETS``) or chunks in input order."""
    if size < 1:
        raise ValueError(f"pass size must be positive, got {size}")
    everything = torch.arange(len(lengths))
    if len(lengths) <= size:
        return [everything]
    return length_buckets(lengths, size) if TRAIN_BUCKETS else list(torch.split(everything, size))
