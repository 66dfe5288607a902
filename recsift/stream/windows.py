"""Per-user histories and tumbling event-time windows that turn events into :class:`Sample` batches.

Event time is tracked per source partition. A partition's watermark is the largest timestamp it has
delivered minus ``allowed_lateness_s``; a window ``[start, start + window_seconds)`` of that partition
closes when the watermark passes its end. Because the user id is the message key, all of a user's
events sit in one partition, so lateness and window closing depend only on that partition's own order:
a restart or a rebalance that replays a partition reproduces exactly the same samples.

An event whose window has already closed is *late*: it still extends its user's history, but yields no
sample. A window emits a micro-batch early when it holds ``max_batch`` samples, or when its oldest
sample has waited ``idle_flush_s`` of processing time, so latency stays bounded on slow partitions.

Memory is bounded by the configuration: at most ``max_users`` histories of ``max_history`` items,
idle users evicted after ``user_ttl_s`` of event time, and at most ``max_batch`` samples buffered per
open window.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from recsift.config import WindowConfig
from recsift.stream.events import Event


@dataclass(frozen=True, slots=True)
class Sample:
    """One training sample: the user's last L items before an interaction → the interacted item."""

    sample_id: int
    user_id: str
    history: tuple[str, ...]
    target: str
    ts: float


def sample_id_for(user_id: str, event_id: str) -> int:
    """Deterministic 63-bit id of the sample made from one event (fits an SQLite INTEGER)."""
    digest = hashlib.blake2b(f"{user_id}\x1f{event_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(slots=True)
class UserHistory:
    partition: int
    items: deque[str]
    last_ts: float
    seq: int  # processing-order stamp of the last update; restores LRU order after a restart


@dataclass(slots=True)
class OpenWindow:
    samples: list[Sample] = field(default_factory=list)
    first_buffered_at: float = 0.0  # monotonic time the oldest buffered sample arrived


@dataclass(slots=True)
class WindowCounts:
    events: int = 0
    samples: int = 0
    late: int = 0
    first_events: int = 0  # events of users with no history yet: they start a history, no sample
    evicted_ttl: int = 0
    evicted_capacity: int = 0

    def add(self, other: WindowCounts) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(slots=True)
class PartitionClock:
    """Event-time progress, open windows and counts of one source partition."""

    max_ts: float = -math.inf
    windows: dict[float, OpenWindow] = field(default_factory=dict)
    counts: WindowCounts = field(default_factory=WindowCounts)


Batch = list[Sample]


class StreamState:
    """Histories and open windows for every partition this process owns."""

    def __init__(self, cfg: WindowConfig) -> None:
        self.cfg = cfg
        self.histories: OrderedDict[str, UserHistory] = OrderedDict()
        self.clocks: dict[int, PartitionClock] = {}
        self._seq = 0
        self.dirty_users: set[str] = set()
        self.evicted_users: set[str] = set()

    # ------------------------------------------------------------------ processing

    @property
    def counts(self) -> WindowCounts:
        """Counts summed over the owned partitions."""
        total = WindowCounts()
        for clock in self.clocks.values():
            total.add(clock.counts)
        return total

    def clock(self, partition: int) -> PartitionClock:
        clock = self.clocks.get(partition)
        if clock is None:
            clock = self.clocks[partition] = PartitionClock()
        return clock

    def watermark(self, partition: int) -> float:
        clock = self.clocks.get(partition)
        return -math.inf if clock is None else clock.max_ts - self.cfg.allowed_lateness_s

    def global_watermark(self) -> float:
        """The slowest owned partition's watermark (for monitoring)."""
        return min((self.watermark(p) for p in self.clocks), default=-math.inf)

    def process(self, event: Event, partition: int, now: float | None = None) -> list[Batch]:
        """Apply one accepted event; return the batches that became ready."""
        cfg = self.cfg
        now = time.monotonic() if now is None else now
        clock = self.clock(partition)
        counts = clock.counts
        counts.events += 1
        start = math.floor(event.ts / cfg.window_seconds) * cfg.window_seconds
        late = start + cfg.window_seconds <= clock.max_ts - cfg.allowed_lateness_s
        ready: list[Batch] = []

        history = self.histories.get(event.user_id)
        if history is None:
            counts.first_events += 1
        elif late:
            counts.late += 1
        else:
            sample = Sample(
                sample_id_for(event.user_id, event.event_id),
                event.user_id,
                tuple(history.items),
                event.item_id,
                event.ts,
            )
            window = clock.windows.get(start)
            if window is None:
                window = clock.windows[start] = OpenWindow()
            if not window.samples:
                window.first_buffered_at = now
            window.samples.append(sample)
            counts.samples += 1
            if len(window.samples) >= cfg.max_batch:
                ready.append(window.samples)
                window.samples = []

        self._remember(event, partition, history)
        if event.ts > clock.max_ts:
            clock.max_ts = event.ts
            ready.extend(self._close_windows(clock))
        self._evict()
        return ready

    def _remember(self, event: Event, partition: int, history: UserHistory | None) -> None:
        self._seq += 1
        item = sys.intern(event.item_id)
        if history is None:
            history = UserHistory(partition, deque(maxlen=self.cfg.max_history), event.ts, self._seq)
            self.histories[event.user_id] = history
        else:
            history.last_ts = max(history.last_ts, event.ts)
            history.seq = self._seq
            self.histories.move_to_end(event.user_id)
        history.items.append(item)
        self.dirty_users.add(event.user_id)
        self.evicted_users.discard(event.user_id)

    def _close_windows(self, clock: PartitionClock) -> list[Batch]:
        watermark = clock.max_ts - self.cfg.allowed_lateness_s
        closed = sorted(s for s in clock.windows if s + self.cfg.window_seconds <= watermark)
        out = []
        for start in closed:
            window = clock.windows.pop(start)
            if window.samples:
                out.append(window.samples)
        return out

    def _evict(self) -> None:
        histories = self.histories
        while len(histories) > self.cfg.max_users:
            user_id, oldest = next(iter(histories.items()))
            self._drop_user(user_id)
            self.clock(oldest.partition).counts.evicted_capacity += 1
        # TTL in event time of the user's own partition; the LRU front is the least recently updated user.
        while histories:
            user_id, oldest = next(iter(histories.items()))
            clock = self.clock(oldest.partition)
            if oldest.last_ts >= clock.max_ts - self.cfg.user_ttl_s:
                break
            self._drop_user(user_id)
            clock.counts.evicted_ttl += 1

    def _drop_user(self, user_id: str) -> None:
        del self.histories[user_id]
        self.dirty_users.discard(user_id)
        self.evicted_users.add(user_id)

    def flush_idle(self, now: float | None = None) -> list[Batch]:
        """Emit buffered samples that have waited ``idle_flush_s``; their windows stay open."""
        now = time.monotonic() if now is None else now
        out = []
        for clock in self.clocks.values():
            for window in clock.windows.values():
                if window.samples and now - window.first_buffered_at >= self.cfg.idle_flush_s:
                    out.append(window.samples)
                    window.samples = []
        return out

    def pending_samples(self) -> int:
        return sum(len(w.samples) for c in self.clocks.values() for w in c.windows.values())

    # ------------------------------------------------------------------ partition ownership

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget the state of partitions this process no longer owns (after it was checkpointed)."""
        for user_id in [u for u, h in self.histories.items() if h.partition in partitions]:
            del self.histories[user_id]
            self.dirty_users.discard(user_id)
        for p in partitions:
            self.clocks.pop(p, None)

    def restore_user(self, user_id: str, partition: int, items: list[str], last_ts: float, seq: int) -> None:
        """Load one checkpointed history (call in ``seq`` order to restore the LRU order)."""
        history = UserHistory(partition, deque((sys.intern(i) for i in items), maxlen=self.cfg.max_history), last_ts, seq)
        self.histories[user_id] = history
        self._seq = max(self._seq, seq)

    def clear_changes(self) -> None:
        self.dirty_users = set()
        self.evicted_users = set()
