"""The item catalogue: item id → title and attributes, read from a file or followed on a catalogue topic.

An empty :class:`Catalog` means "no catalogue": every item id is accepted and titles read ``item <id>``.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from recsift.config import StreamConfig
from recsift.stream.events import parse_id
from recsift.stream.kafka import kafka_client_config


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
            item_id = parse_id(obj, "item_id")
            title = obj.get("title")
            if not isinstance(title, str) or not title.strip():
                return False
        except (ValueError, TypeError, AttributeError):  # InvalidField is a ValueError
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


class CatalogTopicReader:
    """Reads a catalog topic (JSON items) from the beginning, without a consumer group, and follows it."""

    def __init__(self, cfg: StreamConfig, embedded: bool, catalog: Catalog) -> None:
        from kafka import KafkaConsumer, TopicPartition

        assert cfg.catalog_topic is not None
        self.catalog = catalog
        self.invalid = 0
        self.consumer = KafkaConsumer(**kafka_client_config(cfg, embedded), enable_auto_commit=False, group_id=None)
        parts = self.consumer.partitions_for_topic(cfg.catalog_topic) or set()
        self.consumer.assign([TopicPartition(cfg.catalog_topic, p) for p in parts])
        self.consumer.seek_to_beginning()

    def poll(self, timeout_ms: int = 0) -> int:
        """Apply new catalog messages; returns how many items were added or updated."""
        n = 0
        for recs in self.consumer.poll(timeout_ms=timeout_ms).values():
            for r in recs:
                if self.catalog.update_from_message(r.value or b""):
                    n += 1
                else:
                    self.invalid += 1
        return n

    def catch_up(self, timeout_s: float = 30.0) -> int:
        """Read until every partition is at its high-water mark (or ``timeout_s`` passes)."""
        deadline = time.monotonic() + timeout_s
        n = self.poll(500)
        while time.monotonic() < deadline:
            n += self.poll(200)
            tps = self.consumer.assignment()
            if all(
                (hw := self.consumer.highwater(tp)) is not None and self.consumer.position(tp) >= hw for tp in tps
            ):
                break
        return n

    def close(self) -> None:
        self.consumer.close(autocommit=False)
