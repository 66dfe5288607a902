"""The HTTP surface: unit checks of the endpoints, and the admin flow against a running service."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from recsift.monitoring.http import Endpoints, HttpServer
from recsift.monitoring.metrics import Metrics
from recsift.stream.broker import EmbeddedBroker, free_port
from recsift.vocab import AdminAction
from tests.helpers import call, reachable, save_tiny_llm, wait_for


def test_endpoints_health_readiness_and_token_checks() -> None:
    metrics = Metrics()
    beat, lag, up = [time.monotonic()], [{0: 5}], [True]
    done: list[str] = []
    ep = Endpoints(metrics, lambda: beat[0], lambda: lag[0], lambda: up[0], lambda: {"ok": True},
                   {AdminAction.PAUSE: lambda: done.append("pause") or {"paused": True}}, SecretStr("s3cret"),
                   liveness_s=5, ready_lag=10)
    server = HttpServer(ep, port=0).start()
    try:
        assert call(server.url + "/healthz")[0] == 200
        beat[0] -= 60
        assert call(server.url + "/healthz") == (503, {"alive": False, "loop_age_s": pytest.approx(60, abs=2)})
        assert call(server.url + "/readyz")[0] == 200
        lag[0] = {0: 50, 1: 1}
        assert call(server.url + "/readyz") == (503, {"ready": False, "lag": 51, "connected": True})
        lag[0], up[0] = {0: 0}, False  # caught up but the broker is unreachable: not ready
        assert call(server.url + "/readyz") == (503, {"ready": False, "lag": 0, "connected": False})
        assert call(server.url + "/status") == (200, {"ok": True})
        status, text = call(server.url + "/metrics")
        assert status == 200 and "recsift_build_info" in text
        assert call(server.url + "/admin/pause", "POST")[0] == 401
        assert call(server.url + "/admin/pause", "POST", "wrong")[0] == 401
        assert metrics.registry.get_sample_value("recsift_admin_auth_failures_total") == 2
        assert call(server.url + "/admin/pause", "POST", "s3cret") == (200, {"action": "pause", "paused": True})
        assert done == ["pause"]
        assert call(server.url + "/admin/nope", "POST", "s3cret")[0] == 404
        assert call(server.url + "/nope")[0] == 404
    finally:
        server.close()
    ep.token = None  # no token configured: admin disabled
    server = HttpServer(ep, port=0).start()
    try:
        status, body = call(server.url + "/admin/pause", "POST", "s3cret")
        assert status == 404 and "disabled" in body["error"]
    finally:
        server.close()


@pytest.mark.slow
def test_admin_flow_against_a_running_service(broker: EmbeddedBroker, make_topic: Callable[..., str],
                                              tmp_path: Path) -> None:
    from recsift import service
    from recsift.config import SyntheticConfig
    from recsift.data.synthetic import SyntheticStream
    from recsift.stream.kafka import produce_events
    from tests.helpers import kafka_settings

    save_tiny_llm(tmp_path / "tiny")
    topic = make_topic(1)
    payloads = list(SyntheticStream(SyntheticConfig(events=4000, users=100, items=80)).payloads())
    produce_events(kafka_settings(broker, topic).stream, True, payloads[:3000], topic)
    port = free_port()
    cfg = kafka_settings(broker, topic, tmp_path, **{
        "monitoring.port": port, "admin.token": "s3cret", "stream.stop_when_idle_s": 60.0,  # a slow refresh must not outlast it
        "scoring.batch_size": 500, "scoring.scorer.depth": 20, "selection.budget": 64,
        "trainer.base_model": str(tmp_path / "tiny"), "trainer.dtype": "fp32", "trainer.max_prompt_tokens": 600,
        "trainer.refresh_samples": 16, "trainer.eval_samples": 8, "trainer.min_eval_samples": 8,
        "trainer.learning_rate": 5e-3, "trainer.epochs": 2,
    })
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {}
    # the pipeline, so the test stops it when done (stop_when_idle_s is only the safety net)
    thread = threading.Thread(target=lambda: result.update(
        summary=service.run(cfg, progress=lambda pipeline: result.setdefault("pipeline", pipeline))))
    thread.start()
    try:
        wait_for(lambda: reachable(url + "/healthz"))
        wait_for(lambda: call(url + "/status")[1]["events_consumed"] == 3000)
        assert call(url + "/admin/pause", "POST", "nope")[0] == 401
        assert call(url + "/admin/pause", "POST", "s3cret")[0] == 200
        wait_for(lambda: call(url + "/status")[1]["paused"])  # the source has paused its partitions
        time.sleep(1.0)  # a fetch already in flight lands before the pause
        consumed = call(url + "/status")[1]["events_consumed"]
        produce_events(kafka_settings(broker, topic).stream, True, payloads[3000:], topic)
        time.sleep(3)
        status = call(url + "/status")[1]
        assert status["paused"] and status["events_consumed"] == consumed == 3000  # nothing read while paused
        assert call(url + "/admin/resume", "POST", "s3cret")[0] == 200
        wait_for(lambda: call(url + "/status")[1]["events_consumed"] == 4000)
        assert call(url + "/admin/rollback", "POST", "s3cret")[0] == 409  # nothing to roll back to yet
        from recsift.cli import main

        token_file = tmp_path / "token"
        token_file.write_text("s3cret\n")
        assert call(url + "/admin/refresh", "POST", "wrong")[0] == 401  # nothing runs
        assert main(["admin", "refresh", "--url", url, "--token-file", str(token_file), "--wait"]) == 0
        status = call(url + "/status")[1]
        assert status["last_refresh"]["outcome"] == "promoted", status["last_refresh"]
        assert status["adapter"] == "v0001" and status["coreset"]["size"] > 0
        assert "s3cret" not in json.dumps(status)
        (tmp_path / "wrong").write_text("nope")
        assert main(["admin", "pause", "--url", url, "--token-file", str(tmp_path / "wrong")]) == 1  # 401
        assert main(["admin", "pause", "--url", url, "--token-file", str(tmp_path / "tiny" / "config.json")]) == 2
        assert call(url + "/admin/refresh", "POST", "s3cret")[1]["queued"]  # twice quickly: the second coalesces
        assert call(url + "/admin/refresh", "POST", "s3cret")[1]["coalesced"]
        wait_for(lambda: manual_runs(call(url + "/metrics")[1]) == 2 and not call(url + "/status")[1]["refresh_running"],
                 120)
        metrics_text = call(url + "/metrics")[1]
        assert 'recsift_admin_requests_total{action="pause"} 1.0' in metrics_text
        assert 'recsift_admin_requests_total{action="refresh"} 3.0' in metrics_text
        assert "recsift_serving_adapter_version" in metrics_text
    finally:
        if "pipeline" in result:
            result["pipeline"].stop("test done")
        thread.join(120)
    assert not thread.is_alive()
    summary = result["summary"]
    assert summary.ingest.consumed == 4000 and summary.adapter in ("v0001", "v0002")
    assert [r.trigger for r in summary.refreshes] == ["manual", "manual"]  # three admin requests → two runs


def manual_runs(metrics_text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
               if line.startswith("recsift_refresh_runs_total{") and 'trigger="manual"' in line)


def test_a_busy_monitoring_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    from recsift.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["run", "--max-events", "10", "--no-progress", "--state-dir", str(tmp_path),
                     "--set", f"monitoring.port={port}"])
    assert code == 2
