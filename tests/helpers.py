"""Helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from recsift.config import Settings, load_config
from recsift.stream.broker import EmbeddedBroker

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("RECSIFT_TEST_DATA", ROOT.parent / "shared" / "data"))


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
