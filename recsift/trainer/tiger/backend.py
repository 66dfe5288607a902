"""The TIGER backend: a small T5 over semantic IDs (:mod:`.generator`), refreshed on the coreset like a BIGRec
adapter and judged the same way.

A registry version of this backend is the T5 (``save_pretrained``: config.json, model.safetensors) and the
semantic IDs it was trained on (``semantic_ids.safetensors``: the RQ-VAE and every item's ID), so a version
is whole on its own. The first refresh trains the RQ-VAE on the content embeddings of every item (the base
LLM's last-layer state after each catalogue title, cached with BIGRec's grounding vectors:
``recommender.title_embeddings``) and a fresh T5; later refreshes fine-tune the serving T5, and give items the
IDs do not know yet (new catalogue items, items first seen in the samples) an ID from the trained quantiser.
When the quantiser no longer fits (``SemanticIds.needs_retraining``, or more items share a code tuple than the
suffix can number) the refresh retrains it and starts a fresh T5, since the serving T5's tokens would mean
other items; the outcome's train record says why.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from recsift.config import Settings, TigerConfig
from recsift.scoring.effort import EffortScorer
from recsift.state import State
from recsift.stream.catalog import Catalog, Item
from recsift.stream.windows import Sample
from recsift.trainer.backend import BestEpoch, Progress, TrainResult
from recsift.trainer.evaluate import candidate_metrics, negative_sampler
from recsift.trainer.llm import LLM, load_llm
from recsift.trainer.recommender import title_embeddings
from recsift.trainer.registry import AdapterRegistry, check_backend
from recsift.trainer.tiger.effort import TigerBatches, cross_attention_block
from recsift.trainer.tiger.generator import TigerModel, id_losses
from recsift.trainer.tiger.rqvae import RQVAEConfig, SemanticIds
from recsift.vocab import SemanticIdMetric

log = logging.getLogger(__name__)

IDS_FILE = "semantic_ids.safetensors"
EFFORT_DIR = "tiger-effort"  # the effort model of a state directory (its T5 and IDs), kept across restarts


def rqvae_config(t: TigerConfig, seed: int) -> RQVAEConfig:
    return RQVAEConfig(levels=t.levels, codes=t.codes, latent=t.latent, hidden=t.rqvae_hidden, epochs=t.rqvae_epochs,
                       seed=seed)


def load_tiger(path: str | Path, history: int) -> TigerModel:
    """A saved TIGER version: its T5 and its semantic IDs."""
    ids = SemanticIds.from_state(State.from_bytes((Path(path) / IDS_FILE).read_bytes()))
    return TigerModel.from_pretrained(path, ids, history)


class TigerRefreshModel:
    """The T5 being refreshed and its IDs (:class:`~recsift.trainer.backend.RefreshModel`)."""

    device = "cpu"

    def __init__(self, tiger: TigerModel, serving: str | None, cfg: Settings, catalog: Catalog,
                 previous: TigerModel | None = None, ids_retrained: str | None = None) -> None:
        self.tiger, self.serving, self.cfg, self.catalog = tiger, serving, cfg, catalog
        self.previous = previous  # the serving version, when the IDs were retrained (a fresh T5 is refreshed)
        self.ids_retrained = ids_retrained  # why the IDs were retrained this refresh (None: they were not)

    def _nll(self, samples: Sequence[Sample], tiger: TigerModel | None = None) -> torch.Tensor:
        """Per-sample mean token NLL of each target's ID (eval mode, no gradients)."""
        tiger = tiger or self.tiger
        size = self.cfg.trainer.tiger.batch_size
        tiger.model.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(samples), size):
                chunk = samples[start:start + size]
                out.append(tiger.losses([s.history for s in chunk], [s.target for s in chunk]))
        return torch.cat(out) if out else torch.zeros(0)

    def mean_loss(self, samples: Sequence[Sample]) -> float:
        return float(self._nll(samples).mean()) if samples else float("nan")

    def serving_loss(self, samples: Sequence[Sample]) -> float:
        """The serving version's loss: the model about to be trained, or, when the IDs were retrained, the
        serving T5 under its own IDs on the samples whose targets it has an ID for."""
        if self.previous is None:
            return self.mean_loss(samples)
        known = [s for s in samples if s.target in self.previous.ids.ids]
        return float(self._nll(known, self.previous).mean()) if known else float("inf")

    def train(self, samples: Sequence[Sample], validation: Sequence[Sample], progress: Progress) -> TrainResult:
        """AdamW over the whole T5 (it is small), seeded batches, early stopping on the validation loss."""
        t, trainer = self.cfg.trainer.tiger, self.cfg.trainer
        model = self.tiger.model
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate)
        generator = torch.Generator().manual_seed(trainer.seed)
        result = TrainResult()
        params = dict(model.named_parameters())
        best = BestEpoch(trainer.early_stopping_patience)
        started = time.perf_counter()
        for epoch in range(t.epochs):
            model.train()
            losses = []
            for chunk in torch.split(torch.randperm(len(samples), generator=generator), t.batch_size):
                batch = [samples[i] for i in chunk.tolist()]
                loss = self.tiger.losses([s.history for s in batch], [s.target for s in batch]).mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss.item()} at step {result.steps}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                result.steps += 1
                result.samples += len(batch)
                result.learning_rates.append(t.learning_rate)
            result.train_losses.append(sum(losses) / len(losses))
            if validation:
                val = self.mean_loss(validation)
                result.val_losses.append(val)
                progress(f"epoch {epoch + 1}: train loss {result.train_losses[-1]:.4f}, validation loss {val:.4f}")
                if best.stop_after(val, params):
                    break
        best.restore(params)
        model.eval()
        result.seconds = time.perf_counter() - started
        return result

    def validation_metrics(self, validation: Sequence[Sample], train: Sequence[Sample]) -> dict[str, float]:
        """Each target among seeded negatives (half by popularity, half uniform; every ID has the same length,
        so there is no length to match), ranked by the likelihood of each candidate's ID; and the IDs' collision
        rate and new items' reconstruction error, which tell when the quantiser needs retraining."""
        t = self.cfg.trainer
        sampler = negative_sampler(validation, train, self.catalog, t.seed)
        size = min(t.eval_candidates, len(sampler.items))
        scores = np.stack([self.tiger.candidate_logliks(s.history, sampler.candidates(str(s.sample_id), set(s.history),
                                                                                     s.target, size))
                           for s in validation])
        per_user = candidate_metrics(scores, self._nll(validation).numpy())
        ids = self.tiger.ids
        return {**{name: float(v.mean()) for name, v in per_user.items()},
                SemanticIdMetric.COLLISION_RATE: ids.collision_rate, SemanticIdMetric.NEW_ITEM_ERROR: ids.new_item_error,
                SemanticIdMetric.RETRAINED: float(self.ids_retrained is not None)}

    def save(self, path: Path) -> None:
        self.tiger.save_pretrained(path)
        (path / IDS_FILE).write_bytes(self.tiger.ids.state_dict().to_bytes())


class TigerBackend:
    """TIGER on the base LLM's title embeddings (``llm``: an LLM already loaded, as tests build)."""

    name: ClassVar[str] = "tiger"

    def __init__(self, cfg: Settings, catalog: Catalog, llm: LLM | None = None) -> None:
        self.cfg, self.catalog, self.llm = cfg, catalog, llm

    def embed(self, items: Sequence[str], cached: bool = True) -> tuple[list[str], torch.Tensor]:
        """The items' title embeddings; ``cached``: through the per-catalogue cache (the whole catalogue, not the
        few new items of one refresh, which would leave a file per refresh)."""
        t = self.cfg.trainer
        llm = self.llm = self.llm or load_llm(t.base_model, t.cache_dir, t.dtype, t.device)
        known = Catalog(Item(i, self.catalog.title(i)) for i in items)
        ids, vectors = title_embeddings(llm, llm.model, known, t.cache_dir if cached else None)
        return ids, torch.from_numpy(vectors)

    def open(self, registry: AdapterRegistry, samples: Sequence[Sample], progress: Progress) -> TigerRefreshModel:
        t, tc = self.cfg.trainer, self.cfg.trainer.tiger
        wanted = sorted({it.item_id for it in self.catalog} | {i for s in samples for i in (*s.history, s.target)})
        serving = registry.current()
        check_backend(serving, self.name)
        retrain: str | None = None
        previous: TigerModel | None = None
        if serving is not None:
            served = load_tiger(serving.path, tc.history)
            ids = SemanticIds.from_state(served.ids.state_dict())  # a copy: the served IDs stay as they are
            new = [i for i in wanted if i not in ids.ids]
            if new:
                items, vectors = self.embed(new, cached=False)
                try:
                    for item, vector in zip(items, vectors, strict=True):
                        ids.assign(item, vector)
                except OverflowError as exc:
                    retrain = str(exc)
                progress(f"semantic IDs: {len(new)} new items")
            retrain = retrain or ids.needs_retraining(tc.max_collision_rate, tc.max_error_ratio)
            if retrain is None:
                return TigerRefreshModel(TigerModel(ids, served.model, tc.history), serving.name, self.cfg,
                                         self.catalog)
            progress(f"semantic IDs retrained: {retrain}")
            previous = served  # judged under its own IDs
        items, vectors = self.embed(wanted)
        ids = SemanticIds(rqvae_config(tc, t.seed))
        epochs = tc.rqvae_epochs

        def fitting(epoch: int, loss: float) -> None:
            if (epoch + 1) % max(1, epochs // 10) == 0 or epoch + 1 == epochs:
                progress(f"semantic IDs: RQ-VAE epoch {epoch + 1}/{epochs}, loss {loss:.4g} ({len(items):,} items)")

        fit = ids.fit(items, vectors, progress=fitting)
        progress(f"semantic IDs for {len(items)} items: reconstruction error {fit.reconstruction[-1]:.4g}, "
                 f"collision rate {fit.collision_rate:.3f}")
        tiger = TigerModel.build(ids, d_model=tc.d_model, layers=tc.layers, heads=tc.heads, history=tc.history,
                                 dropout=tc.dropout, seed=t.seed)
        return TigerRefreshModel(tiger, serving.name if serving else None, self.cfg, self.catalog, previous, retrain)

    def effort(self, registry: AdapterRegistry) -> EffortScorer:
        """The effort scorer (:mod:`recsift.trainer.tiger.effort`) on the model kept in the state directory
        (``EFFORT_DIR``), so that every run and restart on that state scores effort with one model; the first
        time, the serving version's T5, or the fresh one a first refresh builds, is kept there."""
        kept = self.cfg.checkpoint.state_dir / EFFORT_DIR
        if (kept / IDS_FILE).is_file():
            tiger, source = load_tiger(kept, self.cfg.trainer.tiger.history), f"the model kept in {kept}"
        else:
            opened = self.open(registry, (), log.info)
            fresh = opened.serving is None or opened.ids_retrained is not None
            tiger, source = opened.tiger, "a fresh seeded T5" if fresh else f"serving version {opened.serving}"
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{EFFORT_DIR}-", dir=kept.parent))
            opened.save(tmp)
            tmp.rename(kept)  # whole or absent: a crash mid-save leaves only a temporary directory
        block = cross_attention_block(tiger.model)
        log.info("TIGER effort on %s, block %s", source, block)
        return EffortScorer(tiger.model, TigerBatches(tiger, lambda items: self.embed(items, cached=False)),
                            block=block, batch_size=self.cfg.trainer.effort_batch_size, losses=id_losses)
