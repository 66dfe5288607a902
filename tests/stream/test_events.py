from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsift.stream.catalog import Catalog, Item
from recsift.stream.deadletter import FileDeadLetterSink, dead_letter_payload
from recsift.stream.dedup import DedupIndex
from recsift.stream.events import Event, Rejection, parse_event, parse_timestamp
from recsift.stream.validator import Validator
from recsift.vocab import RejectReason


def ev(**kw: object) -> bytes:
    base: dict[str, object] = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "timestamp": 1700000000}
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_valid_event_with_optional_fields() -> None:
    e = parse_event(ev(kind="click", value=2), 1024)
    assert e == Event("e1", "u1", "i1", 1700000000.0, "click", 2.0)
    assert parse_event(e.encode(), 1024) == e  # round trip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2023-11-14T22:13:20Z", 1700000000.0),
        ("2023-11-14T22:13:20+00:00", 1700000000.0),
        ("2023-11-14T23:13:20+01:00", 1700000000.0),
        ("2023-11-14T22:13:20", 1700000000.0),  # naive means UTC
        ("1700000000.5", 1700000000.5),
        (1700000000, 1700000000.0),
    ],
)
def test_timestamps(text: object, expected: float) -> None:
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", RejectReason.MALFORMED_JSON),
        (b"\xff\xfe\x00", RejectReason.MALFORMED_JSON),
        (b"[1, 2]", RejectReason.MALFORMED_JSON),
        (ev(user_id=...), RejectReason.MISSING_FIELD),
        (ev(event_id=None), RejectReason.MISSING_FIELD),
        (ev(timestamp=...), RejectReason.MISSING_FIELD),
        (ev(user_id=""), RejectReason.INVALID_FIELD),
        (ev(user_id=True), RejectReason.INVALID_FIELD),
        (ev(item_id={"a": 1}), RejectReason.INVALID_FIELD),
        (ev(item_id="x" * 300), RejectReason.INVALID_FIELD),
        (ev(timestamp="yesterday"), RejectReason.INVALID_FIELD),
        (ev(timestamp=-5), RejectReason.INVALID_FIELD),
        (ev(timestamp=1700000000000), RejectReason.INVALID_FIELD),  # milliseconds, not seconds
        (ev(value="high"), RejectReason.INVALID_FIELD),
        (ev(kind=7), RejectReason.INVALID_FIELD),
        (b'{"event_id":"e","user_id":"u","item_id":"i","timestamp":1,"value":NaN}', RejectReason.MALFORMED_JSON),
        (ev(value=1e400), RejectReason.MALFORMED_JSON),  # json.dumps writes Infinity: not JSON either
        (ev(timestamp=True), RejectReason.INVALID_FIELD),
        (ev(user_id=" u1"), RejectReason.INVALID_FIELD),
        (ev(pad="x" * 2000), RejectReason.OVERSIZE),
    ],
)
def test_rejections_carry_reason_and_payload(payload: bytes, reason: RejectReason) -> None:
    result = parse_event(payload, 1024)
    assert isinstance(result, Rejection)
    assert result.reason is reason
    assert result.payload == payload and result.detail


def test_validator_unknown_items_and_duplicates() -> None:
    catalog = Catalog([Item("i1", "One")])
    strict = Validator(1024, catalog, True, DedupIndex(10))
    assert isinstance(strict.validate(ev()), Event)
    dup = strict.validate(ev())
    assert isinstance(dup, Rejection) and dup.reason is RejectReason.DUPLICATE
    unknown = strict.validate(ev(event_id="e2", item_id="i9"))
    assert isinstance(unknown, Rejection) and unknown.reason is RejectReason.UNKNOWN_ITEM
    lenient = Validator(1024, catalog, False, DedupIndex(10))
    assert isinstance(lenient.validate(ev(event_id="e3", item_id="i9")), Event)


def test_dedup_is_bounded_and_tracks_changes() -> None:
    d = DedupIndex(4)  # two generations of two ids
    for i in range(5):
        assert not d.seen_before(f"e{i}", 0)
    assert len(d) <= 4
    assert d.seen_before("e4", 0) and d.seen_before("e3", 0)  # the most recent half is always remembered
    assert not d.seen_before("e0", 0)  # the oldest generation was forgotten
    d.clear_changes()
    d.seen_before("e9", 1)
    assert d.added == {(1, d.generation): ["e9"]}
    assert d.forgotten_below == d.generation - 1
    d.drop_partitions({1})
    assert d.added == {} and "e9" not in d.ids()
    big = DedupIndex(1000)
    for i in range(10_000):
        big.seen_before(str(i), 0)
        assert len(big) <= 1000
    assert all(big.seen_before(str(i), 0) for i in range(9_500, 10_000))


def test_catalog_formats(tmp_path: Path) -> None:
    tsv = tmp_path / "items.tsv"
    tsv.write_text("item_id\ttitle\tcategory\n1\tX: Beyond\tGames > PC\n2\tAnno 2070\tGames\n")
    tsv_cat = Catalog.load(tsv)
    assert len(tsv_cat) == 2 and tsv_cat.get("1").title == "X: Beyond"  # type: ignore[union-attr]
    assert tsv_cat.get("1").attributes == {"category": "Games > PC"}  # type: ignore[union-attr]
    rec = tmp_path / "m.item"
    rec.write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\n1\tToy Story\t1995\n")
    assert Catalog.load(rec).title("1") == "Toy Story"
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"item_id": 5, "title": "Five", "genre": "x"}\n')
    assert Catalog.load(jsonl).get("5").attributes == {"genre": "x"}  # type: ignore[union-attr]
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('item_id,title\n7,"Seven, the game"\n')
    assert Catalog.load(csv_path).title("7") == "Seven, the game"
    assert tsv_cat.title("404") == "item 404"
    assert not Catalog().update_from_message(b'{"item_id": "x"}')  # no title
    with pytest.raises(FileNotFoundError):
        Catalog.load(tmp_path / "missing.tsv")


def test_file_dead_letters_keep_raw_payload_even_binary(tmp_path: Path) -> None:
    sink = FileDeadLetterSink(tmp_path / "dlq" / "dead.jsonl")
    bad = [b"{oops", b"\xff\x00binary", ev(user_id=...)]
    for payload in bad:
        result = parse_event(payload, 1024)
        assert isinstance(result, Rejection)
        sink.write(result, {"offset": 1}, None)
    sink.close()
    records = [json.loads(line) for line in (tmp_path / "dlq" / "dead.jsonl").read_text().splitlines()]
    assert [dead_letter_payload(r) for r in records] == bad
    assert [r["reason"] for r in records] == ["malformed_json", "malformed_json", "missing_field"]
