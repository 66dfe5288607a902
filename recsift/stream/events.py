"""Interaction events: the schema and its stateless validation.

An event is one JSON object::

    {"event_id": "e1", "user_id": "u7", "item_id": "i42", "timestamp": 1700000000.5,
     "kind": "click", "value": 1.0}

``timestamp`` is epoch seconds (int or float) or an ISO-8601 string (naive means UTC); ``kind`` and
``value`` are optional. Every input that is not a valid event is rejected with one reason from
:class:`~recsift.vocab.RejectReason`, counted, and written with its raw payload to a dead-letter sink
(:mod:`recsift.stream.deadletter`). Nothing is dropped silently and nothing raises out of
:func:`parse_event` or :meth:`recsift.stream.validator.Validator.validate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

import orjson

from recsift.vocab import RejectReason

MAX_ID_LENGTH = 256
MAX_EPOCH_SECONDS = 1e11  # year 5138: anything above is a unit error (milliseconds), not a time


class Event(NamedTuple):
    """One accepted interaction (a NamedTuple: built once per message on the hot path, so it must be cheap)."""

    event_id: str
    user_id: str
    item_id: str
    ts: float
    kind: str | None = None
    value: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "timestamp": self.ts,
        }
        if self.kind is not None:
            out["kind"] = self.kind
        if self.value is not None:
            out["value"] = self.value
        return out

    def encode(self) -> bytes:
        return orjson.dumps(self.to_json())


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    detail: str
    payload: bytes


class InvalidField(ValueError):
    """A field that breaks the schema, with the reject reason it maps to."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_id(obj: dict[str, Any], name: str) -> str:
    """The id field ``name`` of a decoded message: a string or integer, 1–256 characters, no edge spaces."""
    if name not in obj or obj[name] is None:
        raise InvalidField(RejectReason.MISSING_FIELD, f"missing field {name!r}")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidField(RejectReason.INVALID_FIELD, f"{name} must be a string or integer, got {type(value).__name__}")
    text = str(value)
    if not text or len(text) > MAX_ID_LENGTH or text.strip() != text:
        raise InvalidField(RejectReason.INVALID_FIELD, f"{name} must be 1-{MAX_ID_LENGTH} characters without edge spaces")
    return text


def parse_timestamp(value: Any) -> float:
    """Epoch seconds from a number or an ISO-8601 string; raises ValueError on anything else."""
    if isinstance(value, bool):
        raise ValueError("timestamp must be a number or ISO-8601 string, got bool")
    if isinstance(value, (int, float)):
        ts = float(value)
    elif isinstance(value, str):
        try:
            ts = float(value)
        except ValueError:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            ts = dt.timestamp()
    else:
        raise ValueError(f"timestamp must be a number or ISO-8601 string, got {type(value).__name__}")
    if not math.isfinite(ts) or ts < 0 or ts >= MAX_EPOCH_SECONDS:
        raise ValueError(f"timestamp {value!r} is not epoch seconds in [0, 1e11)")
    return ts


def parse_event(payload: bytes, max_bytes: int) -> Event | Rejection:
    """Decode and check one raw message. Stateless; :class:`~recsift.stream.validator.Validator` adds the
    catalog and dedup checks."""
    if len(payload) > max_bytes:
        return Rejection(RejectReason.OVERSIZE, f"{len(payload)} bytes > limit {max_bytes}", payload)
    try:
        obj = orjson.loads(payload)
    except ValueError as exc:  # also invalid UTF-8, NaN/Infinity literals and integers beyond 64 bits
        return Rejection(RejectReason.MALFORMED_JSON, str(exc)[:200], payload)
    if type(obj) is not dict:
        return Rejection(RejectReason.MALFORMED_JSON, f"expected a JSON object, got {type(obj).__name__}", payload)
    # Fast path: the common shape (string ids, numeric epoch seconds, no optional fields).
    event_id, user_id, item_id, ts = obj.get("event_id"), obj.get("user_id"), obj.get("item_id"), obj.get("timestamp")
    if (
        len(obj) == 4
        and type(ts) in (float, int)
        and 0 <= ts < MAX_EPOCH_SECONDS  # type: ignore[operator]  # ts is a number here: type() narrows it
        and type(event_id) is str
        and type(user_id) is str
        and type(item_id) is str
        and 0 < len(event_id) <= MAX_ID_LENGTH
        and 0 < len(user_id) <= MAX_ID_LENGTH
        and 0 < len(item_id) <= MAX_ID_LENGTH
        and not (event_id[0].isspace() or event_id[-1].isspace() or user_id[0].isspace() or user_id[-1].isspace()
                 or item_id[0].isspace() or item_id[-1].isspace())
    ):
        return Event(event_id, user_id, item_id, float(ts))  # type: ignore[arg-type]
    return _parse_slow(obj, payload)


def _parse_slow(obj: dict[str, Any], payload: bytes) -> Event | Rejection:
    """Every other shape, with a precise reason when it is not a valid event."""
    try:
        event_id = parse_id(obj, "event_id")
        user_id = parse_id(obj, "user_id")
        item_id = parse_id(obj, "item_id")
        if obj.get("timestamp") is None:
            raise InvalidField(RejectReason.MISSING_FIELD, "missing field 'timestamp'")
        try:
            ts = parse_timestamp(obj["timestamp"])
        except ValueError as exc:
            raise InvalidField(RejectReason.INVALID_FIELD, str(exc)) from None
        kind = obj.get("kind")
        if kind is not None and (not isinstance(kind, str) or len(kind) > 64):
            raise InvalidField(RejectReason.INVALID_FIELD, "kind must be a string of at most 64 characters")
        value = obj.get("value")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidField(RejectReason.INVALID_FIELD, "value must be a finite number")
            value = float(value)
    except InvalidField as exc:
        return Rejection(exc.reason, exc.detail, payload)
    return Event(event_id, user_id, item_id, ts, kind, value)
