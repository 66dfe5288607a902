"""Full validation of a raw message: the schema (:func:`~recsift.stream.events.parse_event`), then the
catalogue (unknown items) and duplicate (event id) checks, which need state."""

from __future__ import annotations

from recsift.stream.catalog import Catalog
from recsift.stream.dedup import DedupIndex
from recsift.stream.events import Event, Rejection, parse_event
from recsift.vocab import RejectReason


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
