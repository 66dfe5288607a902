"""Every Prometheus metric recsift exports, defined in one place.

Conventions (../shared/DESIGN.md): prefix ``recsift_``, base units in names, ``_total`` on counters,
small fixed label sets, never user/item/sample ids as labels, histograms for durations, every labelled
series initialised at start-up so dashboards show 0 rather than "no data".

A process exports the metrics of its roles (``Role``): a worker the ingest, checkpoint, scoring and
selection series, a trainer the refresh, serving-version and promotion-hook series, a server (``recsift
serve``) the request, batch and adapter-swap series; the worker and trainer both the admin series and the
coreset and validation sizes. The embedded default is both. So a trainer exports no ``recsift_events_consumed_total``
for ``RecsiftNoEvents`` to fire on, and a worker no refresh timestamp for ``RecsiftNoRecentRefresh``.
"""

from __future__ import annotations

import platform
from collections.abc import Collection

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from recsift import __version__
from recsift.vocab import (
    AdminAction,
    Attempt,
    CandidateMetric,
    Drift,
    Eviction,
    LossMetric,
    Outcome,
    Rebalance,
    RejectReason,
    Role,
    ServeError,
    Stage,
    Trigger,
)

_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metric objects of one recsift process, on their own registry (tests can build several)."""

    def __init__(self, registry: CollectorRegistry | None = None, roles: Collection[Role] = tuple(Role)) -> None:
        shared = self.registry = registry or CollectorRegistry()
        self.roles = frozenset(roles)
        # a role's metrics exist either way (the code that sets them needs no checks); only the process's
        # roles register theirs, so only those are exported
        worker = shared if Role.WORKER in self.roles else None
        trainer = shared if Role.TRAINER in self.roles else None
        server = shared if Role.SERVER in self.roles else None
        pipeline = shared if self.roles & {Role.WORKER, Role.TRAINER} else None  # a server has no coreset
        self.build_info = Info("recsift_build", "recsift version, runtime and process roles", registry=shared)
        self.build_info.info({"version": __version__, "python": platform.python_version(),
                              "roles": ",".join(sorted(self.roles))})

        # ingestion
        self.events_consumed = Counter("recsift_events_consumed_total", "Records read from the source", registry=worker)
        self.events_rejected = Counter(
            "recsift_events_rejected_total", "Records rejected and dead-lettered, by reason", ["reason"], registry=worker
        )
        for reason in RejectReason:
            self.events_rejected.labels(reason.value)
        self.events_late = Counter(
            "recsift_events_late_total", "Events later than the allowed lateness (history updated, no sample)", registry=worker
        )
        self.samples_emitted = Counter("recsift_samples_emitted_total", "Samples handed to scoring", registry=worker)
        self.users_evicted = Counter(
            "recsift_users_evicted_total", "User histories evicted, by reason (ttl, capacity)", ["reason"], registry=worker
        )
        for eviction in Eviction:
            self.users_evicted.labels(eviction.value)
        self.users_tracked = Gauge("recsift_users_tracked", "User histories held in memory", registry=worker)
        self.pending_samples = Gauge("recsift_pending_samples", "Samples buffered in open windows", registry=worker)
        self.watermark = Gauge(
            "recsift_watermark_timestamp_seconds", "Event-time watermark of the slowest owned partition", registry=worker
        )
        self.consumer_lag = Gauge(
            "recsift_consumer_lag_records", "Records behind the log end, per owned partition", ["partition"], registry=worker
        )
        self.source_connected = Gauge(
            "recsift_source_connected", "1 while the consumer's heartbeats reach the broker within the session timeout",
            registry=worker)
        self.partitions_owned = Gauge("recsift_partitions_owned", "Source partitions assigned to this process", registry=worker)
        self.rebalances = Counter(
            "recsift_rebalances_total", "Partition assignment changes, by outcome (assigned, revoked)", ["outcome"],
            registry=worker)
        for change in Rebalance:
            self.rebalances.labels(change.value)
        self.backpressure_paused = Gauge(
            "recsift_backpressure_paused", "1 while the source is paused because scoring is behind", registry=worker
        )
        self.backpressure_pauses = Counter(
            "recsift_backpressure_pauses_total", "Times the source was paused under backpressure", registry=worker
        )
        self.downstream_backlog = Gauge(
            "recsift_downstream_backlog_samples", "Samples handed on but not yet processed downstream", registry=worker
        )
        self.stage_duration = Histogram(
            "recsift_stage_duration_seconds",
            "Time per poll batch spent in each pipeline stage",
            ["stage"],
            buckets=_DURATION_BUCKETS,
            registry=worker,
        )
        for stage in Stage:
            self.stage_duration.labels(stage.value)

        # checkpoint
        self.checkpoint_commits = Counter("recsift_checkpoint_commits_total", "Checkpoint transactions committed",
                                          registry=worker)
        self.checkpoint_duration = Histogram(
            "recsift_checkpoint_duration_seconds", "Checkpoint transaction duration", buckets=_DURATION_BUCKETS, registry=worker
        )
        self.offset_commit_failures = Counter(
            "recsift_offset_commit_failures_total",
            "Kafka offset commits that failed after a checkpoint (the checkpoint still holds the offsets)",
            registry=worker,
        )
        self.last_checkpoint = Gauge(
            "recsift_last_checkpoint_timestamp_seconds", "Wall-clock time of the last checkpoint", registry=worker
        )
        # the stream state's changelog topic (checkpoint.changelog_topic)
        self.changelog_records = Counter(
            "recsift_changelog_records_total", "Records written to the changelog topic", registry=worker)
        self.changelog_bytes = Counter(
            "recsift_changelog_bytes_total", "Key and value bytes written to the changelog topic", registry=worker)
        self.changelog_worker_state_bytes = Counter(
            "recsift_changelog_worker_state_bytes_total",
            "Bytes of this worker's own state (scorer, selection) written to the changelog's worker topic",
            registry=worker)
        self.changelog_failures = Counter(
            "recsift_changelog_failures_total",
            "Checkpoints not committed because the changelog topic did not confirm a write (retried)", registry=worker)
        self.changelog_syncs = Counter(
            "recsift_changelog_syncs_total", "Assigned partitions whose state needed the changelog, by outcome",
            ["outcome"], registry=worker)
        for outcome in ("restored", "repaired", "published", "worker_restored", "worker_missing"):
            self.changelog_syncs.labels(outcome)
        self.changelog_restore_records = Counter(
            "recsift_changelog_restore_records_total", "Changelog records read to restore or repair partitions",
            registry=worker)
        self.changelog_restore_seconds = Counter(
            "recsift_changelog_restore_seconds_total", "Time spent restoring or repairing partitions", registry=worker)

        # scoring
        self.samples_scored = Counter("recsift_samples_scored_total", "Samples scored by the stream scorer", registry=worker)
        self.samples_unscorable = Counter(
            "recsift_samples_unscorable_total", "Samples excluded from scoring (history too short to form an input)",
            registry=worker,
        )
        self.surrogate_loss = Gauge("recsift_surrogate_loss", "Surrogate training loss on the last batch", registry=worker)
        self.estimate_version = Gauge(
            "recsift_influence_estimate_version", "Version of the scorer estimate (H⁻¹v) scores carry", registry=worker
        )
        self.estimate_timestamp = Gauge(
            "recsift_influence_estimate_timestamp_seconds", "Wall-clock time of the last re-estimate", registry=worker
        )
        self.effort_cache_hits = Counter(
            "recsift_effort_cache_hits_total", "Effort scores served from the per-sample cache", registry=worker
        )

        # selection
        self.coreset_size = Gauge("recsift_coreset_size", "Samples in the coreset", registry=pipeline)
        self.coreset_capacity = Gauge("recsift_coreset_capacity", "Coreset budget", registry=worker)
        self.coreset_stratum_members = Gauge(
            "recsift_coreset_stratum_members", "Coreset members per score stratum", ["stratum"], registry=worker
        )
        self.validation_size = Gauge(
            "recsift_validation_samples", "Samples in the recent validation reservoir", registry=pipeline
        )
        self.coreset_topic_records = Counter(
            "recsift_coreset_topic_records_total", "Records published to the coreset topic, by kind", ["kind"], registry=worker
        )
        for kind in ("upsert", "tombstone"):
            self.coreset_topic_records.labels(kind)
        self.coreset_topic_failures = Counter(
            "recsift_coreset_topic_publish_failures_total",
            "Coreset topic publishes that failed (the next checkpoint retries them)", registry=worker
        )
        self.coverage = Gauge(
            "recsift_coverage_ratio", "Share of the recent stream's mass whose cluster has a coreset member", registry=worker
        )
        self.goracs_objective = Gauge(
            "recsift_goracs_objective", "OT cost of the last GORACS subset to the validation reservoir", registry=worker
        )
        self.drift = Gauge("recsift_drift", "Coreset vs. recent stream, by drift metric", ["metric"], registry=worker)
        for drift in Drift:
            self.drift.labels(drift.value)

        # refresh and operations
        self.refresh_runs = Counter("recsift_refresh_runs_total", "Refresh runs by trigger and outcome",
                                    ["trigger", "outcome"], registry=trainer)
        for trigger in Trigger:
            for outcome in Outcome:
                self.refresh_runs.labels(trigger.value, outcome.value)
        self.refresh_duration = Histogram("recsift_refresh_duration_seconds", "Refresh duration",
                                          buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600), registry=trainer)
        self.last_refresh = Gauge("recsift_last_successful_refresh_timestamp_seconds",
                                  "Wall-clock time of the last promoted refresh", registry=trainer)
        self.serving_version = Gauge("recsift_serving_adapter_version", "Serving adapter version (0: base model)",
                                     registry=trainer)
        self.eval_metric = Gauge("recsift_eval", "Validation metrics of the last refresh, by metric",
                                 ["metric"], registry=trainer)
        for metric in (*LossMetric, *CandidateMetric):  # (a TIGER refresh adds SemanticIdMetric's)
            self.eval_metric.labels(metric.value)
        self.hook_deliveries = Counter(
            "recsift_promotion_hook_deliveries_total", "Promotion hook deliveries by target and outcome (a failed "
            "one is retried with backoff)", ["target", "outcome"], registry=trainer)
        self.hook_unload_failures = Counter(
            "recsift_promotion_hook_unload_failures_total", "vllm targets that did not unload the adapter a "
            "delivery replaced (not retried: the new one serves)", ["target"], registry=trainer)
        self.hook_pending = Gauge("recsift_promotion_hook_pending",
                                  "1 while a target does not yet know the serving adapter", ["target"], registry=trainer)
        self.hook_version = Gauge("recsift_promotion_hook_delivered_version",
                                  "Adapter version a target was last told about (0: none)", ["target"], registry=trainer)

        # serving (recsift serve)
        self.serve_requests = Counter("recsift_serve_requests_total", "Recommendation requests received",
                                      registry=server)
        self.serve_errors = Counter("recsift_serve_errors_total", "Recommendation requests refused or failed, by "
                                    "reason", ["reason"], registry=server)
        for error in ServeError:
            self.serve_errors.labels(error.value)
        self.serve_latency = Histogram("recsift_serve_request_duration_seconds", "Time from a recommendation "
                                       "request's arrival to its answer (answered requests)",
                                       buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
                                       registry=server)
        self.serve_batch = Histogram("recsift_serve_batch_size", "Requests run together in one batch",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=server)
        self.serve_queue = Gauge("recsift_serve_queue_depth", "Requests waiting for a batch", registry=server)
        self.serve_version = Gauge("recsift_serve_adapter_version", "Adapter version serving requests (0: base model)",
                                   registry=server)
        self.serve_swaps = Counter("recsift_serve_adapter_swaps_total", "Adapter swaps by outcome (a failed one "
                                   "keeps the old adapter serving)", ["outcome"], registry=server)
        for attempt in Attempt:
            self.serve_swaps.labels(attempt.value)
        self.serve_swap_duration = Histogram("recsift_serve_swap_duration_seconds", "Load + switch + unload of an "
                                             "adapter, between batches", buckets=_DURATION_BUCKETS, registry=server)
        self.serve_adapters_loaded = Gauge("recsift_serve_adapters_loaded", "Adapters held in memory",
                                           registry=server)
        self.serve_adapter_bytes = Gauge("recsift_serve_adapter_bytes", "Bytes of the adapter weights held in memory",
                                         registry=server)
        self.admin_requests = Counter("recsift_admin_requests_total", "Admin actions performed", ["action"],
                                      registry=pipeline)
        for action in AdminAction:
            if action is not AdminAction.STATUS:  # reading the status is not an action
                self.admin_requests.labels(action.value)
        self.admin_auth_failures = Counter("recsift_admin_auth_failures_total",
                                           "Admin requests refused for a missing or wrong token", registry=shared)
        self.paused = Gauge("recsift_consumption_paused", "1 while consumption is paused by an admin", registry=worker)

    def init_strata(self, strata: int, budget: int) -> None:
        """Initialise the per-stratum series and the capacity once the selector's shape is known."""
        self.coreset_capacity.set(budget)
        for k in range(strata):
            self.coreset_stratum_members.labels(str(k))
