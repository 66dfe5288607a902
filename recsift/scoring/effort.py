"""DEALRec's effort score: how hard the LLM finds a sample, as the norm of its loss gradient on a LoRA block.

(TIGER's effort, the same scorer on its T5's loss and a cross-attention block, is built in
:mod:`recsift.trainer.tiger.effort`.)

effort_i = ‖∂ loss_i / ∂ B‖₂, where loss_i is the sample's training loss (the mean cross-entropy over the
tokens its batch labels: prompt + response with ``trainer.train_on_inputs``, as the authors' effort
loss, else the response alone) and B is one LoRA-B matrix (default: the last layer's ``v_proj`` LoRA-B, as in
the authors' code). The
authors loop over samples with batch size 1; recsift computes a whole batch's per-sample norms from one
backward pass: for a linear layer y = a·Bᵀ the per-sample gradient is Σ_t g_tᵀ a_t, so capturing the
layer's input a and output gradient g per sample (hooks) gives every row's gradient exactly. Only B
requires grad during the pass, so backward stops at the last layer.

The scorer is model-agnostic: the service injects the LLM (loaded by the trainer's loader, wrapped with
peft LoRA) and a function that turns samples into padded prompt batches (``input_ids``,
``attention_mask``, ``labels`` with -100 on the prompt). Results are cached by sample id (bounded LRU);
with λ = 0 the service builds no effort scorer and never loads the LLM.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from recsift.stream.windows import Sample

IGNORE = -100
BatchFn = Callable[[Sequence[Sample]], dict[str, Tensor]]
LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]  # (model, batch) -> each row's loss [B]


def default_effort_block(model: nn.Module) -> str:
    """Name of the last layer's ``v_proj`` LoRA-B module (the highest layer index wins)."""
    best: tuple[int, str] | None = None
    for name, _ in model.named_modules():
        m = re.search(r"layers\.(\d+)\..*v_proj\.lora_B\.[^.]+$", name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), name)
    if best is None:
        raise ValueError("the model has no v_proj LoRA-B module: wrap it with peft LoRA targeting v_proj, "
                         "or name the effort block explicitly")
    return best[1]


class EffortScorer:
    """Per-sample LoRA-block gradient norms of an LLM, batched and cached by sample id."""

    def __init__(self, model: nn.Module, make_batch: BatchFn, block: str | None = None, batch_size: int = 8,
                 cache_size: int = 65_536, autocast_dtype: torch.dtype | None = None,
                 losses: LossFn | None = None) -> None:
        """``losses``: each row's training loss (default: a causal LM's, :func:`response_losses`); ``block``: the
        linear module whose gradient is measured (default: :func:`default_effort_block`)."""
        if batch_size < 1 or cache_size < 0:
            raise ValueError("batch_size must be positive and cache_size non-negative")
        self.model, self.make_batch = model, make_batch
        self.losses: LossFn = losses or response_losses
        self.block_name = block or default_effort_block(model)
        modules = dict(model.named_modules())
        if self.block_name not in modules or not isinstance(modules[self.block_name], nn.Linear):
            raise ValueError(f"effort block {self.block_name!r} is not a linear module of the model")
        self.block: nn.Linear = modules[self.block_name]
        self.batch_size, self.cache_size, self.autocast_dtype = batch_size, cache_size, autocast_dtype
        self.cache: OrderedDict[int, float] = OrderedDict()
        self.hits = 0
        self.computed = 0

    def __call__(self, samples: Sequence[Sample]) -> Tensor:
        """Effort of each sample (float64, input order); cached values are reused."""
        out = torch.empty(len(samples), dtype=torch.float64)
        todo: list[int] = []
        for i, s in enumerate(samples):
            cached = self.cache.get(s.sample_id)
            if cached is None:
                todo.append(i)
            else:
                self.cache.move_to_end(s.sample_id)
                out[i] = cached
                self.hits += 1
        todo.sort(key=lambda i: len(samples[i].history))  # similar lengths → less padding
        for start in range(0, len(todo), self.batch_size):
            rows = todo[start:start + self.batch_size]
            norms = self.norms(self.make_batch([samples[i] for i in rows]))
            for i, value in zip(rows, norms.tolist(), strict=True):
                if not math.isfinite(value):
                    raise FloatingPointError(f"effort of sample {samples[i].sample_id} is not finite")
                out[i] = value
                self._remember(samples[i].sample_id, value)
        self.computed += len(todo)
        return out

    def _remember(self, sample_id: int, value: float) -> None:
        if self.cache_size == 0:
            return
        self.cache[sample_id] = value
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    def norms(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-row gradient norms of each row's loss w.r.t. the block (one backward pass)."""
        captured: dict[str, Tensor] = {}

        def keep_input(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            captured["a"] = args[0].detach()
            output.register_hook(lambda g: captured.__setitem__("g", g.detach()))

        handle = self.block.register_forward_hook(keep_input)
        try:
            with self._only_block_trains(), self._autocast():
                losses = self.losses(self.model, batch)
                losses.sum().backward()  # Σ_i loss_i: each row's gradient stays separate in g
        finally:
            handle.remove()
            self.block.weight.grad = None
        per_sample = torch.einsum("bto,btr->bor", captured["g"].double(), captured["a"].double())
        return per_sample.flatten(1).norm(dim=1)

    @contextlib.contextmanager
    def _only_block_trains(self) -> Iterator[None]:
        flags = {p: p.requires_grad for p in self.model.parameters()}
        was_training = self.model.training
        try:
            for p in flags:
                p.requires_grad_(False)
            self.block.weight.requires_grad_(True)
            self.model.eval()  # no LoRA dropout: effort is a deterministic function of the sample
            yield
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
            self.model.train(was_training)

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.block.weight.device.type, dtype=self.autocast_dtype)


def causal_lm(model: nn.Module) -> Any:
    get_base = getattr(model, "get_base_model", None)  # a peft wrapper
    return get_base() if callable(get_base) else model


def response_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy over each row's labelled tokens, [B] float32, on the model's device.

    Only labelled positions go through the output head, which saves most of the vocabulary projection
    when only the response is labelled. The batch is moved to the model's device.
    """
    if not (batch["labels"][:, 1:] != IGNORE).any(dim=1).all():
        raise ValueError("every row needs at least one response token to have a loss")
    lm = causal_lm(model)
    device = next(lm.parameters()).device
    ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=attention).last_hidden_state
    labels = batch["labels"][:, 1:].to(device)
    mask = labels != IGNORE
    rows = torch.arange(len(labels), device=device).unsqueeze(1).expand_as(labels)[mask]
    logits = lm.get_output_embeddings()(hidden[:, :-1][mask]).float()
    token_loss = nn.functional.cross_entropy(logits, labels[mask], reduction="none")
    counts = mask.sum(1)
    return torch.zeros(len(labels), dtype=token_loss.dtype, device=device).index_add(0, rows, token_loss) / counts
