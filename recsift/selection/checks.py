"""``check_selector``: the conformance suite every streaming selector passes (as River's estimator checks).

Checks: capacity is never exceeded, the same seed and stream give the same coreset, and a selector
restored from its checkpoint state continues exactly as the original does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from recsift.selection.reservoir import Offer, StratifiedReservoir
from recsift.selection.store import CoresetStore
from recsift.stream.checkpoint import Checkpoint
from recsift.stream.windows import Sample


def synthetic_offers(n: int, seed: int = 0, batch: int = 100, version: int = 1) -> list[list[Offer]]:
    """A static stream of scored samples: a score mixture, 200 users, increasing timestamps."""
    rng = np.random.default_rng(seed)
    scores = np.where(rng.random(n) < 0.8, rng.normal(0.0, 1.0, n), rng.normal(3.0, 0.5, n))
    offers = [Offer(Sample(i, f"u{i % 200}", (f"i{i % 97}",), f"i{(i * 7) % 101}", 1_000.0 + i), float(scores[i]),
                    version, rng.normal(size=4).astype(np.float32)) for i in range(n)]
    return [offers[i:i + batch] for i in range(0, n, batch)]


def _ids(selector: StratifiedReservoir) -> list[int]:
    return sorted(selector.members)


def check_selector(make: Callable[[], StratifiedReservoir], stream: Sequence[list[Offer]], tmp_db: str) -> None:
    """Raise AssertionError when ``make()``'s selector breaks the shared contract."""
    a, b = make(), make()
    for batch in stream:
        a.offer(batch)
        assert len(a) <= a.budget, f"{len(a)} members exceed the budget {a.budget}"
        assert sum(a.strata_sizes()) == len(a)
    for batch in stream:
        b.offer(batch)
    assert _ids(a) == _ids(b), "the same seed and stream must give the same coreset"

    half = len(stream) // 2
    first = make()
    ckpt = Checkpoint(tmp_db, [CoresetStore(first)])
    for batch in stream[:half]:
        first.offer(batch)
    ckpt.commit({})
    ckpt.close()
    resumed = make()
    ckpt = Checkpoint(tmp_db, [CoresetStore(resumed)])
    ckpt.load(set())
    ckpt.close()
    assert _ids(resumed) == _ids(first), "the checkpoint must restore the members"
    for batch in stream[half:]:
        resumed.offer(batch)
    assert _ids(resumed) == _ids(a), "a restored selector must continue exactly as the original"
    assert resumed.quotas == a.quotas
