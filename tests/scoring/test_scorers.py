"""Every registered scorer passes the shared conformance suite; the baselines mean what they say."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from recsift.scoring.baselines import LossScorer
from recsift.scoring.checks import check_scorer, check_versions
from recsift.scoring.dealrec import DEALRecScorer
from recsift.scoring.registry import SCORERS, make_scorer
from recsift.scoring.sasrec import SASRecSurrogate
from recsift.scoring.scorer import Bounds, combine
from recsift.scoring.surrogate import SeqBatch, Surrogate


@pytest.fixture(scope="module")
def trained() -> tuple[Surrogate, SeqBatch]:
    rnd = random.Random(0)
    s = SASRecSurrogate(70, hidden=16, max_len=20, seed=0)
    histories = [[f"i{rnd.randrange(70)}" for _ in range(rnd.randint(1, 15))] for _ in range(160)]
    enc = s.encode(histories, [f"i{rnd.randrange(70)}" for _ in histories], range(160))
    s.fit(enc.batch, epochs=3, batch_size=32)
    return s, enc.batch


CONFIGS = {"dealrec": {"depth": 40}, "grand": {}, "el2n": {}, "loss": {}, "random": {}}


@pytest.mark.parametrize("name", SCORERS.names())
def test_every_registered_scorer_passes_check_scorer(name: str, trained: tuple[Surrogate, SeqBatch]) -> None:
    surrogate, batch = trained
    reference, rows = batch.select(torch.arange(0, 64)), batch.select(torch.arange(64, 124))
    check_scorer(lambda seed: make_scorer({"type": name, **CONFIGS[name]}, seed=seed), surrogate, reference, rows)


class StaleVersionLoss(LossScorer):
    """Deliberately wrong: its scores follow the surrogate, but prepare() never starts a new version."""

    def prepare(self, surrogate: Surrogate, reference: SeqBatch) -> None:
        return None


def test_check_versions_fails_a_scorer_whose_scores_change_under_one_version(trained: tuple[Surrogate, SeqBatch]) -> None:
    surrogate, batch = trained
    reference, rows = batch.select(torch.arange(0, 64)), batch.select(torch.arange(64, 124))
    check_versions(lambda seed: LossScorer(seed), copy.deepcopy(surrogate), reference, rows)  # the real one passes
    with pytest.raises(AssertionError, match="changed under the same version"):
        check_versions(lambda seed: StaleVersionLoss(seed), copy.deepcopy(surrogate), reference, rows)


def test_every_scorer_is_configured_in_this_test() -> None:
    assert set(CONFIGS) == set(SCORERS.names())


def test_grand_is_the_per_sample_gradient_norm(trained: tuple[Surrogate, SeqBatch]) -> None:
    surrogate, batch = trained
    rows = batch.select(torch.arange(8))
    scorer = make_scorer("grand")
    got = scorer.score(surrogate, rows).values
    est = DEALRecScorer(depth=1)
    est.prepare(surrogate, rows)
    assert est.estimator is not None
    losses, theta = est.estimator._losses_fn()
    expected = []
    for i in range(len(rows)):
        flat = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(losses(flat, rows.seqs[i:i + 1], surrogate.negatives(rows)[i:i + 1]).sum(), flat)
        expected.append(g.norm().item())
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-4)


def test_el2n_is_zero_for_a_certain_correct_prediction_and_bounded() -> None:
    s = SASRecSurrogate(5, hidden=4, max_len=4, seed=0)
    enc = s.encode([["a", "b"]], ["c"], [1])
    with torch.no_grad():
        s.model.item_emb.weight.mul_(0)
    values = make_scorer("el2n").score(s, enc.batch).values
    assert 0 < values.item() <= 2 ** 0.5  # uniform prediction: error norm below the maximum


def test_random_scores_are_uniform_and_seeded(trained: tuple[Surrogate, SeqBatch]) -> None:
    surrogate, batch = trained
    a = make_scorer("random", seed=1).score(surrogate, batch).values
    b = make_scorer("random", seed=2).score(surrogate, batch).values
    assert not torch.equal(a, b) and 0.3 < a.mean().item() < 0.7 and a.min() >= 0 and a.max() < 1


def test_combine_normalises_per_version() -> None:
    influence = torch.tensor([1.0, 3.0, 2.0])
    effort = torch.tensor([10.0, 10.0, 30.0])
    assert combine(influence, effort, 0.5).tolist() == [0.0, 1.0, 1.0]
    span = float(influence.max() - influence.min())
    assert combine(influence, None, 0.3).tolist() == ((influence.double() - influence.min()) / span).tolist()
    with pytest.raises(ValueError, match="finite"):
        combine(torch.tensor([1.0, float("nan")]), None, 0.0)


def test_bounds_fix_a_versions_range_from_its_reference() -> None:
    bounds = Bounds.of(torch.tensor([2.0, 4.0, 3.0]))
    assert bounds.normalise(torch.tensor([2.0, 3.0, 6.0])).tolist() == [0.0, 0.5, 2.0]
    assert Bounds.of(torch.tensor([1.0, 1.0])).normalise(torch.tensor([5.0])).tolist() == [0.0]
    with pytest.raises(ValueError, match="finite"):
        Bounds.of(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="non-empty"):
        Bounds.of(torch.tensor([]))


def test_unknown_scorer_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="registered"):
        make_scorer("nope")


def test_a_scorer_is_built_from_its_own_config_and_a_bad_option_is_named() -> None:
    scorer = make_scorer({"type": "dealrec", "depth": 7, "damping": 0.05}, seed=4)
    assert isinstance(scorer, DEALRecScorer) and (scorer.depth, scorer.damping, scorer.seed) == (7, 0.05, 4)
    with pytest.raises(ValueError, match="depth"):
        make_scorer({"type": "dealrec", "depth": 0})
    with pytest.raises(ValueError, match="depth"):  # an option of another scorer is refused, not ignored
        make_scorer({"type": "loss", "depth": 10})
