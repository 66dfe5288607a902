"""The conformance suites every scorer and every surrogate must pass (after River's ``check_estimator``).

``check_scorer`` runs one scorer class through shared checks on a given surrogate: seeded determinism,
batch-size invariance, finite scores on edge cases (history of one item, unknown items, an all-padding row),
empty batches refused, and versions that change when ``prepare`` runs again.

``check_surrogate`` runs one surrogate class through: seeded determinism, losses and embeddings independent
of the batch and of its padding, an exact restart from a checkpoint taken while the item table grows, and
LiSSA on its influence block against the exact solve of the damped system.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch.func import hessian

from recsift.scoring.influence import InfluenceEstimator, cosine
from recsift.scoring.scorer import Scorer
from recsift.scoring.sequential import SequentialSurrogate
from recsift.scoring.surrogate import OOV, PAD, SeqBatch, Surrogate, left_pad
from recsift.state import State, differences

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


# ---------------------------------------------------------------------------------------------- surrogates

SurrogateFactory = Callable[[int, "int | None"], SequentialSurrogate]  # (seed, initial_rows) → a fresh small one


def _stream(seed: int, batches: int = 4, size: int = 60, items: int = 60) -> list[tuple[list[list[str]], list[str], range]]:
    """Batches of samples whose items widen batch by batch (so a growing table grows), histories of 1–14 items."""
    rnd = random.Random(seed)
    out = []
    for k in range(batches):
        top = items * (k + 1) // batches
        histories = [[f"i{rnd.randrange(top)}" for _ in range(rnd.randint(1, 14))] for _ in range(size)]
        out.append((histories, [f"i{rnd.randrange(top)}" for _ in histories], range(size * k, size * (k + 1))))
    return out


def _feed(s: SequentialSurrogate, stream: list[tuple[list[list[str]], list[str], range]]) -> list[SeqBatch]:
    encoded = []
    for histories, targets, ids in stream:
        encoded.append(s.encode(histories, targets, ids).batch)
        s.partial_fit(encoded[-1])
    return encoded


def check_surrogate_determinism(factory: SurrogateFactory) -> None:
    a, b = factory(0, None), factory(0, None)
    batches = _feed(a, _stream(1))
    _feed(b, _stream(1))
    a.fit(batches[0], epochs=1, batch_size=16)
    b.fit(batches[0], epochs=1, batch_size=16)
    assert differences(a.state_dict(), b.state_dict()) == [], f"{a.name}: same seed and data, different state"
    assert torch.equal(a.losses(batches[-1]), b.losses(batches[-1])), f"{a.name}: same seed, different losses"


def check_surrogate_batch_invariance(factory: SurrogateFactory) -> None:
    """A row's loss and embedding are the same alone, in any batch, and under any amount of left padding."""
    s = factory(0, None)
    batch = _feed(s, _stream(2))[-1]
    whole, embedded = s.losses(batch), s.embed(batch)
    pieces = torch.cat([s.losses(batch.select(torch.arange(i, min(i + 7, len(batch))))) for i in range(0, len(batch), 7)])
    wide = SeqBatch(left_pad(batch.seqs, s.max_len + 1), batch.sample_ids)
    worst = max(float((whole - pieces).abs().max()), float((whole - s.losses(wide)).abs().max()),
                float((embedded - s.embed(wide)).abs().max()))
    alone = torch.cat([s.embed(batch.select(torch.tensor([i]))) for i in range(5)])
    worst = max(worst, float((embedded[:5] - alone).abs().max()))
    assert worst <= 1e-5, f"{s.name}: losses or embeddings depend on the batch or its padding (max diff {worst:.3g})"


def check_surrogate_restart(factory: SurrogateFactory) -> None:
    """A checkpoint taken halfway through a stream (the table still growing) restores into a fresh surrogate of
    another seed, which then ends in exactly the state of the uninterrupted run."""
    stream = _stream(3)
    uninterrupted = factory(0, 8)
    _feed(uninterrupted, stream)
    halfway = factory(0, 8)
    _feed(halfway, stream[:2])
    assert halfway.rows < uninterrupted.rows, f"{halfway.name}: the table should still be growing halfway"
    restarted = factory(7, 8)
    restarted.load_state_dict(State.from_bytes(halfway.state_dict().to_bytes()))
    assert differences(restarted.state_dict(), halfway.state_dict()) == [], f"{restarted.name}: the state did not round-trip"
    _feed(restarted, stream[2:])
    left = differences(restarted.state_dict(), uninterrupted.state_dict())
    assert left == [], f"{restarted.name}: a restart ends elsewhere than the uninterrupted run: {left[:5]}"


def check_surrogate_lissa(factory: SurrogateFactory, depth: int = 100) -> None:
    """LiSSA over the surrogate's influence block reaches the exact solve of (H + damping·scale·I)x = v, with H the
    exact Hessian of the mean training loss (``torch.func.hessian``; the block must be small: hidden ≤ 8).

    Compared by relative error, not by direction: v itself often points within a few degrees of the solve, so a
    cosine would pass an estimate that never iterated. The damping (≥ 0.1) makes ``depth`` steps converge."""
    s = factory(0, None)
    histories, targets, ids = _stream(4, batches=1, size=160)[0]
    train_rows = s.encode(histories, targets, ids).batch
    s.fit(train_rows, epochs=3, batch_size=32)
    train, reference = s.loss_inputs(train_rows), s.loss_inputs(train_rows.select(torch.arange(80)))
    block = s.influence_block()
    losses, theta = InfluenceEstimator(s.loss_model, block)._losses_fn()
    s.loss_model.eval()  # (the estimator scores in eval mode: no dropout)
    H = hessian(lambda f: losses(f, *train).mean())(theta)
    eig = torch.linalg.eigvalsh(H)
    scale = float(eig.max()) * 1.5 + 1.0  # LiSSA needs H/scale < 2 - damping
    damping = max(0.1, (-float(eig.min()) + 0.05) / scale)  # and H + damping·scale·I positive definite
    est = InfluenceEstimator(s.loss_model, block, damping=damping, scale=scale, depth=depth)
    got = est.estimate(reference, lambda g: train)  # the whole training set every step: the exact HVP
    v = est.gradient(reference)
    exact = torch.linalg.solve(H + damping * scale * torch.eye(len(v)), v)
    error = float((got - exact).norm() / exact.norm())
    assert error <= 1e-3, (f"{s.name}: LiSSA ({depth} steps) vs the exact solve: relative error {error:.3g} "
                           f"(cosine {cosine(got, exact):.4f})")


def check_surrogate(factory: SurrogateFactory) -> None:
    """Run every surrogate check; raises AssertionError naming the first one that fails."""
    check_surrogate_determinism(factory)
    check_surrogate_batch_invariance(factory)
    check_surrogate_restart(factory)
    check_surrogate_lissa(factory)
