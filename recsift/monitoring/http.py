"""The HTTP surface: /metrics, /healthz, /readyz, /status and the token-guarded /admin/* endpoints.

- ``GET /metrics``: Prometheus text format from this process's registry;
- ``GET /healthz``: 200 while the ingest loop is alive (it iterated within ``liveness_s``), else 503;
- ``GET /readyz``: 200 when the source reaches its broker and is caught up (total consumer lag ≤
  ``ready_lag``), else 503;
- ``GET /status``: JSON (offsets, lag, coreset, last refresh, serving adapter, paused);
- ``POST /admin/refresh | pause | resume | rollback``: need ``Authorization: Bearer <token>``. With no
  token configured the admin endpoints answer 404 (disabled); a wrong or missing token answers 401 and
  is counted (``recsift_admin_auth_failures_total``). Tokens are compared in constant time and never
  logged. Bound to 127.0.0.1 unless configured otherwise.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from recsift.monitoring.metrics import Metrics
from recsift.vocab import AdminAction

log = logging.getLogger(__name__)

@dataclass
class Endpoints:
    """What the HTTP surface reads and calls; the service fills it in."""

    metrics: Metrics
    heartbeat: Callable[[], float] = time.monotonic  # monotonic time of the loop's last iteration
    lag: Callable[[], dict[int, int]] = dict
    connected: Callable[[], bool] = lambda: True  # the source reaches its broker
    status: Callable[[], dict[str, Any]] = dict
    actions: dict[AdminAction, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    token: SecretStr | None = None
    liveness_s: float = 30.0
    ready_lag: int = 10_000


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj, default=str).encode())

    def do_GET(self) -> None:
        ep = self.server.endpoints
        if self.path == "/metrics":
            self._send(200, generate_latest(ep.metrics.registry), CONTENT_TYPE_LATEST)
        elif self.path == "/healthz":
            age = time.monotonic() - ep.heartbeat()
            self._json(200 if age <= ep.liveness_s else 503, {"alive": age <= ep.liveness_s, "loop_age_s": age})
        elif self.path == "/readyz":
            lag, connected = sum(ep.lag().values()), ep.connected()
            ready = connected and lag <= ep.ready_lag
            self._json(200 if ready else 503, {"ready": ready, "lag": lag, "connected": connected})
        elif self.path == "/status":
            try:
                self._json(200, ep.status())
            except Exception as exc:  # a status read racing the pipeline must not reset the connection
                log.exception("status failed")
                self._json(500, {"error": f"{type(exc).__name__}: {exc}"})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        ep = self.server.endpoints
        if not self.path.startswith("/admin/"):
            self._json(404, {"error": "not found"})
            return
        action = self.path.removeprefix("/admin/")
        if ep.token is None:
            self._json(404, {"error": "admin endpoints are disabled (no admin.token configured)"})
            return
        given = self.headers.get("Authorization", "")
        expected = "Bearer " + ep.token.get_secret_value()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            ep.metrics.admin_auth_failures.inc()
            self._json(401, {"error": "unauthorized"})
            return
        known = {str(a): a for a in ep.actions}
        if action not in known:
            self._json(404, {"error": f"unknown admin action {action!r}; one of {sorted(known)}"})
            return
        try:
            result = ep.actions[known[action]]()
        except LookupError as exc:
            self._json(409, {"error": str(exc)})
            return
        except Exception as exc:  # an admin action must not take the server down
            log.exception("admin %s failed", action)
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})
            return
        ep.metrics.admin_requests.labels(action).inc()
        self._json(200, {"action": action, **result})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], endpoints: Endpoints) -> None:
        super().__init__(address, _Handler)
        self.endpoints = endpoints


class HttpServer:
    """The HTTP surface in a background thread; ``port`` 0 picks a free port (see ``.port``)."""

    def __init__(self, endpoints: Endpoints, host: str = "127.0.0.1", port: int = 9400) -> None:
        self.server = _Server((host, port), endpoints)
        self.host, self.port = host, self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="recsift-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> HttpServer:
        self.thread.start()
        log.info("metrics and admin on %s", self.url)
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
