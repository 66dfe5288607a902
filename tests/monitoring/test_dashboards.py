"""The shipped Grafana dashboard and Prometheus files name only metrics recsift exports, and the real
Prometheus server (Debian's ``prometheus``) loads the rules and scrapes a running recsift endpoint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from recsift.monitoring.http import Endpoints, HttpServer
from recsift.monitoring.metrics import Metrics
from recsift.stream.broker import free_port
from recsift.vocab import Drift, Role
from tests.helpers import PROMETHEUS, prom_query, start_prometheus

MON = Path(__file__).resolve().parents[2] / "recsift" / "monitoring"
METRIC = re.compile(r"\b(recsift_[a-z_]+)")


def exported_names(roles: tuple[Role, ...] = tuple(Role)) -> set[str]:
    names = set()
    for family in Metrics(roles=roles).registry.collect():
        names.add(family.name)  # labelled series without children yet (partition, stratum) have no samples
        for sample in family.samples:
            names.add(sample.name)
    return names


def test_every_queried_metric_exists_and_drift_panels_show_thresholds() -> None:
    dash = json.loads((MON / "grafana" / "recsift.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    rules = (MON / "prometheus" / "rules.yml").read_text()
    used = {m for e in exprs for m in METRIC.findall(e)} | set(METRIC.findall(rules))
    missing = {m for m in used if m not in exported_names()}
    assert not missing, f"queried but not exported: {sorted(missing)}"
    titles = {p["title"] for p in dash["panels"] if p["type"] == "row"}
    assert titles == {"Ingestion", "Scoring", "Coreset", "Drift", "Refreshes", "Scale-out (one series per worker instance)",
                      "Serving (recsift serve)"}
    drift = [p for p in dash["panels"] if "drift" in json.dumps(p.get("targets", []))
             and p["title"].startswith(("Target", "Embedding"))]
    assert drift and all(p["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"] > 0 for p in drift)
    for metric in Drift.values():  # every drift measure has a panel
        assert any(f'metric=\\"{metric}\\"' in json.dumps(e) for e in exprs), metric


def test_each_alert_watches_only_the_roles_that_export_its_metrics() -> None:
    """A trainer has no event stream and a worker no refreshes: their alerts must not fire on each other."""
    import yaml

    groups = yaml.safe_load((MON / "prometheus" / "rules.yml").read_text())["groups"]
    alerts = {r["alert"]: set(METRIC.findall(r["expr"])) for g in groups for r in g["rules"] if "alert" in r}

    def live(roles: tuple[Role, ...]) -> set[str]:
        exported = exported_names(roles)
        return {name for name, used in alerts.items() if used <= exported}

    assert live(tuple(Role)) == set(alerts)  # the embedded default watches everything
    assert live((Role.TRAINER,)) == {"RecsiftRefreshFailing", "RecsiftNoRecentRefresh"}
    assert {"RecsiftNoEvents", "RecsiftBrokerUnreachable", "RecsiftCoresetDrift"} <= live((Role.WORKER,))
    assert not live((Role.WORKER,)) & live((Role.TRAINER,))
    info = {s.labels["roles"] for f in Metrics(roles=(Role.TRAINER,)).registry.collect() for s in f.samples
            if s.name == "recsift_build_info"}
    assert info == {"trainer"}


PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)


@pytest.mark.skipif(PROMTOOL is None, reason="Debian's prometheus (promtool) is not installed (.ci/run installs it)")
def test_promtool_accepts_the_rules_and_the_config() -> None:
    rules = subprocess.run([PROMTOOL, "check", "rules", str(MON / "prometheus" / "rules.yml")], capture_output=True,
                           text=True, check=False)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS" in rules.stdout
    for name in ("prometheus.yml", "compose.yml"):  # one process on this host; the compose stack
        config = subprocess.run([PROMTOOL, "check", "config", str(MON / "prometheus" / name)],
                                capture_output=True, text=True, check=False)
        assert config.returncode == 0, config.stdout + config.stderr


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (.ci/run installs it)")
def test_real_prometheus_loads_the_rules_and_scrapes_recsift(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.events_consumed.inc(42)
    metrics.drift.labels("target_js").set(0.9)
    server = HttpServer(Endpoints(metrics), port=0).start()
    prom_port = free_port()
    proc = start_prometheus(tmp_path, server.port, prom_port)
    try:
        deadline = time.monotonic() + 60
        result: list[dict[str, object]] = []
        while not result and time.monotonic() < deadline:
            result = prom_query(prom_port, "recsift_events_consumed_total")
            time.sleep(0.5)
        assert result and float(result[0]["value"][1]) == 42.0  # type: ignore[index]
        with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=5) as r:
            groups = json.loads(r.read())["data"]["groups"]
        names = {rule["name"] for g in groups for rule in g["rules"]}
        assert {"RecsiftCoresetDrift", "RecsiftBrokerUnreachable", "recsift:events_consumed:rate1m"} <= names
        assert all(rule.get("health") != "err" for g in groups for rule in g["rules"])
    finally:
        proc.terminate()
        proc.wait(10)
        server.close()
