"""The item catalogue a configuration names, read without a broker (one place for every role)."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path

from recsift.config import Settings
from recsift.data.datasets import catalog_for, resolve_dataset
from recsift.data.synthetic import SyntheticStream
from recsift.stream.catalog import Catalog, CatalogTopicReader

log = logging.getLogger(__name__)


def load_catalog(cfg: Settings) -> Catalog:
    """``stream.catalog_path``; else the file source's catalogue; else, on the embedded broker, its feed's (the
    synthetic stream's, or the shared dataset's). Empty when there is none (a catalogue topic, if configured,
    is read by :class:`~recsift.stream.catalog.CatalogTopicReader` on top)."""
    s = cfg.stream
    if s.catalog_path is not None:
        return Catalog.load(s.catalog_path)
    if s.source == "file" and s.file_path is not None:
        return catalog_for(Path(s.file_path)) or Catalog()
    if s.source == "embedded":
        if s.feed == "synthetic":
            return SyntheticStream(s.synthetic).catalog()
        return catalog_for(resolve_dataset(s.feed, s.data_dir)) or Catalog()
    return Catalog()


def followed_catalog(cfg: Settings, stack: ExitStack) -> tuple[Catalog, CatalogTopicReader | None]:
    """:func:`load_catalog`, caught up with ``stream.catalog_topic`` when one is set; the reader (closed with
    ``stack``) follows it further."""
    catalog = load_catalog(cfg)
    if not cfg.stream.catalog_topic:
        return catalog, None
    reader = CatalogTopicReader(cfg.stream, False, catalog)
    stack.callback(reader.close)
    log.info("catalog topic %r: %d items", cfg.stream.catalog_topic, reader.catch_up())
    return catalog, reader
