"""``recsift serve`` on TIGER versions: the serving version's T5 and semantic IDs, swapped as versions are promoted.

It has the interface the serving engine drives (:class:`recsift.serving.engine.Served`): a version loads whole
(its T5 and the IDs it was trained on, :func:`.backend.load_tiger`), so a swap replaces both at once.
Recommendations come from beam search constrained to real items' IDs, scored by each item's ID likelihood;
candidate lists are ranked by that likelihood (the ``rule`` of BIGRec's PMI does not apply: there is no title
prior). Before the first TIGER version there is nothing to serve, and requests get that as an error. New
catalogue items are recommendable once a refresh has given them IDs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recsift.trainer.tiger.backend import IDS_FILE, load_tiger
from recsift.trainer.tiger.generator import TigerModel


class NoTigerVersion(RuntimeError):
    """No TIGER version has been loaded yet: a T5 over semantic IDs has no base model to fall back on."""


class InvalidTigerVersion(ValueError):
    """A directory that does not hold a whole TIGER version (its T5 and its semantic IDs)."""


class TigerRecommender:
    def __init__(self, history: int = 20, beams: int = 20) -> None:
        self.history, self.beams = history, beams
        self.models: dict[str, TigerModel] = {}
        self.adapter: str | None = None  # the serving version

    def _serving(self) -> TigerModel:
        if self.adapter is None:
            raise NoTigerVersion("no TIGER version is promoted yet: recommendations start with the first refresh")
        return self.models[self.adapter]

    def use_adapter(self, path: str | Path, name: str, keep_previous: bool = False) -> None:
        """Load a version (its T5 and IDs) and serve it; the one it replaces is freed unless ``keep_previous``."""
        folder = Path(path)
        if not (folder / IDS_FILE).is_file() or not (folder / "config.json").is_file():
            raise InvalidTigerVersion(f"{folder} is not a TIGER version (config.json and {IDS_FILE})")
        try:
            model = load_tiger(folder, self.history)
        except Exception as exc:  # a truncated file, a half-written copy
            raise InvalidTigerVersion(f"cannot read the TIGER version in {folder}: {type(exc).__name__}: {exc}") from exc
        previous, self.adapter = self.adapter, name
        self.models[name] = model
        if not keep_previous and previous is not None and previous != name:
            self.models.pop(previous, None)

    def unload_adapter(self, name: str, then: str) -> None:
        if self.adapter == name:
            self.adapter = then
        self.models.pop(name)

    def adapter_bytes(self) -> int:
        """Bytes of the T5 weights held in memory (every loaded version)."""
        return sum(p.numel() * p.element_size() for m in self.models.values() for p in m.model.parameters())

    def refresh_titles(self) -> None:
        """Nothing to re-index: a new catalogue item is recommendable once a refresh gave it an ID."""

    def recommend_batch(self, histories: Sequence[Sequence[str]], k: int = 10,
                        generate: bool = True) -> list[list[tuple[str, float]]]:
        """The top ``k`` items per history: constrained beam search finds them, and they are ordered by their IDs'
        log-likelihood, the score returned (the beams' own scores also count the end-of-sequence token)."""
        model = self._serving()
        ranked = model.recommend(histories, k, beams=self.beams)
        out = []
        for history, items in zip(histories, ranked, strict=True):
            scored = zip(items, model.candidate_logliks(history, items).tolist(), strict=True)
            out.append(sorted(scored, key=lambda pair: -pair[1]))
        return out

    def rank_candidates(self, history: Sequence[str], items: Sequence[str], k: int,
                        rule: str = "loglik") -> list[tuple[str, float]]:
        """The top ``k`` of ``items`` by the likelihood of their IDs; items without an ID come last."""
        model = self._serving()
        distinct = list(dict.fromkeys(items))
        known = [i for i in distinct if i in model.ids.ids]
        scores = dict(zip(known, model.candidate_logliks(history, known).tolist(), strict=True)) if known else {}
        values = np.array([scores.get(i, -np.inf) for i in distinct])
        order = np.argsort(-values, kind="stable")[:k]
        return [(distinct[j], float(values[j])) for j in order]
