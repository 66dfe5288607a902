"""The serving recommender: BIGRec generation followed by grounding in the catalogue.

``recommend(history, k)`` builds the BIGRec prompt, generates the response with beam search (BIGRec:
4 beams, 128 new tokens), embeds the generated text with the *base* model's last-layer last-token hidden
state (adapter disabled, as BIGRec embeds both sides with the base model), and ranks every item by L2
distance between that embedding and its title's (faiss ``IndexFlatL2``). ``generate=False`` grounds from
the prompt's own last-token state instead (no generation; a cheap but weak signal).

``score_candidates(history, items)`` is the other way to rank: the teacher-forced log-likelihood of each
candidate's title + end-of-sequence given the prompt, with the prompt encoded once, its KV cache
shared by all candidates and the candidates packed into one unpadded row (the quality benchmark and
each refresh's evaluation use it).

Title embeddings depend on the base model only, so they are cached per base model and catalogue
contents (``.npy`` under the cache directory) and rebuilt when the catalogue changes. Batches are sorted by
title length (3.2x faster on
Games than id order). ``use_adapter`` hot-swaps to a newly promoted adapter without a restart (peft
``load_adapter`` beside the serving one, ``set_adapter``, ``delete_adapter`` of the old one); ``recsift
serve`` (:mod:`recsift.serving`) calls it between batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from recsift.batching import length_buckets
from recsift.scoring.effort import causal_lm
from recsift.stream.catalog import Catalog
from recsift.trainer.llm import LLM
from recsift.trainer.prompts import PromptBuilder

log = logging.getLogger(__name__)


def last_token_states(llm: LLM, model: Any, texts: Sequence[str], batch_size: int = 32,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Last-layer hidden state of each text's last token, float32 [n, hidden]; batches sorted by length."""
    encoded = [llm.encode(t) or [llm.eos_token_id] for t in texts]
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model.eval()
    with torch.no_grad(), llm.autocast():
        for chunk in length_buckets(torch.tensor([len(e) for e in encoded]), batch_size):
            rows = chunk.tolist()
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), llm.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, :len(encoded[i])] = 1
            ids, mask = ids.to(llm.device), mask.to(llm.device)
            hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            last = mask.sum(1) - 1
            out[rows] = hidden[torch.arange(len(rows), device=llm.device), last].float().cpu().numpy()
            if progress is not None:
                progress(len(rows))
    return out


def catalogue_key(model_name: str, catalog: Catalog) -> str:
    """A digest of the base model's name and every item's id and title: the title embeddings' cache key."""
    h = hashlib.sha256(model_name.encode())
    for item in sorted(catalog, key=lambda it: it.item_id):
        h.update(f"{item.item_id}\t{item.title}\n".encode())
    return h.hexdigest()[:20]


def title_embeddings(llm: LLM, model: Any, catalog: Catalog, cache_dir: Path | None) -> tuple[list[str], np.ndarray]:
    """Every catalogue item's id (sorted) and ``model``'s last-layer state after its title (BIGRec grounds on
    them; TIGER's semantic IDs quantise them), cached per base model and catalogue contents as
    ``titles-<key>.npy`` under ``cache_dir``; the caller disables any adapter."""
    items = sorted(catalog, key=lambda it: it.item_id)
    path = cache_dir / f"titles-{catalogue_key(llm.name, catalog)}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        return [it.item_id for it in items], np.load(path, allow_pickle=False)
    done, step = [0, 0.0], max(len(items) // 10, 1)

    def progress(n: int) -> None:  # a large catalogue takes minutes on a CPU: say how far it is
        done[0] += n
        if done[0] >= done[1] + step or done[0] == len(items):
            done[1] = done[0]
            log.info("embedding catalogue titles: %d / %d", done[0], len(items))

    vectors = last_token_states(llm, model, [it.title for it in items], progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors, allow_pickle=False)
        tmp.replace(path)
    return [it.item_id for it in items], vectors


class Recommender:
    def __init__(self, llm: LLM, model: Any, catalog: Catalog, builder: PromptBuilder, cache_dir: Path | None = None,
                 max_new_tokens: int = 128, num_beams: int = 4) -> None:
        if not len(catalog):
            raise ValueError("grounding needs a catalogue with titles")
        self.llm, self.model, self.catalog, self.builder = llm, model, catalog, builder
        self.cache_dir, self.max_new_tokens, self.num_beams = cache_dir, max_new_tokens, num_beams
        self.adapter: str | None = None
        self.item_ids: list[str] = []
        self.index: faiss.IndexFlatL2 | None = None
        self._catalog_key = ""
        self.refresh_titles()

    def refresh_titles(self) -> None:
        """(Re)build the title index when the catalogue changed; cached embeddings are reused."""
        key = catalogue_key(self.llm.name, self.catalog)
        if key == self._catalog_key:
            return
        with self._base_only():
            self.item_ids, vectors = title_embeddings(self.llm, self.model, self.catalog, self.cache_dir)
        self.index = faiss.IndexFlatL2(vectors.shape[1])
        self.index.add(vectors)
        self._catalog_key = key

    def _base_only(self) -> Any:
        disable = getattr(self.model, "disable_adapter", None)
        return disable() if callable(disable) else contextlib.nullcontext()

    def use_adapter(self, path: str | Path, name: str, keep_previous: bool = False) -> None:
        """Serve a registry version without reloading the base model: load it beside the serving adapter
        (wrapping the base model in peft on the first), switch to it, then unload the one it replaced unless
        ``keep_previous``. The directory is checked first (:func:`check_adapter_dir`), so a bad one raises and
        changes nothing."""
        check_adapter_dir(path)
        previous = self.adapter
        if not hasattr(self.model, "peft_config"):
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
        elif name not in self.model.peft_config:
            self.model.load_adapter(str(path), adapter_name=name)
        self.model.set_adapter(name)
        self.model.eval()
        self.adapter = name
        if not keep_previous and previous is not None and previous != name and previous in self.model.peft_config:
            self.model.delete_adapter(previous)
        log.info("serving adapter %s", name)

    def unload_adapter(self, name: str, then: str) -> None:
        """Free a loaded adapter; ``then`` (another loaded one) serves if ``name`` was serving."""
        if self.adapter == name:
            self.model.set_adapter(then)
            self.adapter = then
        self.model.delete_adapter(name)

    def adapter_bytes(self) -> int:
        """Bytes of the LoRA weights held in memory (every loaded adapter)."""
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if "lora_" in n)

    def generate(self, history: Sequence[str]) -> str:
        return self.generate_batch([history])[0]

    def generate_batch(self, histories: Sequence[Sequence[str]]) -> list[str]:
        """The generated response per history: beam search over the prompts, left-padded into one batch."""
        prompts = [self.builder.prompt_ids(h)[0] for h in histories]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.llm.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.no_grad(), self.llm.autocast():
            out = self.model.generate(input_ids=ids.to(self.llm.device), attention_mask=mask.to(self.llm.device),
                                      max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False,
                                      eos_token_id=self.llm.eos_token_id, pad_token_id=self.llm.pad_token_id)
        return [str(self.llm.tokenizer.decode(row[width:], skip_special_tokens=True)).strip() for row in out]

    def ground(self, vectors: np.ndarray, k: int) -> list[list[str]]:
        return [[item for item, _ in row] for row in self.ground_scored(vectors, k)]

    def ground_scored(self, vectors: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The ``k`` items whose title embeddings are nearest each vector, with minus the squared L2 distance."""
        assert self.index is not None
        distances, idx = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(self.item_ids)))
        return [[(self.item_ids[j], -float(d)) for j, d in zip(row, dist, strict=True)]
                for row, dist in zip(idx, distances, strict=True)]

    def rank_from_prompts(self, histories: Sequence[Sequence[str]], k: int, batch_size: int = 32) -> list[list[str]]:
        """Top-``k`` items per history, grounded from each prompt's last-token state (no generation), batched."""
        texts = [self.fitted_prompt(h) for h in histories]
        return self.ground(last_token_states(self.llm, self.model, texts, batch_size), k)

    def fitted_prompt(self, history: Sequence[str]) -> str:
        """The prompt text of the longest recent suffix of ``history`` that fits the prompt budget."""
        return self.builder.prompt_text(history[len(history) - self.builder.prompt_ids(history)[1]:])

    def recommend(self, history: Sequence[str], k: int = 10, generate: bool = True) -> list[str]:
        """The top-``k`` catalogue items for a history (oldest first)."""
        return [item for item, _ in self.recommend_batch([history], k, generate)[0]]

    def recommend_batch(self, histories: Sequence[Sequence[str]], k: int = 10,
                        generate: bool = True) -> list[list[tuple[str, float]]]:
        """The top-``k`` catalogue items per history with their scores (minus the squared L2 distance of the
        item's title embedding to the response's: higher is closer)."""
        if generate:
            texts = self.generate_batch(histories)
            with self._base_only():  # both sides of the grounding come from the base model (BIGRec)
                vectors = last_token_states(self.llm, self.model, texts)
        else:
            vectors = last_token_states(self.llm, self.model, [self.fitted_prompt(h) for h in histories])
        return self.ground_scored(vectors, k)

    def rank_candidates(self, history: Sequence[str], items: Sequence[str], k: int,
                        rule: str = "pmi") -> list[tuple[str, float]]:
        """The top-``k`` of ``items`` for a history by their likelihood (``evaluate.candidate_scores``'s rule:
        ``pmi`` subtracts each title's prior under the same model, ``loglik`` does not)."""
        from recsift.trainer.evaluate import candidate_scores

        distinct = list(dict.fromkeys(items))
        logliks, _ = self.score_candidates(history, distinct)
        priors = None
        if rule == "pmi":
            prior = title_priors(self.llm, self.model, self.builder, distinct)
            priors = np.array([[prior[i] for i in distinct]])
        scores = candidate_scores(logliks[None], priors, rule)[0]
        order = np.argsort(-scores, kind="stable")[:k]
        return [(distinct[j], float(scores[j])) for j in order]

    def score_candidates(self, history: Sequence[str], items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Log-likelihood of each item's title + end-of-sequence given the prompt, and its token count."""
        return candidate_logliks(self.llm, self.model, self.builder, history, items)


ADAPTER_WEIGHTS = "adapter_model.safetensors"


class InvalidAdapter(ValueError):
    """An adapter directory that cannot be served (missing or unreadable files, non-finite weights)."""


def check_adapter_dir(path: str | Path) -> None:
    """Raise :class:`InvalidAdapter` unless ``path`` holds a readable peft LoRA config and finite safetensors
    weights. Only safetensors are accepted: peft would unpickle an ``adapter_model.bin`` instead."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise InvalidAdapter(f"{folder} has no {ADAPTER_WEIGHTS}")
    try:
        PeftConfig.from_pretrained(str(folder))
        weights = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as exc:  # a truncated file, bad JSON, a half-written copy
        raise InvalidAdapter(f"cannot read the adapter in {folder}: {type(exc).__name__}: {exc}") from exc
    if not weights or not all(torch.isfinite(t).all() for t in weights.values()):
        raise InvalidAdapter(f"the adapter in {folder} has no weights or non-finite ones")


def candidate_logliks(llm: LLM, model: Any, builder: PromptBuilder, history: Sequence[str],
                      items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Σ log p(response tokens | prompt) per item, teacher-forced, and the response lengths."""
    if not items:
        raise ValueError("no candidates to score")
    prompt, _ = builder.prompt_ids(history)
    return packed_logliks(llm, model, prompt, [builder.response_ids(i) for i in items])


def candidate_table(llm: LLM, model: Any, builder: PromptBuilder, histories: Sequence[Sequence[str]],
                    candidates: Sequence[Sequence[str]], priors: bool = True,
                    progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """For each user (a history and its candidates, the target first): every candidate's log-likelihood
    [users, C], its title prior [users, C] (``title_priors``, once per distinct title; None when not asked
    for) and the target's per-token NLL [users]. ``progress`` gets the users done."""
    logliks, nll = np.zeros((len(histories), len(candidates[0]))), np.zeros(len(histories))
    for row, (history, items) in enumerate(zip(histories, candidates, strict=True)):
        values, lengths = candidate_logliks(llm, model, builder, history, items)
        logliks[row], nll[row] = values, -values[0] / lengths[0]
        if progress is not None:
            progress(row + 1)
    if not priors:
        return logliks, None, nll
    prior = title_priors(llm, model, builder, [i for items in candidates for i in items])
    return logliks, np.array([[prior[i] for i in items] for items in candidates]), nll


def title_priors(llm: LLM, model: Any, builder: PromptBuilder, items: Sequence[str],
                 pack: int = 32) -> dict[str, float]:
    """Σ log p(title + EOS | the prompt with an empty history) per distinct item: the title's prior under
    ``model``, which the PMI rule subtracts so that a candidate is ranked by what the user's history adds
    (long or rare titles are not penalised for their length; see ``candidate_scores``)."""
    distinct = list(dict.fromkeys(items))
    prompt = builder.prior_prompt_ids()
    out: dict[str, float] = {}
    for start in range(0, len(distinct), pack):
        chunk = distinct[start:start + pack]
        values, _ = packed_logliks(llm, model, prompt, [builder.response_ids(i) for i in chunk])
        out.update(zip(chunk, values.tolist(), strict=True))
    return out


def packed_logliks(llm: LLM, model: Any, prompt: Sequence[int],
                   responses: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Σ log p(response tokens | prompt) per response, teacher-forced, and the response lengths.

    The prompt runs once and its KV cache is shared. The responses run packed end to end in one row
    (no padding): each attends to the whole prompt and causally to its own tokens only (a block-diagonal
    4D mask), with positions restarting after the prompt, so each equals its own forward pass after the
    prompt. On Games, padding 20 candidates to the longest one was 2.7x the real tokens (packing: 2x
    faster end to end). Only the positions that predict a response token go through the output head."""
    lm = causal_lm(model)
    device = llm.device
    lengths = torch.tensor([len(r) for r in responses])
    tokens = torch.tensor([t for r in responses for t in r], device=device)
    block = torch.repeat_interleave(torch.arange(len(responses)), lengths)  # which response each token is
    offset = torch.arange(len(block)) - (torch.cumsum(lengths, 0) - lengths)[block]  # position within it
    own = (block.unsqueeze(1) == block.unsqueeze(0)) & (offset.unsqueeze(1) >= offset.unsqueeze(0))
    mask = torch.cat([torch.ones(len(block), len(prompt), dtype=torch.bool), own], dim=1)[None, None]
    block, offset = block.to(device), offset.to(device)
    model.eval()
    with torch.no_grad(), llm.autocast():
        first = lm.get_decoder()(input_ids=torch.tensor([list(prompt)], device=device), use_cache=True)
        hidden = lm.get_decoder()(input_ids=tokens[None], past_key_values=first.past_key_values,
                                  attention_mask=mask.to(device), position_ids=(len(prompt) + offset)[None],
                                  use_cache=False).last_hidden_state[0]
        # the state before a response's token j: the prompt's last state for j = 0, else the state at j − 1
        previous = torch.cat([hidden[:1], hidden[:-1]])
        states = torch.where((offset == 0).unsqueeze(1), first.last_hidden_state[0, -1:], previous)
        logp = lm.get_output_embeddings()(states).float().log_softmax(-1)
        token_logp = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)
        total = torch.zeros(len(responses), device=device).index_add(0, block, token_logp)
    return total.double().cpu().numpy(), lengths.numpy()
