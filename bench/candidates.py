"""Candidate scoring, packed vs padded: the cost of one user's evaluation in the quality benchmark.

``recsift.trainer.recommender.candidate_logliks`` runs the prompt once and the candidates packed end to end
in one unpadded row (a block-diagonal mask). The reference here pads every candidate to the longest one
and runs them as a batch over the repeated prompt cache (what it did before). Both run side by side on the
same users, candidates and model (SmolLM2-135M with a fresh LoRA adapter, as an arm of the benchmark),
and the largest difference of their log-likelihoods is reported (bf16 autocast rounds both).

    python bench/candidates.py [--dataset games] [--users 20]

Writes ``bench/results/candidates.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402

from recsift.scoring.effort import causal_lm  # noqa: E402
from recsift.trainer.llm import add_lora  # noqa: E402
from recsift.trainer.recommender import candidate_logliks  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def padded_logliks(llm: Any, model: Any, builder: Any, history: list[str], items: list[str]) -> np.ndarray:
    """The padded reference: every candidate right-padded to the longest, the prompt cache repeated."""
    lm, device = causal_lm(model), llm.device
    prompt, _ = builder.prompt_ids(history)
    responses = [builder.response_ids(i) for i in items]
    lengths = torch.tensor([len(r) for r in responses])
    tokens = torch.full((len(items), int(lengths.max())), llm.pad_token_id, dtype=torch.long)
    for row, r in enumerate(responses):
        tokens[row, :len(r)] = torch.tensor(r)
    model.eval()
    with torch.no_grad(), llm.autocast():
        first = lm.get_decoder()(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        cache = first.past_key_values
        cache.batch_repeat_interleave(len(items))
        hidden = lm.get_decoder()(input_ids=tokens, past_key_values=cache, use_cache=False).last_hidden_state
        states = torch.cat([first.last_hidden_state[:, -1:].expand(len(items), 1, -1), hidden[:, :-1]], dim=1)
        mask = torch.arange(tokens.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        logp = lm.get_output_embeddings()(states[mask]).float().log_softmax(-1)
        token_logp = logp.gather(1, tokens[mask].unsqueeze(1)).squeeze(1)
        rows = torch.arange(len(items)).unsqueeze(1).expand_as(mask)[mask]
        return torch.zeros(len(items)).index_add(0, rows, token_logp).double().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="games")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--users", type=int, default=20)
    args = ap.parse_args()
    path = quality.resolve_dataset(args.dataset, args.data_dir)
    protocol = quality.Protocol(dataset=path.name, data_digest="-", users=args.users)
    data = quality.Data(path, protocol)
    bench = quality.CpuBench(data, protocol, Path(tempfile.mkdtemp()))  # it caches nothing here
    llm, builder = bench.llm, bench.builder
    model = add_lora(llm.model, bench.t.lora_r, bench.t.lora_alpha, bench.t.lora_dropout, bench.t.target_modules, 0)
    work = list(zip(data.histories, data.candidates, strict=True))
    timings: dict[str, float] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    for name, fn in (("padded", padded_logliks), ("packed", lambda *a: candidate_logliks(*a)[0])):
        fn(llm, model, builder, *work[0])  # warm-up
        started = time.perf_counter()
        outputs[name] = [fn(llm, model, builder, h, c) for h, c in work]
        timings[name] = (time.perf_counter() - started) / len(work)
    tokens = [(len(builder.prompt_ids(h)[0]), sum(len(builder.response_ids(c)) for c in cs),
               max(len(builder.response_ids(c)) for c in cs) * len(cs)) for h, cs in work]
    result = {
        "dataset": path.name, "users": len(work), "candidates": protocol.candidates,
        "base_model": protocol.base_model, "torch_threads": torch.get_num_threads(),
        "seconds_per_user": timings, "speedup": timings["padded"] / timings["packed"],
        "prompt_tokens_mean": float(np.mean([t[0] for t in tokens])),
        "candidate_tokens_mean": float(np.mean([t[1] for t in tokens])),
        "padded_candidate_tokens_mean": float(np.mean([t[2] for t in tokens])),
        "max_abs_loglik_difference": float(max(np.abs(a - b).max() for a, b in zip(*outputs.values(), strict=True))),
        "command": " ".join(["python", "bench/candidates.py", *sys.argv[1:]]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "candidates.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
