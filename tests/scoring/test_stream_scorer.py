"""The stream scorer learns and scores window batches, re-estimates on schedule, and survives a restart exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsift.config import SyntheticConfig, WindowConfig
from recsift.data.synthetic import SyntheticStream
from recsift.scoring.scorer import make_scorer
from recsift.scoring.stream import ScoringStore, StreamScorer
from recsift.scoring.surrogate import Surrogate
from recsift.stream.checkpoint import Checkpoint
from recsift.stream.windows import Sample, StreamState


def sample_batches(n_events: int = 6000, seed: int = 0) -> list[list[Sample]]:
    stream = SyntheticStream(SyntheticConfig(seed=seed, users=80, items=60, events=n_events))
    state = StreamState(WindowConfig(max_history=20, max_batch=100))
    batches: list[list[Sample]] = []
    for event in stream.events():
        batches.extend(state.process(event, 0, now=0.0))
    return batches


def make(reestimate_every: int = 4) -> StreamScorer:
    return StreamScorer(Surrogate(80, hidden=16, max_len=20, seed=0, replay=500),
                        make_scorer("dealrec", depth=30), reestimate_every=reestimate_every, reference_size=200)


def test_batches_are_learned_scored_and_versioned() -> None:
    batches = sample_batches()
    scorer = make(reestimate_every=4)
    versions, losses = [], []
    for batch in batches[:12]:
        out = scorer(batch)
        assert len(out) == len(batch) and [o.sample for o in out] == batch
        assert all(np.isfinite(o.score) and o.embedding.shape == (16,) for o in out)
        versions.append(out[0].version)
        losses.append(scorer.last_loss)
    assert versions == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]  # re-estimated every 4 batches
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # the surrogate learns the stream
    assert len(scorer.reference) == 200 and scorer.excluded == 0
    assert scorer([]) == []


@pytest.mark.slow
def test_a_restart_from_the_checkpoint_scores_exactly_like_an_uninterrupted_run(tmp_path: Path) -> None:
    batches = sample_batches()
    straight = make()
    for batch in batches[:10]:
        straight(batch)

    first = make()
    ckpt = Checkpoint(tmp_path / "c.sqlite", [ScoringStore(first)])
    for batch in batches[:7]:
        first(batch)
    ckpt.commit({})
    ckpt.close()
    resumed = make()
    ckpt = Checkpoint(tmp_path / "c.sqlite", [ScoringStore(resumed)])
    ckpt.load(set())
    for batch in batches[7:10]:
        resumed(batch)

    probe = batches[10]
    a, b = straight(probe), resumed(probe)
    assert [x.score for x in a] == [x.score for x in b]
    assert [x.version for x in a] == [x.version for x in b]
    assert all(np.array_equal(x.embedding, y.embedding) for x, y in zip(a, b))
