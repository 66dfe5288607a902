"""Adapter registry atomicity and pointer moves; Recall/NDCG against hand-computed values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from recsift.trainer.evaluate import recall_ndcg
from recsift.trainer.registry import AdapterRegistry


def write_files(path: Path) -> None:
    (path / "adapter_model.safetensors").write_bytes(b"x")


def test_versions_are_atomic_and_the_pointer_moves(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    assert reg.current() is None and reg.versions() == []
    v1 = reg.save(write_files, {"snapshot_id": 1})
    v2 = reg.save(write_files, {"snapshot_id": 2})
    assert (v1.name, v2.name) == ("v0001", "v0002") and v2.metadata["snapshot_id"] == 2

    def crash(path: Path) -> None:
        write_files(path)
        raise KeyboardInterrupt  # killed mid-save

    with pytest.raises(KeyboardInterrupt):
        reg.save(crash, {})
    assert [v.name for v in reg.versions()] == ["v0001", "v0002"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".v")]  # no half version left
    (tmp_path / ".v0003-leftover").mkdir()  # what a SIGKILL would leave: hidden, never listed
    assert [v.name for v in reg.versions()] == ["v0001", "v0002"]
    assert reg.save(write_files, {}).name == "v0003"

    reg.promote("v0001")
    reg.promote("v0002")
    assert reg.current().name == "v0002"  # type: ignore[union-attr]
    assert reg.rollback().name == "v0001" and reg.current().name == "v0001"  # type: ignore[union-attr]
    with pytest.raises(LookupError):
        reg.promote("v0099")


def test_rollback_without_history_is_an_error(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path)
    reg.save(write_files, {})
    reg.promote("v0001")
    with pytest.raises(LookupError, match="nothing to roll back"):
        reg.rollback()


def test_recall_and_ndcg_by_hand() -> None:
    ranked = [["a", "b", "c", "d"], ["x", "y", "z", "w"]]
    targets = [["b", "d", "q"], ["x"]]
    m = recall_ndcg(ranked, targets, ks=(2, 4))
    # user 1: hit at rank 2 (and 4); 3 targets. user 2: hit at rank 1, 1 target
    assert m["recall@2"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["recall@4"] == pytest.approx((2 / 3 + 1) / 2)
    idcg2 = 1 + 1 / math.log2(3)
    assert m["ndcg@2"] == pytest.approx(((1 / math.log2(3)) / idcg2 + 1) / 2)
    idcg4 = 1 + 1 / math.log2(3) + 1 / math.log2(4)  # min(3 targets, 4)
    assert m["ndcg@4"] == pytest.approx(((1 / math.log2(3) + 1 / math.log2(5)) / idcg4 + 1) / 2)
    assert recall_ndcg([["a"], ["b"]], [["a"], []], ks=(1,))["recall@1"] == 1.0  # users without targets skipped
    with pytest.raises(ValueError):
        recall_ndcg([["a"]], [[]], ks=(1,))
