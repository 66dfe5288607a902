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
    (tmp_path / ".current.tmp").write_text("v0099\n")  # a pointer write cut short
    assert sorted(reg.discard_partial()) == [".current.tmp", ".v0003-leftover"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0001", "v0002", "v0003"]

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


def test_evaluate_command_on_a_tiny_dealrec_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsift.cli import main
    from tests.helpers import tiny_llm

    model, tokenizer = tiny_llm(lora=False)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    data = tmp_path / "data"
    data.mkdir()
    titles = ["zelda", "mario racing", "halo", "doom space quest", "tetris", "portal chess"]
    (data / "items.tsv").write_text("item_id\ttitle\tcategory\n" + "".join(f"{i + 1}\t{t}\tx\n" for i, t in enumerate(titles)))
    (data / "train.txt").write_text("".join(f"{u} {1 + u % 6} {1 + (u + 1) % 6}\n" for u in range(1, 9)))
    (data / "valid.txt").write_text("".join(f"{u}\n" for u in range(1, 9)))
    (data / "test.txt").write_text("".join(f"{u} {1 + (u + 2) % 6}\n" for u in range(1, 7)) + "7\n8\n")
    args = ["evaluate", "--dataset", str(data), "--users", "0", "--set", f"trainer.base_model={tmp_path / 'tiny'}",
            "--set", "trainer.dtype=fp32", "--set", f"trainer.cache_dir={tmp_path / 'cache'}",
            "--set", "trainer.max_new_tokens=3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "(6 users)" in out  # users 7 and 8 have no test items
    recall20 = float(next(line for line in out.splitlines() if line.startswith("recall@20")).split()[-1])
    assert recall20 == 1.0  # 6 items in the catalogue: every target is in the top 20
    assert main([*args, "--no-generate"]) == 0


def test_candidate_metrics_by_hand_and_at_chance() -> None:
    import numpy as np

    from recsift.trainer.evaluate import candidate_metrics

    scores = np.array([[5.0, 1, 2, 3], [3.0, 5, 2, 1], [2.0, 5, 2, 1]])  # target first: ranks 0, 1, 1 (+1 tie)
    m = candidate_metrics(scores, np.array([1.0, 2.0, 3.0]))
    assert m["hr@1"].tolist() == [1.0, 0.0, 0.0]
    assert m["ndcg@5"].tolist() == pytest.approx([1.0, 1 / np.log2(3), 1 / np.log2(4)])  # a tie counts against
    assert m["rank_percentile"].tolist() == pytest.approx([1.0, 2 / 3, 1 - 1.5 / 3])
    assert m["target_nll"].tolist() == [1.0, 2.0, 3.0]
    chance = candidate_metrics(np.random.default_rng(0).normal(size=(20_000, 20)))
    assert chance["rank_percentile"].mean() == pytest.approx(0.5, abs=0.01)
    assert chance["hr@5"].mean() == pytest.approx(5 / 20, abs=0.01)
    with pytest.raises(ValueError):
        candidate_metrics(np.zeros((3, 1)))


def test_candidate_score_rules() -> None:
    import numpy as np

    from recsift.trainer.evaluate import candidate_metrics, candidate_scores

    # the target has the longest title: the summed log-likelihood ranks it last, although the history makes
    # it more likely than its prior by more than any negative's gain (what PMI measures)
    logliks = np.array([[-30.0, -10.0, -12.0, -11.0]])
    priors = np.array([[-40.0, -11.0, -12.5, -11.0]])
    assert candidate_metrics(candidate_scores(logliks, priors, "loglik"))["rank_percentile"].tolist() == [0.0]
    assert candidate_metrics(candidate_scores(logliks, priors, "pmi"))["rank_percentile"].tolist() == [1.0]
    assert candidate_scores(logliks, None, "loglik").tolist() == logliks.tolist()
    with pytest.raises(ValueError, match="prior"):
        candidate_scores(logliks, None, "pmi")
    with pytest.raises(ValueError, match="unknown"):
        candidate_scores(logliks, priors, "mean")


def test_negative_sampler_is_seeded_exclusive_and_half_popular() -> None:
    from recsift.trainer.evaluate import NegativeSampler

    items = [f"i{k}" for k in range(1000)]
    popularity = {f"i{k}": 1000.0 for k in range(10)}  # ten very popular items
    sampler = NegativeSampler(items, popularity, seed=3)
    got = sampler.candidates("u1", {"i0", "i1"}, "i5", 20)
    assert got[0] == "i5" and len(set(got)) == 20 and not {"i0", "i1"} & set(got)
    assert got == sampler.candidates("u1", {"i0", "i1"}, "i5", 20)  # fixed per user
    assert got != sampler.candidates("u2", {"i0", "i1"}, "i5", 20)
    assert set(got[1:8]) <= {f"i{k}" for k in range(10)}  # the popular half comes from the popular items
    with pytest.raises(ValueError):
        NegativeSampler(items[:5], {}).candidates("u", {"i0"}, "i1", 20)


def test_length_matched_negatives_leave_nothing_to_win_by_length() -> None:
    """Targets with longer titles than the catalogue's typical item (as Games test items are): "the
    shorter title wins" beats chance by far against unmatched negatives (the control) and is at chance
    against length-matched ones."""
    import numpy as np

    from recsift.trainer.evaluate import NegativeSampler, candidate_metrics

    rng = np.random.default_rng(0)
    lengths = {f"i{k}": int(n) for k, n in enumerate(rng.integers(3, 30, 5000))}
    popularity = {f"i{k}": float(rng.integers(1, 100)) for k in range(0, 5000, 3)}
    targets = [i for i, n in lengths.items() if n >= 20][:400]  # long-titled targets
    for matched, (low, high) in ((False, (0.0, 0.3)), (True, (0.45, 0.55))):
        sampler = NegativeSampler(list(lengths), popularity, seed=1, length=lengths.__getitem__ if matched else None)
        cands = [sampler.candidates(f"u{k}", set(), t, 20) for k, t in enumerate(targets)]
        assert all(len(set(c)) == 20 and c[0] == t for c, t in zip(cands, targets, strict=True))
        shorter_wins = candidate_metrics(-np.array([[lengths[i] for i in c] for c in cands], dtype=float))
        assert low < shorter_wins["rank_percentile"].mean() < high, matched
        if matched:
            assert all(abs(lengths[i] - lengths[c[0]]) <= 1 for c in cands for i in c)
