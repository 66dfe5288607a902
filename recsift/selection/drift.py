"""Drift between the coreset and the recent stream; the numbers behind drift-triggered refreshes.

- ``target_js``: Jensen–Shannon divergence (base 2, in [0, 1]) of target-item distributions;
- ``category_js``: the same over item categories, when the catalogue knows them;
- ``embedding_sw``: sliced Wasserstein distance between embedding distributions (POT);
- ``score_ks``: two-sample Kolmogorov–Smirnov statistic of the score distributions;
- ``turnover``: share of current members that were not in the last refresh's snapshot;
- ``member_age_s``: median event-time age of the members.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from recsift.selection.selector import Member, embeddings_from_tensors, embeddings_to_tensors
from recsift.state import State


def js_divergence(p: Counter[str] | dict[str, float], q: Counter[str] | dict[str, float]) -> float:
    keys = sorted(set(p) | set(q))
    if not keys:
        return 0.0
    a = np.array([p.get(k, 0) for k in keys], dtype=np.float64)
    b = np.array([q.get(k, 0) for k in keys], dtype=np.float64)
    if a.sum() == 0 or b.sum() == 0:
        return 0.0
    return float(jensenshannon(a, b, base=2) ** 2)


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, projections: int = 64, seed: int = 0) -> float:
    if not len(x) or not len(y):
        return 0.0
    import ot  # POT imports scipy.stats and networkx: only a service that measures drift pays for them

    return float(ot.sliced_wasserstein_distance(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                                n_projections=projections, seed=seed))


@dataclass
class RecentWindow:
    """The recent stream's last ``size`` targets, scores and embeddings."""

    size: int = 4096

    def __post_init__(self) -> None:
        self.targets: deque[str] = deque(maxlen=self.size)
        self.scores: deque[float] = deque(maxlen=self.size)
        self.embeddings: deque[np.ndarray] = deque(maxlen=self.size)

    def add(self, target: str, score: float, embedding: np.ndarray | None) -> None:
        self.targets.append(target)
        self.scores.append(score)
        self.embeddings.append(embedding if embedding is not None else np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.targets)

    def state_dict(self) -> State:
        return State(embeddings_to_tensors(list(self.embeddings), "embeddings"),
                     {"targets": list(self.targets), "scores": list(self.scores)})

    def load_state_dict(self, state: State) -> None:
        self.targets = deque(state.meta["targets"], maxlen=self.size)
        self.scores = deque(state.meta["scores"], maxlen=self.size)
        self.embeddings = deque((e if e is not None else np.zeros(0, np.float32)
                                 for e in embeddings_from_tensors(state.tensors, "embeddings")), maxlen=self.size)


@dataclass(frozen=True)
class DriftReport:
    """One value per :class:`~recsift.vocab.Drift` name (the fields are those names, in that order)."""

    target_js: float
    category_js: float
    embedding_sw: float
    score_ks: float
    turnover: float
    member_age_s: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def drift(members: Sequence[Member], recent: RecentWindow, last_snapshot: Iterable[int] = (),
          category: Callable[[str], str | None] = lambda _: None, now_ts: float | None = None) -> DriftReport:
    """Coreset vs. recent stream (0 everywhere when either side is empty)."""
    if not members or not len(recent):
        return DriftReport(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    m_targets = Counter(m.sample.target for m in members)
    r_targets = Counter(recent.targets)
    m_cats = Counter(c for m in members if (c := category(m.sample.target)) is not None)
    r_cats = Counter(c for t in recent.targets if (c := category(t)) is not None)
    m_emb = [m.embedding for m in members if m.embedding is not None and len(m.embedding)]
    r_emb = [e for e in recent.embeddings if len(e)]
    sw = sliced_wasserstein(np.stack(m_emb), np.stack(r_emb)) if m_emb and r_emb else 0.0
    ks = float(ks_2samp([m.score for m in members], recent.scores).statistic)
    previous = set(last_snapshot)
    turnover = sum(m.sample.sample_id not in previous for m in members) / len(members) if previous else 0.0
    now = now_ts if now_ts is not None else max(m.sample.ts for m in members)
    age = float(np.median([now - m.inserted_ts for m in members]))
    return DriftReport(js_divergence(m_targets, r_targets), js_divergence(m_cats, r_cats), sw, ks, turnover, age)
