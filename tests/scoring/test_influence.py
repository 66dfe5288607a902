"""Influence: a warm-started LiSSA against an exact solve, the JVP path against the per-sample loop, and influence
against real leave-one-out retraining on a convex model. (A cold LiSSA against the exact solve is part of every
surrogate's conformance suite: ``check_surrogate_lissa``, tests/scoring/test_surrogates.py.)"""

from __future__ import annotations

import random

import pytest
import torch
from torch import Tensor, nn
from torch.func import hessian

from recsift.scoring.influence import (
    InfluenceError,
    InfluenceEstimator,
    cosine,
    default_block,
    spearman,
)
from recsift.scoring.sasrec import SASRecSurrogate
from recsift.scoring.surrogate import SeqBatch, Surrogate


def tiny_surrogate(n: int = 240, seed: int = 0) -> tuple[Surrogate, SeqBatch]:
    rnd = random.Random(seed)
    s = SASRecSurrogate(60, hidden=8, layers=2, heads=2, max_len=12, dropout=0.0, seed=seed)
    histories = [[f"i{rnd.randrange(60)}" for _ in range(rnd.randint(1, 11))] for _ in range(n)]
    enc = s.encode(histories, [f"i{rnd.randrange(60)}" for _ in histories], range(n))
    s.fit(enc.batch, epochs=3, batch_size=32)
    return s, enc.batch


def inputs(s: Surrogate, b: SeqBatch) -> tuple[Tensor, Tensor]:
    return b.seqs, s.negatives(b)


def test_a_warm_started_estimate_follows_a_moved_model_in_few_steps() -> None:
    """LiSSA from the previous H⁻¹v (``start``) reaches the moved model's exact solve in fewer steps than a
    cold start; the previous estimate itself (no steps: the negative control) is further from it."""
    torch.manual_seed(0)
    s, batch = tiny_surrogate()
    block = default_block(s.model)
    train = inputs(s, batch)
    reference = inputs(s, SeqBatch(batch.seqs[:80], batch.sample_ids[:80]))

    def hessian_now() -> Tensor:
        losses, theta = InfluenceEstimator(s.model, block)._losses_fn()
        return hessian(lambda f: losses(f, *train).mean())(theta)

    eig = torch.linalg.eigvalsh(hessian_now())
    scale = float(eig.max()) * 1.5 + 1.0  # as in the exact-solve test above
    damping = max(0.01, (-float(eig.min()) + 0.05) / scale)
    previous = InfluenceEstimator(s.model, block, damping=damping, scale=scale, depth=150).estimate(reference, lambda g: train)
    s.fit(batch, epochs=2, batch_size=32)  # the model moves on
    est = InfluenceEstimator(s.model, block, damping=damping, scale=scale, depth=300)
    H = hessian_now()
    exact = torch.linalg.solve(H + damping * scale * torch.eye(len(H)), est.gradient(reference))
    warm = est.estimate(reference, lambda g: train, start=previous, depth=25)
    cold = InfluenceEstimator(s.model, block, damping=damping, scale=scale, depth=25).estimate(reference, lambda g: train)
    assert cosine(warm, exact) >= 0.99
    assert cosine(warm, exact) > cosine(cold, exact)
    assert cosine(previous, exact) < cosine(warm, exact)
    with pytest.raises(ValueError, match="entries"):
        est.estimate(reference, lambda g: train, start=torch.ones(3), depth=5)


def test_jvp_scores_equal_per_sample_gradient_dot_products() -> None:
    s, batch = tiny_surrogate(seed=1)
    est = InfluenceEstimator(s.model, default_block(s.model), depth=30)
    rows = batch.select(torch.arange(64))

    def sample(g: torch.Generator) -> tuple[Tensor, Tensor]:
        return inputs(s, batch.select(torch.randint(0, len(batch), (32,), generator=g)))

    est.estimate(inputs(s, rows), sample)
    jvp_scores = est.scores(inputs(s, rows))
    loop_scores = est.scores_by_loop(inputs(s, rows))
    rel = (jvp_scores - loop_scores).abs().max() / loop_scores.abs().max()
    assert rel < 1e-5
    # batch-size invariant: scoring in pieces gives the same numbers
    pieces = torch.cat([est.scores(inputs(s, batch.select(torch.arange(i, min(i + 9, 64))))) for i in range(0, 64, 9)])
    assert torch.allclose(pieces, jvp_scores, rtol=1e-4, atol=1e-6)


class Logistic(nn.Module):
    """L2-regularised logistic regression whose forward returns per-sample losses (strongly convex)."""

    def __init__(self, dim: int, l2: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.l2 = l2

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        logits = x @ self.w + self.b
        return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") + 0.5 * self.l2 * (self.w @ self.w)


def train_logistic(x: Tensor, y: Tensor, l2: float) -> Logistic:
    m = Logistic(x.shape[1], l2)
    opt = torch.optim.LBFGS(m.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = m(x, y).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return m


def test_influence_ranks_agree_with_leave_one_out_retraining_on_a_convex_model() -> None:
    g = torch.Generator().manual_seed(0)
    n, dim, l2 = 60, 5, 0.05
    w_true = torch.randn(dim, generator=g, dtype=torch.float64)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w_true)).double()
    xv = torch.randn(200, dim, generator=g, dtype=torch.float64)
    yv = (torch.rand(200, generator=g, dtype=torch.float64) < torch.sigmoid(xv @ w_true)).double()

    model = train_logistic(x, y, l2)
    est = InfluenceEstimator(model, ["w", "b"], damping=0.0, scale=10.0, depth=2000)
    est.estimate((xv, yv), lambda _: (x, y))
    # removing sample i moves θ by +(1/n)·H⁻¹∇ℓ_i, so the validation loss changes by about (1/n)·⟨∇ℓ_i, H⁻¹v⟩
    predicted = est.scores((x, y)) / n
    base = model(xv, yv).mean().item()
    actual = []
    for i in range(n):
        keep = torch.arange(n) != i
        loo = train_logistic(x[keep], y[keep], l2)
        actual.append(loo(xv, yv).mean().item() - base)
    assert spearman(predicted, torch.tensor(actual)) >= 0.8


def test_bad_input_is_refused_clearly() -> None:
    s, batch = tiny_surrogate(seed=2)
    est = InfluenceEstimator(s.model, default_block(s.model), depth=5)
    with pytest.raises(InfluenceError, match="estimate"):
        est.scores(inputs(s, batch))
    with pytest.raises(ValueError, match="not in the model"):
        InfluenceEstimator(s.model, ["no.such.weight"])
    est.set_ihvp(torch.ones(est.block_size))
    with pytest.raises(ValueError, match="empty batch"):
        est.scores((batch.seqs[:0], s.negatives(batch)[:0]))
    with pytest.raises(ValueError, match="entries"):
        est.set_ihvp(torch.ones(3))
    diverging = InfluenceEstimator(s.model, default_block(s.model), damping=0.0, scale=1e-6, depth=200)
    with pytest.raises(InfluenceError, match="diverged"):
        diverging.estimate(inputs(s, batch), lambda g: inputs(s, batch))
