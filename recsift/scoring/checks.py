"""``check_scorer``: the conformance suite every scorer must pass (after River's ``check_estimator``).

It runs one scorer class through shared checks on a given surrogate: seeded determinism, batch-size
invariance, finite scores on edge cases (history of one item, unknown items, an all-padding row), empty
batches refused, and versions that change when ``prepare`` runs again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from recsift.scoring.scorer import Scorer
from recsift.scoring.surrogate import OOV, PAD, SeqBatch, Surrogate

ScorerFactory = Callable[[int], Scorer]  # seed → a fresh scorer


def _edge_cases(surrogate: Surrogate) -> SeqBatch:
    width = 6
    known = 2 if len(surrogate.vocab) else OOV
    rows = torch.full((3, width), PAD, dtype=torch.int64)
    rows[0, -2:] = torch.tensor([known, known])  # a history of one item
    rows[1, -4:] = OOV  # unknown items only
    # row 2 stays all padding: no input at all
    return SeqBatch(rows, torch.tensor([10**12, 10**12 + 1, 10**12 + 2]))


def check_determinism(factory: ScorerFactory, surrogate: Surrogate, reference: SeqBatch, batch: SeqBatch) -> None:
    a, b = factory(0), factory(0)
    a.prepare(surrogate, reference)
    b.prepare(surrogate, reference)
    sa, sb = a.score(surrogate, batch), b.score(surrogate, batch)
    assert torch.equal(sa.values, sb.values), f"{type(a).__name__}: same seed, different scores"


def check_batch_size_invariance(factory: ScorerFactory, surrogate: Surrogate, reference: SeqBatch,
                                batch: SeqBatch) -> None:
    scorer = factory(0)
    scorer.prepare(surrogate, reference)
    whole = scorer.score(surrogate, batch).values
    pieces = torch.cat([scorer.score(surrogate, batch.select(torch.arange(i, min(i + 7, len(batch))))).values
                        for i in range(0, len(batch), 7)])
    assert torch.allclose(whole, pieces, rtol=1e-4, atol=1e-7), (
        f"{type(scorer).__name__}: scores depend on the batch (max diff {(whole - pieces).abs().max():.3g})"
    )


def check_edge_cases(factory: ScorerFactory, surrogate: Surrogate, reference: SeqBatch) -> None:
    scorer = factory(0)
    scorer.prepare(surrogate, reference)
    values = scorer.score(surrogate, _edge_cases(surrogate)).values
    assert values.shape == (3,) and torch.isfinite(values).all(), f"{type(scorer).__name__}: {values}"
    try:
        scorer.score(surrogate, reference.select(torch.arange(0)))
    except ValueError:
        pass
    else:
        raise AssertionError(f"{type(scorer).__name__}: an empty batch must be refused with ValueError")


def check_versions(factory: ScorerFactory, surrogate: Surrogate, reference: SeqBatch, batch: SeqBatch) -> None:
    """Scores carry a version that names what they depend on: when the surrogate moves and the scorer is
    prepared again, either the scores are unchanged (they do not depend on the surrogate) or the
    version is new and higher."""
    scorer = factory(0)
    scorer.prepare(surrogate, reference)
    first = scorer.score(surrogate, batch)
    surrogate.partial_fit(reference)
    scorer.prepare(surrogate, reference)
    second = scorer.score(surrogate, batch)
    name = type(scorer).__name__
    if second.version == first.version:
        assert torch.equal(first.values, second.values), f"{name}: the scores changed under the same version"
    else:
        assert second.version > first.version, f"{name}: the version went backwards"


def check_scorer(factory: ScorerFactory, surrogate: Surrogate, reference: SeqBatch, batch: SeqBatch) -> None:
    """Run every check; raises AssertionError naming the first one that fails."""
    check_determinism(factory, surrogate, reference, batch)
    check_batch_size_invariance(factory, surrogate, reference, batch)
    check_edge_cases(factory, surrogate, reference)
    check_versions(factory, surrogate, reference, batch)
