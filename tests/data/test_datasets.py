from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from recsift.config import SyntheticConfig
from recsift.data.datasets import (
    DatasetNotFound,
    catalog_for,
    dealrec_events,
    movielens_events,
    read_dealrec_split,
    recbole_events,
    resolve_dataset,
)
from recsift.data.synthetic import SyntheticStream
from recsift.stream.events import parse_event


def test_games_matches_the_published_split(games: Path) -> None:
    train = read_dealrec_split(games, "train")
    assert len(train) == 49_156
    assert sum(len(v) for v in train.values()) == 299_987
    assert sum(len(v) for v in read_dealrec_split(games, "valid").values()) == 22_609
    assert sum(len(v) for v in read_dealrec_split(games, "test").values()) == 19_733
    assert len(catalog_for(games)) == 17_332  # type: ignore[arg-type]


def test_games_events_keep_each_users_order_and_split_order(games: Path) -> None:
    events = dealrec_events(games)
    assert len(events) == 299_987 + 22_609 + 19_733
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(events))
    user = "1"
    mine = [e for e in events if e.user_id == user]
    expected = (read_dealrec_split(games, "train").get(user, []) + read_dealrec_split(games, "valid").get(user, [])
                + read_dealrec_split(games, "test").get(user, []))
    assert [e.item_id for e in mine] == expected
    assert len({e.event_id for e in events}) == len(events)


def test_ml100k_is_time_sorted_with_its_catalog(ml100k: Path) -> None:
    events = recbole_events(ml100k)
    assert len(events) == 100_000
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(events))
    assert len({e.user_id for e in events}) == 943 and events[0].kind == "rating"
    assert catalog_for(ml100k).title("1") == "Toy Story"  # type: ignore[union-attr]


def test_movielens_dat_and_udata(tmp_path: Path) -> None:
    dat = tmp_path / "ratings.dat"
    dat.write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1357::5::978298709\n")
    events = movielens_events(dat)
    assert [e.item_id for e in events] == ["1357", "1193", "661"]
    udata = tmp_path / "u.data"
    udata.write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    assert [e.user_id for e in movielens_events(udata)] == ["196", "186"]


def test_resolve_dataset_names_the_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFound, match="ml-100k"):
        resolve_dataset("ml-100k", tmp_path)


def test_synthetic_stream_is_deterministic_and_sliceable() -> None:
    cfg = SyntheticConfig(seed=42, users=100, items=80, events=30_000)
    a = list(SyntheticStream(cfg).events())
    assert a == list(SyntheticStream(cfg).events())
    assert a[12_345:20_000] == list(SyntheticStream(cfg).events(12_345, 20_000))
    assert a != list(SyntheticStream(cfg.model_copy(update={"seed": 43})).events())
    payloads = list(SyntheticStream(cfg).payloads(0, 5))
    assert [parse_event(p, 1024) for _, p in payloads] == a[:5]  # the fast path encodes the same events
    assert [k for k, _ in payloads] == [e.user_id.encode() for e in a[:5]]
    assert all(b - a_.ts >= 0 for a_, b in zip(a, [e.ts for e in a[1:]], strict=False))


def test_synthetic_stream_has_skew_new_items_a_shift_and_readable_titles() -> None:
    cfg = SyntheticConfig(seed=1, users=500, items=400, events=100_000, new_item_share=0.25, shift_at=0.5)
    stream = SyntheticStream(cfg)
    events = list(stream.events())
    first, second = Counter(e.item_id for e in events[:50_000]), Counter(e.item_id for e in events[50_000:])
    top = first.most_common(10)
    assert sum(c for _, c in top) > 0.15 * 50_000  # Zipf: ten items hold a large share
    top_before = {i for i, _ in top}
    top_after = {i for i, _ in second.most_common(10)}
    assert len(top_before & top_after) <= 5  # popularity shifted
    early = {e.item_id for e in events[:5_000]}
    late_new = {e.item_id for e in events[60_000:]} - {e.item_id for e in events[:30_000]}
    assert len(late_new) >= 10  # items that did not exist early on appear later
    assert not early & {f"i{i}" for i in range(cfg.items) if stream.release[i] > 0.1}
    catalog = stream.catalog()
    titles = [it.title for it in catalog]
    assert len(set(titles)) == len(titles) and all(len(t.split()) >= 3 for t in titles)
    # users lean to their taste group
    same = sum(stream.item_taste[int(e.item_id[1:])] == stream.user_taste[int(e.user_id[1:])] for e in events[:20_000])
    assert same / 20_000 > 0.6
