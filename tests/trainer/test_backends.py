"""The refresh contract, run over every backend in ``recsift.trainer.refresh.BACKENDS``: a first refresh trains and
promotes a version that records its backend; the next starts from the serving version; a worse model is rejected
and serving stays; too few validation samples reject the refresh and save nothing; an empty coreset is skipped; a
rollback serves the version before; the backend's effort scorer scores every sample. A backend added without a
profile here fails the suite."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from recsift.config import Settings
from recsift.selection.reservoir import StratifiedReservoir
from recsift.selection.stage import SelectionStage
from recsift.selection.store import CoresetStore
from recsift.stream.checkpoint import Checkpoint
from recsift.stream.windows import Sample
from recsift.trainer.refresh import BACKENDS, backend_class, list_runs, refresh, registry_for
from tests.trainer.test_refresh import settings, state_with_coreset, tiny
from tests.trainer.test_tiger_refresh import catalog, tiger_settings


@dataclass(frozen=True)
class Profile:
    """How the suite configures one backend: a refresh that learns, and one that makes the model worse."""

    make: Callable[..., Settings]  # (state dir, **trainer options) -> settings
    learns: dict[str, Any]
    wrecks: dict[str, Any]
    files: set[str] = field(default_factory=set)  # what a saved version holds


PROFILES = {
    "bigrec": Profile(settings, {"learning_rate": 2e-2, "epochs": 4, "warmup_steps": 0},
                      {"learning_rate": 30.0, "epochs": 1, "warmup_steps": 0},
                      {"adapter_model.safetensors", "adapter_config.json"}),
    "tiger": Profile(tiger_settings, {}, {"tiger": {"learning_rate": 5.0, "epochs": 2}},
                     {"model.safetensors", "config.json", "semantic_ids.safetensors"}),
}


def test_every_registered_backend_has_a_profile() -> None:
    assert set(PROFILES) == set(BACKENDS)


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_a_refresh_promotes_and_the_next_starts_from_the_serving_version(tmp_path: Path, backend: str) -> None:
    p = PROFILES[backend]
    cfg = p.make(state_with_coreset(tmp_path), **p.learns)
    first = refresh(cfg, "manual", catalog(), llm=tiny())
    assert first.outcome == "promoted", first.error
    assert first.serving_before is None and first.new_loss < first.serving_loss  # type: ignore[operator]
    current = registry_for(cfg).current()
    assert current is not None and current.name == first.version == "v0001"
    assert current.metadata["backend"] == backend and current.metadata["promoted"] is True
    assert p.files <= {f.name for f in current.path.iterdir()}
    again = refresh(cfg, "interval", catalog(), llm=tiny())
    assert again.serving_before == "v0001" and again.outcome in ("promoted", "rejected"), again.error
    assert [r["trigger"] for r in list_runs(cfg.checkpoint.path)] == ["manual", "interval"]


def test_a_worse_model_is_rejected_serving_stays_and_a_rollback_serves_the_version_before(tmp_path: Path,
                                                                                          backend: str) -> None:
    p = PROFILES[backend]
    cfg = p.make(state_with_coreset(tmp_path), **p.learns)
    assert refresh(cfg, "manual", catalog(), llm=tiny()).outcome == "promoted"
    wrecked = p.make(cfg.checkpoint.state_dir, promote_tolerance=0.0, early_stopping_patience=5, **p.wrecks)
    outcome = refresh(wrecked, "drift", catalog(), llm=tiny())
    assert (outcome.outcome, outcome.reason) == ("rejected", "worse"), outcome.error
    assert "worse than serving" in (outcome.error or "")
    registry = registry_for(cfg)
    assert registry.current().name == "v0001"  # type: ignore[union-attr]
    forced = p.make(cfg.checkpoint.state_dir, promote_tolerance=1e9, **p.learns)
    assert refresh(forced, "manual", catalog(), llm=tiny()).version == "v0003"
    assert registry.current().name == "v0003"  # type: ignore[union-attr]
    assert registry.rollback().name == "v0001"


@pytest.mark.parametrize("held_out", [0, 5])
def test_too_few_validation_samples_reject_the_refresh_and_save_nothing(tmp_path: Path, backend: str,
                                                                        held_out: int) -> None:
    p = PROFILES[backend]
    cfg = p.make(state_with_coreset(tmp_path, validation=held_out), **p.learns)
    outcome = refresh(cfg, "manual", catalog(), llm=tiny())
    assert (outcome.outcome, outcome.reason) == ("rejected", "no_validation"), outcome.error
    assert registry_for(cfg).versions() == [] and registry_for(cfg).current() is None


def test_an_empty_coreset_is_skipped(tmp_path: Path, backend: str) -> None:
    p = PROFILES[backend]
    state = tmp_path / "state"
    Checkpoint(state / "recsift.sqlite", [CoresetStore(SelectionStage(StratifiedReservoir(4, 2)))]).close()
    cfg = p.make(state, **p.learns)
    outcome = refresh(cfg, "manual", catalog(), llm=tiny())
    assert outcome.outcome == "skipped", outcome.error
    assert registry_for(cfg).versions() == []


def test_the_effort_scorer_scores_every_sample_as_a_function_of_the_sample(tmp_path: Path, backend: str) -> None:
    """DEALRec's effort on the backend's model: finite, positive, different across samples, the same in any
    batch order (a fixed model; the cache is keyed by sample id)."""
    p = PROFILES[backend]
    cfg = p.make(state_with_coreset(tmp_path), **p.learns)
    rows = [Sample(10 + k, f"u{k}", tuple(f"i{j}" for j in range(k, k + 1 + k % 3)), f"i{k + 5}", 0.0)
            for k in range(6)]
    effort = backend_class(backend)(cfg, catalog(), tiny()).effort(registry_for(cfg))
    scores = effort(rows)
    assert torch.isfinite(scores).all() and (scores > 0).all() and len(set(scores.tolist())) == len(rows)
    fresh = backend_class(backend)(cfg, catalog(), tiny()).effort(registry_for(cfg))
    assert fresh(rows[::-1]).flip(0).tolist() == pytest.approx(scores.tolist(), rel=1e-6)
