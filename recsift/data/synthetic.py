"""A deterministic synthetic interaction stream: the default feed when no data is configured.

What it models, all from one seed:
- item popularity follows a Zipf law;
- every user and every item belongs to a latent taste group; users mostly pick items of their taste;
- items have readable titles ("Crimson Dragon Chronicles") whose genre word follows the taste;
- a share of the items is released only as the stream goes on (new items appear over time);
- at ``shift_at`` of the stream the popularity ranking is reshuffled (a drift the coreset must follow).

Events are produced lazily in vectorised chunks, so a million events cost seconds and constant memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from recsift.config import SyntheticConfig
from recsift.stream.catalog import Catalog, Item
from recsift.stream.events import Event

_GENRES = ["Space", "Fantasy", "Racing", "Puzzle", "Horror", "Sports", "Strategy", "Mystery", "Western", "Pirate",
           "Ninja", "Robot"]
_ADJECTIVES = ["Crimson", "Silent", "Golden", "Broken", "Hidden", "Eternal", "Frozen", "Savage", "Lucky", "Iron",
               "Neon", "Ancient", "Wild", "Shadow", "Crystal", "Rapid", "Lost", "Royal", "Cosmic", "Tiny"]
_NOUNS = ["Dragon", "Empire", "Harbor", "Circuit", "Forest", "Legion", "Garden", "Tower", "Voyage", "Kingdom",
          "Engine", "Temple", "Rider", "Island", "Comet", "Castle", "Arena", "Canyon", "Signal", "Orchard"]
_SUFFIXES = ["Chronicles", "Saga", "Quest", "Tactics", "Rush", "Legends", "Origins", "Deluxe", "Arena", "Tales"]
_CHUNK = 8192


class SyntheticStream:
    """Seeded generator of interaction events and their item catalog."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        n_items, n_users, n_tastes = cfg.items, cfg.users, cfg.tastes
        self.item_taste = rng.integers(0, n_tastes, n_items)
        self.user_taste = rng.integers(0, n_tastes, n_users)
        # Users' activity is skewed too: a few heavy users, many light ones.
        activity = 1.0 / np.arange(1, n_users + 1) ** 0.6
        self.user_p = rng.permutation(activity / activity.sum())
        zipf = 1.0 / np.arange(1, n_items + 1) ** cfg.zipf_a
        # Popularity rank before and after the shift: two independent permutations.
        self.popularity = [zipf[rng.permutation(n_items)], zipf[rng.permutation(n_items)]]
        release = np.zeros(n_items)
        n_new = round(cfg.new_item_share * n_items)
        if n_new:
            new = rng.choice(n_items, n_new, replace=False)
            release[new] = rng.uniform(0.05, 0.95, n_new)
        self.release = release  # stream fraction from which the item exists
        self.titles = self._titles(rng)
        self._seed = cfg.seed

    def _titles(self, rng: np.random.Generator) -> list[str]:
        seen: dict[str, int] = {}
        titles = []
        for i in range(self.cfg.items):
            genre = _GENRES[int(self.item_taste[i]) % len(_GENRES)]
            base = f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]} {_NOUNS[rng.integers(len(_NOUNS))]}"
            title = f"{base} {genre} {_SUFFIXES[rng.integers(len(_SUFFIXES))]}"
            seen[title] = seen.get(title, 0) + 1
            titles.append(title if seen[title] == 1 else f"{title} {seen[title]}")
        return titles

    def catalog(self) -> Catalog:
        return Catalog(
            Item(
                f"i{i}",
                self.titles[i],
                {"genre": _GENRES[int(self.item_taste[i]) % len(_GENRES)], "release": f"{self.release[i]:.3f}"},
            )
            for i in range(self.cfg.items)
        )

    def _item_weights(self, frac: float) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        phase = int(frac >= self.cfg.shift_at)
        w = self.popularity[phase] * (self.release <= frac)
        per_taste_items, per_taste_p = [], []
        for t in range(self.cfg.tastes):
            idx = np.flatnonzero((self.item_taste == t) & (w > 0))
            per_taste_items.append(idx)
            per_taste_p.append(w[idx] / w[idx].sum() if len(idx) else w[idx])
        return w / w.sum(), per_taste_items, per_taste_p

    def events(self, start: int = 0, stop: int | None = None) -> Iterator[Event]:
        """Events ``start`` … ``stop - 1`` of the stream (the same ones whatever the slicing)."""
        for user, item, idx, ts in self._chunks(start, self.cfg.events if stop is None else stop):
            for u, i, k, t in zip(user.tolist(), item.tolist(), idx.tolist(), ts.tolist(), strict=True):
                yield Event(f"s{self._seed}-{k}", f"u{u}", f"i{i}", t)

    def payloads(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(key, JSON payload) pairs, formatted directly (fast path for producing millions of events)."""
        seed = self._seed
        for user, item, idx, ts in self._chunks(start, self.cfg.events if stop is None else stop):
            for u, i, k, t in zip(user.tolist(), item.tolist(), idx.tolist(), ts.tolist(), strict=True):
                yield (
                    b"u%d" % u,
                    b'{"event_id":"s%d-%d","user_id":"u%d","item_id":"i%d","timestamp":%.3f}' % (seed, k, u, i, t),
                )

    def _chunks(self, start: int, stop: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        cfg = self.cfg
        first_chunk = start // _CHUNK
        for c in range(first_chunk, (max(stop, start) + _CHUNK - 1) // _CHUNK):
            lo, hi = c * _CHUNK, min((c + 1) * _CHUNK, cfg.events)
            if lo >= hi:
                break
            # A generator per chunk, seeded by (seed, chunk): any slice of the stream is reproducible.
            rng = np.random.default_rng([cfg.seed, c])
            n = hi - lo
            global_p, taste_items, taste_p = self._item_weights(lo / cfg.events)
            users = rng.choice(cfg.users, n, p=self.user_p)
            items = rng.choice(cfg.items, n, p=global_p)
            on_taste = rng.random(n) < 0.75
            tastes = self.user_taste[users]
            for t in range(cfg.tastes):
                sel = np.flatnonzero(on_taste & (tastes == t))
                if len(sel) and len(taste_items[t]):
                    items[sel] = rng.choice(taste_items[t], len(sel), p=taste_p[t])
            idx = np.arange(lo, hi)
            ts = cfg.start_ts + idx / cfg.events_per_second
            keep = (idx >= start) & (idx < stop)
            yield users[keep], items[keep], idx[keep], ts[keep]
