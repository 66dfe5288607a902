"""The item catalogue a configuration names, read without a broker (one place for every role)."""

from __future__ import annotations

from pathlib import Path

from recsift.config import Settings
from recsift.data.datasets import catalog_for, resolve_dataset
from recsift.data.synthetic import SyntheticStream
from recsift.stream.catalog import Catalog


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
