"""Surrogate benchmark: batch DEALRec (``recsift prune``'s pipeline) on each registered surrogate, side by side.

For every surrogate (SASRec, GRU4Rec, BERT4Rec by default), on every training sample of a DEALRec-format
dataset: the surrogate is trained for ``--epochs`` (time per epoch), LiSSA estimates H⁻¹v, every sample's
influence is scored (samples/s), and coverage-enhanced stratified sampling selects ``--budget``. Against
SASRec's run (the paper's surrogate): the share of the selected coreset both choose, the overlap a random
selection of the same size would have (the chance level), and the rank correlation of the influence scores.

What a coreset is worth to the recommender takes the quality benchmark's fine-tuning arms: run its ``dealrec``
arm once per surrogate (``python bench/quality.py --cpu [--backend tiger] --surrogate NAME --tag NAME --arms
dealrec``; SASRec's is the untagged run with every arm), then ``--quality tiger|bigrec`` reads those runs and adds,
per surrogate, its coreset's rank_percentile minus SASRec's coreset's, paired by seed and test user (hierarchical
bootstrap, 95% interval). The gates of SASRec's run decide whether the protocol can rank anything: when one fails
the verdict is "not measurable at this scale".

Usage:  python bench/surrogates.py [--dataset games|DIR] [--epochs 10] [--budget 1024] [--surrogates a,b]
                                   [--quality tiger|bigrec [--quality-only]]
Writes ``bench/results/surrogates[-TAG].json`` (``--quality-only``: adds the quality section to it, nothing re-run).
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
sys.path.insert(0, str(ROOT / "bench"))

import quality as quality_bench  # noqa: E402

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


def quality(dataset: str, backend: str, names: list[str]) -> dict[str, Any]:
    """Each surrogate's DEALRec coreset against SASRec's after fine-tuning, from the quality benchmark's runs
    (``quality-DATASET-cpu[-tiger][-NAME]``): the per-user records of its ``dealrec`` arm, paired by seed."""
    base = f"quality-{dataset}-cpu{'-tiger' if backend == 'tiger' else ''}"
    reference = json.loads((RESULTS / f"{base}.json").read_text())
    records: dict[str, dict[int, dict[str, Any]]] = {}
    for name in names:
        run = base if name == "sasrec" else f"{base}-{name}"
        files = sorted((RESULTS / run).glob("dealrec-s*.json"))
        if not files:
            sys.exit(f"no dealrec arm in bench/results/{run}/: run bench/quality.py --cpu"
                     f"{' --backend tiger' if backend == 'tiger' else ''} --surrogate {name} --tag {name} --arms dealrec")
        summary = json.loads((RESULTS / f"{run}.json").read_text())
        runs = {r["seed"]: r for r in map(json.loads, map(Path.read_text, files))}
        protocol = summary["protocol"]  # SASRec's but for the surrogate: the same pool, users and candidates
        if {k: v for k, v in protocol.items() if k != "surrogate"} != \
                {k: v for k, v in reference["protocol"].items() if k != "surrogate"} or \
                protocol.get("surrogate", "sasrec") != name or any(r["protocol"] != summary["protocol_key"]
                                                                   for r in runs.values()):
            sys.exit(f"bench/results/{run}: not SASRec's protocol with the {name} surrogate: {protocol}")
        records[name] = runs
    measurable = bool(reference["gates"]["measurable"])
    out: dict[str, Any] = {"backend": backend, "runs": base, "metric": quality_bench.PRIMARY,
                           "gates (SASRec's run)": reference["gates"], "surrogates": {}}
    for name in names:
        row: dict[str, Any] = {"seeds": sorted(records[name]),
                               quality_bench.PRIMARY: float(np.mean([r["mean"][quality_bench.PRIMARY]
                                                                     for r in records[name].values()]))}
        if name != "sasrec":
            c = quality_bench.compare(records, name, "sasrec")[quality_bench.PRIMARY]
            row["minus_sasrec"] = {"diff": c["diff"], "ci95": c["ci95"], "per_seed": c["per_seed"]}
            row["verdict"] = ("not measurable at this scale" if not measurable else
                              "no difference detected" if not c["significant"] else
                              "better than SASRec's" if c["diff"] > 0 else "worse than SASRec's")
        out["surrogates"][name] = row
        say(f"quality, {name}: {json.dumps(row)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="games", help="a shared dataset's name or a directory in DEALRec format")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--surrogates", default=",".join(SURROGATES), help="comma-separated; sasrec is the reference")
    ap.add_argument("--tag", default="")
    ap.add_argument("--quality", choices=("tiger", "bigrec"),
                    help="add each surrogate's coreset quality vs SASRec's from the quality benchmark's runs")
    ap.add_argument("--quality-only", action="store_true", help="with --quality: add it to the existing results "
                    "file, re-running nothing")
    args = ap.parse_args()
    names = args.surrogates.split(",")
    unknown = [n for n in names if n not in SURROGATES]
    if unknown or "sasrec" not in names:
        sys.exit(f"--surrogates must name registered surrogates ({', '.join(SURROGATES)}) and include sasrec")
    cfg = load_config()
    path = resolve_dataset(args.dataset, cfg.stream.data_dir)
    target = RESULTS / f"surrogates{'-' + args.tag if args.tag else ''}.json"
    if args.quality_only:
        if not args.quality:
            sys.exit("--quality-only needs --quality tiger|bigrec")
        kept = json.loads(target.read_text())
        kept["quality"] = quality(path.name, args.quality, names)
        kept["quality_command"] = " ".join(["python bench/surrogates.py", *sys.argv[1:]])
        target.write_text(json.dumps(kept, indent=1))
        say(f"wrote {target}")
        return
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
    if args.quality:
        out["quality"] = quality(path.name, args.quality, names)
    RESULTS.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=1))
    say(f"wrote {target}")


if __name__ == "__main__":
    main()
