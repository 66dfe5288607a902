"""Surrogate benchmark: batch DEALRec (``recsift prune``'s pipeline) on each registered surrogate, side by side.

For every surrogate (SASRec, GRU4Rec, BERT4Rec by default), on every training sample of a DEALRec-format
dataset: the surrogate is trained for ``--epochs`` (time per epoch), LiSSA estimates H⁻¹v, every sample's
influence is scored (samples/s), and coverage-enhanced stratified sampling selects ``--budget``. Against
SASRec's run (the paper's surrogate): the share of the selected coreset both choose, the overlap a random
selection of the same size would have (the chance level), and the rank correlation of the influence scores.

What a coreset is worth to the LLM is not measured here (it takes the quality benchmark's fine-tuning arms:
``python bench/quality.py --cpu --surrogate NAME --tag NAME``).

Usage:  python bench/surrogates.py [--dataset games|DIR] [--epochs 10] [--budget 1024] [--surrogates a,b]
Writes ``bench/results/surrogates[-TAG].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recsift.config import load_config  # noqa: E402
from recsift.data.datasets import resolve_dataset  # noqa: E402
from recsift.scoring.influence import spearman  # noqa: E402
from recsift.scoring.registry import SURROGATES  # noqa: E402
from recsift.selection.prune import METHODS, prune  # noqa: E402
from recsift.service import scorer_options, stratified_options, surrogate_options  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def read_jsonl(path: Path, key: str) -> dict[int, float]:
    return {int(r["sample_id"]): float(r[key]) for r in map(json.loads, path.read_text().splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="games", help="a shared dataset's name or a directory in DEALRec format")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--surrogates", default=",".join(SURROGATES), help="comma-separated; sasrec is the reference")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    names = args.surrogates.split(",")
    unknown = [n for n in names if n not in SURROGATES]
    if unknown or "sasrec" not in names:
        sys.exit(f"--surrogates must name registered surrogates ({', '.join(SURROGATES)}) and include sasrec")
    cfg = load_config()
    path = resolve_dataset(args.dataset, cfg.stream.data_dir)
    strata = stratified_options(cfg)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "dataset": path.name,
                           "command": " ".join(["python bench/surrogates.py", *sys.argv[1:]]),
                           "epochs": args.epochs, "budget": args.budget, "options": surrogate_options(cfg),
                           "surrogates": {}}
    runs: dict[str, tuple[dict[int, float], set[int]]] = {}
    with tempfile.TemporaryDirectory(prefix="recsift-surrogates-") as tmp:
        for name in ["sasrec"] + [n for n in names if n != "sasrec"]:
            say(f"{name}: training {args.epochs} epochs, LiSSA, influence over every sample, selection")
            started = time.perf_counter()
            report = prune(path, "dealrec", args.budget, Path(tmp) / name, epochs=args.epochs, seed=cfg.scoring.seed,
                           scorer_options=scorer_options(cfg, METHODS["dealrec"].scorer), surrogate=name,
                           surrogate_options=surrogate_options(cfg), strata=strata.strata,
                           hard_prune=strata.hard_prune, progress=say)
            wall = time.perf_counter() - started
            scores = read_jsonl(Path(report.scores_path), "raw")
            selected = set(read_jsonl(Path(report.selected_path), "score"))
            runs[name] = (scores, selected)
            row: dict[str, Any] = {
                "samples": report.scored, "epoch_s": float(np.mean(report.epoch_seconds)),
                "final_loss": report.final_loss, "lissa_s": report.prepare_seconds,
                "scoring_samples_per_s": report.rate, "wall_s": wall, "selected": len(selected)}
            if name != "sasrec":
                ref_scores, ref_selected = runs["sasrec"]
                ids = sorted(ref_scores)
                row["selected_overlap_with_sasrec"] = len(selected & ref_selected) / max(len(ref_selected), 1)
                row["chance_overlap"] = len(ref_selected) / max(len(ref_scores), 1)  # a random set of the same size
                row["influence_spearman_with_sasrec"] = spearman(torch.tensor([scores[i] for i in ids]),
                                                                 torch.tensor([ref_scores[i] for i in ids]))
            out["surrogates"][name] = row
            say(f"{name}: {json.dumps(row)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"surrogates{'-' + args.tag if args.tag else ''}.json"
    target.write_text(json.dumps(out, indent=1))
    say(f"wrote {target}")


if __name__ == "__main__":
    main()
