"""Wires the pipeline for ``recsift run``: the only module that imports every package.

With nothing configured it runs the embedded default: a tansu broker on a free loopback port, fed in a
background thread by the synthetic drifting stream (or a dataset from ``../shared/data``), consumed by
the ingest pipeline with its checkpoint under ``checkpoint.state_dir``. Sample batches go to the scoring
stage in a worker thread (backpressure pauses the source when it falls behind).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

from recsift.config import ConfigError, Settings
from recsift.data.catalogs import followed_catalog, load_catalog
from recsift.data.datasets import (
    catalog_for,
    detect_format,
    iter_events_or_payloads,
    iter_payloads,
    resolve_dataset,
)
from recsift.data.synthetic import SyntheticStream
from recsift.lock import DirectoryLock
from recsift.monitoring.http import Endpoints, HttpServer
from recsift.monitoring.metrics import Metrics
from recsift.process import one_torch_pool
from recsift.scoring.effort import EffortScorer
from recsift.scoring.registry import SCORERS, make_scorer, make_surrogate
from recsift.scoring.stage import (
    ScoredHandler,
    ScoringStage,
    ScoringStore,
    StreamScorer,
)
from recsift.selection.coverage import Coverage
from recsift.selection.drift import RecentWindow
from recsift.selection.partitioned import PartitionedSelector
from recsift.selection.publish import CoresetPublisher, CoresetTopicReader
from recsift.selection.registry import SELECTORS, make_selector
from recsift.selection.reservoir import StratifiedConfig
from recsift.selection.selector import Rescore, Selector
from recsift.selection.stage import GoracsSettings, SelectionStage
from recsift.selection.store import CoresetStore, read_snapshot, write_coreset
from recsift.selection.validation import PartitionedValidation, ValidationReservoir
from recsift.stream.broker import EmbeddedBroker
from recsift.stream.catalog import Catalog, CatalogTopicReader
from recsift.stream.changelog import KafkaChangelog, StreamChangelog, WorkerStateLog
from recsift.stream.checkpoint import Checkpoint, Participant
from recsift.stream.deadletter import DeadLetterSink, FileDeadLetterSink, KafkaDeadLetterSink
from recsift.stream.dedup import DedupIndex
from recsift.stream.fetcher import ProcessKafkaSource
from recsift.stream.file_source import FileSource
from recsift.stream.kafka import KafkaSource, ensure_topic, keyed, produce_events, topic_partitions
from recsift.stream.pipeline import DirectSink, Pipeline, RunSummary, ThreadedSink
from recsift.stream.sources import Source
from recsift.stream.validator import Validator
from recsift.stream.windows import Batch
from recsift.trainer.hooks import PromotionNotifier, build_targets
from recsift.trainer.refresh import (
    RefreshOutcome,
    make_backend,
    record_interrupted,
    refresh_in_process,
    registry_for,
)
from recsift.trainer.registry import version_number
from recsift.trainer.scheduler import RefreshScheduler, RefreshSignals
from recsift.vocab import AdminAction, LossMetric, Outcome, Role, Trigger

log = logging.getLogger(__name__)


@dataclass
class Feed:
    """What the embedded broker is fed with: (key, payload) pairs and the matching catalog."""

    name: str
    payloads: Iterator[tuple[bytes | None, bytes]]
    catalog: Catalog


def embedded_feed(cfg: Settings, limit: int | None, covered: int = 0) -> Feed:
    """The synthetic stream, a shared dataset (``ml-100k``, ``games``) or a file, by ``stream.feed``: its first
    ``covered + limit`` records (all of them without a limit). A state directory whose checkpoint has consumed
    ``covered`` records resumes where it stopped: the fresh broker gets the same keyed records at the same
    offsets, and the synthetic stream keeps its configured length, which its drift and new items follow."""
    s = cfg.stream
    stop = None if limit is None else covered + limit
    if s.feed == "synthetic":
        stream = SyntheticStream(s.synthetic)
        return Feed("synthetic", stream.payloads(0, stop), stream.catalog())
    path = resolve_dataset(s.feed, s.data_dir)
    payloads = keyed(iter_events_or_payloads(path, detect_format(path)))
    if stop is not None:
        payloads = islice(payloads, stop)
    return Feed(str(path), payloads, catalog_for(path) or Catalog())


def consumed_offsets(cfg: Settings) -> int:
    """How many records of ``stream.topic`` the state directory's checkpoint has consumed (0 when fresh)."""
    if not cfg.checkpoint.path.exists():
        return 0
    checkpoint = Checkpoint(cfg.checkpoint.path)
    try:
        offsets = checkpoint.offsets(cfg.stream.topic)
    finally:
        checkpoint.close()
    if offsets and max(offsets) >= cfg.stream.partitions:
        raise ConfigError(f"{cfg.checkpoint.state_dir} holds offsets of {max(offsets) + 1} partitions of "
                          f"{cfg.stream.topic!r}, the embedded broker makes {cfg.stream.partitions}: keep "
                          "stream.partitions, or start on a fresh --state-dir")
    return sum(offsets.values())


def check_saved_surrogate(cfg: Settings) -> None:
    """Refuse a state directory whose scorer was built on another surrogate than ``scoring.surrogate``: its
    weights cannot load into this one, and finding out at the first partition assignment would end the run
    inside the consumer's rebalance."""
    if not cfg.scoring.enabled or not cfg.checkpoint.path.exists():
        return
    checkpoint = Checkpoint(cfg.checkpoint.path)
    try:
        saved = ScoringStore.saved_surrogate(checkpoint.conn)
    finally:
        checkpoint.close()
    if saved is not None and saved != cfg.scoring.surrogate:
        raise ConfigError(f"{cfg.checkpoint.state_dir} holds a {saved} surrogate, not {cfg.scoring.surrogate}: set "
                          f"scoring.surrogate to {saved!r} (--surrogate {saved}), or start on a fresh --state-dir")


def feed_embedded_topic(cfg: Settings, feed: Feed, covered: int, limit: int | None) -> Callable[[Pipeline], None]:
    """Produce ``feed`` into the embedded broker's topic. The ``covered`` records a kept checkpoint has consumed
    are produced before consumption starts (a seek past the log's end would reset to its start); the rest in
    a background thread. Returns a pipeline tick that ends the run when the feed runs out before ``limit``
    new records (a dataset shorter than ``--max-events``), rather than waiting for records that never come."""
    payloads = iter(feed.payloads)
    fed = 0
    if covered:
        log.info("re-feeding the %s records the checkpoint has consumed", f"{covered:,}")
        fed = produce_events(cfg.stream, True, islice(payloads, covered), cfg.stream.topic)
    first = next(payloads, None)
    if first is None:  # also when the feed is shorter than the checkpoint (fed < covered)
        raise ConfigError(f"{cfg.checkpoint.state_dir} has already consumed all {fed:,} records of the embedded "
                          f"feed {feed.name} (its checkpoint is at {covered:,}): start on a fresh --state-dir "
                          "(`make clean`), or lengthen the feed (stream.synthetic.events)")
    produced: list[int] = []

    def produce() -> None:
        produced.append(covered + produce_events(cfg.stream, True, chain([first], payloads), cfg.stream.topic))

    threading.Thread(target=produce, daemon=True, name="feed").start()

    def end_of_feed(pipeline: Pipeline) -> None:
        if limit is not None and produced and produced[0] < covered + limit \
                and covered + pipeline.summary.consumed >= produced[0]:
            pipeline.stop("end of feed")

    return end_of_feed


def check_components(cfg: Settings) -> None:
    """Validate the configured scorer and selector against their registries (a :class:`ConfigError` naming
    the section), so a bad option fails at start-up rather than when the stage is built."""
    for section, registry, spec in (("scoring.scorer", SCORERS, cfg.scoring.scorer),
                                    ("selection.selector", SELECTORS, cfg.selection.selector)):
        try:
            registry.config(spec)
        except ValueError as exc:
            raise ConfigError(f"{section}: {exc}") from None


def scorer_options(cfg: Settings, scorer_type: str) -> dict[str, object]:
    """The configured options of ``scorer_type`` (empty when another scorer is configured)."""
    spec = cfg.scoring.scorer
    return SCORERS.config(spec).options() if spec.type == scorer_type else {}


def stratified_options(cfg: Settings) -> StratifiedConfig:
    """The stratified selector's options (strata, hard-prune), which batch pruning shares; defaults when
    another selector is configured."""
    spec = cfg.selection.selector
    return StratifiedConfig.model_validate(spec.model_dump()) if spec.type == "stratified" else StratifiedConfig()


class Ingest:
    """The ingest half of the service: validator, dead letters, checkpoint and pipeline, built from config."""

    def __init__(
        self,
        cfg: Settings,
        metrics: Metrics,
        catalog: Catalog,
        participants: list[Participant] | None = None,
        handlers: list[Callable[[Batch], None]] | None = None,
        threaded: bool = False,
        ticks: Sequence[Callable[[Pipeline], object]] = (),
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.catalog = catalog
        embedded = cfg.stream.source == "embedded"
        self.embedded = embedded
        participants = list(participants or [])
        handlers = list(handlers or [])
        dead_letters: DeadLetterSink
        if cfg.stream.source == "file":
            # beside the run's other state: two runs with their own state directories never share the file
            dead_letters = FileDeadLetterSink(cfg.stream.dead_letter_path
                                              or cfg.checkpoint.state_dir / "dead_letter.jsonl")
        else:
            dead_letters = KafkaDeadLetterSink(cfg.stream, embedded)
        validator = Validator(
            cfg.stream.max_message_bytes, catalog, cfg.stream.unknown_items == "reject", DedupIndex(cfg.stream.dedup_capacity)
        )
        self.checkpoint = Checkpoint(cfg.checkpoint.path)
        sink = ThreadedSink(*handlers) if threaded else DirectSink(*handlers)
        self.pipeline = Pipeline(cfg, validator=validator, dead_letters=dead_letters, checkpoint=self.checkpoint,
                                 sink=sink, metrics=metrics, participants=participants, ticks=ticks)
        self.changelog = build_changelog(cfg, self.pipeline, metrics) if cfg.checkpoint.changelog_topic else None
        if self.changelog is not None:  # the stages' per-partition state moves with its partition too, and the
            for participant in participants:  # scorer's (this worker's own) is kept in the worker topic
                self.changelog.add(participant)

    def source(self) -> Source:
        s = self.cfg.stream
        if s.source == "file":
            assert s.file_path is not None
            path, fmt = Path(s.file_path), s.file_format
            return FileSource(path, lambda: iter_payloads(path, detect_format(path) if fmt == "auto" else fmt),
                              self.pipeline.on_assign)
        if s.fetch_process:
            return ProcessKafkaSource(
                s, self.embedded, self.pipeline.on_assign, self.pipeline.on_revoke,
                on_commit_failure=self.metrics.offset_commit_failures.inc,
            )
        return KafkaSource(s, self.embedded, self.pipeline.on_assign, self.pipeline.on_revoke)

    def close(self) -> None:
        self.pipeline.dead_letters.close()
        self.pipeline.sink.close()
        if self.changelog is not None:
            self.changelog.close()
        self.checkpoint.close()


def worker_id(cfg: Settings) -> str:
    """This worker's name in the coreset and worker topics (``stream.worker_id``, else the host name)."""
    return cfg.stream.worker_id or socket.gethostname()


def build_changelog(cfg: Settings, pipeline: Pipeline, metrics: Metrics) -> StreamChangelog:
    """The stream state's changelog (``checkpoint.changelog_topic``), attached to the pipeline's checkpoint:
    one compacted changelog partition per source partition, created when missing."""
    s, topic = cfg.stream, cfg.checkpoint.changelog_topic
    assert topic is not None
    if s.source == "file":
        raise ConfigError("checkpoint.changelog_topic needs a Kafka source: a file has no partitions to move")
    embedded = s.source == "embedded"
    partitions = topic_partitions(s, embedded, s.topic)
    if not partitions:
        raise ConfigError(f"the changelog needs the source topic {s.topic!r} to exist first: it gets one "
                          "changelog partition per source partition")
    ensure_topic(s, embedded, topic, partitions, {"cleanup.policy": "compact"})
    have = topic_partitions(s, embedded, topic)
    if have < partitions:
        raise ConfigError(f"changelog topic {topic!r} has {have} partitions, the source topic {s.topic!r} has "
                          f"{partitions}: it needs one per source partition")

    def restored(outcome: str, records: int, seconds: float) -> None:
        metrics.changelog_syncs.labels(outcome).inc()
        metrics.changelog_restore_seconds.inc(seconds)

    def written(records: int, size: int) -> None:
        metrics.changelog_records.inc(records)
        metrics.changelog_bytes.inc(size)

    workers = None
    if cfg.checkpoint.worker_state:  # this worker's own state (scorer, selection), keyed by worker id
        ensure_topic(s, embedded, f"{topic}.workers", 1, {"cleanup.policy": "compact"})
        workers = WorkerStateLog(KafkaChangelog(s, embedded, f"{topic}.workers"), worker_id(cfg),
                                 on_write=metrics.changelog_worker_state_bytes.inc)
    changelog = StreamChangelog(KafkaChangelog(s, embedded, topic), pipeline.store, s.topic, on_restore=restored,
                                on_progress=metrics.changelog_restore_records.inc, on_write=written, workers=workers)
    pipeline.checkpoint.attach_changelog(changelog)
    return changelog


def build_effort(cfg: Settings, catalog: Catalog) -> EffortScorer:
    """The effort scorer of ``trainer.backend`` (:meth:`recsift.trainer.backend.Backend.effort`)."""
    return make_backend(cfg, catalog).effort(registry_for(cfg))


def surrogate_options(cfg: Settings) -> dict[str, Any]:
    """The architecture options of ``scoring.surrogate`` (hidden, layers, heads, dropout)."""
    sc = cfg.scoring
    return {"hidden": sc.hidden, "layers": sc.layers, "heads": sc.heads, "dropout": sc.dropout}


def build_stream_scorer(cfg: Settings, catalog: Catalog) -> StreamScorer:
    """Surrogate and scorer (and the LLM effort scorer when λ > 0)."""
    sc = cfg.scoring
    surrogate = make_surrogate(sc.surrogate, sc.item_capacity, **surrogate_options(cfg), max_len=cfg.window.max_history,
                               replay=sc.replay, seed=sc.seed, initial_rows=sc.item_rows_start)
    effort = build_effort(cfg, catalog) if sc.effort_weight > 0 else None
    return StreamScorer(surrogate, make_scorer(sc.scorer, seed=sc.seed), reestimate_every=sc.reestimate_every,
                        reference_size=sc.reference_size, seed=sc.seed, effort=effort,
                        effort_weight=sc.effort_weight, train_rows=sc.train_rows)


def build_scoring(cfg: Settings, scorer: StreamScorer, *, downstream: Sequence[ScoredHandler] = (),
                  metrics: Metrics | None = None, threads: int | None = None) -> tuple[ScoringStage, ScoringStore]:
    """The batching stage around ``scorer``, handing scored batches to ``downstream``, and its checkpoint
    participant; ``threads``: the torch threads of the thread it runs in (None: leave them)."""
    stage = ScoringStage(scorer, batch_size=cfg.scoring.batch_size, downstream=downstream, metrics=metrics,
                         threads=threads)
    return stage, ScoringStore(scorer, stage)


def build_publisher(cfg: Settings, metrics: Metrics) -> CoresetPublisher:
    """The coreset topic's publisher (``stream.coreset_topic``), caught up with what the topic holds for
    this worker, so its first publish sends only what is missing."""
    topic = cfg.stream.coreset_topic
    assert topic is not None
    embedded = cfg.stream.source == "embedded"
    ensure_topic(cfg.stream, embedded, topic, 1, {"cleanup.policy": "compact"})
    records = metrics.coreset_topic_records

    def published(upserts: int, tombstones: int) -> None:
        records.labels("upsert").inc(upserts)
        records.labels("tombstone").inc(tombstones)

    publisher = CoresetPublisher(cfg.stream, embedded, topic, worker_id(cfg),
                                 on_publish=published, on_failure=lambda _: metrics.coreset_topic_failures.inc(),
                                 partitioned=partitioned_selection(cfg))
    log.info("coreset topic %r: %d records of worker %r", topic, publisher.catch_up(), publisher.worker)
    return publisher


def build_selection(cfg: Settings, catalog: Catalog, *, rescore: Rescore | None = None, metrics: Metrics | None = None,
                    on_drift: Callable[[dict[str, float]], object] | None = None) -> tuple[SelectionStage, CoresetStore]:
    """Streaming selector, validation reservoir, coverage and drift, and their checkpoint participant."""
    sel = cfg.selection
    selector: Selector
    validation: ValidationReservoir | PartitionedValidation
    if partitioned_selection(cfg):  # one reservoir per owned partition: a partition's share moves with it
        selector = PartitionedSelector(lambda budget: make_selector(sel.selector, budget=budget, seed=sel.seed),
                                       sel.budget)
        validation = PartitionedValidation(sel.validation_size)
    else:
        selector = make_selector(sel.selector, budget=sel.budget, seed=sel.seed)
        validation = ValidationReservoir(sel.validation_size)

    def category(item_id: str) -> str | None:
        item = catalog.get(item_id)
        return item.attributes.get("category") if item is not None else None

    goracs = GoracsSettings(sel.goracs_size, sel.goracs_every, sel.goracs_lambda, sel.goracs_max_exchanges,
                            sel.goracs_exchange_candidates) if sel.goracs_size else None
    selection = SelectionStage(selector, validation=validation, recent=RecentWindow(sel.recent_window),
                               coverage=Coverage(sel.coverage_clusters, seed=sel.seed), rescore=rescore,
                               metrics=metrics, validation_fraction=sel.validation_fraction, seed=sel.seed,
                               coverage_constraint=sel.coverage_constraint, category=category, goracs=goracs,
                               on_drift=on_drift)
    if metrics is not None:
        metrics.init_strata(selector.strata, sel.budget)
    return selection, CoresetStore(selection)


def partitioned_selection(cfg: Settings) -> bool:
    """Workers of one group keep the coreset per source partition (``selection.partition_budgets``, Kafka)."""
    return cfg.selection.partition_budgets and cfg.stream.source != "file"


class PartitionShare:
    """A loop tick that tells a partitioned selection the topic's partition count, which fixes each
    partition's share of ``selection.budget`` (``partition_budget``), so the workers of one group together
    keep one budget. The count is read once before the worker joins its group (:meth:`prime`: so that no
    partition's reservoir fills to the whole budget before its share is known), again once the worker owns a
    partition if the topic did not exist then, and whenever it owns a partition beyond the count it knows
    (partitions were added)."""

    RETRY_S = 30.0  # after a failed metadata read (the broker away): the loop must not block on it each turn

    def __init__(self, cfg: Settings, selection: SelectionStage) -> None:
        self.cfg, self.selection = cfg, selection
        self.partitions = 0
        self.retry_at = 0.0

    def prime(self) -> int:
        """Read the topic's partition count now, before the first assignment (0: the topic does not exist yet,
        or the broker cannot be reached; the loop tick reads it later). The selection applies it before its
        first batch."""
        try:
            partitions = self._read()
        except Exception as exc:  # kafka-python's errors: the broker is not up yet; the tick retries
            log.info("cannot read %r's partition count before joining (%s); it is read once partitions arrive",
                     self.cfg.stream.topic, exc)
            return 0
        if partitions:
            self._learn(partitions)
        return partitions

    def __call__(self, pipeline: Pipeline) -> None:
        owned = frozenset(pipeline.source.assignment()) if pipeline.source is not None else frozenset()
        if not owned or (self.partitions and max(owned) < self.partitions):
            return
        if time.monotonic() < self.retry_at:
            return
        try:
            partitions = self._read()
        except Exception as exc:  # kafka-python's errors; the shares stay as they are until the next try
            self.retry_at = time.monotonic() + self.RETRY_S
            log.warning("cannot read %r's partition count (%s); keeping the coreset budget, retrying in %.0f s",
                        self.cfg.stream.topic, exc, self.RETRY_S)
            return
        if max(owned) < partitions:  # else the broker's metadata is behind the assignment: next loop
            self._learn(partitions)

    def _read(self) -> int:
        s = self.cfg.stream
        return topic_partitions(s, s.source == "embedded", s.topic)

    def _learn(self, partitions: int) -> None:
        self.partitions = partitions
        self.selection.partition_count_target = partitions


class Operations:
    """Refresh scheduling, the HTTP surface and admin actions: around a running pipeline (``recsift run``;
    without ``refreshes`` when a separate trainer refreshes), or around a materialised coreset topic
    (``recsift trainer``, no pipeline)."""

    def __init__(self, cfg: Settings, metrics: Metrics, catalog: Catalog, *, pipeline: Pipeline | None = None,
                 selection: SelectionStage | None = None, signals: RefreshSignals | None = None,
                 refreshes: bool = True, coreset: Callable[[], dict[str, object]] | None = None) -> None:
        t = cfg.trainer
        self.cfg, self.metrics, self.catalog = cfg, metrics, catalog
        self.pipeline, self.selection, self.coreset = pipeline, selection, coreset
        self.registry = registry_for(cfg)
        self.scheduler: RefreshScheduler | None = None
        self.notifier: PromotionNotifier | None = None
        self.interrupted: RefreshOutcome | None = None
        if refreshes:
            if leftovers := self.registry.discard_partial():
                log.warning("removed partial adapter writes from an interrupted refresh: %s", ", ".join(leftovers))
            if (lost := record_interrupted(cfg.checkpoint.path)) is not None:
                self.interrupted = lost
                metrics.refresh_runs.labels(lost.trigger, lost.outcome).inc()
                log.warning("the %s refresh of snapshot %d was interrupted (its process stopped); recorded as "
                            "failed, and it runs again now", lost.trigger, lost.snapshot_id)
            self.scheduler = RefreshScheduler(self.refresh_job, t.refresh_interval_s, t.drift_thresholds,
                                              t.drift_cooldown_s, signals=signals, every_samples=t.refresh_every_samples)
            if t.on_promote:
                self.notifier = PromotionNotifier(self.registry, build_targets(t.on_promote, self.registry.root, metrics),
                                                  metrics, cfg.checkpoint.state_dir / "hooks.json")
        self.outcomes: list[RefreshOutcome] = []
        self._serving_gauge()

    def start(self) -> None:
        """Start the refresh scheduler and the promotion hooks; a refresh found interrupted at start runs
        again at once."""
        assert self.scheduler is not None
        self.scheduler.start()
        if self.notifier is not None:
            self.notifier.start()
        if self.interrupted is not None:
            self.scheduler.trigger(self.interrupted.trigger)

    def shutdown(self, wait: bool = True) -> None:
        """Stop scheduling (a running refresh finishes when ``wait``), then the hooks (after one more try
        at a change not yet delivered)."""
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=wait)
        if self.notifier is not None:
            self.notifier.close()

    def _serving_gauge(self) -> None:
        current = self.registry.current()
        self.metrics.serving_version.set(version_number(current.name if current else None))

    def refresh_job(self, trigger: Trigger) -> RefreshOutcome:
        """The scheduler's job: one refresh in its own process, then metrics and turnover bookkeeping."""
        log.info("refresh (%s) starting", trigger)
        if self.pipeline is not None and not self.pipeline.request_checkpoint():
            if self.pipeline.looping:  # a live loop that did not checkpoint in time is worth a warning
                log.warning("no checkpoint before the refresh; it trains on the last committed coreset")
            else:  # stopping: the loop's final checkpoint is the last word
                log.info("the ingest loop has stopped; the refresh trains on its last checkpoint")
        outcome = refresh_in_process(self.cfg, trigger, self.catalog, self.cfg.trainer.refresh_timeout_s)
        m = self.metrics
        m.refresh_runs.labels(trigger, outcome.outcome).inc()
        m.refresh_duration.observe(outcome.seconds)
        if outcome.outcome is Outcome.PROMOTED:
            m.last_refresh.set(time.time())
        for name, value in ((LossMetric.VALIDATION_LOSS, outcome.new_loss), (LossMetric.SERVING_LOSS, outcome.serving_loss),
                            *outcome.metrics.items()):
            if value is not None:
                m.eval_metric.labels(name).set(value)
        self._serving_gauge()
        if self.selection is not None and outcome.snapshot_id is not None:
            _, members = read_snapshot(self.cfg.checkpoint.path, outcome.snapshot_id)
            self.selection.snapshot_taken([mm.sample.sample_id for mm in members])
        self.outcomes.append(outcome)
        detail = outcome.version if outcome.outcome is Outcome.PROMOTED else outcome.reason
        log.info("refresh (%s): %s%s%s", trigger, outcome.outcome, f" {detail}" if detail else "",
                 f" ({outcome.error})" if outcome.error else "")
        return outcome

    def status(self) -> dict[str, object]:
        p, sel = self.pipeline, self.selection
        current = self.registry.current()
        last = self.outcomes[-1] if self.outcomes else None
        stream: dict[str, object] = {
            "offsets": _copy(p.offsets),
            "lag": _copy(p.lag),
            "source_connected": p.connected,
            "paused": p.held.is_set() and getattr(p.source, "paused", False),
            "events_consumed": p.summary.consumed,
        } if p is not None else {}
        coreset = self.coreset() if self.coreset is not None else {
            "size": len(sel.selector), "budget": sel.selector.budget,
            "strata": sel.selector.strata_sizes(), "scorer_version": sel.selector.version,
            "validation": len(sel.validation), "coverage": sel.last_coverage,
            "drift": sel.last_drift.as_dict() if sel.last_drift else None} if sel else None
        return {
            **stream,
            "coreset": coreset,
            "refresh_running": self.scheduler is not None and self.scheduler.running,
            "last_refresh": {"trigger": last.trigger, "outcome": last.outcome, "version": last.version,
                             "validation_loss": last.new_loss, "metrics": last.metrics,
                             "reason": last.reason, "error": last.error} if last else None,
            "adapter": current.name if current else None,
        }

    def actions(self) -> dict[AdminAction, Callable[[], dict[str, object]]]:
        """The admin actions this process can do: pause/resume with a pipeline, refresh/rollback when it
        refreshes (the HTTP surface answers the others "disabled")."""
        actions: dict[AdminAction, Callable[[], dict[str, object]]] = {}
        scheduler, pipeline = self.scheduler, self.pipeline
        if scheduler is not None:
            def refresh_now() -> dict[str, object]:
                started = scheduler.trigger(Trigger.MANUAL)
                return {"queued": started, "coalesced": not started, "runs_so_far": len(self.outcomes)}

            def rollback() -> dict[str, object]:
                version = self.registry.rollback()
                self._serving_gauge()
                return {"adapter": version.name}

            actions.update({AdminAction.REFRESH: refresh_now, AdminAction.ROLLBACK: rollback})
        if pipeline is not None:
            def pause() -> dict[str, object]:
                pipeline.hold(True)
                self.metrics.paused.set(1)
                return {"paused": True}

            def resume() -> dict[str, object]:
                pipeline.hold(False)
                self.metrics.paused.set(0)
                return {"paused": False}

            actions.update({AdminAction.PAUSE: pause, AdminAction.RESUME: resume})
        return actions


def _copy(d: dict[int, int]) -> dict[int, int]:
    """A copy of a dict the ingest thread may be resizing (retries the rare concurrent resize)."""
    for _ in range(10):
        try:
            return dict(d)
        except RuntimeError:
            continue
    return {}


@dataclass
class ServiceSummary:
    """What ``recsift run`` returns (the CLI prints it): the ingest summary plus the later stages."""

    ingest: RunSummary
    scored: int = 0
    awaiting_scoring: int = 0
    unscorable: int = 0
    scorer_version: int = 0
    surrogate_loss: float = float("nan")
    scoring_busy_s: float = 0.0
    coreset: int = 0
    budget: int = 0
    validation: int = 0
    coverage: float = 0.0
    drift: dict[str, float] | None = None
    refreshes: list[RefreshOutcome] | None = None  # None: the refreshes run in `recsift trainer`
    adapter: str | None = None
    http_url: str | None = None


def serve_http(cfg: Settings, stack: ExitStack, endpoints: Endpoints) -> HttpServer:
    """Start the monitoring HTTP surface on ``monitoring.host:port``, closed with ``stack``."""
    try:
        http = HttpServer(endpoints, cfg.monitoring.host, cfg.monitoring.port)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {cfg.monitoring.host}:{cfg.monitoring.port}: "
                          f"{exc.strerror}; choose another monitoring.port (0 disables it)") from None
    http.start()
    stack.callback(http.close)
    return http


def run(cfg: Settings, max_events: int | None = None, metrics: Metrics | None = None,
        progress: Callable[[Pipeline], object] | None = None) -> ServiceSummary:
    """``recsift run``: consume until stopped, checkpointing as it goes; returns the run summary.
    ``progress`` is called with the pipeline once per loop (the CLI's progress bar)."""
    check_components(cfg)
    if cfg.scoring.enabled and not cfg.trainer.in_worker and not cfg.stream.coreset_topic:
        raise ConfigError("trainer.in_worker=false leaves the refreshes to `recsift trainer`, which reads the "
                          "coreset topic: set stream.coreset_topic too")
    refreshes = cfg.scoring.enabled and cfg.trainer.in_worker
    metrics = metrics or Metrics(roles=(Role.WORKER, Role.TRAINER) if refreshes else (Role.WORKER,))
    with ExitStack() as stack:
        # one worker per state directory; with scoring on, this process also refreshes: one per registry
        stack.enter_context(DirectoryLock(cfg.checkpoint.state_dir, Role.WORKER))
        # torch's threads: a pool for the scoring thread only, none for this (ingest) thread
        threads = stack.enter_context(one_torch_pool()) if cfg.scoring.enabled else None
        if refreshes:
            stack.enter_context(DirectoryLock(registry_for(cfg).root, Role.TRAINER))
        check_saved_surrogate(cfg)
        catalog = load_catalog(cfg)
        feed_ticks: list[Callable[[Pipeline], object]] = []
        if cfg.stream.source == "embedded":
            broker = stack.enter_context(EmbeddedBroker())
            cfg = cfg.model_copy(update={"stream": cfg.stream.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})})
            covered = consumed_offsets(cfg)
            feed = embedded_feed(cfg, max_events, covered)
            ensure_topic(cfg.stream, True, cfg.stream.topic, cfg.stream.partitions)
            ensure_topic(cfg.stream, True, cfg.stream.dead_letter_topic, 1)
            log.info("embedded broker on %s, feeding %s into %r", broker.bootstrap_servers, feed.name, cfg.stream.topic)
            feed_ticks.append(feed_embedded_topic(cfg, feed, covered, max_events))
        # built in one direction, each part with its downstreams: selection → scoring → ingest → operations
        # (the stages report to the refresh scheduler through RefreshSignals, not by holding it)
        signals = RefreshSignals()
        stage = selection = None
        participants: list[Participant] = []
        if cfg.scoring.enabled:
            scorer = build_stream_scorer(cfg, catalog)
            selection, coreset_store = build_selection(cfg, catalog, rescore=scorer.rescore, metrics=metrics,
                                                       on_drift=signals.drift)
            stage, store = build_scoring(cfg, scorer, downstream=[selection, signals.scored], metrics=metrics,
                                         threads=threads)
            participants = [store, coreset_store]
            if cfg.stream.coreset_topic:
                coreset_store.publisher = build_publisher(cfg, metrics)
                stack.callback(coreset_store.publisher.close)
        ticks: list[Callable[[Pipeline], object]] = feed_ticks
        if cfg.stream.catalog_topic and cfg.stream.source != "file":
            reader = CatalogTopicReader(cfg.stream, cfg.stream.source == "embedded", catalog)
            stack.callback(reader.close)
            log.info("catalog topic %r: %d items", cfg.stream.catalog_topic, reader.catch_up())
            ticks.append(lambda _: reader.poll())
        if selection is not None and partitioned_selection(cfg):
            share = PartitionShare(cfg, selection)
            share.prime()
            ticks.append(share)
        if progress is not None:
            ticks.append(progress)
        ingest = Ingest(cfg, metrics, catalog, participants=participants, handlers=[stage] if stage else [],
                        threaded=stage is not None, ticks=ticks)
        stack.callback(ingest.close)
        ops = Operations(cfg, metrics, catalog, pipeline=ingest.pipeline, selection=selection, signals=signals,
                         refreshes=refreshes)
        http = None
        if cfg.monitoring.port:
            pipeline = ingest.pipeline
            http = serve_http(cfg, stack, Endpoints(metrics, lambda: pipeline.heartbeat, lambda: pipeline.lag,
                                                    lambda: pipeline.connected, ops.status, ops.actions(),
                                                    cfg.admin.token))
        if ops.scheduler is not None:
            ops.start()
            stack.callback(ops.shutdown)  # waits for a running refresh
        summary = ingest.pipeline.run(ingest.source(), max_events=max_events)
        url = http.url if http else None
        if stage is None or selection is None:
            return ServiceSummary(summary, http_url=url)
        if ops.scheduler is not None:
            ops.shutdown(wait=True)  # a refresh that is running finishes and is reported
        scorer = stage.scorer
        report = selection.measure()
        current = ops.registry.current() if refreshes else None  # a worker beside a trainer serves nothing
        return ServiceSummary(summary, stage.scored, len(stage.pending), scorer.excluded, scorer.scorer.version,
                              scorer.last_loss, stage.busy_s, len(selection.selector), cfg.selection.budget,
                              len(selection.validation), selection.last_coverage, report.as_dict(),
                              ops.outcomes if refreshes else None, current.name if current else None, url)


@dataclass
class TrainerSummary:
    refreshes: list[RefreshOutcome]
    members: int
    validation: int
    workers: int
    adapter: str | None


class CoresetMirror:
    """The coreset topic, read as it grows and written into this trainer's state directory (the tables
    its refreshes snapshot and are judged on); the workers' counters feed the refresh scheduler."""

    def __init__(self, cfg: Settings, metrics: Metrics, signals: RefreshSignals) -> None:
        topic = cfg.stream.coreset_topic
        assert topic is not None
        ensure_topic(cfg.stream, False, topic, 1, {"cleanup.policy": "compact"})
        self.reader = CoresetTopicReader(cfg.stream, False, topic)
        self.db, self.metrics, self.signals = cfg.checkpoint.path, metrics, signals
        self.samples: dict[str, int] = {}  # worker → samples it had reported when last read
        self.heartbeat = time.monotonic()

    def sync(self, timeout_ms: int = 200) -> int:
        """Read what arrived; when anything did, rewrite the mirror and pass new samples and drift on."""
        self.heartbeat = time.monotonic()
        workers = dict(self.reader.view.workers)
        n = self.reader.poll(timeout_ms)
        if not n:
            return 0
        view = self.reader.view
        write_coreset(self.db, view.member_samples(), view.validation_samples())
        for worker, body in view.workers.items():
            if body is workers.get(worker):
                continue
            seen = int(body.get("samples", 0))
            self.signals.count(max(0, seen - self.samples.get(worker, seen)))
            self.samples[worker] = seen
            if body.get("drift"):
                self.signals.drift(body["drift"])
        self.metrics.coreset_size.set(len(view.members))
        self.metrics.validation_size.set(len(view.validation))
        return n

    def status(self) -> dict[str, object]:
        view = self.reader.view
        return {"size": len(view.members), "validation": len(view.validation), "workers": sorted(view.workers),
                "invalid_records": view.invalid}

    def close(self) -> None:
        self.reader.close()


def run_trainer(cfg: Settings, metrics: Metrics | None = None, stop: threading.Event | None = None) -> TrainerSummary:
    """``recsift trainer``: the one process that refreshes when workers run elsewhere. It materialises
    the coreset topic into its own state directory, schedules refreshes (interval, samples the workers
    report, their drift, admin) and promotes adapters into its registry. Runs until ``stop`` is set
    (SIGTERM/SIGINT in the CLI); a refresh that is running then finishes first. It reads
    ``stream.bootstrap_servers`` whatever ``stream.source`` says (it consumes no interactions)."""
    if not cfg.stream.coreset_topic:
        raise ConfigError("recsift trainer reads the workers' coreset topic: set stream.coreset_topic "
                          "(the same on the workers, with trainer.in_worker=false there)")
    metrics = metrics or Metrics(roles=(Role.TRAINER,))
    stop = stop or threading.Event()
    with ExitStack() as stack:
        # its state directory holds the mirror: no worker may share it; its registry: no other refresher
        stack.enter_context(DirectoryLock(cfg.checkpoint.state_dir, Role.WORKER, owner=Role.TRAINER))
        stack.enter_context(DirectoryLock(registry_for(cfg).root, Role.TRAINER))
        catalog, catalog_reader = followed_catalog(cfg, stack)
        signals = RefreshSignals()
        mirror = CoresetMirror(cfg, metrics, signals)
        stack.callback(mirror.close)
        log.info("coreset topic %r: %d records", cfg.stream.coreset_topic, mirror.sync(1000))
        ops = Operations(cfg, metrics, catalog, signals=signals, coreset=mirror.status)
        assert ops.scheduler is not None
        if cfg.monitoring.port:
            serve_http(cfg, stack, Endpoints(metrics, lambda: mirror.heartbeat, dict, lambda: True, ops.status,
                                             ops.actions(), cfg.admin.token))
        ops.start()
        stack.callback(ops.shutdown)
        while not stop.is_set():
            mirror.sync(500)
            if catalog_reader is not None:
                catalog_reader.poll()
        ops.shutdown(wait=True)  # a refresh that is running finishes and is reported
        current = ops.registry.current()
        view = mirror.reader.view
        return TrainerSummary(ops.outcomes, len(view.members), len(view.validation), len(view.workers),
                              current.name if current else None)
