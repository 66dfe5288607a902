"""Windows and histories: property tests against a plain reference model, plus edge cases."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from recsift.config import WindowConfig
from recsift.stream.events import Event
from recsift.stream.windows import Sample, StreamState, sample_id_for

L, W, LATE = 3, 10.0, 5.0
CFG = WindowConfig(max_history=L, window_seconds=W, allowed_lateness_s=LATE, max_batch=4, idle_flush_s=1.0,
                   max_users=10_000, user_ttl_s=1e12)

# (user, item, timestamp): small alphabets so users repeat and timestamps go back and forth.
events_st = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 9), st.floats(0, 200, allow_nan=False).map(lambda x: round(x, 1))),
    max_size=120,
)


def to_events(raw: list[tuple[int, int, float]]) -> list[tuple[Event, int]]:
    """Events with their partition (user-keyed, as with Kafka message keys)."""
    return [(Event(f"e{k}", f"u{u}", f"i{i}", ts), u % 3) for k, (u, i, ts) in enumerate(raw)]


def oracle(stream: list[tuple[Event, int]]) -> tuple[set[tuple[int, tuple[str, ...], str]], int]:
    """The specification, written as plainly as possible: per-partition max timestamps, full histories."""
    max_ts: dict[int, float] = {}
    items: dict[str, list[str]] = {}
    samples, late = set(), 0
    for e, p in stream:
        wm = max_ts.get(p, -math.inf) - LATE
        is_late = math.floor(e.ts / W) * W + W <= wm
        if e.user_id in items:
            if is_late:
                late += 1
            else:
                samples.add((sample_id_for(e.user_id, e.event_id), tuple(items[e.user_id][-L:]), e.item_id))
        items.setdefault(e.user_id, []).append(e.item_id)
        max_ts[p] = max(max_ts.get(p, -math.inf), e.ts)
    return samples, late


def run(state: StreamState, stream: list[tuple[Event, int]]) -> list[Sample]:
    out: list[Sample] = []
    for e, p in stream:
        for batch in state.process(e, p, now=0.0):
            assert 0 < len(batch) <= CFG.max_batch
            out.extend(batch)
        for part in state.partitions.values():
            assert all(len(w.samples) < CFG.max_batch for w in part.windows.values())
    for batch in state.flush_idle(now=1e9):
        out.extend(batch)
    return out


@settings(max_examples=200, deadline=None)
@given(events_st)
def test_samples_and_lateness_match_the_reference_model(raw: list[tuple[int, int, float]]) -> None:
    stream = to_events(raw)
    state = StreamState(CFG)
    got = run(state, stream)
    expected, late = oracle(stream)
    assert {(s.sample_id, s.history, s.target) for s in got} == expected
    assert len(got) == len(expected)  # no sample emitted twice
    assert state.counts.late == late
    assert state.counts.samples == len(expected)
    assert state.pending_samples() == 0


@settings(max_examples=150, deadline=None)
@given(events_st)
def test_each_users_samples_come_out_in_arrival_order(raw: list[tuple[int, int, float]]) -> None:
    stream = to_events(raw)
    got = run(StreamState(CFG), stream)
    order = {sample_id_for(e.user_id, e.event_id): k for k, (e, _) in enumerate(stream)}
    # within one window of one user, emission follows arrival; across windows a window closes as a unit
    for user in {s.user_id for s in got}:
        mine = [s for s in got if s.user_id == user]
        by_window: dict[float, list[int]] = {}
        for s in mine:
            by_window.setdefault(math.floor(s.ts / W), []).append(order[s.sample_id])
        assert all(v == sorted(v) for v in by_window.values())


@settings(max_examples=150, deadline=None)
@given(events_st, st.randoms(use_true_random=False))
def test_partition_interleaving_does_not_change_the_result(raw: list[tuple[int, int, float]], rnd) -> None:  # type: ignore[no-untyped-def]
    stream = to_events(raw)
    per_partition = {p: [x for x in stream if x[1] == p] for p in range(3)}
    shuffled: list[tuple[Event, int]] = []
    cursors = {p: 0 for p in per_partition}
    while any(cursors[p] < len(v) for p, v in per_partition.items()):
        p = rnd.choice([p for p, v in per_partition.items() if cursors[p] < len(v)])
        shuffled.append(per_partition[p][cursors[p]])
        cursors[p] += 1
    a, b = StreamState(CFG), StreamState(CFG)
    assert {s.sample_id for s in run(a, stream)} == {s.sample_id for s in run(b, shuffled)}
    assert a.counts.late == b.counts.late


@settings(max_examples=150, deadline=None)
@given(events_st, st.integers(1, 4), st.floats(1, 100))
def test_memory_stays_within_the_configured_bounds(raw: list[tuple[int, int, float]], max_users: int, ttl: float) -> None:
    cfg = CFG.model_copy(update={"max_users": max_users, "user_ttl_s": ttl})
    state = StreamState(cfg)
    for e, p in to_events(raw):
        state.process(e, p, now=0.0)
        assert state.users == sum(len(part.histories) for part in state.partitions.values()) <= max_users
        for part in state.partitions.values():
            assert all(len(h.items) <= cfg.max_history for h in part.histories.values())
            # TTL is exact: nobody idle longer than ttl of the partition's event time survives
            assert all(h.touched_ts >= part.max_ts - ttl for h in part.histories.values())
            # open windows are bounded by lateness: only windows the watermark has not passed stay open
            assert all(start + W > part.max_ts - LATE for start in part.windows)
    c = state.counts
    assert c.evicted_capacity + c.evicted_ttl + state.users >= len({u for u, _, _ in raw})


def test_window_closes_when_watermark_passes_and_idle_flush_bounds_latency() -> None:
    s = StreamState(CFG)
    assert s.process(Event("a", "u", "i1", 1.0), 0, now=0.0) == []  # first event: history only
    assert s.process(Event("b", "u", "i2", 2.0), 0, now=0.0) == []  # sample buffered in window [0, 10)
    assert s.pending_samples() == 1
    assert s.flush_idle(now=0.5) == []  # has not waited idle_flush_s yet
    (batch,) = s.flush_idle(now=1.5)
    assert [x.history for x in batch] == [("i1",)]
    s.process(Event("c", "u", "i3", 3.0), 0, now=2.0)
    # watermark = 16 - 5 = 11 >= 10: window [0, 10) closes and emits what it holds
    (closed,) = s.process(Event("d", "v", "i9", 16.0), 0, now=2.0)
    assert [x.history for x in closed] == [("i1", "i2")]
    # an event in the closed window is late: history grows, no sample
    assert s.process(Event("e", "u", "i4", 4.0), 0, now=2.0) == []
    assert s.counts.late == 1 and s.history("u", 0) == ["i2", "i3", "i4"]


def test_watermarks_are_per_partition() -> None:
    s = StreamState(CFG)
    s.process(Event("a", "u", "i1", 1.0), 0)
    s.process(Event("b", "x", "i1", 100.0), 1)  # partition 1 races ahead
    s.process(Event("c", "u", "i2", 2.0), 0)  # not late: partition 0 has not advanced
    assert s.counts.late == 0 and s.pending_samples() == 1
    assert s.global_watermark() == 2.0 - LATE
