"""The refresh scheduler: one APScheduler 3.x job, four triggers.

- interval: the job's own ``IntervalTrigger`` (``trainer.refresh_interval_s``);
- samples: every ``trainer.refresh_every_samples`` scored samples (reported as ``interval``);
- drift: :meth:`RefreshScheduler.check_drift` moves the job to now when a drift metric is above its
  threshold and the cooldown has passed;
- manual: :meth:`RefreshScheduler.trigger` — ``modify_job(next_run_time=now)``, reached through the admin
  endpoint; never a second scheduler.

The data path does not hold the scheduler: the scoring and selection stages report scored samples and
drift measurements into :class:`RefreshSignals`, which the scheduler drains every ``poll_s``. So the
service builds its parts in one direction (selection → scoring → ingest → operations), each with its
downstreams in its constructor, with no cycle to close after construction.

``max_instances=1`` and ``coalesce=True``: at most one refresh runs at a time, and a trigger that
arrives while one is running or already due coalesces into it (nothing more runs). The run function
receives the trigger that woke it and its outcome is recorded by the caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sized
from datetime import datetime, timedelta, timezone
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from recsift.vocab import Trigger

log = logging.getLogger(__name__)

JOB_ID = "refresh"
SIGNALS_JOB_ID = "signals"


class RefreshSignals:
    """Scored-sample counts and drift reports from the data path, drained by the scheduler (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scored = 0
        self._drift: dict[str, float] | None = None

    def scored(self, samples: Sized) -> None:
        """A scoring-stage downstream: count the batch."""
        self.count(len(samples))

    def count(self, samples: int) -> None:
        """Count ``samples`` scored elsewhere (a trainer reads the workers' counters)."""
        with self._lock:
            self._scored += samples

    def drift(self, report: dict[str, float]) -> None:
        """A selection-stage drift listener: keep the latest report."""
        with self._lock:
            self._drift = dict(report)

    def take(self) -> tuple[int, dict[str, float] | None]:
        """Samples scored and the latest drift report since the last call."""
        with self._lock:
            taken = self._scored, self._drift
            self._scored, self._drift = 0, None
        return taken
FAR_FUTURE = timedelta(days=3650)


class RefreshScheduler:
    def __init__(self, run: Callable[[Trigger], Any], interval_s: float | None = None,
                 drift_thresholds: dict[str, float] | None = None, drift_cooldown_s: float = 600.0, *,
                 signals: RefreshSignals | None = None, every_samples: int | None = None,
                 poll_s: float = 0.5) -> None:
        self.run_fn, self.interval_s = run, interval_s
        self.signals, self.every_samples, self.poll_s = signals, every_samples, poll_s
        self._since_refresh = 0
        self.thresholds = dict(drift_thresholds or {})
        self.cooldown_s = drift_cooldown_s
        self.scheduler = BackgroundScheduler(timezone=timezone.utc)
        self._lock = threading.Lock()
        self._pending: Trigger | None = None  # the trigger the next run reports
        self._last_drift_fire = -float("inf")
        self.running = False
        self.runs: list[tuple[Trigger, Any]] = []  # (trigger, result)

    def start(self) -> None:
        trigger = IntervalTrigger(seconds=self.interval_s) if self.interval_s else \
            IntervalTrigger(seconds=FAR_FUTURE.total_seconds())
        self.scheduler.add_job(self._job, trigger, id=JOB_ID, max_instances=1, coalesce=True,
                               misfire_grace_time=None)
        if self.signals is not None:
            self.scheduler.add_job(self.poll, IntervalTrigger(seconds=self.poll_s), id=SIGNALS_JOB_ID,
                                   max_instances=1, coalesce=True)
        self.scheduler.start()

    def poll(self) -> None:
        """Act on what the data path reported: a refresh every ``every_samples`` samples, drift checks."""
        assert self.signals is not None
        scored, drift = self.signals.take()
        self._since_refresh += scored
        if self.every_samples is not None and self._since_refresh >= self.every_samples:
            self._since_refresh = 0
            self.trigger(Trigger.INTERVAL)
        if drift is not None:
            self.check_drift(drift)

    def shutdown(self, wait: bool = True) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=wait)

    def _job(self) -> None:
        with self._lock:
            trigger = self._pending or Trigger.INTERVAL
            self._pending = None
            self.running = True
        try:
            result = self.run_fn(trigger)
            self.runs.append((trigger, result))
        except Exception:  # a failed run is logged; the scheduler keeps going
            log.exception("refresh job failed")
            self.runs.append((trigger, None))
        finally:
            with self._lock:
                self.running = False

    def trigger(self, reason: Trigger = Trigger.MANUAL) -> bool:
        """Run the refresh job now. A trigger while a refresh is running or already due coalesces into
        it (returns False): the refresh in progress is the one asked for."""
        with self._lock:
            if self.running or self._pending is not None:
                log.info("refresh already %s: the %s trigger coalesces", "running" if self.running else "due", reason)
                return False
            self._pending = reason
        self.scheduler.modify_job(JOB_ID, next_run_time=datetime.now(timezone.utc))
        return True

    def check_drift(self, metrics: dict[str, float]) -> str | None:
        """Fire a drift refresh when a metric exceeds its threshold (once per cooldown); returns the metric."""
        now = time.monotonic()
        if now - self._last_drift_fire < self.cooldown_s:
            return None
        for name, threshold in self.thresholds.items():
            if metrics.get(name, 0.0) > threshold:
                self._last_drift_fire = now
                log.info("drift %s = %.4f above %.4f: refreshing", name, metrics[name], threshold)
                self.trigger(Trigger.DRIFT)
                return name
        return None
