"""``recsift serve``'s HTTP surface.

- ``POST /recommend``: ``{"history": [item ids, oldest first]}`` or ``{"user_id": ...}`` (the history a
  worker keeps, read from its state directory), ``"k"`` (default 10), optionally ``"candidates"`` (item ids
  to rank by likelihood instead of generating). Answers ``{"items": [{item_id, title, score}], "version"}``
  and the header ``X-Recsift-Adapter-Version``. A bad request gets 400 with ``{"error", "reason"}`` (an
  unknown user 404), a full queue 503 at once, an answer not ready within ``request_timeout_s`` 503.
- ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and ``POST /v1/unload_lora_adapter``
  ``{"lora_name"}``: vLLM's runtime LoRA API, so one promotion hook drives vLLM or recsift serve
  (``serve.follow: api``). They need ``Authorization: Bearer <admin.token>`` (404 without a token
  configured), and ``lora_path`` must lie inside the registry directory.
- ``GET /v1/models`` (vLLM's listing: the base model and the loaded adapters), ``/healthz`` (the engine
  thread is alive and iterating), ``/readyz`` (the model, titles and first adapter are loaded),
  ``/metrics``.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from recsift.config import ServeConfig
from recsift.monitoring.metrics import Metrics
from recsift.serving.engine import Engine, Overloaded, Request
from recsift.stream.catalog import Catalog
from recsift.trainer.recommender import InvalidAdapter
from recsift.vocab import ServeError

log = logging.getLogger(__name__)

VERSION_HEADER = "X-Recsift-Adapter-Version"
DRAIN_FACTOR = 16  # an oversize body up to this many times the limit is read and dropped; a larger one is not


class BadRequest(ValueError):
    def __init__(self, reason: ServeError, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason, self.status = reason, status


@dataclass
class ServeContext:
    """What the handlers read: the engine, the catalogue, where histories and adapters are."""

    engine: Engine
    catalog: Catalog
    metrics: Metrics
    cfg: ServeConfig
    base_model: str
    registry_root: Path
    history: Callable[[str], list[str] | None]  # user id → its history (None: not known)
    token: SecretStr | None


def parse_request(body: dict[str, Any], ctx: ServeContext) -> Request:
    """A validated :class:`Request` from a JSON body, or :class:`BadRequest` naming what is wrong."""
    cfg = ctx.cfg
    unknown_keys = set(body) - {"history", "user_id", "k", "candidates"}
    if unknown_keys:
        raise BadRequest(ServeError.INVALID_REQUEST, f"unknown fields {sorted(unknown_keys)}")
    if ("history" in body) == ("user_id" in body):
        raise BadRequest(ServeError.INVALID_REQUEST, "give exactly one of history and user_id")
    k = body.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= cfg.max_k:
        raise BadRequest(ServeError.K_OUT_OF_RANGE, f"k must be an integer from 1 to {cfg.max_k} (got {k!r})")
    if "user_id" in body:
        user = body["user_id"]
        if not isinstance(user, str | int) or isinstance(user, bool) or str(user) == "":
            raise BadRequest(ServeError.INVALID_REQUEST, "user_id must be a non-empty string or integer")
        history = ctx.history(str(user))
        if history is None:
            raise BadRequest(ServeError.UNKNOWN_USER, f"no history for user {str(user)[:64]!r}", status=404)
    else:
        history = item_ids(body["history"], "history", ctx)
    if not history:
        raise BadRequest(ServeError.EMPTY_HISTORY, "the history is empty: a recommendation needs at least one item")
    candidates = item_ids(body["candidates"], "candidates", ctx) if "candidates" in body else None
    if candidates is not None and not candidates:
        raise BadRequest(ServeError.INVALID_REQUEST, "candidates is empty")
    return Request(history[-cfg.max_items:], k, candidates)


def item_ids(value: Any, what: str, ctx: ServeContext) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(i, str | int) and not isinstance(i, bool) for i in value):
        raise BadRequest(ServeError.INVALID_REQUEST, f"{what} must be a list of item ids (strings or integers)")
    if len(value) > ctx.cfg.max_items:
        raise BadRequest(ServeError.INVALID_REQUEST, f"{what} has {len(value)} items; at most {ctx.cfg.max_items} "
                         "(serve.max_items)")
    ids = [str(i) for i in value]
    unknown = [i for i in dict.fromkeys(ids) if i not in ctx.catalog]
    if unknown:
        shown = ", ".join(repr(i[:40]) for i in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise BadRequest(ServeError.UNKNOWN_ITEM, f"{what} names items not in the catalogue: {shown}")
    return ids


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    body_read = False

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def _send(self, code: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None, close: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any, **kw: Any) -> None:
        self._send(code, json.dumps(obj).encode(), **kw)

    def _refuse(self, err: BadRequest, close: bool = False) -> None:
        self.server.ctx.metrics.serve_errors.labels(err.reason).inc()
        self._json(err.status, {"error": str(err), "reason": err.reason.value}, close=close)

    def _body(self) -> dict[str, Any]:
        """The JSON object in the request body; BadRequest (with the connection to be closed when the body
        was not read) otherwise."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest(ServeError.INVALID_REQUEST, "a JSON body with Content-Length is required")
        limit = self.server.ctx.cfg.max_body_bytes
        if int(length) > limit:
            if int(length) <= DRAIN_FACTOR * limit:  # read and drop it: closing on unread bytes resets the
                self.rfile.read(int(length))         # connection, and the client may lose the answer
                self.body_read = True
            raise BadRequest(ServeError.BODY_TOO_LARGE, f"the body has {int(length):,} bytes; at most {limit:,} "
                             "(serve.max_body_bytes)")
        raw = self.rfile.read(int(length))
        self.body_read = True
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(ServeError.MALFORMED_JSON, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest(ServeError.INVALID_REQUEST, "the body must be a JSON object")
        return body

    def do_GET(self) -> None:
        ctx = self.server.ctx
        engine = ctx.engine
        if self.path == "/metrics":
            self._send(200, generate_latest(ctx.metrics.registry), CONTENT_TYPE_LATEST)
        elif self.path == "/healthz":
            age = time.monotonic() - engine.heartbeat
            alive = engine.alive() and age <= ctx.cfg.request_timeout_s
            self._json(200 if alive else 503, {"alive": alive, "loop_age_s": age})
        elif self.path == "/readyz":
            ready = engine.ready.is_set() and engine.alive()
            self._json(200 if ready else 503, {"ready": ready, "version": engine.version})
        elif self.path == "/v1/models":
            models = [{"id": ctx.base_model, "object": "model", "root": ctx.base_model, "parent": None}]
            models += [{"id": n, "object": "model", "root": str(ctx.registry_root / n), "parent": ctx.base_model}
                       for n in engine.loaded]
            self._json(200, {"object": "list", "data": models})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path == "/recommend":
            self._recommend()
        elif self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            self._lora(self.path.removeprefix("/v1/"))
        else:
            self._json(404, {"error": "not found"}, close=True)

    def _recommend(self) -> None:
        ctx = self.server.ctx
        ctx.metrics.serve_requests.inc()
        started = time.monotonic()
        self.body_read = False
        try:
            request = parse_request(self._body(), ctx)
        except BadRequest as err:
            self._refuse(err, close=not self.body_read)  # an unread body would be taken for the next request
            return
        request.arrived = started
        try:
            ctx.engine.submit(request)
        except Overloaded as exc:
            self._refuse(BadRequest(ServeError.OVERLOADED, str(exc), status=503))
            return
        if not request.done.wait(ctx.cfg.request_timeout_s):
            request.abandoned = True
            self._refuse(BadRequest(ServeError.TIMEOUT, f"no answer within {ctx.cfg.request_timeout_s:.0f} s "
                                    "(serve.request_timeout_s)", status=503))
            return
        if request.error is not None or request.items is None:
            self._refuse(BadRequest(ServeError.INTERNAL, request.error or "no answer", status=500))
            return
        items = [{"item_id": i, "title": ctx.catalog.title(i), "score": score} for i, score in request.items]
        ctx.metrics.serve_latency.observe(time.monotonic() - started)
        self._json(200, {"items": items, "version": request.version}, headers={VERSION_HEADER: request.version})

    def _lora(self, action: str) -> None:
        ctx = self.server.ctx
        if ctx.token is None:
            self._json(404, {"error": "the LoRA endpoints are disabled (no admin.token configured)"}, close=True)
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), ("Bearer " + ctx.token.get_secret_value()).encode()):
            ctx.metrics.admin_auth_failures.inc()
            self._json(401, {"error": "unauthorized"}, close=True)
            return
        if ctx.cfg.follow != "api":
            self._json(409, {"error": "this server follows the adapter registry (serve.follow: registry); "
                             "run it with serve.follow=api to load adapters through this endpoint"}, close=True)
            return
        try:
            body = self._body()
            name = body.get("lora_name")
            if not isinstance(name, str) or not name or "/" in name:
                raise BadRequest(ServeError.INVALID_REQUEST, "lora_name must be a non-empty name")
            if action == "load_lora_adapter":
                ctx.engine.load(name, self._adapter_path(body.get("lora_path")), ctx.cfg.request_timeout_s)
                message = f"Success: LoRA adapter '{name}' added successfully."
            else:
                ctx.engine.unload(name, ctx.cfg.request_timeout_s)
                message = f"Success: LoRA adapter '{name}' removed successfully."
        except BadRequest as err:
            self._json(err.status, {"error": str(err)}, close=True)
            return
        except LookupError as exc:
            self._json(404, {"error": str(exc)})
            return
        except (InvalidAdapter, ValueError) as exc:
            self._json(400, {"error": str(exc)})
            return
        except TimeoutError as exc:
            self._json(503, {"error": str(exc)})
            return
        self._send(200, message.encode(), "text/plain; charset=utf-8")

    def _adapter_path(self, value: Any) -> Path:
        root = self.server.ctx.registry_root.resolve()
        if not isinstance(value, str) or not value:
            raise BadRequest(ServeError.INVALID_REQUEST, "lora_path must be a directory path")
        path = Path(value).resolve()
        if not path.is_relative_to(root):
            raise BadRequest(ServeError.INVALID_REQUEST, f"lora_path must lie inside the registry directory {root}")
        return path


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # socketserver's 5 resets connections when many clients connect at once

    def __init__(self, address: tuple[str, int], ctx: ServeContext) -> None:
        super().__init__(address, _Handler)
        self.ctx = ctx


class ServeHttp:
    """The HTTP surface in a background thread; ``port`` 0 picks a free port (see ``.port``)."""

    def __init__(self, ctx: ServeContext, host: str, port: int) -> None:
        self.server = _Server((host, port), ctx)
        self.host, self.port = host, self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="recsift-serve-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServeHttp:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
