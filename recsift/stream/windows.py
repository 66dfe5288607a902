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
from typing import Any, NamedTuple

import orjson

from recsift.config import WindowConfig
from recsift.state import State
from recsift.stream.events import Event


class Sample(NamedTuple):
    """One training sample: the user's last L items before an interaction → the interacted item."""

    sample_id: int
    user_id: str
    history: tuple[str, ...]
    target: str
    ts: float
    partition: int = 0  # the source partition it came from: its selection state lives there (scale-out)

    # the one codec of a sample (checkpoint rows, coreset state, snapshots):
    # [id, user, history, target, ts, partition]; state written before the partition was kept has five fields

    def to_json(self) -> list[Any]:
        return [self.sample_id, self.user_id, list(self.history), self.target, self.ts, self.partition]

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())

    @classmethod
    def from_json(cls, data: list[Any] | str | bytes) -> Sample:
        sid, user, history, target, ts, *partition = orjson.loads(data) if isinstance(data, (str, bytes)) else data
        return cls(int(sid), user, tuple(history), target, float(ts), int(partition[0]) if partition else 0)


def sample_id_for(user_id: str, event_id: str) -> int:
    """Deterministic 63-bit id of the sample made from one event (fits an SQLite INTEGER)."""
    digest = _blake2b(f"{user_id}\x1f{event_id}".encode(), digest_size=8).digest()
    return _from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


_blake2b = hashlib.blake2b
_from_bytes = int.from_bytes


@dataclass(slots=True)
class UserHistory:
    items: deque[str]
    touched_ts: float  # the partition's event time (max timestamp) when the user was last updated: TTL clock
    seq: int  # processing-order stamp of the last update: LRU order, also across a restart


@dataclass(slots=True)
class OpenWindow:
    samples: list[Sample] = field(default_factory=list)
    first_buffered_at: float = 0.0  # monotonic time the oldest buffered sample arrived


@dataclass(slots=True)
class WindowCounts:
    samples: int = 0
    late: int = 0
    first_events: int = 0  # events of users with no history yet: they start a history, no sample
    evicted_ttl: int = 0
    evicted_capacity: int = 0

    @property
    def events(self) -> int:
        """Every event is exactly one of: a user's first, late, or a sample."""
        return self.first_events + self.late + self.samples

    def add(self, other: WindowCounts) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(slots=True)
class PartitionState:
    """Event-time progress, user histories (in LRU order), open windows and counts of one source partition."""

    max_ts: float = -math.inf
    histories: OrderedDict[str, UserHistory] = field(default_factory=OrderedDict)
    windows: dict[float, OpenWindow] = field(default_factory=dict)
    next_close: float = math.inf  # end of the earliest open window: nothing to close before the watermark passes it
    counts: WindowCounts = field(default_factory=WindowCounts)
    dirty: set[str] = field(default_factory=set)  # users changed since the last checkpoint
    evicted: set[str] = field(default_factory=set)  # users evicted since the last checkpoint
    emitted: list[Sample] = field(default_factory=list)  # handed on since the last checkpoint (journal only)


Batch = list[Sample]
_intern = sys.intern


class StreamState:
    """Histories and open windows for every partition this process owns."""

    def __init__(self, cfg: WindowConfig, journal: bool = False) -> None:
        self.cfg = cfg
        self.journal = journal  # keep each partition's emitted samples until the checkpoint saves them
        self.partitions: dict[int, PartitionState] = {}
        self.users = 0  # histories held, over all partitions
        self._seq = 0

    # ------------------------------------------------------------------ queries

    @property
    def counts(self) -> WindowCounts:
        """Counts summed over the owned partitions."""
        total = WindowCounts()
        for part in self.partitions.values():
            total.add(part.counts)
        return total

    def partition(self, partition: int) -> PartitionState:
        state = self.partitions.get(partition)
        if state is None:
            state = self.partitions[partition] = PartitionState()
        return state

    def history(self, user_id: str, partition: int) -> list[str] | None:
        state = self.partitions.get(partition)
        h = state.histories.get(user_id) if state is not None else None
        return None if h is None else list(h.items)

    def watermark(self, partition: int) -> float:
        state = self.partitions.get(partition)
        return -math.inf if state is None else state.max_ts - self.cfg.allowed_lateness_s

    def global_watermark(self) -> float:
        """The slowest owned partition's watermark (for monitoring)."""
        return min((self.watermark(p) for p in self.partitions), default=-math.inf)

    def pending_samples(self) -> int:
        return sum(len(w.samples) for part in self.partitions.values() for w in part.windows.values())

    # ------------------------------------------------------------------ processing

    def process(self, event: Event, partition: int, now: float | None = None) -> list[Batch]:
        """Apply one accepted event; return the batches that became ready. (The ingest hot path.)"""
        cfg = self.cfg
        part = self.partitions.get(partition)
        if part is None:
            part = self.partitions[partition] = PartitionState()
        counts = part.counts
        ts = event.ts
        size = cfg.window_seconds
        start = (ts // size) * size
        ready: list[Batch] = []

        user_id = event.user_id
        history = part.histories.get(user_id)
        if history is None:
            counts.first_events += 1
        elif start + size <= part.max_ts - cfg.allowed_lateness_s:
            counts.late += 1
        else:
            window = part.windows.get(start)
            if window is None:
                window = part.windows[start] = OpenWindow()
                part.next_close = min(part.next_close, start + size)
            samples = window.samples
            if not samples:
                window.first_buffered_at = time.monotonic() if now is None else now
            samples.append(Sample(sample_id_for(user_id, event.event_id), user_id, tuple(history.items), event.item_id, ts,
                                  partition))
            counts.samples += 1
            if len(samples) >= cfg.max_batch:
                ready.append(samples)
                window.samples = []
                if self.journal:
                    part.emitted.extend(samples)

        advanced = ts > part.max_ts
        if advanced:
            part.max_ts = ts
            if ts - cfg.allowed_lateness_s >= part.next_close:
                ready.extend(self._close_windows(part))
        self._seq += 1
        if history is None:
            history = part.histories[user_id] = UserHistory(deque(maxlen=cfg.max_history), part.max_ts, self._seq)
            self.users += 1
        else:
            history.touched_ts = part.max_ts
            history.seq = self._seq
            part.histories.move_to_end(user_id)
        history.items.append(_intern(event.item_id))
        part.dirty.add(user_id)
        if part.evicted:
            part.evicted.discard(user_id)
        # The TTL horizon moves only when the clock advances; within a partition LRU order is touch order, so
        # the front is the only candidate.
        if self.users > cfg.max_users or (advanced and next(iter(part.histories.values())).touched_ts < ts - cfg.user_ttl_s):
            self._evict(part)
        return ready

    def _close_windows(self, part: PartitionState) -> list[Batch]:
        watermark = part.max_ts - self.cfg.allowed_lateness_s
        closed = sorted(s for s in part.windows if s + self.cfg.window_seconds <= watermark)
        out = []
        for start in closed:
            window = part.windows.pop(start)
            if window.samples:
                out.append(window.samples)
                if self.journal:
                    part.emitted.extend(window.samples)
        part.next_close = min(part.windows, default=math.inf) + self.cfg.window_seconds
        return out

    def _evict(self, part: PartitionState) -> None:
        # TTL, in the partition's own event time: its LRU front is its longest-idle user.
        horizon = part.max_ts - self.cfg.user_ttl_s
        while part.histories:
            user_id, oldest = next(iter(part.histories.items()))
            if oldest.touched_ts >= horizon:
                break
            self._drop_user(part, user_id)
            part.counts.evicted_ttl += 1
        # Capacity: the least recently updated user over all partitions (the oldest of the LRU fronts).
        while self.users > self.cfg.max_users:
            victim = min(
                (p for p in self.partitions.values() if p.histories),
                key=lambda p: next(iter(p.histories.values())).seq,
            )
            self._drop_user(victim, next(iter(victim.histories)))
            victim.counts.evicted_capacity += 1

    def _drop_user(self, part: PartitionState, user_id: str) -> None:
        del part.histories[user_id]
        part.dirty.discard(user_id)
        part.evicted.add(user_id)
        self.users -= 1

    def flush_idle(self, now: float | None = None) -> list[Batch]:
        """Emit buffered samples that have waited ``idle_flush_s``; their windows stay open."""
        now = time.monotonic() if now is None else now
        out = []
        for part in self.partitions.values():
            for window in part.windows.values():
                if window.samples and now - window.first_buffered_at >= self.cfg.idle_flush_s:
                    out.append(window.samples)
                    if self.journal:
                        part.emitted.extend(window.samples)
                    window.samples = []
        return out

    # ------------------------------------------------------------------ partition ownership

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget the state of partitions this process no longer owns (after it was checkpointed)."""
        for p in partitions:
            part = self.partitions.pop(p, None)
            if part is not None:
                self.users -= len(part.histories)

    def restore_user(self, partition: int, user_id: str, items: list[str], touched_ts: float, seq: int) -> None:
        """Load one checkpointed history (call in ``seq`` order to restore the LRU order)."""
        part = self.partition(partition)
        if user_id not in part.histories:
            self.users += 1
        part.histories[user_id] = UserHistory(deque((_intern(i) for i in items), maxlen=self.cfg.max_history), touched_ts, seq)
        self._seq = max(self._seq, seq)

    def clear_changes(self) -> None:
        for part in self.partitions.values():
            part.dirty = set()
            part.evicted = set()
            part.emitted = []

    def state_dict(self) -> State:
        """Every owned partition's histories (in LRU order), clock, counts and open windows' samples.
        (A window's processing-time arrival stamp is not state: it only bounds how long a sample waits.)
        The checkpoint saves histories incrementally instead (:class:`~recsift.stream.checkpoint.StreamStateStore`);
        this is the whole state, for comparisons and moves."""
        parts = {}
        for p, part in sorted(self.partitions.items()):
            parts[str(p)] = {
                "max_ts": part.max_ts, "next_close": part.next_close,
                "counts": {k: getattr(part.counts, k) for k in WindowCounts.__slots__},
                "histories": [[u, list(h.items), h.touched_ts, h.seq] for u, h in part.histories.items()],
                "windows": [[start, [s.to_json() for s in w.samples]] for start, w in sorted(part.windows.items())],
            }
        return State(meta={"users": self.users, "seq": self._seq, "partitions": parts})

    def load_state_dict(self, state: State) -> None:
        now = time.monotonic()
        self.partitions, self.users, self._seq = {}, 0, 0
        for p, data in state.meta["partitions"].items():
            part = self.partition(int(p))
            for user_id, items, touched_ts, seq in data["histories"]:
                self.restore_user(int(p), user_id, items, touched_ts, seq)
            part.max_ts, part.next_close = float(data["max_ts"]), float(data["next_close"])
            part.counts = WindowCounts(**data["counts"])
            part.windows = {float(start): OpenWindow([Sample.from_json(s)._replace(partition=int(p)) for s in samples], now)
                            for start, samples in data["windows"]}
        self.users, self._seq = state.meta["users"], state.meta["seq"]
