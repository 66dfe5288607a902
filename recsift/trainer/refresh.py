"""The refresh job: snapshot the coreset → LoRA fine-tune → evaluate → promote or roll back.

It starts from the serving adapter (a refresh is incremental) or a fresh seeded LoRA adapter, trains
on the snapshot with AdamW over the LoRA parameters only (linear warm-up then linear decay, as the
reference alpaca-lora setup; loss over prompt + response with ``train_on_inputs``; bf16 autocast where
supported; on ``trainer.device``), stops early when the validation loss stops improving, and judges the
result on the recent validation reservoir by its mean response loss against the serving adapter's on the
same samples. It also reports candidate metrics on those samples (the target among seeded negatives,
ranked by likelihood: HR@K, NDCG@K, rank percentile, target NLL), so an operator sees a number that
moves. A run that fails, produces a non-finite loss, has fewer than ``min_eval_samples`` validation
samples to be judged on (``no_validation``), or is worse than serving by more than ``promote_tolerance``
is recorded and not promoted. Every run is recorded in the ``refresh_runs`` table with its trigger,
outcome and reason.

``refresh_in_process`` runs it in a child process (spawn), so the ingest loop never stalls and a crash
of the job leaves the serving adapter untouched.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from recsift.config import Settings, TrainerConfig
from recsift.process import die_with_parent, log_to_stderr
from recsift.scoring.effort import response_losses
from recsift.selection.store import read_snapshot, read_validation, take_snapshot
from recsift.stream.catalog import Catalog, Item
from recsift.stream.checkpoint import connect
from recsift.stream.windows import Sample
from recsift.trainer.evaluate import NegativeSampler, candidate_metrics, candidate_scores
from recsift.trainer.llm import LLM, add_lora, autocast, load_llm
from recsift.trainer.prompts import PromptBuilder, builder_for
from recsift.trainer.recommender import candidate_table
from recsift.trainer.registry import AdapterRegistry
from recsift.vocab import LossMetric, Outcome, RefreshReason, Trigger

log = logging.getLogger(__name__)

@dataclass
class TrainResult:
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    steps: int = 0
    learning_rates: list[float] = field(default_factory=list)  # after each step
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _autocast(model: Any, dtype: torch.dtype | None) -> Any:
    return autocast(next(model.parameters()).device, dtype)


def mean_loss(model: Any, builder: PromptBuilder, samples: Sequence[Sample], batch_size: int,
              autocast_dtype: torch.dtype | None) -> float:
    """Mean response-token loss over ``samples`` (eval mode, no gradients; the prompt is never judged)."""
    if not samples:
        return float("nan")
    model.eval()
    total = 0.0
    with torch.no_grad(), _autocast(model, autocast_dtype):
        for start in range(0, len(samples), batch_size):
            batch = builder.batch(samples[start:start + batch_size], response_only=True)
            total += float(response_losses(model, batch).sum())
    return total / len(samples)


def train_lora(model: Any, builder: PromptBuilder, samples: Sequence[Sample], validation: Sequence[Sample],
               cfg: TrainerConfig, autocast_dtype: torch.dtype | None,
               progress: Callable[[str], None] = lambda _: None) -> TrainResult:
    """Fine-tune the LoRA parameters of ``model`` on ``samples``; early stopping on ``validation``."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    if not params:
        raise ValueError("the model has no LoRA parameters to train")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    schedule = lr_schedule(optimizer, cfg.warmup_steps, cfg.epochs * math.ceil(len(samples) / cfg.batch_size))
    generator = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult()
    best, best_state, stale = math.inf, None, 0
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(samples), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), cfg.batch_size):
            batch = builder.batch([samples[i] for i in order[start:start + cfg.batch_size]])
            with _autocast(model, autocast_dtype):
                loss = response_losses(model, batch).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at step {result.steps}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            result.learning_rates.append(schedule.get_last_lr()[0])
            losses.append(float(loss.detach()))
            result.steps += 1
            result.samples += len(batch["input_ids"])
            result.tokens += int(batch["attention_mask"].sum())
            if result.steps % 10 == 0:
                progress(f"epoch {epoch + 1}: step {result.steps}, loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
        result.train_losses.append(sum(losses) / len(losses))
        if validation:
            val = mean_loss(model, builder, validation, cfg.batch_size, autocast_dtype)
            result.val_losses.append(val)
            progress(f"epoch {epoch + 1}: train loss {result.train_losses[-1]:.4f}, validation loss {val:.4f}")
            if val < best:
                best, stale = val, 0
                best_state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
            else:
                stale += 1
                if stale > cfg.early_stopping_patience:
                    break
    if best_state is not None:  # keep the best epoch's adapter
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n])
    result.seconds = time.perf_counter() - started
    model.eval()
    return result


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> Any:
    """Linear warm-up to the configured rate, then linear decay to 0 at ``total_steps`` (transformers'
    ``get_linear_schedule_with_warmup``, as the reference trainer); warm-up takes at most half the run."""
    from transformers import get_linear_schedule_with_warmup

    total = max(total_steps, 1)
    return get_linear_schedule_with_warmup(optimizer, min(warmup_steps, total // 2), total)


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


def registry_for(cfg: Settings) -> AdapterRegistry:
    return AdapterRegistry(cfg.checkpoint.state_dir / "adapters")


def model_for(llm: LLM, cfg: TrainerConfig, registry: AdapterRegistry) -> tuple[Any, str | None]:
    """The base model with the serving adapter loaded (trainable), or a fresh seeded LoRA adapter."""
    serving = registry.current()
    if serving is None:
        return add_lora(llm.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, cfg.seed), None
    from peft import PeftModel

    return PeftModel.from_pretrained(llm.model, serving.path, is_trainable=True), serving.name


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
        llm = llm or load_llm(t.base_model, t.cache_dir, t.dtype, t.device)
        catalog = catalog or Catalog()
        builder = builder_for(llm.encode, catalog.title, llm.eos_token_id, llm.pad_token_id, t)
        model, outcome.serving_before = model_for(llm, t, registry)
        samples = [m.sample for m in members]
        if t.refresh_samples is not None and len(samples) > t.refresh_samples:
            import random

            samples = random.Random(t.seed + snap.snapshot_id).sample(samples, t.refresh_samples)
        progress(f"refresh ({trigger}): snapshot {snap.snapshot_id}, {len(samples)} samples, "
                 f"{len(validation)} validation samples, serving {outcome.serving_before or 'base model'} "
                 f"on {llm.device}")
        outcome.serving_loss = mean_loss(model, builder, validation, t.batch_size, llm.autocast_dtype)
        result = train_lora(model, builder, samples, validation, t, llm.autocast_dtype, progress)
        outcome.train = {**asdict(result), "samples_per_s": result.samples_per_s, "tokens_per_s": result.tokens_per_s}
        outcome.new_loss = mean_loss(model, builder, validation, t.batch_size, llm.autocast_dtype)
        if not math.isfinite(outcome.new_loss):
            raise FloatingPointError(f"validation loss is {outcome.new_loss}")
        outcome.metrics = validation_metrics(llm, model, builder, validation, [m.sample for m in members], catalog,
                                             t.eval_candidates, t.seed, t.candidate_score)
        progress("validation " + ", ".join(f"{k} {v:.4f}" for k, v in outcome.metrics.items()))
        better = outcome.new_loss <= outcome.serving_loss * (1 + t.promote_tolerance)
        meta = {"snapshot_id": snap.snapshot_id, "scorer_version": snap.scorer_version, "trigger": trigger,
                "metrics": {LossMetric.SERVING_LOSS.value: outcome.serving_loss,
                            LossMetric.VALIDATION_LOSS.value: outcome.new_loss,
                            **outcome.metrics},
                "config_hash": _config_hash(cfg), "timings": {"train_s": result.seconds},
                "base_model": t.base_model, "promoted": better}
        version = registry.save(model.save_pretrained, meta)
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


def validation_metrics(llm: LLM, model: Any, builder: PromptBuilder, validation: Sequence[Sample],
                       train: Sequence[Sample], catalog: Catalog, candidates: int, seed: int,
                       rule: str) -> dict[str, float]:
    """Candidate metrics of ``model`` on the validation samples: each target among ``candidates`` − 1
    seeded negatives of about the target's title length (half drawn by popularity in the training and
    validation samples, half uniform over the catalogue, or over the items seen when there is no
    catalogue), ranked by ``rule`` (``evaluate.candidate_scores``)."""
    popularity: Counter[str] = Counter()
    for s in (*train, *validation):
        popularity.update(s.history)
        popularity[s.target] += 1
    items = [it.item_id for it in catalog] if len(catalog) else sorted(popularity)
    sampler = NegativeSampler(items, dict(popularity), seed, length=builder.response_length)
    size = min(candidates, len(items))
    cands = [sampler.candidates(str(s.sample_id), set(s.history), s.target, size) for s in validation]
    logliks, priors, nll = candidate_table(llm, model, builder, [s.history for s in validation], cands,
                                           priors=rule == "pmi")
    per_user = candidate_metrics(candidate_scores(logliks, priors, rule), nll)
    return {name: float(values.mean()) for name, values in per_user.items()}


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
