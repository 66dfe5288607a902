"""The serving engine: one thread owns the model. Requests wait in a bounded queue and run in batches (up to
``max_batch``, the first waiting at most ``max_wait_s`` for company); every batch runs under one adapter
version, and the adapter changes only between batches, so no response mixes versions and none fails
because of a swap.

What it serves (``follow``):

- ``registry``: the registry's ``current`` version, read before every batch and every ``watch_interval_s``
  when idle. A new one is loaded beside the serving one, switched to, and the old one unloaded
  (:meth:`Served.use_adapter`). A version that cannot be loaded is counted and skipped (the old one
  keeps serving) until the pointer moves again or ``retry_s`` passes.
- ``api``: what :meth:`Engine.load` was last given (``POST /v1/load_lora_adapter``, vLLM's runtime LoRA API);
  :meth:`Engine.unload` removes an adapter that is not the only one loaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from recsift.monitoring.metrics import Metrics
from recsift.trainer.registry import AdapterRegistry, version_number
from recsift.vocab import Attempt

log = logging.getLogger(__name__)

BASE = "base"  # the version label of the base model with no adapter


class Served(Protocol):
    """What the engine serves: BIGRec's :class:`~recsift.trainer.recommender.Recommender` (the base LLM and its
    adapters) or TIGER's :class:`~recsift.trainer.tiger.recommender.TigerRecommender` (a T5 and its IDs)."""

    def recommend_batch(self, histories: Sequence[Sequence[str]], k: int = 10,
                        generate: bool = True) -> list[list[tuple[str, float]]]: ...

    def rank_candidates(self, history: Sequence[str], items: Sequence[str], k: int,
                        rule: str = ...) -> list[tuple[str, float]]: ...

    def use_adapter(self, path: str | Path, name: str, keep_previous: bool = False) -> None: ...

    def unload_adapter(self, name: str, then: str) -> None: ...

    def adapter_bytes(self) -> int: ...


class Overloaded(RuntimeError):
    """The request queue is full: the caller answers 503 at once rather than waiting."""


@dataclass
class Request:
    """One recommendation request and, once ``done`` is set, its answer (``items`` or ``error``)."""

    history: list[str]
    k: int
    candidates: list[str] | None = None
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    items: list[tuple[str, float]] | None = None
    version: str = ""
    error: str | None = None
    abandoned: bool = False  # the caller stopped waiting (timeout): not worth running


@dataclass
class Command:
    """An adapter change asked for through the API, run by the engine thread between batches."""

    action: Literal["load", "unload"]
    name: str
    path: Path | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class Engine:
    def __init__(self, recommender: Served, metrics: Metrics, *, follow: Literal["registry", "api"],
                 registry: AdapterRegistry | None, generate: bool, candidate_rule: str, max_batch: int,
                 max_wait_s: float, queue_size: int, watch_interval_s: float, retry_s: float = 30.0,
                 between_batches: Callable[[], None] | None = None) -> None:
        if follow == "registry" and registry is None:
            raise ValueError("following the registry needs a registry")
        self.rec, self.metrics, self.follow, self.registry = recommender, metrics, follow, registry
        self.generate, self.candidate_rule = generate, candidate_rule
        self.max_batch, self.max_wait_s, self.queue_size = max_batch, max_wait_s, queue_size
        self.watch_interval_s, self.retry_s = watch_interval_s, retry_s
        self.between_batches = between_batches
        self.loaded: list[str] = []  # adapters in memory, oldest first; the last one serves
        self.failed: dict[str, float] = {}  # version → when it failed to load (registry mode)
        self.heartbeat = time.monotonic()
        self.ready = threading.Event()
        self._cond = threading.Condition()
        self._requests: deque[Request] = deque()
        self._commands: deque[Command] = deque()
        self._stop = threading.Event()
        self._next_look = 0.0
        self._thread = threading.Thread(target=self._loop, name="recsift-serve-engine", daemon=True)

    @property
    def version(self) -> str:
        return self.loaded[-1] if self.loaded else BASE

    # ---------------------------------------------------------------- callers (HTTP threads)

    def submit(self, request: Request) -> None:
        """Queue a request; :class:`Overloaded` when ``queue_size`` are already waiting."""
        with self._cond:
            if len(self._requests) >= self.queue_size:
                raise Overloaded(f"{len(self._requests)} requests are waiting (serve.queue_size)")
            self._requests.append(request)
            self.metrics.serve_queue.set(len(self._requests))
            self._cond.notify_all()

    def load(self, name: str, path: Path, timeout_s: float) -> None:
        """Load an adapter and serve it (API mode); raises what loading raised (``InvalidAdapter`` for a bad
        directory), the old adapter serving on."""
        self._command(Command("load", name, path), timeout_s)

    def unload(self, name: str, timeout_s: float) -> None:
        """Unload an adapter (API mode); the newest remaining one serves if it was serving. LookupError: not
        loaded; ValueError: the only one loaded."""
        self._command(Command("unload", name), timeout_s)

    def _command(self, command: Command, timeout_s: float) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify_all()
        if not command.done.wait(timeout_s):
            raise TimeoutError(f"the engine did not {command.action} {command.name} within {timeout_s:.0f} s")
        if command.error is not None:
            raise command.error

    # ---------------------------------------------------------------- the engine thread

    def start(self) -> Engine:
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        with self._cond:  # whoever still waits gets an answer
            for r in self._requests:
                r.error = "the server is stopping"
                r.done.set()
            self._requests.clear()

    def _loop(self) -> None:
        self._publish_adapter()
        if self.follow == "registry":
            self._follow_registry()
        self.ready.set()
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            self._run_commands()
            if self.follow == "registry":
                self._follow_registry()
            if self.between_batches is not None:
                try:
                    self.between_batches()
                except Exception:  # e.g. a catalogue re-index that failed: serving goes on, it runs again
                    log.exception("between batches")
            batch = self._take()
            if batch:
                if self.follow == "registry":  # a promotion made while the batch gathered serves it
                    self._follow_registry(force=True)
                self._run(batch)

    def _take(self) -> list[Request]:
        """The next batch: waits up to ``watch_interval_s`` for a first request, then up to ``max_wait_s``
        for more (or until ``max_batch`` are there); abandoned requests are dropped."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._requests or self._commands or self._stop.is_set(),
                                       timeout=self.watch_interval_s) or not self._requests:
                return []
            deadline = self._requests[0].arrived + self.max_wait_s
            while len(self._requests) < self.max_batch and not self._commands and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(timeout=left):
                    break
            batch: list[Request] = []
            while self._requests and len(batch) < self.max_batch:
                r = self._requests.popleft()
                if not r.abandoned:
                    batch.append(r)
            self.metrics.serve_queue.set(len(self._requests))
        return batch

    def _run(self, batch: list[Request]) -> None:
        version = self.version
        self.metrics.serve_batch.observe(len(batch))
        generated = [r for r in batch if r.candidates is None]
        try:
            if generated:
                k = max(r.k for r in generated)
                ranked = self.rec.recommend_batch([r.history for r in generated], k, self.generate)
                for r, items in zip(generated, ranked, strict=True):
                    r.items = items[:r.k]
        except Exception as exc:  # a failed batch answers its requests with the error; the engine goes on
            log.exception("a batch of %d requests failed", len(generated))
            for r in generated:
                r.error = f"{type(exc).__name__}: {exc}"
        for r in batch:
            if r.candidates is not None:
                try:
                    r.items = self.rec.rank_candidates(r.history, r.candidates, r.k, self.candidate_rule)
                except Exception as exc:
                    log.exception("a candidate request failed")
                    r.error = f"{type(exc).__name__}: {exc}"
        for r in batch:
            r.version = version
            r.done.set()

    # ---------------------------------------------------------------- adapters

    def _follow_registry(self, force: bool = False) -> None:
        now = time.monotonic()
        if now < self._next_look and not force:
            return
        self._next_look = now + self.watch_interval_s
        assert self.registry is not None
        name = self.registry.pointer()
        if name is None or name == self.version:
            return
        failed_at = self.failed.get(name)
        if failed_at is not None and now - failed_at < self.retry_s:
            return
        try:
            current = self.registry.get(name)
        except LookupError as exc:  # the pointer names a version that is not (or no longer) there
            self._failed_swap(str(exc), name)
            return
        try:
            self._swap(current.name, current.path, keep_previous=False)
        except Exception as exc:
            self._failed_swap(f"{type(exc).__name__}: {exc}", current.name)

    def _failed_swap(self, error: str, name: str | None) -> None:
        if name is not None:
            self.failed[name] = time.monotonic()
        self.metrics.serve_swaps.labels(Attempt.FAILED).inc()
        log.error("cannot serve adapter %s (still serving %s): %s", name or "?", self.version, error)

    def _swap(self, name: str, path: Path, keep_previous: bool) -> None:
        started = time.perf_counter()
        previous = self.version
        self.rec.use_adapter(path, name, keep_previous=keep_previous)
        self.loaded = [n for n in self.loaded if n != name and (keep_previous or n != previous)] + [name]
        self.failed.pop(name, None)
        took = time.perf_counter() - started
        self.metrics.serve_swaps.labels(Attempt.OK).inc()
        self.metrics.serve_swap_duration.observe(took)
        self._publish_adapter()
        log.info("serving adapter %s (was %s; swap %.2f s)", name, previous, took)

    def _run_commands(self) -> None:
        while True:
            with self._cond:
                if not self._commands:
                    return
                command = self._commands.popleft()
            try:
                if command.action == "load":
                    assert command.path is not None
                    self._swap(command.name, command.path, keep_previous=True)
                else:
                    self._unload(command.name)
            except Exception as exc:  # the caller gets it; the engine goes on serving what it served
                command.error = exc
                if command.action == "load":
                    self._failed_swap(f"{type(exc).__name__}: {exc}", command.name)
            command.done.set()

    def _unload(self, name: str) -> None:
        if name not in self.loaded:
            raise LookupError(f"adapter {name!r} is not loaded")
        if self.loaded == [name]:
            raise ValueError(f"adapter {name!r} is the only one loaded and serving; load another first")
        self.rec.unload_adapter(name, then=[n for n in self.loaded if n != name][-1])
        self.loaded.remove(name)
        self._publish_adapter()

    def _publish_adapter(self) -> None:
        m = self.metrics
        m.serve_version.set(version_number(self.version))
        m.serve_adapters_loaded.set(len(self.loaded))
        m.serve_adapter_bytes.set(self.rec.adapter_bytes())
