"""Semantic IDs: a residual-quantised autoencoder (RQ-VAE) over item content embeddings, as TIGER builds them.

Rajput et al., NeurIPS 2023, §3.1: an encoder maps an item's content embedding to a latent; ``levels``
codebooks of ``codes`` vectors quantise it residually (level 1 the latent, level 2 what level 1 left, …); a
decoder reconstructs the embedding from the sum of the chosen vectors. Training minimises reconstruction
error plus, per level, the codebook loss ‖sg[r] − e‖² and β times the commitment loss ‖r − sg[e]‖²
(straight-through gradients to the encoder). Each codebook is initialised by k-means on the residuals of
the first pass, and after every epoch the codes no item chose restart on random residuals: without that, the
codebooks collapse onto a few codes and many items share an ID prefix. An item's semantic ID is its code per
level plus a collision suffix: items that share all ``levels`` codes are numbered 0, 1, … in the order they
were assigned, so every item has a unique tuple of ``levels + 1`` tokens.

:class:`SemanticIds` trains once per catalogue (a version number counts the trainings), then gives new items
an ID from the trained quantiser without retraining. Its collision rate (the share of items whose codes are
shared) and the reconstruction error of the items assigned since the training are what tell when the
quantiser no longer fits the catalogue (``needs_retraining``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import cast

import faiss
import numpy as np
import torch
from torch import Tensor, nn

from recsift.state import State


@dataclass(frozen=True)
class RQVAEConfig:
    """The quantiser's shape and training (TIGER: 3 levels × 256 codes, latent 32, β = 0.25)."""

    levels: int = 3
    codes: int = 256
    latent: int = 32
    hidden: int = 256
    beta: float = 0.25
    lr: float = 1e-3
    epochs: int = 200
    batch_size: int = 1024
    kmeans_iterations: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.levels < 1 or self.codes < 2 or self.latent < 1 or self.hidden < 1:
            raise ValueError(f"an RQ-VAE needs levels ≥ 1, codes ≥ 2, latent and hidden ≥ 1: {self}")


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """Encoder → residual quantiser (``levels`` codebooks) → decoder."""

    def __init__(self, dim: int, config: RQVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = _mlp([dim, config.hidden, config.hidden // 2 or 1, config.latent])
        self.decoder = _mlp([config.latent, config.hidden // 2 or 1, config.hidden, dim])
        self.dim = dim
        self.codebooks = nn.ModuleList(nn.Embedding(config.codes, config.latent) for _ in range(config.levels))

    def books(self) -> list[nn.Embedding]:
        return [cast(nn.Embedding, book) for book in self.codebooks]

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(codes ``[N, levels]``, the quantised latent, the codebook + β·commitment loss)."""
        residual, quantised = z, torch.zeros_like(z)
        codes, loss = [], z.new_zeros(())
        for book in self.books():
            index = torch.cdist(residual.detach(), book.weight.detach()).argmin(1)
            vector = book(index)
            codebook = ((vector - residual.detach()) ** 2).mean()
            commitment = ((residual - vector.detach()) ** 2).mean()
            loss = loss + codebook + self.config.beta * commitment
            quantised = quantised + vector
            residual = residual - vector.detach()
            codes.append(index)
        return torch.stack(codes, 1), quantised, loss

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, codes, quantisation loss); gradients reach the encoder straight through."""
        z = self.encoder(x)
        codes, quantised, loss = self.quantize(z)
        return self.decoder(z + (quantised - z).detach()), codes, loss

    def residuals(self, x: Tensor) -> list[Tensor]:
        """What each level quantises: the latent, then what the levels before it left."""
        out = []
        with torch.no_grad():
            residual = self.encoder(x)
            for book in self.books():
                out.append(residual)
                residual = residual - book.weight[torch.cdist(residual, book.weight).argmin(1)]
        return out

    def init_codebooks(self, x: Tensor) -> None:
        """k-means (faiss, as the coverage clusters) on each level's residuals of the untrained encoder's latents
        (TIGER's initialisation); with fewer items than codes, the first codes only."""
        with torch.no_grad():
            residual = self.encoder(x)
            for book in self.books():
                k = min(self.config.codes, len(residual))
                km = faiss.Kmeans(residual.shape[1], k, niter=self.config.kmeans_iterations, seed=self.config.seed,
                                  verbose=False)
                km.train(np.ascontiguousarray(residual.numpy(), dtype=np.float32))
                book.weight[:k] = torch.from_numpy(km.centroids)
                residual = residual - book.weight[torch.cdist(residual, book.weight).argmin(1)]

    def restart_dead_codes(self, x: Tensor, generator: torch.Generator) -> int:
        """Move every code no item chooses onto a random item's residual at its level; returns how many moved.
        Without it, training collapses the codebooks onto a few codes: on the catalogue of
        ``tests/trainer/test_rqvae.py`` more items then share an ID prefix than the suffix can number."""
        moved = 0
        with torch.no_grad():
            for book, residual in zip(self.books(), self.residuals(x), strict=True):
                used = torch.bincount(torch.cdist(residual, book.weight).argmin(1), minlength=self.config.codes)
                dead = (used == 0).nonzero().flatten()
                if len(dead):
                    book.weight[dead] = residual[torch.randint(0, len(residual), (len(dead),), generator=generator)]
                    moved += len(dead)
        return moved


@dataclass(frozen=True)
class Training:
    """What one :meth:`SemanticIds.fit` did: the mean reconstruction error per epoch and the IDs it left."""

    reconstruction: list[float]
    items: int
    collision_rate: float


class SemanticIds:
    """Item id → semantic ID (``levels`` codes + a collision suffix), from an RQ-VAE trained on the catalogue."""

    def __init__(self, config: RQVAEConfig | None = None) -> None:
        self.config = config or RQVAEConfig()
        self.model: RQVAE | None = None
        self.version = 0  # trainings so far: IDs of different versions are different vocabularies
        self.ids: dict[str, tuple[int, ...]] = {}
        self._next_suffix: dict[tuple[int, ...], int] = {}
        self.trained_items = 0  # items the current version was trained on
        self.trained_error = 0.0  # their mean reconstruction error after training
        self.new_error_sum = 0.0  # reconstruction error summed over the items assigned since (not trained on)
        self.new_items = 0

    # ------------------------------------------------------------------ training and assignment

    def fit(self, items: Sequence[str], embeddings: Tensor,
            progress: Callable[[int, float], None] | None = None) -> Training:
        """Train a new quantiser on the catalogue's content embeddings ``[N, D]`` and assign every item an ID
        (a new version: earlier IDs are dropped)."""
        if len(items) != len(embeddings) or not len(items):
            raise ValueError(f"need one embedding per item, got {len(items)} items and {len(embeddings)} rows")
        if len(set(items)) != len(items):
            raise ValueError("item ids must be unique")
        c = self.config
        x = embeddings.detach().float()
        generator = torch.Generator().manual_seed(c.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            model = RQVAE(x.shape[1], c)
        model.init_codebooks(x)
        optimizer = torch.optim.Adam(model.parameters(), lr=c.lr)
        history = []
        for epoch in range(c.epochs):
            total = 0.0
            for chunk in torch.split(torch.randperm(len(x), generator=generator), c.batch_size):
                rebuilt, _, quantisation = model(x[chunk])
                error = ((rebuilt - x[chunk]) ** 2).mean()
                optimizer.zero_grad(set_to_none=True)
                (error + quantisation).backward()
                optimizer.step()
                total += float(error.detach()) * len(chunk)
            model.restart_dead_codes(x, generator)
            history.append(total / len(x))
            if progress is not None:
                progress(epoch, history[-1])
        self.model = model.eval()
        self.version += 1
        self.ids, self._next_suffix = {}, {}
        self.new_error_sum, self.new_items = 0.0, 0
        codes, errors = self._encode(x)
        for item, row in zip(items, codes.tolist(), strict=True):
            self._give(item, tuple(row))
        self.trained_items, self.trained_error = len(items), float(errors.mean())
        return Training(history, len(items), self.collision_rate)

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.model is None:
            raise RuntimeError("no quantiser yet: fit() it on the catalogue first")
        with torch.no_grad():
            rebuilt, codes, _ = self.model(x.float())
        return codes, ((rebuilt - x.float()) ** 2).mean(1)

    def _give(self, item: str, codes: tuple[int, ...]) -> tuple[int, ...]:
        suffix = self._next_suffix.get(codes, 0)
        if suffix >= self.config.codes:
            raise OverflowError(f"{suffix + 1} items share the codes {codes}: the suffix holds {self.config.codes}; "
                                "retrain the quantiser (collision rate too high)")
        self._next_suffix[codes] = suffix + 1
        self.ids[item] = (*codes, suffix)
        return self.ids[item]

    def assign(self, item: str, embedding: Tensor) -> tuple[int, ...]:
        """The ID of ``item`` (a new item: from the trained quantiser, no retraining; a known one: unchanged)."""
        if item in self.ids:
            return self.ids[item]
        codes, errors = self._encode(embedding.view(1, -1))
        self.new_error_sum += float(errors[0])
        self.new_items += 1
        return self._give(item, tuple(codes[0].tolist()))

    def peek(self, item: str, embedding: Tensor) -> tuple[int, ...]:
        """The ID ``item`` has, or would get now from the quantiser, without assigning it: nothing changes. When
        the codes' suffix is full, the last suffix (the item then shares a tuple; a loss over it is still defined)."""
        if item in self.ids:
            return self.ids[item]
        codes, _ = self._encode(embedding.view(1, -1))
        row = tuple(codes[0].tolist())
        return (*row, min(self._next_suffix.get(row, 0), self.config.codes - 1))

    # ------------------------------------------------------------------ health

    @property
    def collision_rate(self) -> float:
        """The share of items whose codes another item also has (they differ only by the suffix)."""
        shared = sum(n for n in self._next_suffix.values() if n > 1)
        return shared / max(len(self.ids), 1)

    @property
    def new_item_error(self) -> float:
        """Mean reconstruction error of the items assigned since the training (0 when there are none)."""
        return self.new_error_sum / self.new_items if self.new_items else 0.0

    def needs_retraining(self, max_collision_rate: float, max_error_ratio: float) -> str | None:
        """Why the quantiser should be retrained (a refresh reason), or None: the collision rate above
        ``max_collision_rate``, or the new items' reconstruction error above ``max_error_ratio`` times the
        training items' error."""
        if self.collision_rate > max_collision_rate:
            return f"semantic-ID collision rate {self.collision_rate:.3f} > {max_collision_rate}"
        if self.new_items and self.new_item_error > max_error_ratio * max(self.trained_error, 1e-12):
            return (f"new items' reconstruction error {self.new_item_error:.4g} > {max_error_ratio}× the "
                    f"catalogue's {self.trained_error:.4g}")
        return None

    # ------------------------------------------------------------------ state (safetensors + JSON)

    def state_dict(self) -> State:
        if self.model is None:
            raise RuntimeError("no quantiser to save: fit() it first")
        items = list(self.ids)
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors["ids"] = torch.tensor([self.ids[i] for i in items], dtype=torch.int64)
        return State(tensors, {"config": asdict(self.config), "dim": self.model.dim,
                               "items": items, "version": self.version, "trained_items": self.trained_items,
                               "trained_error": self.trained_error, "new_error_sum": self.new_error_sum,
                               "new_items": self.new_items})

    @classmethod
    def from_state(cls, state: State) -> SemanticIds:
        meta = state.meta
        out = cls(RQVAEConfig(**meta["config"]))
        model = RQVAE(int(meta["dim"]), out.config)
        model.load_state_dict({k[6:]: v for k, v in state.tensors.items() if k.startswith("model.")})
        out.model = model.eval()
        for item, row in zip(meta["items"], state.tensors["ids"].tolist(), strict=True):
            out.ids[item] = tuple(row)
            prefix = tuple(row[:-1])
            out._next_suffix[prefix] = max(out._next_suffix.get(prefix, 0), row[-1] + 1)
        out.version, out.trained_items, out.trained_error = meta["version"], meta["trained_items"], meta["trained_error"]
        out.new_error_sum, out.new_items = meta["new_error_sum"], meta["new_items"]
        return out
