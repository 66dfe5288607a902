"""The stream scorer learns and scores window batches, re-estimates on schedule, and survives a restart exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsift.config import SyntheticConfig, WindowConfig
from recsift.data.synthetic import SyntheticStream
from recsift.scoring.registry import make_scorer
from recsift.scoring.sasrec import SASRecSurrogate
from recsift.scoring.stage import ScoringStore, StreamScorer
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
    return StreamScorer(SASRecSurrogate(80, hidden=16, max_len=20, seed=0, replay=500),
                        make_scorer({"type": "dealrec", "depth": 30}), reestimate_every=reestimate_every, reference_size=200)


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


def test_a_scored_sample_owns_its_embedding_so_keeping_it_does_not_keep_its_batch() -> None:
    """The coreset and the validation reservoir keep a few samples of every batch for long: a view into the batch's
    embedding matrix would keep the whole matrix alive with each of them (the service's memory grew with the stream)."""
    out = make()(sample_batches()[0])
    for o in out:
        assert o.embedding.base is None and o.embedding.flags.owndata
        assert o.embedding.nbytes == 16 * 4
    assert not np.shares_memory(out[0].embedding, out[1].embedding)


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
    assert all(np.array_equal(x.embedding, y.embedding) for x, y in zip(a, b, strict=False))


def test_effort_joins_the_overall_score_with_per_version_bounds() -> None:
    import torch

    from recsift.scoring.effort import EffortScorer
    from recsift.trainer.prompts import PromptBuilder
    from tests.helpers import tiny_llm

    model, tokenizer = tiny_llm(seed=1)
    builder = PromptBuilder(lambda t: tokenizer(t, add_special_tokens=False).input_ids, lambda i: f"game {i}",
                            tokenizer.eos_token_id, max_prompt_tokens=400, pad_token_id=tokenizer.pad_token_id)
    effort = EffortScorer(model, builder.batch, batch_size=16)
    batches = [b[:40] for b in sample_batches(3000)[:3]]
    scorer = StreamScorer(SASRecSurrogate(80, hidden=16, max_len=20, seed=0), make_scorer({"type": "dealrec", "depth": 10}),
                          reestimate_every=2, reference_size=60, effort=effort, effort_weight=0.3)
    for batch in batches:
        out = scorer(batch)
        raw = torch.tensor([o.raw for o in out], dtype=torch.float64)
        eff = torch.tensor([o.effort for o in out], dtype=torch.float64)
        assert scorer.bounds is not None and scorer.effort_bounds is not None
        expected = scorer.bounds.normalise(raw) + 0.3 * scorer.effort_bounds.normalise(eff)
        assert [o.score for o in out] == pytest.approx(expected.tolist(), abs=1e-12)
        assert (eff > 0).all()
    assert effort.computed == sum(len(b) for b in batches)
    # bounds come from the reference reservoir: its raw scores span exactly [0, 1] once normalised
    ref = scorer.bounds.normalise(scorer.scorer.score(scorer.surrogate, scorer.reference).values)
    assert ref.min().item() == pytest.approx(0.0) and ref.max().item() == pytest.approx(1.0)


def test_lambda_zero_never_computes_effort() -> None:
    calls: list[int] = []
    scorer = StreamScorer(SASRecSurrogate(80, hidden=16, max_len=20, seed=0), make_scorer("loss"),
                          effort=lambda rows: calls.append(1) or __import__("torch").zeros(len(rows)), effort_weight=0.0)
    out = scorer(sample_batches(2000)[0])
    assert not calls and all(np.isnan(o.effort) for o in out)
    with pytest.raises(ValueError, match="needs an effort scorer"):
        StreamScorer(SASRecSurrogate(80, hidden=16, max_len=20), make_scorer("loss"), effort_weight=0.3)


def test_the_stage_scores_fixed_size_batches_and_a_restart_forms_the_same_ones(tmp_path: Path) -> None:
    from recsift.monitoring.metrics import Metrics
    from recsift.scoring.stage import ScoredSample, ScoringStage

    windows = sample_batches(3000)
    received: list[list[ScoredSample]] = []
    metrics = Metrics()
    straight = ScoringStage(make(), batch_size=150, downstream=[received.append], metrics=metrics)
    for w in windows[:9]:
        straight(w)
    n = sum(len(w) for w in windows[:9])
    assert [len(b) for b in received] == [150] * (n // 150) and len(straight.pending) == n % 150
    assert metrics.registry.get_sample_value("recsift_samples_scored_total") == 150 * (n // 150)
    assert metrics.registry.get_sample_value("recsift_influence_estimate_version") == straight.scorer.scorer.version > 1

    first = ScoringStage(make(), batch_size=150)
    ckpt = Checkpoint(tmp_path / "c.sqlite", [ScoringStore(first.scorer, first)])
    for w in windows[:5]:
        first(w)
    ckpt.commit({})
    ckpt.close()
    resumed = ScoringStage(make(), batch_size=150)
    again: list[list[ScoredSample]] = []
    resumed.downstream.append(again.append)
    ckpt = Checkpoint(tmp_path / "c.sqlite", [ScoringStore(resumed.scorer, resumed)])
    ckpt.load({0})
    assert resumed.pending == first.pending and resumed.pending
    for w in windows[5:9]:
        resumed(w)
    tail = received[-len(again):]
    assert [[s.sample.sample_id for s in b] for b in again] == [[s.sample.sample_id for s in b] for b in tail]
    assert [[s.score for s in b] for b in again] == [[s.score for s in b] for b in tail]


def test_pending_samples_move_with_their_partition_and_a_restart_keeps_their_order(tmp_path: Path) -> None:
    """Samples handed on but not yet scored belong to their partition: a revoked partition takes them along
    (its row, and its changelog record), the next owner scores them, and a restart on the same partitions
    forms exactly the batches an uninterrupted run forms."""
    import zlib

    from recsift.scoring.stage import ScoringStage

    windows = [[s._replace(partition=zlib.crc32(s.user_id.encode()) % 3) for s in w] for w in sample_batches(3000)]
    a = ScoringStage(make(), batch_size=150)
    store_a = ScoringStore(a.scorer, a)
    ckpt_a = Checkpoint(tmp_path / "a.sqlite", [store_a])
    ckpt_a.load({0, 1, 2})
    for w in windows[:5]:
        a(w)
    before = list(a.pending)
    assert {s.partition for s in before} == {0, 1, 2}
    ckpt_a.commit({})
    assert {p for p, records in store_a.changes.items() if records} == {0, 1, 2}  # each partition's record

    # a restart on the same partitions: the same samples in the same order
    again = ScoringStage(make(), batch_size=150)
    ckpt = Checkpoint(tmp_path / "a.sqlite", [ScoringStore(again.scorer, again)])
    ckpt.load({0, 1, 2})
    ckpt.close()
    assert again.pending == before

    # partition 2 is revoked after a checkpoint: its samples leave this worker and reach the next owner
    ckpt_a.release({2})
    assert a.pending == [s for s in before if s.partition != 2]
    b = ScoringStage(make(), batch_size=150)
    store_b = ScoringStore(b.scorer, b)
    ckpt_b = Checkpoint(tmp_path / "b.sqlite", [store_b])
    store_b.replace_partition(ckpt_b.conn, 2, store_a.partition_records(ckpt_a.conn, 2))  # a changelog restore
    ckpt_b.load({2})
    assert b.pending == [s for s in before if s.partition == 2]

    # given back to the first worker with nothing written since, its own row brings them back
    ckpt_a.load({2})
    assert sorted(s.sample_id for s in a.pending) == sorted(s.sample_id for s in before)
    ckpt_a.close()
    ckpt_b.close()
