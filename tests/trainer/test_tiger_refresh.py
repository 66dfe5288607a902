"""The TIGER backend behind the refresh: the first refresh trains the semantic IDs and a T5 on the coreset and
promotes it; later ones fine-tune the serving T5 and give new items IDs without retraining; a worse model is
rejected; a version serves on its own (its T5 and its IDs); a registry of one backend refuses the other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsift.config import Settings
from recsift.stream.catalog import Catalog, Item
from recsift.trainer.evaluate import CANDIDATE_METRICS
from recsift.trainer.refresh import list_runs, refresh, registry_for
from recsift.trainer.tiger.backend import IDS_FILE, load_tiger
from recsift.vocab import SemanticIdMetric
from tests.helpers import TINY_WORDS, wait_for
from tests.trainer.test_refresh import settings, state_with_coreset, tiny

TIGER = {"backend": "tiger", "tiger": {"levels": 2, "codes": 16, "latent": 8, "rqvae_hidden": 32, "rqvae_epochs": 20,
                                       "d_model": 32, "layers": 1, "heads": 2, "history": 5, "epochs": 8,
                                       "batch_size": 8, "learning_rate": 3e-3,
                                       "max_collision_rate": 1.0}}  # 2 × 16 codes: shared codes are common


def tiger_settings(state: Path, **trainer: object) -> Settings:
    tiger = {**TIGER["tiger"], **trainer.pop("tiger", {})}  # type: ignore[dict-item]
    return settings(state, **{**TIGER, "tiger": tiger, **trainer})


def catalog(n: int = 101) -> Catalog:
    """Distinct titles in the tiny model's vocabulary (its other words are all one unknown token)."""
    w = TINY_WORDS
    return Catalog(Item(f"i{i}", f"{w[i % len(w)]} {w[i // len(w)]} {w[(3 * i + 1) % len(w)]}") for i in range(n))


def test_a_tiger_refresh_trains_ids_and_a_t5_and_the_version_serves_on_its_own(tmp_path: Path) -> None:
    cfg = tiger_settings(state_with_coreset(tmp_path))
    outcome = refresh(cfg, "manual", catalog(), llm=tiny())
    assert outcome.outcome == "promoted", outcome.error
    assert outcome.serving_before is None and outcome.new_loss < outcome.serving_loss  # type: ignore[operator]
    assert set(outcome.metrics) == {*CANDIDATE_METRICS, *SemanticIdMetric.values()}
    assert outcome.metrics["semantic_ids_retrained"] == 0.0
    current = registry_for(cfg).current()
    assert current is not None and current.metadata["backend"] == "tiger"
    assert {"config.json", "model.safetensors", IDS_FILE} <= {p.name for p in current.path.iterdir()}
    served = load_tiger(current.path, history=5)  # what `recsift serve` loads: the T5 and its IDs
    assert set(served.ids.ids) == {f"i{i}" for i in range(101)}  # every catalogue item has an ID
    ranked = served.recommend([["i1", "i2"], []], k=5)
    assert all(len(r) == 5 and set(r) <= set(served.ids.ids) for r in ranked)
    assert [r["outcome"] for r in list_runs(cfg.checkpoint.path)] == ["promoted"]


def test_a_later_refresh_fine_tunes_the_serving_t5_and_gives_new_items_ids_without_retraining(tmp_path: Path) -> None:
    cfg = tiger_settings(state_with_coreset(tmp_path))
    assert refresh(cfg, "manual", catalog(101), llm=tiny()).outcome == "promoted"
    first = load_tiger(registry_for(cfg).current().path, 5).ids  # type: ignore[union-attr]
    again = refresh(cfg, "interval", catalog(106), llm=tiny())  # five new catalogue items
    assert again.serving_before == "v0001" and again.outcome in ("promoted", "rejected"), again.error
    assert again.metrics["semantic_ids_retrained"] == 0.0
    saved = registry_for(cfg).get(again.version)  # type: ignore[arg-type]
    ids = load_tiger(saved.path, 5).ids
    assert ids.version == first.version  # the same quantiser
    assert {i: ids.ids[i] for i in first.ids} == first.ids  # old items keep their IDs
    assert {f"i{i}" for i in range(101, 106)} <= set(ids.ids) and len(set(ids.ids.values())) == len(ids.ids)


def test_a_quantiser_that_no_longer_fits_is_retrained_with_a_fresh_t5(tmp_path: Path) -> None:
    cfg = tiger_settings(state_with_coreset(tmp_path))
    assert refresh(cfg, "manual", catalog(101), llm=tiny()).outcome == "promoted"
    strict = tiger_settings(cfg.checkpoint.state_dir, tiger={"max_collision_rate": 0.0})  # any shared codes
    outcome = refresh(strict, "interval", catalog(106), llm=tiny())
    assert outcome.metrics["semantic_ids_retrained"] == 1.0, outcome.error
    assert outcome.serving_loss is not None and outcome.serving_loss > 0  # the serving T5 under its own IDs
    ids = load_tiger(registry_for(cfg).get(outcome.version).path, 5).ids  # type: ignore[arg-type]
    assert ids.version == 1 and len(ids.ids) == 106  # a new quantiser over every item


@pytest.mark.parametrize("first, then", [("bigrec", "tiger"), ("tiger", "bigrec")])
def test_a_registry_of_one_backend_refuses_a_refresh_of_the_other(tmp_path: Path, first: str, then: str) -> None:
    state = state_with_coreset(tmp_path)
    make = {"tiger": lambda **k: tiger_settings(state, **k), "bigrec": lambda **k: settings(state, **k)}
    assert refresh(make[first](learning_rate=5e-3, epochs=2), "manual", catalog(), llm=tiny()).outcome == "promoted"
    outcome = refresh(make[then](), "manual", catalog(), llm=tiny())
    assert outcome.outcome == "failed" and f"a {first} model" in (outcome.error or "")
    assert registry_for(make[then]()).current().name == "v0001"  # type: ignore[union-attr]


def test_recsift_serve_serves_the_promoted_tiger_version_and_follows_the_registry(tmp_path: Path) -> None:
    """`recsift serve` with ``trainer.backend=tiger``: recommendations by constrained beam search over the serving
    version's IDs (only catalogue items), candidates ranked by ID likelihood, and a rollback followed."""
    from tests.serving.test_serve import post, serve_process

    cfg = tiger_settings(state_with_coreset(tmp_path))
    items = catalog()
    assert refresh(cfg, "manual", items, llm=tiny()).outcome == "promoted"
    forced = tiger_settings(cfg.checkpoint.state_dir, promote_tolerance=1e9)
    assert refresh(forced, "manual", items, llm=tiny()).version == "v0002"
    registry = registry_for(cfg)
    path = tmp_path / "catalog.jsonl"
    path.write_text("".join(json.dumps({"item_id": it.item_id, "title": it.title}) + "\n" for it in items))
    with serve_process(tmp_path, "unused", f"serve.registry_dir={registry.root}", f"stream.catalog_path={path}",
                       "trainer.backend=tiger", "trainer.tiger.history=5", "trainer.tiger.beams=8") as (_, url):
        status, headers, answer = post(url + "/recommend", {"history": ["i1", "i2", "i3"], "k": 5})
        assert status == 200, answer
        assert headers["X-Recsift-Adapter-Version"] == "v0002"
        got = [r["item_id"] for r in answer["items"]]
        assert len(got) == 5 == len(set(got)) and set(got) <= {it.item_id for it in items}
        scores = [r["score"] for r in answer["items"]]
        assert scores == sorted(scores, reverse=True)  # best first, by the likelihood of the ID
        status, _, ranked = post(url + "/recommend", {"history": ["i1", "i2"], "candidates": ["i4", "i5", "i6"],
                                                      "k": 3})
        assert status == 200 and sorted(r["item_id"] for r in ranked["items"]) == ["i4", "i5", "i6"]
        registry.rollback()
        wait_for(lambda: post(url + "/recommend", {"history": ["i1"], "k": 2})[1]["X-Recsift-Adapter-Version"]
                 == "v0001", 30, "the server to follow the rollback")


def test_recsift_evaluate_ranks_a_tiger_version_over_the_whole_catalogue(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`recsift evaluate --backend tiger --adapter DIR`: Recall/NDCG@K of a saved TIGER version by constrained beam
    search (6 items: every target is in the top 20); without a version it is a clear error."""
    import torch

    from recsift.cli import main
    from recsift.trainer.tiger.backend import TigerRefreshModel
    from recsift.trainer.tiger.generator import TigerModel
    from recsift.trainer.tiger.rqvae import RQVAEConfig, SemanticIds

    data = tmp_path / "data"
    data.mkdir()
    (data / "items.tsv").write_text("item_id\ttitle\tcategory\n" + "".join(f"{i}\tgame {i}\tx\n" for i in range(1, 7)))
    (data / "train.txt").write_text("".join(f"{u} {1 + u % 6} {1 + (u + 1) % 6}\n" for u in range(1, 9)))
    (data / "valid.txt").write_text("".join(f"{u}\n" for u in range(1, 9)))
    (data / "test.txt").write_text("".join(f"{u} {1 + (u + 2) % 6}\n" for u in range(1, 7)) + "7\n8\n")
    ids = SemanticIds(RQVAEConfig(levels=2, codes=4, latent=4, hidden=8, epochs=5))
    ids.fit([str(i) for i in range(1, 7)], torch.randn((6, 8), generator=torch.Generator().manual_seed(0)))
    version = tmp_path / "v0001"
    version.mkdir()
    cfg = tiger_settings(tmp_path / "state")
    TigerRefreshModel(TigerModel.build(ids, d_model=16, layers=1, heads=2), None, cfg, Catalog()).save(version)
    args = ["evaluate", "--backend", "tiger", "--dataset", str(data), "--users", "0", "--set", "trainer.tiger.beams=6"]
    assert main([*args, "--adapter", str(version)]) == 0
    out = capsys.readouterr().out
    assert "(6 users)" in out
    assert float(next(line for line in out.splitlines() if line.startswith("recall@20")).split()[-1]) == 1.0
    assert main(args) != 0
    assert "--adapter" in capsys.readouterr().err


def test_the_commands_take_the_backend_and_prune_scores_tiger_effort(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`recsift refresh --backend tiger` trains a TIGER version; `recsift prune --backend tiger` with λ > 0 adds the
    T5's effort (on that serving version) to DEALRec's influence: the scores move off the influence-only ones."""
    from recsift.cli import main
    from tests.selection.test_prune import write_dealrec

    state = state_with_coreset(tmp_path)
    tiny_dir = tmp_path / "tiny"
    model, tokenizer = tiny().model, tiny().tokenizer
    model.save_pretrained(tiny_dir)
    tokenizer.save_pretrained(tiny_dir)
    sets = [a for k, v in {"trainer.base_model": tiny_dir, "trainer.dtype": "fp32", "trainer.eval_samples": 16,
                           "trainer.cache_dir": tmp_path / "cache", "trainer.tiger.levels": 2,
                           "trainer.tiger.codes": 16, "trainer.tiger.rqvae_epochs": 5, "trainer.tiger.d_model": 32,
                           "trainer.tiger.heads": 2, "trainer.tiger.epochs": 2}.items() for a in ("--set", f"{k}={v}")]
    titles = tmp_path / "catalog.jsonl"  # distinct titles: the tiny model gives all unknown words one embedding
    titles.write_text("".join(json.dumps({"item_id": it.item_id, "title": it.title}) + "\n" for it in catalog()))
    assert main(["refresh", "--state-dir", str(state), "--backend", "tiger", "--catalog", str(titles), *sets]) == 0
    assert registry_for(tiger_settings(state)).current().metadata["backend"] == "tiger"  # type: ignore[union-attr]

    (tmp_path / "data").mkdir()
    data = write_dealrec(tmp_path / "data")  # items 1..30, titled in the tiny model's words
    (data / "items.tsv").write_text("item_id\ttitle\tcategory\n" + "".join(
        f"{i}\t{TINY_WORDS[i]} {TINY_WORDS[(7 * i) % len(TINY_WORDS)]}\tx\n" for i in range(1, 31)))

    def prune(weight: float) -> dict[int, float]:
        out = tmp_path / f"prune-{weight}"
        assert main(["prune", "--dataset", str(data), "--method", "dealrec", "--epochs", "2", "--budget", "10",
                     "--out", str(out), "--set", f"checkpoint.state_dir={state}", "--backend", "tiger",
                     "--set", f"scoring.effort_weight={weight}", "--set", "scoring.scorer.depth=20",
                     "--set", "scoring.hidden=16", *sets]) == 0
        rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
        return {r["sample_id"]: r["score"] for r in rows}

    alone, with_effort = prune(0.0), prune(0.3)
    assert alone.keys() == with_effort.keys() and len(alone) == 59
    assert alone != with_effort and max(with_effort.values()) > 1.0  # minmax(influence) ≤ 1: effort was added
    assert "effort weight λ" in capsys.readouterr().out
