"""Coverage of the recent stream by the coreset, in the surrogate's embedding space.

faiss k-means clusters a bounded reservoir of recent sample embeddings (refreshed every
``refresh_every`` samples); coverage = the share of that recent mass whose cluster holds at least one
coreset member. Clusters holding at least 1/budget of the mass are *heavy*: with the constraint on, the
selector never evicts the last member of a heavy cluster (:meth:`Coverage.guard`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import faiss
import numpy as np
import torch

from recsift.selection.ring import ArrayRing
from recsift.selection.selector import Member
from recsift.state import State


class Coverage:
    def __init__(self, clusters: int = 32, sample_size: int = 8192, refresh_every: int = 20_000, seed: int = 0,
                 niter: int = 20) -> None:
        if clusters < 2 or sample_size < clusters:
            raise ValueError("need at least 2 clusters and a sample at least as large")
        self.k, self.sample_size, self.refresh_every, self.seed, self.niter = clusters, sample_size, refresh_every, seed, niter
        self.recent = ArrayRing(sample_size, np.float32)  # recent embeddings [≤ sample_size, d]
        self.since_refresh = 0
        self.centroids: np.ndarray | None = None
        self.mass = np.zeros(clusters)
        self.index: faiss.Index | None = None

    def add(self, embeddings: np.ndarray) -> None:
        """Remember recent embeddings (a ring); refit the clusters when due."""
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if not len(x):
            return
        self.recent.extend(x)
        self.since_refresh += len(embeddings)
        if (self.index is None and len(self.recent) >= self.k * 4) or self.since_refresh >= self.refresh_every:
            self.refit()

    def refit(self) -> None:
        recent = self.recent.values
        if len(recent) < self.k:
            return
        km = faiss.Kmeans(recent.shape[1], self.k, niter=self.niter, seed=self.seed, verbose=False)
        km.train(recent)
        self.centroids, self.index = np.array(km.centroids, copy=True), km.index
        self.mass = np.bincount(self.assign(recent), minlength=self.k) / len(recent)
        self.since_refresh = 0

    def state_dict(self) -> State:
        """The recent ring, the clusters and their mass (the faiss index is rebuilt from the centroids)."""
        tensors = {"mass": torch.from_numpy(np.asarray(self.mass, dtype=np.float64))}
        if self.centroids is not None:
            tensors["centroids"] = torch.from_numpy(self.centroids.copy())
        return State(tensors, {"since_refresh": self.since_refresh}).put("recent", self.recent.state_dict())

    def load_state_dict(self, state: State) -> None:
        t = state.tensors
        if "recent" in state.meta:
            self.recent.load_state_dict(state.part("recent"))
        else:  # written before the sample was an ArrayRing (2026-11-24): a bare tensor and its position
            self.recent.load_state_dict(State({"values": t["recent"]} if "recent" in t else {}, {"pos": state.meta["pos"]}))
        self.centroids = t["centroids"].numpy().copy() if "centroids" in t else None
        self.mass = t["mass"].numpy().copy()
        self.since_refresh = state.meta["since_refresh"]
        self.index = None
        if self.centroids is not None:
            self.index = faiss.IndexFlatL2(self.centroids.shape[1])
            self.index.add(self.centroids)

    @property
    def ready(self) -> bool:
        return self.index is not None

    def assign(self, embeddings: np.ndarray) -> np.ndarray:
        if self.index is None:
            raise RuntimeError("coverage clusters are not fitted yet")
        _, idx = self.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), 1)
        return idx[:, 0].astype(np.int64)

    def coverage(self, member_embeddings: np.ndarray) -> float:
        """Share of the recent stream's mass whose cluster has a coreset member (0 when not fitted)."""
        if self.index is None or not len(member_embeddings):
            return 0.0
        covered = np.unique(self.assign(member_embeddings))
        return float(self.mass[covered].sum())

    def heavy(self, budget: int) -> np.ndarray:
        return self.mass >= 1.0 / budget

    def guard(self, members: Callable[[], Iterable[Member]], budget: Callable[[], int]) -> Callable[[Member], bool]:
        """A selector ``protect`` hook: True for the last member of a heavy cluster. ``budget`` is read at
        each call: a worker's budget changes when its partitions do, and "heavy" is relative to it."""

        def protect(m: Member) -> bool:
            if self.index is None or m.embedding is None:
                return False
            cluster = int(self.assign(m.embedding[None])[0])
            if not self.heavy(budget())[cluster]:
                return False
            others = [o for o in members() if o is not m and o.embedding is not None]
            if not others:
                return True
            return not (self.assign(np.stack([o.embedding for o in others])) == cluster).any()  # type: ignore[misc]

        return protect
