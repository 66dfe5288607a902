"""The ingest loop: source → validation → windows → sample sink, with the checkpoint commit protocol.

The pipeline owns the source, signals and rebalances (as quix-streams' Application does):

- records are processed synchronously after each poll, so when a rebalance callback runs inside the
  next poll every record handed out so far is fully applied;
- on revoke it checkpoints (offsets included) *before* letting the partitions go, then forgets their
  state; on assign it restores the partitions' state and seeks to the checkpoint's offsets;
- SIGTERM / SIGINT finish the current batch, checkpoint, commit and close;
- when the sink's backlog passes ``backpressure_high`` the source's partitions are paused (polling
  goes on, so group membership stays alive) until it falls below ``backpressure_low``.

The checkpoint ordering rules are in :mod:`recsift.stream.checkpoint`.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from recsift.config import Settings
from recsift.monitoring.metrics import Metrics
from recsift.process import release_free_memory
from recsift.stream.changelog import ChangelogUnavailable, changelog_summary
from recsift.stream.checkpoint import Checkpoint, Participant, StreamStateStore
from recsift.stream.deadletter import DeadLetterSink
from recsift.stream.dedup import DedupIndex
from recsift.stream.events import Event, Rejection
from recsift.stream.sources import Source, SourceRecord
from recsift.stream.validator import Validator
from recsift.stream.windows import Batch, StreamState
from recsift.vocab import Eviction, Rebalance, RejectReason, Stage

log = logging.getLogger(__name__)


class SampleSink(Protocol):
    """Where sample batches go (scoring, in the full service)."""

    def put(self, batch: Batch) -> None: ...

    def backlog(self) -> int:
        """Samples accepted but not yet processed."""

    def drain(self) -> None:
        """Block until every accepted batch is processed; raise the handler's error if one failed."""

    def close(self) -> None: ...


class DirectSink:
    """Calls the handlers synchronously, in the ingest thread."""

    def __init__(self, *handlers: Callable[[Batch], None]) -> None:
        self.handlers = handlers

    def put(self, batch: Batch) -> None:
        for h in self.handlers:
            h(batch)

    def backlog(self) -> int:
        return 0

    def drain(self) -> None:
        return None

    def close(self) -> None:
        return None


class ThreadedSink:
    """Runs the handlers in a worker thread so slow downstream work overlaps with consumption.

    The backlog it reports drives backpressure; ``drain`` is the checkpoint barrier.
    """

    def __init__(self, *handlers: Callable[[Batch], None]) -> None:
        self.handlers = handlers
        self._queue: queue.Queue[Batch | None] = queue.Queue()
        self._backlog = 0
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="recsift-sink", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                if self.error is None:
                    for h in self.handlers:
                        h(batch)
            except BaseException as exc:  # surfaced by drain(): the checkpoint must not pass a failed batch
                self.error = exc
                log.exception("sample handler failed")
            finally:
                if batch is not None:
                    with self._lock:
                        self._backlog -= len(batch)
                self._queue.task_done()

    def put(self, batch: Batch) -> None:
        with self._lock:
            self._backlog += len(batch)
        self._queue.put(batch)

    def backlog(self) -> int:
        return self._backlog

    def drain(self) -> None:
        self._queue.join()
        if self.error is not None:
            raise RuntimeError("a sample handler failed; not checkpointing past it") from self.error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)


@dataclass
class RunSummary:
    consumed: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {r.value: 0 for r in RejectReason})
    samples: int = 0
    late: int = 0
    first_events: int = 0
    users: int = 0
    checkpoints: int = 0
    elapsed_s: float = 0.0
    busy_s: float = 0.0  # from the first record to the stop: excludes start-up and the group join
    offsets: dict[int, int] = field(default_factory=dict)
    stopped_by: str = ""

    @property
    def rate(self) -> float:
        return self.consumed / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Pipeline:
    """Consumes one source into histories and windows, hands sample batches on, checkpoints."""

    def __init__(
        self,
        cfg: Settings,
        *,
        validator: Validator,
        dead_letters: DeadLetterSink,
        checkpoint: Checkpoint,
        sink: SampleSink,
        metrics: Metrics,
        participants: Iterable[Participant] = (),
        ticks: Iterable[Callable[[Pipeline], object]] = (),
    ) -> None:
        self.cfg = cfg
        self.validator = validator
        self.dedup: DedupIndex = validator.dedup
        self.dead_letters = dead_letters
        self.checkpoint = checkpoint
        self.sink = sink
        self.metrics = metrics
        self.state = StreamState(cfg.window, journal=cfg.checkpoint.journal_samples)
        self.store = StreamStateStore(self.state, self.dedup, track_changes=cfg.checkpoint.changelog_topic is not None)
        checkpoint.add(self.store)
        for p in participants:
            checkpoint.add(p)
        self.source: Source | None = None
        self.offsets: dict[int, int] = {}
        self.summary = RunSummary()
        self._stop = threading.Event()
        self.held = threading.Event()  # admin pause
        self._checkpoint_requests: queue.SimpleQueue[threading.Event] = queue.SimpleQueue()
        self.looping = False
        self.heartbeat = time.monotonic()  # last loop iteration (liveness)
        self.lag: dict[int, int] = {}
        self.connected = False  # the source has not reached its broker yet
        self._ever_connected = False
        self._stop_reason = ""
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._lag_labels: set[str] = set()
        self._closing = False
        self._assigned_at = 0.0
        self._restored = False  # set by the first assignment: only then does memory hold the checkpoint's state
        self.ticks = list(ticks)  # called with the pipeline once per loop: catalog topic, progress, ...

    # ------------------------------------------------------------------ rebalance callbacks

    def on_assign(self, partitions: set[int]) -> dict[int, int]:
        """Restore the partitions' state (from the changelog first where it is ahead of the local checkpoint);
        return the checkpoint's offsets to seek to."""
        outcomes = self.checkpoint.sync_changelog(partitions)
        if any(o != "current" for o in outcomes.values()):
            log.info("changelog: %s", changelog_summary(outcomes))
        self.checkpoint.load(partitions)
        self._restored = True
        saved = self.checkpoint.offsets(self._topic())
        offsets = {p: saved[p] for p in partitions if p in saved}
        self.offsets.update(offsets)
        self.metrics.rebalances.labels(Rebalance.ASSIGNED).inc()
        self._assigned_at = time.monotonic()  # partitions that just arrived may hold work: not idle yet
        log.info("assigned partitions %s; resuming at %s", sorted(partitions), offsets or "the group's position")
        return offsets

    def on_revoke(self, partitions: set[int], lost: bool = False) -> None:
        """Checkpoint, then forget the partitions' state: their next owner resumes from this checkpoint.

        ``lost`` (this member was evicted from the group): another member may already own the partitions,
        so nothing is checkpointed; the work since the last checkpoint is discarded and will be redone.
        """
        if not lost:
            self.checkpoint_now()
        if self._closing:  # the process ends: the stream state goes as ever; the stages keep theirs for its summary
            self.store.release(partitions)
        else:
            self.checkpoint.release(partitions)
        for p in partitions:
            self.offsets.pop(p, None)
            if str(p) in self._lag_labels and not self._closing:  # at shutdown the last values stay visible
                self.metrics.consumer_lag.remove(str(p))
                self._lag_labels.discard(str(p))
        self.metrics.rebalances.labels(Rebalance.REVOKED).inc()
        log.info("revoked partitions %s after checkpointing", sorted(partitions))

    def _topic(self) -> str:
        assert self.source is not None, "attach a source first"
        return self.source.topic

    # ------------------------------------------------------------------ the loop

    def stop(self, reason: str = "stop requested") -> None:
        self._stop_reason = self._stop_reason or reason
        self._stop.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop(signal.Signals(signum).name)

    def run(self, source: Source, max_events: int | None = None) -> RunSummary:
        """Consume until stopped (signal, :meth:`stop`, ``max_events``, idle timeout); then checkpoint and close."""
        self.source = source
        cfg = self.cfg.stream
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        started = time.monotonic()
        last_record = started
        first_record: float | None = None
        last_lag = 0.0
        self.looping = True
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                t0 = time.perf_counter()
                records = source.poll(cfg.poll_max_records, cfg.poll_timeout_ms)
                self.metrics.stage_duration.labels(Stage.POLL).observe(time.perf_counter() - t0)
                now = time.monotonic()
                if max_events is not None:
                    records = records[: max(0, max_events - self.summary.consumed)]
                if records or not source.assignment() or getattr(source, "paused", False):
                    # idle time counts only while partitions are owned (not during a join) and read (not
                    # while paused: under backpressure the records are there, scoring is behind)
                    last_record = now
                last_record = max(last_record, self._assigned_at)
                if records:
                    if first_record is None:
                        first_record = time.monotonic()
                    self._process(records)
                self._emit(self.state.flush_idle(now))
                self._backpressure(source)
                for tick in self.ticks:
                    tick(self)
                if now - last_lag >= 1.0:
                    self._update_gauges(source)
                    last_lag = now
                requested = []
                while not self._checkpoint_requests.empty():
                    requested.append(self._checkpoint_requests.get())
                if requested or self._since_checkpoint >= self.cfg.checkpoint.interval_events or (
                    now - self._last_checkpoint >= self.cfg.checkpoint.interval_s and self._since_checkpoint
                ):
                    self.checkpoint_now()
                for done in requested:
                    done.set()
                if max_events is not None and self.summary.consumed >= max_events:
                    self.stop("max-events")
                elif getattr(source, "exhausted", False):
                    self.stop("end of input")
                elif cfg.stop_when_idle_s is not None and now - last_record >= cfg.stop_when_idle_s:
                    self.stop("idle")
            self._update_gauges(source)
            self.checkpoint_now()
        finally:
            self.looping = False
            self.summary.elapsed_s = time.monotonic() - started
            self.summary.busy_s = time.monotonic() - first_record if first_record is not None else 0.0
            self.summary.stopped_by = self._stop_reason
            self._fill_summary()  # before close(): leaving the group revokes (and forgets) every partition
            self._closing = True
            source.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.summary

    def _process(self, records: list[SourceRecord]) -> None:
        t0 = time.perf_counter()
        validate = self.validator.validate
        results = [validate(r.value or b"", r.partition) for r in records]
        t1 = time.perf_counter()
        state, offsets, summary = self.state, self.offsets, self.summary
        before = state.counts
        rejected = 0
        process = state.process
        for rec, result in zip(records, results, strict=True):
            if type(result) is Event:
                ready = process(result, rec.partition)
                if ready:
                    self._emit(ready)
            else:
                assert isinstance(result, Rejection)
                where = {"topic": self._topic(), "partition": rec.partition, "offset": rec.offset}
                self.dead_letters.write(result, where, rec.key)
                summary.rejected[result.reason.value] += 1
                self.metrics.events_rejected.labels(result.reason.value).inc()
                rejected += 1
            offsets[rec.partition] = rec.offset + 1
        t2 = time.perf_counter()
        n = len(records)
        summary.consumed += n
        summary.accepted += n - rejected
        self._since_checkpoint += n
        m = self.metrics
        m.events_consumed.inc(n)
        m.stage_duration.labels(Stage.VALIDATE).observe(t1 - t0)
        m.stage_duration.labels(Stage.WINDOW).observe(t2 - t1)
        after = state.counts
        m.events_late.inc(after.late - before.late)
        m.users_evicted.labels(Eviction.TTL).inc(after.evicted_ttl - before.evicted_ttl)
        m.users_evicted.labels(Eviction.CAPACITY).inc(after.evicted_capacity - before.evicted_capacity)

    def _emit(self, batches: list[Batch]) -> None:
        if not batches:
            return
        t0 = time.perf_counter()
        for batch in batches:
            self.sink.put(batch)
            self.metrics.samples_emitted.inc(len(batch))
        self.metrics.stage_duration.labels(Stage.SINK).observe(time.perf_counter() - t0)

    def request_checkpoint(self, timeout: float = 120.0) -> bool:
        """From another thread: have the loop checkpoint now (downstream drained); True once committed."""
        if not self.looping:
            return False
        done = threading.Event()
        self._checkpoint_requests.put(done)
        end = time.monotonic() + timeout
        while self.looping and time.monotonic() < end:
            if done.wait(0.2):
                return True
        return done.is_set()

    def hold(self, paused: bool) -> None:
        """Admin pause/resume: the loop keeps polling (group membership stays alive) but reads nothing."""
        if paused:
            self.held.set()
        else:
            self.held.clear()
        log.info("consumption %s by an admin request", "paused" if paused else "resumed")

    def _backpressure(self, source: Source) -> None:
        backlog = self.sink.backlog()
        paused = getattr(source, "paused", False)
        if not paused and self.held.is_set():
            source.pause()
        elif not paused and backlog > self.cfg.stream.backpressure_high:
            source.pause()
            self.metrics.backpressure_pauses.inc()
            self.metrics.backpressure_paused.set(1)
            log.info("paused the source: %d samples waiting downstream", backlog)
        elif paused and not self.held.is_set() and backlog < self.cfg.stream.backpressure_low:
            source.resume()
            self.metrics.backpressure_paused.set(0)
        self.metrics.downstream_backlog.set(backlog)

    def _update_gauges(self, source: Source) -> None:
        m = self.metrics
        self.lag = source.lag(self.offsets)
        connected = source.connected()
        if connected != self.connected and self._ever_connected:
            log.log(logging.INFO if connected else logging.WARNING, "source %s the broker",
                    "reconnected to" if connected else "lost")
        self.connected = connected
        self._ever_connected |= connected
        m.source_connected.set(int(connected))
        for part, lag in self.lag.items():
            m.consumer_lag.labels(str(part)).set(lag)
            self._lag_labels.add(str(part))
        m.users_tracked.set(self.state.users)
        m.pending_samples.set(self.state.pending_samples())
        m.partitions_owned.set(len(source.assignment()))
        wm = self.state.global_watermark()
        if wm != float("-inf"):
            m.watermark.set(wm)

    def checkpoint_now(self) -> None:
        """Drain downstream, flush dead letters, commit the checkpoint transaction, then commit offsets.

        Before the first assignment nothing is committed: nothing was consumed, and the stages still hold the
        state they were built with, not the saved one (a worker's scorer and selection counters are restored
        with its first partitions), so a commit would overwrite the saved state with a fresh one. A refresh
        started at once (an interrupted one) asks for a checkpoint while the group is still joining."""
        if not self._restored:
            return
        t0 = time.perf_counter()
        self.sink.drain()
        self.dead_letters.flush()
        m = self.metrics
        try:
            self.checkpoint.commit({(self._topic(), p): o for p, o in self.offsets.items()})
        except ChangelogUnavailable as exc:  # nothing committed: the next checkpoint retries all of it
            m.changelog_failures.inc()
            log.warning("checkpoint not committed: %s; retrying at the next checkpoint", exc)
            self._since_checkpoint = 0
            self._last_checkpoint = time.monotonic()
            return
        elapsed = time.perf_counter() - t0
        m.checkpoint_commits.inc()
        m.checkpoint_duration.observe(elapsed)
        m.stage_duration.labels(Stage.CHECKPOINT).observe(elapsed)
        m.last_checkpoint.set_to_current_time()
        if self.source is not None and self.source.commit(dict(self.offsets)) is False:
            m.offset_commit_failures.inc()
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self.summary.checkpoints += 1
        release_free_memory()  # the drain freed the scoring temporaries: return their pages (flat RSS)

    def _fill_summary(self) -> None:
        counts = self.state.counts
        s = self.summary
        s.samples = counts.samples
        s.late = counts.late
        s.first_events = counts.first_events
        s.users = self.state.users
        s.offsets = dict(self.offsets)
