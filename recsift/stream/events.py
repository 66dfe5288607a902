"""Interaction events: schema, validation, the item catalog and dead-letter sinks.

An event is one JSON object::

    {"event_id": "e1", "user_id": "u7", "item_id": "i42", "timestamp": 1700000000.5,
     "kind": "click", "value": 1.0}

``timestamp`` is epoch seconds (int or float) or an ISO-8601 string (naive means UTC); ``kind`` and
``value`` are optional. Every input that is not a valid event is rejected with one reason from
:class:`RejectReason`, counted, and written with its raw payload to a dead-letter sink. Nothing is
dropped silently and nothing raises out of :meth:`Validator.validate`.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

import orjson

MAX_ID_LENGTH = 256
MAX_EPOCH_SECONDS = 1e11  # year 5138: anything above is a unit error (milliseconds), not a time


class RejectReason(str, Enum):
    """The fixed set of reasons an input is rejected (a Prometheus label: keep it small)."""

    MALFORMED_JSON = "malformed_json"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    OVERSIZE = "oversize"
    UNKNOWN_ITEM = "unknown_item"
    DUPLICATE = "duplicate"


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


class _Invalid(Exception):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _as_id(obj: dict[str, Any], name: str) -> str:
    if name not in obj or obj[name] is None:
        raise _Invalid(RejectReason.MISSING_FIELD, f"missing field {name!r}")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Invalid(RejectReason.INVALID_FIELD, f"{name} must be a string or integer, got {type(value).__name__}")
    text = str(value)
    if not text or len(text) > MAX_ID_LENGTH or text.strip() != text:
        raise _Invalid(RejectReason.INVALID_FIELD, f"{name} must be 1-{MAX_ID_LENGTH} characters without edge spaces")
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
    """Decode and check one raw message. Stateless; see :class:`Validator` for catalog and dedup checks."""
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
        and 0 <= ts < MAX_EPOCH_SECONDS
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
        event_id = _as_id(obj, "event_id")
        user_id = _as_id(obj, "user_id")
        item_id = _as_id(obj, "item_id")
        if obj.get("timestamp") is None:
            raise _Invalid(RejectReason.MISSING_FIELD, "missing field 'timestamp'")
        try:
            ts = parse_timestamp(obj["timestamp"])
        except ValueError as exc:
            raise _Invalid(RejectReason.INVALID_FIELD, str(exc)) from None
        kind = obj.get("kind")
        if kind is not None and (not isinstance(kind, str) or len(kind) > 64):
            raise _Invalid(RejectReason.INVALID_FIELD, "kind must be a string of at most 64 characters")
        value = obj.get("value")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise _Invalid(RejectReason.INVALID_FIELD, "value must be a finite number")
            value = float(value)
    except _Invalid as exc:
        return Rejection(exc.reason, exc.detail, payload)
    return Event(event_id, user_id, item_id, ts, kind, value)


# --------------------------------------------------------------------------------------------- catalog


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    title: str
    attributes: dict[str, str] = field(default_factory=dict)


class Catalog:
    """item_id → :class:`Item`. Empty means "no catalog": every item id is accepted."""

    def __init__(self, items: Iterable[Item] = ()) -> None:
        self._items: dict[str, Item] = {it.item_id: it for it in items}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def __iter__(self) -> Iterator[Item]:
        return iter(self._items.values())

    def get(self, item_id: str) -> Item | None:
        return self._items.get(item_id)

    def title(self, item_id: str) -> str:
        item = self._items.get(item_id)
        return item.title if item is not None else f"item {item_id}"

    def add(self, item: Item) -> None:
        self._items[item.item_id] = item

    def update_from_message(self, payload: bytes) -> bool:
        """Apply one catalog-topic message (a JSON object with item_id and title); False if it is invalid."""
        try:
            obj = json.loads(payload)
            item_id = _as_id(obj, "item_id")
            title = obj.get("title")
            if not isinstance(title, str) or not title.strip():
                return False
        except (ValueError, TypeError, AttributeError, _Invalid):
            return False
        attrs = {k: str(v) for k, v in obj.items() if k not in ("item_id", "title") and v is not None}
        self.add(Item(item_id, title.strip(), attrs))
        return True

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        """Read a catalog file: DEALRec ``items.tsv``, a RecBole ``.item`` file, JSONL or CSV (item_id, title, ...)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"catalog file {path} does not exist")
        catalog = cls()
        with path.open(encoding="utf-8", newline="") as fh:
            if path.suffix == ".jsonl":
                for line in fh:
                    if line.strip() and not catalog.update_from_message(line.encode()):
                        raise ValueError(f"{path}: invalid catalog line {line[:80]!r}")
                return catalog
            delimiter = "," if path.suffix == ".csv" else "\t"
            reader = csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE)
            header = [h.split(":", 1)[0] for h in next(reader)]  # RecBole headers carry ":type"
            id_col = header.index("item_id")
            title_col = next(i for i, h in enumerate(header) if h in ("title", "movie_title", "name"))
            for row in reader:
                if len(row) <= max(id_col, title_col):
                    continue
                attrs = {h: row[i] for i, h in enumerate(header) if i not in (id_col, title_col) and i < len(row) and row[i]}
                catalog.add(Item(row[id_col], row[title_col], attrs))
        return catalog


# --------------------------------------------------------------------------------------------- dedup


class DedupIndex:
    """Recently accepted event ids, each tagged with its source partition, in two generations.

    Lookups check both generations; when the current one holds ``capacity / 2`` ids it becomes the previous
    one and the old previous generation is forgotten at once. So between ``capacity / 2`` and ``capacity``
    of the most recent ids are remembered (a duplicate arriving later than that is not detected), memory is
    bounded, and every operation is a plain dict access. Ids added since the last checkpoint are tracked
    for an incremental save; a forgotten generation is deleted there by its number.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._half = max(1, capacity // 2)
        self.generation = 0
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}
        self.added: dict[tuple[int, int], list[str]] = {}  # (partition, generation) → ids since the last checkpoint
        self.forgotten_below = 0  # generations below this number are gone

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def ids(self) -> dict[str, int]:
        return {**self._previous, **self._current}

    def seen_before(self, event_id: str, partition: int) -> bool:
        """True if the id is remembered; otherwise remember it and return False."""
        if self.capacity == 0:
            return False
        if event_id in self._current or event_id in self._previous:
            return True
        if len(self._current) >= self._half:
            self._previous = self._current
            self._current = {}
            self.generation += 1
            self.forgotten_below = self.generation - 1
            self.added = {k: v for k, v in self.added.items() if k[1] >= self.forgotten_below}
        self._current[event_id] = partition
        key = (partition, self.generation)
        ids = self.added.get(key)
        if ids is None:
            ids = self.added[key] = []
        ids.append(event_id)
        return False

    def restore(self, generation: int, rows: Iterable[tuple[str, int, int]]) -> None:
        """Load remembered ids ``(event_id, partition, generation)`` without marking them as changed."""
        self.generation = max(self.generation, generation)
        self.forgotten_below = max(0, self.generation - 1)
        for event_id, partition, gen in rows:
            if gen == self.generation:
                self._current[event_id] = partition
            elif gen == self.generation - 1:
                self._previous[event_id] = partition

    def drop_partitions(self, partitions: set[int]) -> None:
        for gen in (self._current, self._previous):
            for event_id in [e for e, p in gen.items() if p in partitions]:
                del gen[event_id]
        self.added = {k: v for k, v in self.added.items() if k[0] not in partitions}

    def clear_changes(self) -> None:
        self.added = {}


class Validator:
    """Full validation: :func:`parse_event`, then unknown-item and duplicate checks."""

    def __init__(self, max_bytes: int, catalog: Catalog, reject_unknown_items: bool, dedup: DedupIndex) -> None:
        self.max_bytes = max_bytes
        self.catalog = catalog
        self.reject_unknown_items = reject_unknown_items
        self.dedup = dedup

    def validate(self, payload: bytes, partition: int = 0) -> Event | Rejection:
        result = parse_event(payload, self.max_bytes)
        if isinstance(result, Rejection):
            return result
        if self.reject_unknown_items and len(self.catalog) and result.item_id not in self.catalog:
            return Rejection(RejectReason.UNKNOWN_ITEM, f"item {result.item_id!r} is not in the catalog", payload)
        if self.dedup.seen_before(result.event_id, partition):
            return Rejection(RejectReason.DUPLICATE, f"event_id {result.event_id!r} was already accepted", payload)
        return result


# --------------------------------------------------------------------------------------------- dead letters


def dead_letter_record(rejection: Rejection, source: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of a dead letter: reason, detail, where it came from and the raw payload."""
    record: dict[str, Any] = {
        "reason": rejection.reason.value,
        "detail": rejection.detail,
        "source": source,
        "rejected_at": time.time(),
    }
    try:
        record["payload"] = rejection.payload.decode("utf-8")
    except UnicodeDecodeError:
        record["payload_b64"] = base64.b64encode(rejection.payload).decode()
    return record


def dead_letter_payload(record: dict[str, Any]) -> bytes:
    """The original raw payload of a dead-letter record."""
    if "payload_b64" in record:
        return base64.b64decode(record["payload_b64"])
    return record["payload"].encode("utf-8")


class DeadLetterSink(Protocol):
    def write(self, rejection: Rejection, source: dict[str, Any], key: bytes | None) -> None: ...

    def flush(self) -> None:
        """Make every written record durable; called before each checkpoint."""

    def close(self) -> None: ...


class FileDeadLetterSink:
    """Appends dead letters as JSON lines; ``flush`` fsyncs so a checkpoint never outruns them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] = self.path.open("a", encoding="utf-8")

    def write(self, rejection: Rejection, source: dict[str, Any], key: bytes | None) -> None:
        self._fh.write(json.dumps(dead_letter_record(rejection, source), ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()
