"""Dataset readers: DEALRec sequence files, RecBole atomic files, MovieLens, and plain JSONL / CSV events.

Every reader yields :class:`~recsift.stream.events.Event` objects (or raw JSON lines) in time order, so
the same validation path serves a file replay and a Kafka topic.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterator
from pathlib import Path

from recsift.stream.catalog import Catalog
from recsift.stream.events import Event

SPLITS = ("train", "valid", "test")
SPLIT_PERIOD_S = 30 * 86400.0  # DEALRec files carry no timestamps: each split gets a synthetic 30-day period
DEALREC_BASE_TS = 1_600_000_000.0
FORMATS = ("jsonl", "csv", "inter", "dealrec", "movielens")


class DatasetNotFound(FileNotFoundError):
    """A named dataset is not where it should be (e.g. ``../shared/data`` is absent)."""


def resolve_dataset(name: str | Path, data_dir: str | Path) -> Path:
    """``ml-100k`` and ``games`` name the shared datasets under ``data_dir``; anything else is a path."""
    data_dir = Path(data_dir)
    known = {"ml-100k": data_dir / "ml-100k" / "ml-100k.inter", "games": data_dir / "games"}
    path = known.get(str(name), Path(name))
    if not path.exists():
        raise DatasetNotFound(f"dataset {name!r} not found at {path} (data_dir={data_dir})")
    return path


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "train.txt").is_file():
            return "dealrec"
        raise ValueError(f"{path} is a directory without a DEALRec train.txt")
    suffix = path.suffix.lower()
    by_suffix = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".inter": "inter", ".dat": "movielens"}
    if suffix not in by_suffix:
        raise ValueError(f"cannot tell the format of {path}; name it with --format ({', '.join(FORMATS)})")
    return by_suffix[suffix]


def catalog_for(path: Path) -> Catalog | None:
    """The item catalog that ships beside a dataset, if any (``items.tsv``, a RecBole ``.item`` file)."""
    candidates = [path / "items.tsv"] if path.is_dir() else [path.with_suffix(".item"), path.parent / "items.tsv"]
    for c in candidates:
        if c.is_file():
            return Catalog.load(c)
    return None


# ------------------------------------------------------------------------------------------ DEALRec


def read_dealrec_split(directory: str | Path, split: str) -> dict[str, list[str]]:
    """One split of a DEALRec dataset: user id → items in chronological order (users without items omitted)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out: dict[str, list[str]] = {}
    with (Path(directory) / f"{split}.txt").open(encoding="utf-8") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) > 1:
                out[parts[0]] = parts[1:]
    return out


def dealrec_events(directory: str | Path, splits: tuple[str, ...] = SPLITS) -> list[Event]:
    """All interactions of a DEALRec dataset as events with synthetic, monotone timestamps.

    Split ``s`` occupies its own 30-day period (train < valid < test, as in the data); inside it a user's
    k-th of n items sits at fraction (k + 1) / (n + 1) of the period, which interleaves users while keeping
    each user's order.
    """
    events: list[Event] = []
    for s_idx, split in enumerate(SPLITS):
        if split not in splits:
            continue
        start = DEALREC_BASE_TS + s_idx * SPLIT_PERIOD_S
        for user, items in read_dealrec_split(directory, split).items():
            n = len(items)
            for k, item in enumerate(items):
                ts = start + SPLIT_PERIOD_S * (k + 1) / (n + 1)
                events.append(Event(f"{user}-{split}-{k}", user, item, round(ts, 3)))
    events.sort(key=lambda e: (e.ts, e.user_id))
    return events


# ------------------------------------------------------------------------------------------ RecBole / MovieLens


def recbole_events(path: str | Path) -> list[Event]:
    """A RecBole atomic ``.inter`` file (``user_id:token item_id:token [rating:float] timestamp:float``), time-sorted."""
    events = []
    with Path(path).open(encoding="utf-8") as fh:
        header = [h.split(":", 1)[0] for h in fh.readline().rstrip("\n").split("\t")]
        col = {h: i for i, h in enumerate(header)}
        for name in ("user_id", "item_id", "timestamp"):
            if name not in col:
                raise ValueError(f"{path}: RecBole header lacks {name!r}: {header}")
        u, i, t, r = col["user_id"], col["item_id"], col["timestamp"], col.get("rating")
        for line in fh:
            f = line.rstrip("\n").split("\t")
            if len(f) < len(header):
                continue
            ts = float(f[t])
            value = float(f[r]) if r is not None else None
            events.append(Event(f"{f[u]}-{f[i]}-{int(ts)}", f[u], f[i], ts, "rating" if value is not None else None, value))
    events.sort(key=lambda e: (e.ts, e.user_id, e.item_id))
    return events


def movielens_events(path: str | Path) -> list[Event]:
    """MovieLens ``ratings.dat`` (``user::item::rating::timestamp``) or ``u.data`` (tab-separated), time-sorted."""
    events = []
    with Path(path).open(encoding="latin-1") as fh:
        for line in fh:
            f = line.strip().split("::") if "::" in line else line.split()
            if len(f) != 4:
                continue
            user, item, rating, ts = f[0], f[1], float(f[2]), float(f[3])
            events.append(Event(f"{user}-{item}-{int(ts)}", user, item, ts, "rating", rating))
    events.sort(key=lambda e: (e.ts, e.user_id, e.item_id))
    return events


# ------------------------------------------------------------------------------------------ generic


def _csv_payloads(path: Path) -> Iterator[bytes]:
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            obj: dict[str, object] = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
            if isinstance(obj.get("value"), str):
                with contextlib.suppress(ValueError):  # left as text: validation rejects it with its reason
                    obj["value"] = float(obj["value"])  # type: ignore[arg-type]
            yield json.dumps(obj, separators=(",", ":")).encode()


def _jsonl_payloads(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        for line in fh:
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield line


def iter_events_or_payloads(path: Path, fmt: str) -> Iterator[bytes | Event]:
    """Events for the structured formats; raw payloads for JSONL and CSV (validated downstream)."""
    if fmt == "jsonl":
        yield from _jsonl_payloads(path)
    elif fmt == "csv":
        yield from _csv_payloads(path)
    elif fmt == "inter":
        yield from recbole_events(path)
    elif fmt == "dealrec":
        yield from dealrec_events(path)
    elif fmt == "movielens":
        yield from movielens_events(path)
    else:
        raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")


def iter_payloads(path: Path, fmt: str) -> Iterator[bytes]:
    """Raw message payloads of a file, in replay order."""
    for x in iter_events_or_payloads(path, fmt):
        yield x.encode() if isinstance(x, Event) else x
