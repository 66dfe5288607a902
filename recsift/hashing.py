"""splitmix64: the one hash recsift draws its deterministic randomness from.

A sample's draws (its reservoir key, its validation side, the surrogate's negatives for it) are a hash of
(seed, sample id, …), never an RNG's state, so they are the same across restarts, replicas, batch sizes
and padding. This is Vigna's splitmix64 finaliser, bit for bit, on int64 tensors: multiplication wraps and
right shifts are logical, as in the unsigned reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's state increment (2^64 / φ)
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # the finaliser's multipliers


def as_int64(value: int) -> int:
    """``value`` mod 2^64 as the signed 64-bit integer with the same bits (what a torch int64 holds)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical (unsigned) right shift of an int64 tensor; ``>>`` on a tensor is arithmetic."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """The splitmix64 finaliser of each element (int64 bits in, int64 bits out)."""
    x = (x ^ shift_right(x, 30)) * as_int64(MIX1)
    x = (x ^ shift_right(x, 27)) * as_int64(MIX2)
    return x ^ shift_right(x, 31)


def uniform(ids: Tensor, seed: int) -> Tensor:
    """A uniform float64 in (0, 1) per id, from (seed, id); never exactly 0 or 1."""
    z = splitmix64(ids.to(torch.int64) * as_int64(GOLDEN) + as_int64(seed * MIX1 + MIX2))
    return (shift_right(z, 11).to(torch.float64) + 0.5) / float(1 << 53)
