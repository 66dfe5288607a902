"""The refresh job: snapshot the coreset → fine-tune → evaluate → promote or roll back.

What is fine-tuned is the backend's (``trainer.backend``, :mod:`recsift.trainer.backend`): a LoRA adapter on
the base LLM (BIGRec) or a T5 over semantic IDs (TIGER). Either way the refresh starts from the serving
version (it is incremental) or a fresh model, trains on the snapshot, stops early when the validation loss
stops improving, and judges the result on the recent validation reservoir by its mean loss against the
serving version's on the same samples. It also reports candidate metrics on those samples (the target among
seeded negatives, ranked by likelihood: HR@K, NDCG@K, rank percentile, target NLL), so an operator sees a
number that moves. A run that fails, produces a non-finite loss, has fewer than ``min_eval_samples`` validation
samples to be judged on (``no_validation``), or is worse than serving by more than ``promote_tolerance``
is recorded and not promoted. Every run is recorded in the ``refresh_runs`` table with its trigger,
outcome and reason.

``refresh_in_process`` runs it in a child process (spawn), so the ingest loop never stalls and a crash
of the job leaves the serving adapter untouched.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from recsift.config import Settings
from recsift.process import die_with_parent, log_to_stderr
from recsift.selection.store import read_snapshot, read_validation, take_snapshot
from recsift.stream.catalog import Catalog, Item
from recsift.stream.checkpoint import connect
from recsift.trainer.backend import Backend
from recsift.trainer.llm import LLM
from recsift.trainer.registry import AdapterRegistry
from recsift.vocab import LossMetric, Outcome, RefreshReason, Trigger

log = logging.getLogger(__name__)

@dataclass
class RefreshOutcome:
    trigger: Trigger
    outcome: Outcome
    snapshot_id: int | None = None
    version: str | None = None
    serving_before: str | None = None
    serving_loss: float | None = None
    new_loss: float | None = None
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # CandidateMetric → value, new adapter on validation
    seconds: float = 0.0
    error: str | None = None
    reason: RefreshReason | None = None  # why a run was not promoted

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RefreshOutcome:
        """A run as :func:`list_runs` returns it."""
        out = cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})
        out.trigger, out.outcome = Trigger(out.trigger), Outcome(out.outcome)
        out.reason = RefreshReason(out.reason) if out.reason is not None else None
        return out


RUNS_SCHEMA = ("CREATE TABLE IF NOT EXISTS refresh_runs (run_id INTEGER PRIMARY KEY AUTOINCREMENT, trigger TEXT NOT NULL,"
               " outcome TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL NOT NULL, detail TEXT NOT NULL)")


def record_run(db_path: str | Path, outcome: RefreshOutcome, started_at: float) -> None:
    conn = connect(db_path)
    try:
        conn.execute(RUNS_SCHEMA)
        conn.execute("INSERT INTO refresh_runs (trigger, outcome, started_at, finished_at, detail) VALUES (?,?,?,?,?)",
                     (outcome.trigger, outcome.outcome, started_at, time.time(), json.dumps(asdict(outcome))))
    finally:
        conn.close()


def list_runs(db_path: str | Path) -> list[dict[str, Any]]:
    conn = connect(db_path)
    try:
        conn.execute(RUNS_SCHEMA)
        return [{"run_id": r, "trigger": t, "outcome": o, "started_at": s, "finished_at": f, **json.loads(d)}
                for r, t, o, s, f, d in conn.execute("SELECT * FROM refresh_runs ORDER BY run_id")]
    finally:
        conn.close()


def record_interrupted(db_path: str | Path) -> RefreshOutcome | None:
    """Called before any refresh of this state directory starts: a refresh whose snapshot was taken but
    whose run was never recorded died with its process. Record it (failed, interrupted) and return it."""
    from recsift.selection.store import list_snapshots

    recorded = {r.get("snapshot_id") for r in list_runs(db_path)}
    triggers = {t.value for t in Trigger}
    lost = [s for s in list_snapshots(db_path) if s.reason in triggers and s.snapshot_id not in recorded]
    if not lost:
        return None
    snap = lost[-1]
    outcome = RefreshOutcome(Trigger(snap.reason), Outcome.FAILED, snapshot_id=snap.snapshot_id,
                             reason=RefreshReason.INTERRUPTED,
                             error="the process running this refresh stopped before it finished")
    record_run(db_path, outcome, snap.created_at)
    return outcome


# name -> "module:class". Imported on use: a backend pulls in its model libraries (transformers, peft), which
# the ingest service, which only starts refresh children, never needs.
BACKENDS: dict[str, str] = {"bigrec": "recsift.trainer.bigrec:BigRecBackend",
                            "tiger": "recsift.trainer.tiger.backend:TigerBackend"}


def backend_class(name: str) -> type[Backend]:
    """The backend class registered as ``name`` in :data:`BACKENDS`."""
    module, cls = BACKENDS[name].split(":")
    backend: type[Backend] = getattr(importlib.import_module(module), cls)
    return backend


def make_backend(cfg: Settings, catalog: Catalog, llm: LLM | None = None) -> Backend:
    """``trainer.backend``'s backend (``llm``: a base model already loaded, as tests build)."""
    return backend_class(cfg.trainer.backend)(cfg, catalog, llm)


def registry_for(cfg: Settings) -> AdapterRegistry:
    return AdapterRegistry(cfg.checkpoint.state_dir / "adapters")


def refresh(cfg: Settings, trigger: Trigger | str, catalog: Catalog | None = None, llm: LLM | None = None,
            progress: Callable[[str], None] = lambda line: log.info("%s", line)) -> RefreshOutcome:
    """One refresh, recorded in the checkpoint database; never raises for a failed run (it is recorded)."""
    trigger = Trigger(trigger)  # a ValueError naming the value for anything else
    db, t = cfg.checkpoint.path, cfg.trainer
    started_at, started = time.time(), time.perf_counter()
    outcome = RefreshOutcome(trigger, Outcome.FAILED)
    registry = registry_for(cfg)
    try:
        snap = take_snapshot(db, reason=trigger)
        outcome.snapshot_id = snap.snapshot_id
        _, members = read_snapshot(db, snap.snapshot_id)
        validation = read_validation(db)[-t.eval_samples:]
        if not members:
            outcome.outcome, outcome.reason = Outcome.SKIPPED, RefreshReason.EMPTY_CORESET
            outcome.error = "the coreset is empty"
            return outcome
        if len(validation) < t.min_eval_samples:
            outcome.outcome, outcome.reason = Outcome.REJECTED, RefreshReason.NO_VALIDATION
            outcome.error = (f"{len(validation)} validation samples, fewer than trainer.min_eval_samples = "
                             f"{t.min_eval_samples}: an adapter that cannot be judged is never promoted")
            return outcome
        progress(f"refresh ({trigger}): snapshot {snap.snapshot_id} taken, {len(members)} members")
        torch.manual_seed(t.seed)
        samples = [m.sample for m in members]
        if t.refresh_samples is not None and len(samples) > t.refresh_samples:
            import random

            samples = random.Random(t.seed + snap.snapshot_id).sample(samples, t.refresh_samples)
        model = make_backend(cfg, catalog or Catalog(), llm).open(registry, [*samples, *validation], progress)
        outcome.serving_before = model.serving
        progress(f"refresh ({trigger}): snapshot {snap.snapshot_id}, {len(samples)} samples, "
                 f"{len(validation)} validation samples, {t.backend} serving {outcome.serving_before or 'a fresh model'} "
                 f"on {model.device}")
        outcome.serving_loss = model.serving_loss(validation)
        result = model.train(samples, validation, progress)
        outcome.train = {**asdict(result), "samples_per_s": result.samples_per_s, "tokens_per_s": result.tokens_per_s}
        outcome.new_loss = model.mean_loss(validation)
        if not math.isfinite(outcome.new_loss):
            raise FloatingPointError(f"validation loss is {outcome.new_loss}")
        outcome.metrics = model.validation_metrics(validation, [m.sample for m in members])
        progress("validation " + ", ".join(f"{k} {v:.4f}" for k, v in outcome.metrics.items()))
        better = outcome.new_loss <= outcome.serving_loss * (1 + t.promote_tolerance)
        meta = {"snapshot_id": snap.snapshot_id, "scorer_version": snap.scorer_version, "trigger": trigger,
                "metrics": {LossMetric.SERVING_LOSS.value: outcome.serving_loss,
                            LossMetric.VALIDATION_LOSS.value: outcome.new_loss,
                            **outcome.metrics},
                "config_hash": _config_hash(cfg), "timings": {"train_s": result.seconds},
                "backend": t.backend, "base_model": t.base_model, "promoted": better}
        version = registry.save(model.save, meta)
        outcome.version = version.name
        if better:
            registry.promote(version.name, reason=trigger)
            outcome.outcome = Outcome.PROMOTED
        else:
            outcome.outcome, outcome.reason = Outcome.REJECTED, RefreshReason.WORSE
            outcome.error = (f"validation loss {outcome.new_loss:.4f} is worse than serving "
                             f"{outcome.serving_loss:.4f} beyond tolerance {t.promote_tolerance}")
        return outcome
    except Exception as exc:  # recorded, never propagated: the service keeps serving
        outcome.outcome, outcome.reason = Outcome.FAILED, RefreshReason.ERROR
        outcome.error = f"{type(exc).__name__}: {exc}"
        log.error("refresh failed: %s\n%s", exc, traceback.format_exc())
        return outcome
    finally:
        outcome.seconds = time.perf_counter() - started
        record_run(db, outcome, started_at)


def _config_hash(cfg: Settings) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.trainer.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _child(cfg_json: str, trigger: str, catalog_items: list[tuple[str, str]]) -> None:
    die_with_parent()  # a killed service takes its refresh with it: no orphan writing to the registry
    cfg = Settings.model_validate_json(cfg_json)
    log_to_stderr()  # the run's progress lines reach the service's log
    logging.getLogger().setLevel(cfg.monitoring.log_level)
    log.info("refresh (%s): process %d started", trigger, os.getpid())
    outcome = refresh(cfg, trigger, Catalog(Item(i, t) for i, t in catalog_items))
    raise SystemExit(0 if outcome.outcome != Outcome.FAILED else 1)


def refresh_in_process(cfg: Settings, trigger: Trigger, catalog: Catalog, timeout_s: float | None = None) -> RefreshOutcome:
    """Run :func:`refresh` in a spawned child process; a crash is recorded as a failed run."""
    ctx = multiprocessing.get_context("spawn")
    started_at = time.time()
    before = len(list_runs(cfg.checkpoint.path))
    proc = ctx.Process(target=_child, name="recsift-refresh", daemon=True,
                       args=(cfg.model_dump_json(), trigger, [(it.item_id, it.title) for it in catalog]))
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
    runs = list_runs(cfg.checkpoint.path)
    if len(runs) > before:
        return RefreshOutcome.from_record(runs[-1])
    outcome = RefreshOutcome(trigger, Outcome.FAILED, error=f"the refresh process exited with code {proc.exitcode}")
    record_run(cfg.checkpoint.path, outcome, started_at)
    return outcome
