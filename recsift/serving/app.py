"""``recsift serve``: the base model + the serving adapter behind HTTP, swapping adapters as they are promoted
(with ``trainer.backend: tiger``, the serving TIGER version: its T5 and semantic IDs).

It loads ``trainer.base_model`` on ``trainer.device`` (CUDA when present), the catalogue the configuration
names (and follows ``stream.catalog_topic`` when set), indexes the titles (cached per model and catalogue),
and serves until ``stop`` is set. It writes nothing: the registry and the workers' state directories are
only read, so it runs beside them, on a read-only volume.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from recsift.config import Settings
from recsift.data.catalogs import followed_catalog
from recsift.monitoring.metrics import Metrics
from recsift.serving.engine import Engine, Served
from recsift.serving.http import ServeContext, ServeHttp
from recsift.stream.checkpoint import read_history
from recsift.trainer.llm import load_llm
from recsift.trainer.prompts import builder_for
from recsift.trainer.recommender import Recommender
from recsift.trainer.registry import AdapterRegistry
from recsift.trainer.tiger.recommender import TigerRecommender
from recsift.vocab import Role

log = logging.getLogger(__name__)

CATALOG_REINDEX_S = 60.0  # at most this often, new catalogue items are embedded and become recommendable


@dataclass
class ServeSummary:
    url: str
    version: str
    requests: int


def registry_dir(cfg: Settings) -> Path:
    return cfg.serve.registry_dir or cfg.checkpoint.state_dir / "adapters"


def history_reader(cfg: Settings) -> Callable[[str], list[str] | None]:
    """user id → the newest history any of the workers' state directories holds for it."""
    dbs = [d / "recsift.sqlite" for d in (cfg.serve.history_dirs or (cfg.checkpoint.state_dir,))]

    def read(user_id: str) -> list[str] | None:
        found = [h for db in dbs if (h := read_history(db, user_id)) is not None]
        return max(found, key=lambda h: h[0])[1] if found else None

    return read


def run_serve(cfg: Settings, stop: threading.Event, metrics: Metrics | None = None,
              on_ready: Callable[[str], None] | None = None) -> ServeSummary:
    """Serve until ``stop`` is set; ``on_ready`` gets the URL once requests are answered."""
    s, t = cfg.serve, cfg.trainer
    metrics = metrics or Metrics(roles=(Role.SERVER,))
    root = registry_dir(cfg)
    if s.follow == "registry" and not root.is_dir():
        raise FileNotFoundError(f"adapter registry {root} does not exist (serve.registry_dir, or "
                                "<checkpoint.state_dir>/adapters)")
    with ExitStack() as stack:
        catalog, reader = followed_catalog(cfg, stack)
        while reader is not None and not len(catalog) and not stop.is_set():  # nothing to recommend yet: wait
            log.info("catalog topic %r is empty; waiting for items", cfg.stream.catalog_topic)
            reader.poll(10_000)
        if not len(catalog):
            if stop.is_set():
                return ServeSummary("", "", 0)
            raise FileNotFoundError("recsift serve needs a catalogue to recommend from: set stream.catalog_path "
                                    "(--catalog) or stream.catalog_topic")
        rec: Served
        if t.backend == "tiger":  # a T5 over semantic IDs: each version is whole, no base model to load
            rec = TigerRecommender(t.tiger.history, t.tiger.beams)
            log.info("serving TIGER versions of %s", root)
        else:
            llm = load_llm(t.base_model, t.cache_dir, t.dtype, t.device)
            builder = builder_for(llm.encode, catalog.title, llm.eos_token_id, llm.pad_token_id, t)
            rec = Recommender(llm, llm.model, catalog, builder, t.cache_dir / "titles", t.max_new_tokens, t.num_beams)
            log.info("serving %s on %s: %d catalogue items indexed", t.base_model, llm.device, len(rec.item_ids))
        next_index = [time.monotonic() + CATALOG_REINDEX_S]

        def follow_catalog() -> None:
            if reader is not None and reader.poll(0) and time.monotonic() >= next_index[0]:
                rec.refresh_titles()
                next_index[0] = time.monotonic() + CATALOG_REINDEX_S

        engine = Engine(rec, metrics, follow=s.follow, registry=AdapterRegistry(root) if s.follow == "registry" else None,
                        generate=s.generate, candidate_rule=t.candidate_score, max_batch=s.max_batch,
                        max_wait_s=s.max_wait_ms / 1000, queue_size=s.queue_size, watch_interval_s=s.watch_interval_s,
                        between_batches=follow_catalog).start()
        stack.callback(engine.close)
        ctx = ServeContext(engine, catalog, metrics, s, t.base_model, root, history_reader(cfg), cfg.admin.token)
        http = ServeHttp(ctx, s.host, s.port).start()
        stack.callback(http.close)
        engine.ready.wait()
        log.info("recsift serve on %s, serving %s (follow: %s)", http.url, engine.version, s.follow)
        if on_ready is not None:
            on_ready(http.url)
        while not stop.wait(1.0):
            if not engine.alive():
                raise RuntimeError("the serving engine stopped; see the log above")
        return ServeSummary(http.url, engine.version, int(metrics.registry.get_sample_value("recsift_serve_requests_total") or 0))
