"""The labels every layer shares, spelled once: reject reasons, pipeline stages, eviction reasons,
rebalance outcomes, refresh triggers, outcomes and reasons, admin actions, drift metric names,
evaluation metric names, process roles, serving errors and attempt outcomes.

They are Prometheus label values, log words and JSON values, so each is a ``str`` enum: a member
compares equal to its value, formats as its value, and iterating the class gives the full label set
that metrics initialise at start-up and tests check against. A leaf: this module imports nothing of
recsift.
"""

from __future__ import annotations

from enum import Enum


class Label(str, Enum):
    """A ``str`` enum that formats as its value (``f"{Trigger.MANUAL}"`` is ``"manual"``)."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class RejectReason(Label):
    """Why an input record was rejected and dead-lettered (a metric label: keep it small)."""

    MALFORMED_JSON = "malformed_json"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    OVERSIZE = "oversize"
    UNKNOWN_ITEM = "unknown_item"
    DUPLICATE = "duplicate"


class Stage(Label):
    """The pipeline stages whose time per poll batch is measured."""

    POLL = "poll"
    VALIDATE = "validate"
    WINDOW = "window"
    SINK = "sink"
    CHECKPOINT = "checkpoint"
    SCORE = "score"
    SELECT = "select"


class Eviction(Label):
    """Why a user's history left memory."""

    TTL = "ttl"
    CAPACITY = "capacity"


class Rebalance(Label):
    """What a consumer-group rebalance did to this process's partitions."""

    ASSIGNED = "assigned"
    REVOKED = "revoked"


class Trigger(Label):
    """What started a refresh (every-N-samples counts as ``interval``: both are the schedule)."""

    INTERVAL = "interval"
    DRIFT = "drift"
    MANUAL = "manual"


class Outcome(Label):
    """How a refresh ended."""

    PROMOTED = "promoted"
    REJECTED = "rejected"
    FAILED = "failed"
    SKIPPED = "skipped"


class RefreshReason(Label):
    """Why a refresh was rejected, skipped or failed (the detail behind its outcome)."""

    NO_VALIDATION = "no_validation"
    WORSE = "worse"
    EMPTY_CORESET = "empty_coreset"
    ERROR = "error"
    INTERRUPTED = "interrupted"  # the process that ran it stopped first (a kill, a host lost); found at start


class AdminAction(Label):
    """What the admin endpoint and ``recsift admin`` can do (``status`` only reads)."""

    STATUS = "status"
    REFRESH = "refresh"
    PAUSE = "pause"
    RESUME = "resume"
    ROLLBACK = "rollback"


class Drift(Label):
    """Coreset-versus-recent-stream drift measures."""

    TARGET_JS = "target_js"
    CATEGORY_JS = "category_js"
    EMBEDDING_SW = "embedding_sw"
    SCORE_KS = "score_ks"
    TURNOVER = "turnover"
    MEMBER_AGE_S = "member_age_s"


class CandidateMetric(Label):
    """Candidate-ranking metrics: the target among sampled negatives, ranked by likelihood (a refresh
    reports them on the validation reservoir; the quality benchmark on test users)."""

    RANK_PERCENTILE = "rank_percentile"
    HR_1 = "hr@1"
    HR_5 = "hr@5"
    NDCG_5 = "ndcg@5"
    NDCG_10 = "ndcg@10"
    TARGET_NLL = "target_nll"


class SemanticIdMetric(Label):
    """What a TIGER refresh reports about its semantic IDs: the share of items whose codes another item shares,
    the new items' reconstruction error, and whether this refresh retrained the quantiser (1) or not (0)."""

    COLLISION_RATE = "semantic_id_collision_rate"
    NEW_ITEM_ERROR = "semantic_id_new_item_error"
    RETRAINED = "semantic_ids_retrained"


class LossMetric(Label):
    """The mean validation losses a refresh compares: the new adapter's and the serving one's."""

    VALIDATION_LOSS = "validation_loss"
    SERVING_LOSS = "serving_loss"


class Role(Label):
    """What a recsift process does; it decides which metrics the process exports, so an alert meant for
    one role never fires on a process of the other."""

    WORKER = "worker"  # consume, window, score, select, publish the coreset (`recsift run`)
    TRAINER = "trainer"  # refresh and promote (`recsift trainer`, or `recsift run` with trainer.in_worker)
    SERVER = "server"  # answer recommendation requests on the serving adapter (`recsift serve`)


class ServeError(Label):
    """Why ``recsift serve`` refused or failed a recommendation request (a metric label)."""

    MALFORMED_JSON = "malformed_json"
    INVALID_REQUEST = "invalid_request"
    BODY_TOO_LARGE = "body_too_large"
    EMPTY_HISTORY = "empty_history"
    UNKNOWN_ITEM = "unknown_item"
    UNKNOWN_USER = "unknown_user"
    K_OUT_OF_RANGE = "k_out_of_range"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class Attempt(Label):
    """How an attempt ended: an adapter swap in ``recsift serve``, a promotion hook delivery."""

    OK = "ok"
    FAILED = "failed"
