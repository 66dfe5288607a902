"""splitmix64 on int64 tensors must be the unsigned reference, bit for bit."""

from __future__ import annotations

import random

import pytest
import torch
from scipy import stats

from recsift.hashing import GOLDEN, MIX1, MIX2, as_int64, splitmix64, uniform

MASK = (1 << 64) - 1


def reference(z: int) -> int:
    """Vigna's splitmix64 finaliser on Python ints (unsigned, masked to 64 bits)."""
    z = ((z ^ (z >> 30)) * MIX1) & MASK
    z = ((z ^ (z >> 27)) * MIX2) & MASK
    return z ^ (z >> 31)


def arithmetic_shift_mix(x: torch.Tensor) -> torch.Tensor:
    """Negative control: the finaliser with tensor ``>>`` (arithmetic), which is not splitmix64."""
    x = (x ^ (x >> 30)) * as_int64(MIX1)
    x = (x ^ (x >> 27)) * as_int64(MIX2)
    return x ^ (x >> 31)


# The first two outputs of splitmix64 seeded with 0 (state += GOLDEN before each mix).
KNOWN = [(GOLDEN, 0xE220A8397B1DCDAF), (2 * GOLDEN & MASK, 0x6E789E6AA1B965F4)]


def test_known_answers() -> None:
    for state, expected in KNOWN:
        assert reference(state) == expected
        assert splitmix64(torch.tensor([as_int64(state)])).item() == as_int64(expected)


def test_matches_the_unsigned_reference_on_every_bit_pattern() -> None:
    rng = random.Random(0)
    values = [rng.getrandbits(64) for _ in range(2000)] + [0, 1, MASK, 1 << 63, (1 << 63) - 1]
    got = splitmix64(torch.tensor([as_int64(v) for v in values]))
    assert got.tolist() == [as_int64(reference(v)) for v in values]


def test_negative_control_arithmetic_shifts_fail() -> None:
    """The tensor ``>>`` sign-extends; a version built on it disagrees with the reference."""
    state, expected = KNOWN[0]
    assert arithmetic_shift_mix(torch.tensor([as_int64(state)])).item() != as_int64(expected)


def test_uniform_is_the_reference_key_and_uniform() -> None:
    ids = torch.arange(0, 20_000) * 7919 + 3
    u = uniform(ids, seed=5)
    expected = [((reference((i * GOLDEN + 5 * MIX1 + MIX2) & MASK) >> 11) + 0.5) / float(1 << 53)
                for i in ids.tolist()]
    assert u.tolist() == expected
    assert u.min().item() > 0 and u.max().item() < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > 0.01
    assert not torch.equal(u, uniform(ids, seed=6))  # the seed matters


@pytest.mark.parametrize("seed", [0, 1, 2**40])
def test_uniform_depends_only_on_seed_and_id(seed: int) -> None:
    ids = torch.tensor([5, 17, 2**40, 3])
    assert uniform(ids, seed)[[3, 0]].tolist() == uniform(torch.tensor([3, 5]), seed).tolist()
