"""Promotion hooks (``trainer.on_promote``): serving stacks recsift does not run learn of every change of the
serving adapter.

A :class:`PromotionNotifier` thread reads the registry's ``current`` pointer every ``poll_s`` and brings each
target up to it; so a promotion or rollback, whichever process made it (a refresh, an admin rollback,
``recsift adapters promote``), is never delayed by a target: it only moved the pointer. A failed delivery
is counted and retried with exponential backoff (1 s doubling up to the target's ``max_backoff_s``) until it
succeeds or the pointer moves on, in which case the newest version is delivered (changes in between are
coalesced: a target learns the state, not every step). What each target was last told is kept in
``<state_dir>/hooks.json``, so a restarted trainer neither repeats nor skips a delivery.

Targets:

- ``vllm``: vLLM's runtime LoRA API (the server runs with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``):
  ``POST /v1/load_lora_adapter`` ``{"lora_name": version, "lora_path": <lora_root>/version}``, then
  ``POST /v1/unload_lora_adapter`` ``{"lora_name": <the version it replaces>}``. ``recsift serve`` with
  ``serve.follow: api`` answers the same endpoints. A load answered "already loaded" counts as delivered;
  a failed unload is logged and counted, not retried (the new adapter serves either way).
- ``webhook``: a JSON POST ``{"event": "promote"|"rollback", "version", "previous", "path", "metadata",
  "at"}`` with ``X-Recsift-Signature: sha256=<hex HMAC-SHA256 of the body under the target's secret>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from recsift.config import HookTarget
from recsift.monitoring.metrics import Metrics
from recsift.trainer.registry import AdapterRegistry, AdapterVersion, version_number
from recsift.vocab import Attempt

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Recsift-Signature"


class DeliveryFailed(RuntimeError):
    """A target did not accept a change (unreachable, or an error status)."""


@dataclass(frozen=True)
class Change:
    """What a target is told: the serving version now, and what it was told before (None: nothing yet)."""

    event: str  # promote | rollback
    version: AdapterVersion
    previous: str | None
    at: float


class Target(Protocol):
    name: str
    max_backoff_s: float

    def deliver(self, change: Change) -> None:
        """Tell the target; :class:`DeliveryFailed` when it did not accept."""


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """(status, response text) of a JSON POST; DeliveryFailed when the target cannot be reached."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, urllib.error.URLError) as exc:
        raise DeliveryFailed(f"{url}: {exc}") from exc


class VllmTarget:
    def __init__(self, spec: HookTarget, name: str, registry_root: Path, metrics: Metrics) -> None:
        self.name, self.spec, self.metrics = name, spec, metrics
        self.max_backoff_s = spec.max_backoff_s
        self.root = spec.lora_root.rstrip("/") if spec.lora_root else str(registry_root.resolve())

    def _post(self, endpoint: str, body: dict[str, Any]) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {self.spec.api_key.get_secret_value()}"} if self.spec.api_key else {}
        return post(f"{self.spec.url.rstrip('/')}/v1/{endpoint}", json.dumps(body).encode(), headers,
                    self.spec.timeout_s)

    def deliver(self, change: Change) -> None:
        name = change.version.name
        status, text = self._post("load_lora_adapter", {"lora_name": name, "lora_path": f"{self.root}/{name}"})
        if status != 200 and not (status == 400 and "already" in text.lower()):
            raise DeliveryFailed(f"load_lora_adapter {name}: HTTP {status}: {text[:200]}")
        if change.previous is not None and change.previous != name:
            try:
                status, text = self._post("unload_lora_adapter", {"lora_name": change.previous})
                if status != 200:
                    raise DeliveryFailed(f"HTTP {status}: {text[:200]}")
            except DeliveryFailed as exc:  # the new adapter is loaded; the old one only costs memory there
                self.metrics.hook_unload_failures.labels(self.name).inc()
                log.warning("promotion hook %s: unloading %s failed: %s", self.name, change.previous, exc)


class WebhookTarget:
    def __init__(self, spec: HookTarget, name: str) -> None:
        assert spec.secret is not None  # the config requires it
        self.name, self.spec, self.max_backoff_s = name, spec, spec.max_backoff_s

    def deliver(self, change: Change) -> None:
        v = change.version
        body = json.dumps({"event": change.event, "version": v.name, "previous": change.previous,
                           "path": str(v.path.resolve()), "metadata": v.metadata, "at": change.at},
                          sort_keys=True, default=str).encode()
        assert self.spec.secret is not None
        signature = hmac.new(self.spec.secret.get_secret_value().encode(), body, hashlib.sha256).hexdigest()
        status, text = post(self.spec.url, body, {SIGNATURE_HEADER: f"sha256={signature}",
                                                  "X-Recsift-Event": change.event}, self.spec.timeout_s)
        if not 200 <= status < 300:
            raise DeliveryFailed(f"HTTP {status}: {text[:200]}")


def build_targets(specs: tuple[HookTarget, ...], registry_root: Path, metrics: Metrics) -> list[Target]:
    targets: list[Target] = []
    for i, spec in enumerate(specs):
        name = spec.name or f"{spec.type}-{i}"
        targets.append(VllmTarget(spec, name, registry_root, metrics) if spec.type == "vllm" else WebhookTarget(spec, name))
    if len({t.name for t in targets}) != len(targets):
        raise ValueError("two trainer.on_promote targets have the same name")
    return targets


class PromotionNotifier:
    """Brings every target up to the registry's current version, in a background thread (see the module)."""

    def __init__(self, registry: AdapterRegistry, targets: list[Target], metrics: Metrics, state_path: Path,
                 poll_s: float = 1.0) -> None:
        self.registry, self.targets, self.metrics = registry, targets, metrics
        self.state_path, self.poll_s = state_path, poll_s
        self.told: dict[str, str | None] = dict.fromkeys((t.name for t in targets), None)
        if state_path.is_file():
            saved = json.loads(state_path.read_text())
            self.told.update({k: v for k, v in saved.items() if k in self.told})
        self._next_try = dict.fromkeys(self.told, 0.0)
        self._backoff = dict.fromkeys(self.told, 1.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="recsift-promotion-hooks", daemon=True)
        for t in targets:
            for attempt in Attempt:
                metrics.hook_deliveries.labels(t.name, attempt.value)
            metrics.hook_unload_failures.labels(t.name)
            metrics.hook_version.labels(t.name).set(version_number(self.told[t.name]))

    def start(self) -> PromotionNotifier:
        self._thread.start()
        return self

    def close(self, final_s: float = 10.0) -> None:
        """Stop; a change not yet delivered gets one more try within ``final_s``. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(final_s)
        if not self._thread.is_alive():
            self.sync(force=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.sync()
            except Exception:  # a registry read racing a write, say: the next poll reads again
                log.exception("promotion hooks")

    def sync(self, force: bool = False) -> None:
        """One pass: deliver the current version to every target that does not have it and is due."""
        name = self.registry.pointer()  # one small read per poll; the version's files only when needed
        if name is None:
            return
        now = time.monotonic()
        due = []
        for t in self.targets:
            behind = self.told[t.name] != name
            self.metrics.hook_pending.labels(t.name).set(int(behind))
            if behind and (force or now >= self._next_try[t.name]):
                due.append(t)
        if not due:
            return
        current, event = self.registry.get(name), self._event()
        for t in due:
            told = self.told[t.name]
            try:
                t.deliver(Change(event, current, told, time.time()))
            except DeliveryFailed as exc:
                self.metrics.hook_deliveries.labels(t.name, Attempt.FAILED).inc()
                self._next_try[t.name] = now + self._backoff[t.name]
                log.warning("promotion hook %s: %s not delivered (retry in %.0f s): %s", t.name, current.name,
                            self._backoff[t.name], exc)
                self._backoff[t.name] = min(self._backoff[t.name] * 2, t.max_backoff_s)
                continue
            self.metrics.hook_deliveries.labels(t.name, Attempt.OK).inc()
            self.metrics.hook_pending.labels(t.name).set(0)
            self.metrics.hook_version.labels(t.name).set(version_number(current.name))
            self.told[t.name], self._backoff[t.name] = current.name, 1.0
            self._save()
            log.info("promotion hook %s: told %s (%s)", t.name, current.name, event)

    def _event(self) -> str:
        last = self.registry.last_change()
        return "rollback" if last is not None and str(last.get("reason", "")).startswith("rollback") else "promote"

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.told))
        tmp.replace(self.state_path)
