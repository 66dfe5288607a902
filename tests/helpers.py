"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsift.config import Settings, load_config
from recsift.stream.broker import EmbeddedBroker

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("RECSIFT_TEST_DATA", ROOT.parent / "shared" / "data"))
# The environment of the services a test starts. They share this machine's cores: one torch thread each, as for
# workers that share a host (README, "Several workers"); each spins while it waits for its own torch workers.
SERVICE_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def kafka_settings(broker: EmbeddedBroker, topic: str, tmp: Path | None = None, **overrides: Any) -> Settings:
    """Settings for a Kafka source on the test broker (short group timeouts, as in embedded mode)."""
    base: dict[str, Any] = {
        "stream.source": "kafka",
        "stream.bootstrap_servers": broker.bootstrap_servers,
        "stream.topic": topic,
        "stream.dead_letter_topic": f"{topic}.dlq",
        "stream.group_id": f"g-{topic}",
        "stream.session_timeout_ms": 2000,
        "stream.heartbeat_interval_ms": 500,
        "monitoring.progress": False,
        "monitoring.port": 0,  # tests that need the HTTP surface pick a free port
    }
    if tmp is not None:
        base["checkpoint.state_dir"] = str(tmp / "state")
    base.update(overrides)
    return load_config(overrides=base)


TINY_WORDS = ("the user has played following video games before with titles as recommend a new game that likes "
              "below is an instruction describes task paired input provides further context write response "
              "appropriately completes request given list of please to zelda mario halo doom tetris portal "
              "chess racing space quest").split()


def tiny_llm(seed: int = 0, lora: bool = True, layers: int = 2) -> tuple[Any, Any]:
    """A tiny Llama model and a byte-level BPE tokenizer built here (no download), LoRA-wrapped if asked."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(TINY_WORDS)] * 4 + ["### Instruction:\n### Input:\n### Response:\n; , ."],
                            vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.1))
    return model, tokenizer


def save_tiny_llm(path: Path) -> Path:
    """Write the tiny Llama and its tokenizer where ``trainer.base_model`` can load them with from_pretrained."""
    model, tokenizer = tiny_llm(lora=False)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def call(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any]:
    """One HTTP request; (status, JSON body or text)."""
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read().decode()
            return resp.status, json.loads(body) if resp.headers.get_content_type() == "application/json" else body
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


def reachable(url: str) -> bool:
    try:
        return call(url)[0] == 200
    except OSError:
        return False


def wait_for(cond: Callable[[], bool], timeout: float = 60.0, what: str = "a condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)


PROMETHEUS = _which("prometheus")
MONITORING = ROOT / "recsift" / "monitoring"


def start_prometheus(tmp: Path, target_port: int, port: int, scrape_interval: str = "5s",
                     serve_port: int | None = None) -> Any:
    """The real Prometheus (Debian's package) with the shipped config and rules, scraping 127.0.0.1:target_port
    (and a `recsift serve` on ``serve_port``)."""
    import shutil
    import subprocess

    from recsift.stream.broker import free_port

    assert PROMETHEUS is not None
    config = (MONITORING / "prometheus" / "prometheus.yml").read_text()
    config = config.replace("127.0.0.1:9400", f"127.0.0.1:{target_port}").replace("interval: 5s",
                                                                                   f"interval: {scrape_interval}")
    config = config.replace("127.0.0.1:9500", f"127.0.0.1:{serve_port or free_port()}")
    (tmp / "prometheus.yml").write_text(config)
    shutil.copy(MONITORING / "prometheus" / "rules.yml", tmp / "rules.yml")
    return subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                            stderr=(tmp / "prometheus.log").open("w"))


def prom_query(port: int, expr: str) -> list[dict[str, Any]]:
    """An instant PromQL query; the result vector ([] while Prometheus is starting)."""
    from urllib.parse import quote

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query={quote(expr)}", timeout=5) as r:
            return list(json.loads(r.read())["data"]["result"])
    except OSError:
        return []
