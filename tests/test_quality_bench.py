"""The quality benchmark's statistics: the gates rank methods only when the protocol detects its controls."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def quality() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module
    spec.loader.exec_module(module)
    return module


def records(q: ModuleType, means: dict[str, float], users: int = 800) -> dict[str, dict[int, dict[str, Any]]]:
    """Per-user rank percentiles around each arm's mean; a user effect shared by every arm (paired design)."""
    user = np.random.default_rng(99).normal(0, 0.15, users)
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for k, (arm, mean) in enumerate(means.items()):
        seeds = [0] if arm in ("popularity", "base", *q.SINGLE_SEED) else [0, 1, 2]
        for seed in seeds:
            values = mean + user + np.random.default_rng(100 * k + seed).normal(0, 0.05, users)
            per_user = {m: values.tolist() for m in q.CANDIDATE_METRICS}
            out.setdefault(arm, {})[seed] = {"arm": arm, "seed": seed, "per_user": per_user,
                                             "mean": {m: float(values.mean()) for m in q.CANDIDATE_METRICS}}
    return out


META = {"dataset": "synthetic", "date": "today", "commit": "x", "cores": 2, "base_model": "tiny", "pool": 10,
        "budget": 4, "epochs": 1, "users": 800, "candidates": 20, "protocol": {"score": "pmi"}}


def test_a_protocol_that_detects_its_controls_ranks_methods() -> None:
    q = quality()
    summary = q.summarise(records(q, {"popularity": 0.45, "base": 0.48, "random": 0.55, "random4x": 0.60,
                                      "dealrec": 0.58, "streaming": 0.55}), META)
    assert summary["gates"] == {"random beats base": True, "random beats popularity": True,
                                "positive control beats random": True, "complete": True, "measurable": True}
    table = q.markdown(summary)
    assert "not measurable" not in table.lower()
    dealrec = summary["comparisons"]["dealrec - random"]["rank_percentile"]
    assert abs(dealrec["diff"] - 0.03) < 0.005 and dealrec["significant"]
    assert f"| dealrec - random | {dealrec['diff']:+.4f} " in table and "| yes |" in table
    streaming = summary["comparisons"]["streaming - dealrec"]["rank_percentile"]
    assert abs(streaming["diff"] + 0.03) < 0.005 and streaming["ci95"][1] < 0 and len(streaming["per_seed"]) == 3


def test_negative_control_an_undetected_positive_control_ranks_nothing() -> None:
    """The control trains on 4x the data yet is no better than Random: the protocol has no power, so the
    table must not rank DEALRec, however large its difference looks."""
    q = quality()
    summary = q.summarise(records(q, {"popularity": 0.45, "base": 0.48, "random": 0.55, "random4x": 0.55,
                                      "dealrec": 0.58}), META)
    assert summary["gates"]["positive control beats random"] is False
    assert summary["gates"]["measurable"] is False
    table = q.markdown(summary)
    assert "Not measurable at this scale" in table
    assert "| yes |" not in table and "| no |" not in table


def test_an_incomplete_run_evaluates_no_gate() -> None:
    q = quality()
    summary = q.summarise(records(q, {"base": 0.48, "random": 0.55}), META)
    assert summary["gates"]["complete"] is False and summary["gates"]["positive control beats random"] is None
    assert "Incomplete run" in q.markdown(summary)


def test_the_committed_results_keep_their_protocol_keys_and_a_diagnostic_gets_its_own() -> None:
    """A resumed run recognises the committed records (a protocol field added later must not re-key them),
    and the response-only diagnostic never reads or overwrites the protocol's records."""
    import json

    q = quality()
    for run in ("quality-games-cpu", "quality-games-cpu-pilot-lr1e-4"):
        summary = json.loads((ROOT / "bench" / "results" / f"{run}.json").read_text())
        fields = {k: v for k, v in summary["protocol"].items() if k != "key"}
        protocol = q.Protocol(**fields)
        record = json.loads((ROOT / "bench" / "results" / run / "base-s0.json").read_text())
        assert protocol.key() == record["protocol"]
        diagnostic = q.Protocol(**{**fields, "train_on_inputs": False})
        assert diagnostic.key() != protocol.key()
