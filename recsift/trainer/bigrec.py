"""The BIGRec backend: a LoRA adapter on the base LLM, trained on prompts of a history and the next item's
title (Bao et al., BIGRec), judged by its mean response loss and by the likelihood it gives each candidate's
title.

Training is AdamW over the LoRA parameters only (linear warm-up then linear decay, as the reference
alpaca-lora setup; loss over prompt + response with ``train_on_inputs``; bf16 autocast where supported; on
``trainer.device``), with early stopping on the validation loss. A refresh starts from the serving adapter
(it is incremental) or from a fresh seeded LoRA adapter. The candidate metrics rank the target among seeded
negatives of about its title's length (``evaluate.NegativeSampler``) by ``trainer.candidate_score``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from recsift.config import Settings, TrainerConfig
from recsift.scoring.effort import EffortScorer, response_losses
from recsift.stream.catalog import Catalog
from recsift.stream.windows import Sample
from recsift.trainer.backend import BestEpoch, Progress, TrainResult
from recsift.trainer.evaluate import candidate_metrics, candidate_scores, negative_sampler
from recsift.trainer.llm import LLM, add_lora, autocast, load_llm
from recsift.trainer.prompts import PromptBuilder, builder_for
from recsift.trainer.recommender import candidate_table
from recsift.trainer.registry import AdapterRegistry, check_backend


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
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    best = BestEpoch(cfg.early_stopping_patience)
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
            if best.stop_after(val, lora):
                break
    best.restore(lora)  # keep the best epoch's adapter
    result.seconds = time.perf_counter() - started
    model.eval()
    return result


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> Any:
    """Linear warm-up to the configured rate, then linear decay to 0 at ``total_steps`` (transformers'
    ``get_linear_schedule_with_warmup``, as the reference trainer); warm-up takes at most half the run."""
    from transformers import get_linear_schedule_with_warmup

    total = max(total_steps, 1)
    return get_linear_schedule_with_warmup(optimizer, min(warmup_steps, total // 2), total)


def model_for(llm: LLM, cfg: TrainerConfig, registry: AdapterRegistry) -> tuple[Any, str | None]:
    """The base model with the serving adapter loaded (trainable), or a fresh seeded LoRA adapter."""
    serving = registry.current()
    check_backend(serving, BigRecBackend.name)
    if serving is None:
        return add_lora(llm.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, cfg.seed), None
    from peft import PeftModel

    return PeftModel.from_pretrained(llm.model, serving.path, is_trainable=True), serving.name


def validation_metrics(llm: LLM, model: Any, builder: PromptBuilder, validation: Sequence[Sample],
                       train: Sequence[Sample], catalog: Catalog, candidates: int, seed: int,
                       rule: str) -> dict[str, float]:
    """Candidate metrics of ``model`` on the validation samples: each target among ``candidates`` − 1
    seeded negatives of about the target's title length (half drawn by popularity in the training and
    validation samples, half uniform over the catalogue, or over the items seen when there is no
    catalogue), ranked by ``rule`` (``evaluate.candidate_scores``)."""
    sampler = negative_sampler(validation, train, catalog, seed, length=builder.response_length)
    size = min(candidates, len(sampler.items))
    cands = [sampler.candidates(str(s.sample_id), set(s.history), s.target, size) for s in validation]
    logliks, priors, nll = candidate_table(llm, model, builder, [s.history for s in validation], cands,
                                           priors=rule == "pmi")
    per_user = candidate_metrics(candidate_scores(logliks, priors, rule), nll)
    return {name: float(values.mean()) for name, values in per_user.items()}


class BigRecModel:
    """The base LLM with the adapter being refreshed (:class:`~recsift.trainer.backend.RefreshModel`)."""

    def __init__(self, llm: LLM, model: Any, serving: str | None, builder: PromptBuilder, cfg: TrainerConfig,
                 catalog: Catalog) -> None:
        self.llm, self.model, self.serving, self.builder, self.cfg, self.catalog = llm, model, serving, builder, cfg, catalog
        self.device = str(llm.device)

    def mean_loss(self, samples: Sequence[Sample]) -> float:
        return mean_loss(self.model, self.builder, samples, self.cfg.batch_size, self.llm.autocast_dtype)

    def serving_loss(self, samples: Sequence[Sample]) -> float:
        return self.mean_loss(samples)  # before training: the serving adapter (or the base model's fresh LoRA)

    def train(self, samples: Sequence[Sample], validation: Sequence[Sample], progress: Progress) -> TrainResult:
        return train_lora(self.model, self.builder, samples, validation, self.cfg, self.llm.autocast_dtype, progress)

    def validation_metrics(self, validation: Sequence[Sample], train: Sequence[Sample]) -> dict[str, float]:
        t = self.cfg
        return validation_metrics(self.llm, self.model, self.builder, validation, train, self.catalog,
                                  t.eval_candidates, t.seed, t.candidate_score)

    def save(self, path: Path) -> None:
        self.model.save_pretrained(path)


class BigRecBackend:
    """BIGRec: LoRA adapters on ``trainer.base_model`` (``llm``: an LLM already loaded, as tests build)."""

    name: ClassVar[str] = "bigrec"

    def __init__(self, cfg: Settings, catalog: Catalog, llm: LLM | None = None) -> None:
        self.cfg, self.catalog, self.llm = cfg, catalog, llm

    def open(self, registry: AdapterRegistry, samples: Sequence[Sample], progress: Progress) -> BigRecModel:
        t = self.cfg.trainer
        llm = self.llm or load_llm(t.base_model, t.cache_dir, t.dtype, t.device)
        builder = builder_for(llm.encode, self.catalog.title, llm.eos_token_id, llm.pad_token_id, t)
        model, serving = model_for(llm, t, registry)
        return BigRecModel(llm, model, serving, builder, t, self.catalog)

    def effort(self, registry: AdapterRegistry) -> EffortScorer:
        """The base model with a fresh seeded LoRA adapter (DEALRec's effort model), BIGRec prompts; the registry's
        adapters are not used."""
        t = self.cfg.trainer
        llm = self.llm or load_llm(t.base_model, t.cache_dir, t.dtype, t.device)
        model = add_lora(llm.model, t.lora_r, t.lora_alpha, t.lora_dropout, t.target_modules, t.seed)
        builder = builder_for(llm.encode, self.catalog.title, llm.eos_token_id, llm.pad_token_id, t)
        return EffortScorer(model, builder.batch, batch_size=t.effort_batch_size, autocast_dtype=llm.autocast_dtype)
