"""The selection stage fed by the real stream scorer: validation split, re-scoring on a new version, metrics."""

from __future__ import annotations

from recsift.monitoring.metrics import Metrics
from recsift.scoring.registry import make_scorer
from recsift.scoring.sasrec import SASRecSurrogate
from recsift.scoring.stage import ScoringStage, StreamScorer
from recsift.selection.coverage import Coverage
from recsift.selection.drift import RecentWindow
from recsift.selection.reservoir import StratifiedReservoir
from recsift.selection.stage import SelectionStage
from recsift.selection.validation import ValidationReservoir, is_validation
from tests.scoring.test_stream_scorer import sample_batches


def test_scored_samples_flow_into_the_coreset_and_the_validation_reservoir() -> None:
    scorer = StreamScorer(SASRecSurrogate(80, hidden=16, max_len=20, seed=0), make_scorer({"type": "dealrec", "depth": 20}),
                          reestimate_every=3, reference_size=200)
    metrics = Metrics()
    selector = StratifiedReservoir(budget=60, strata=6, sketch_size=256, rebucket_every=200)
    selection = SelectionStage(selector, validation=ValidationReservoir(100), recent=RecentWindow(500),
                               coverage=Coverage(4, 256, 1000), rescore=scorer.rescore, metrics=metrics,
                               validation_fraction=0.1, drift_every=2)
    stage = ScoringStage(scorer, batch_size=200, downstream=[selection], metrics=metrics)
    for batch in sample_batches(6000):
        stage(batch)
    assert scorer.scorer.version >= 3 and selector.stats.rescored > 0  # members re-scored on each new version
    assert all(m.version == scorer.scorer.version for m in selector.members.values())
    held_out = {s.sample_id for s in selection.validation.samples}
    assert held_out and not held_out & set(selector.members)  # validation samples never enter the coreset
    assert all(is_validation(i, 0.1, 0) for i in held_out)
    assert 0.05 < selection.validation.seen / stage.scored < 0.15
    assert 50 <= len(selector) <= 60  # strata whose quota grew refill from later arrivals
    value = metrics.registry.get_sample_value
    assert value("recsift_coreset_size") == len(selector)
    assert sum(value("recsift_coreset_stratum_members", {"stratum": str(k)}) for k in range(6)) == len(selector)
    assert value("recsift_drift", {"metric": "target_js"}) > 0
    assert 0 < value("recsift_coverage_ratio") <= 1


def test_goracs_runs_periodically_over_the_coreset_pool() -> None:
    from recsift.selection.stage import GoracsSettings

    scorer = StreamScorer(SASRecSurrogate(80, hidden=16, max_len=20, seed=0), make_scorer("loss"), reference_size=200)
    metrics = Metrics()
    selector = StratifiedReservoir(budget=80, strata=4)
    selection = SelectionStage(selector, validation=ValidationReservoir(200), recent=RecentWindow(500),
                               rescore=scorer.rescore, metrics=metrics, validation_fraction=0.2,
                               goracs=GoracsSettings(size=20, every=3, max_exchanges=5))
    stage = ScoringStage(scorer, batch_size=200, downstream=[selection], metrics=metrics)
    for batch in sample_batches(4000):
        stage(batch)
    assert len(selection.goracs_subset) == 20  # ran on schedule (members have moved on since)
    now = selection.run_goracs()
    assert len(now) == 20 and set(now) <= set(selector.members)
    assert metrics.registry.get_sample_value("recsift_goracs_objective") == selection.goracs_objective
