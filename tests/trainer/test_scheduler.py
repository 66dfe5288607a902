"""The refresh scheduler: one run at a time, manual triggers coalesce, drift fires once per cooldown."""

from __future__ import annotations

import threading
import time

from recsift.trainer.scheduler import RefreshScheduler, RefreshSignals


def wait_for(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_triggers_while_a_refresh_is_due_or_running_coalesce_into_it() -> None:
    release = threading.Event()
    active, peak = [0], [0]

    def run(trigger: str) -> str:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        release.wait(5)
        active[0] -= 1
        return trigger

    sched = RefreshScheduler(run)
    sched.start()
    try:
        assert sched.trigger()
        assert not sched.trigger()  # twice quickly: already due
        wait_for(lambda: sched.running)
        for _ in range(5):  # while it runs
            assert not sched.trigger()
            time.sleep(0.05)
        release.set()
        wait_for(lambda: len(sched.runs) >= 1 and not sched.running)
        time.sleep(0.5)
        assert [t for t, _ in sched.runs] == ["manual"]  # seven triggers → one run
        assert sched.trigger("manual")  # after it ended, a trigger runs again
        wait_for(lambda: len(sched.runs) == 2)
        assert peak[0] == 1
    finally:
        release.set()
        sched.shutdown()


def test_interval_and_drift_triggers() -> None:
    sched = RefreshScheduler(lambda trigger: trigger, interval_s=0.3, drift_thresholds={"target_js": 0.2},
                             drift_cooldown_s=60)
    sched.start()
    try:
        wait_for(lambda: len(sched.runs) >= 1)
        assert sched.runs[0][0] == "interval"
        assert sched.check_drift({"target_js": 0.1}) is None
        assert sched.check_drift({"target_js": 0.5}) == "target_js"
        assert sched.check_drift({"target_js": 0.9}) is None  # cooldown
        wait_for(lambda: any(t == "drift" for t, _ in sched.runs))
    finally:
        sched.shutdown()


def test_signals_from_the_data_path_trigger_sample_count_and_drift_refreshes() -> None:
    """The stages report into RefreshSignals; the scheduler acts on them without the stages holding it."""
    signals = RefreshSignals()
    sched = RefreshScheduler(lambda trigger: trigger, drift_thresholds={"target_js": 0.2}, drift_cooldown_s=60,
                             signals=signals, every_samples=100, poll_s=0.05)
    sched.start()
    try:
        signals.scored([0] * 60)
        signals.drift({"target_js": 0.1})  # below the threshold
        time.sleep(0.5)
        assert sched.runs == []  # 60 < 100 samples, no drift
        signals.scored([0] * 50)  # 110 in all: one refresh
        wait_for(lambda: len(sched.runs) == 1)
        assert sched.runs[0][0] == "interval"
        signals.drift({"target_js": 0.1})
        signals.drift({"target_js": 0.5})  # above it
        wait_for(lambda: len(sched.runs) == 2)
        assert sched.runs[1][0] == "drift"
        assert signals.take() == (0, None)  # drained
    finally:
        sched.shutdown()
