"""Serving: requests/s and latency of `recsift serve` on SmolLM2, at batch sizes 1, 8 and 32, and an adapter
swap under load.

For each batch size ``b`` a server (the real HTTP surface and engine, in this process) runs with
``serve.max_batch = b``, and ``b`` clients send ``/recommend`` requests back to back (histories from the test
split of ``--dataset``, generation + grounding with the configured beams and new tokens), so batches fill:

- ``rps``: answered requests per second over the run; ``p50_ms``, ``p95_ms``: client-side latency;
- then, at ``--swap-batch`` (8), two LoRA adapters (seeded random weights, saved in a registry) are
  promoted in turn while the clients keep asking: ``swap_s`` is the server's own load + switch + unload time
  (``recsift_serve_swap_duration_seconds``), ``swap_visible_s`` the time from the promotion to the first
  answer by the new version, and ``p95_ms_during_swap`` the latency of requests in flight during a swap.

The catalogue is the dataset's first ``--items`` items (their titles are embedded once and cached), and the
histories are users' events within it (each user's last one left out), in the dataset's order.

Usage:  python bench/serve.py                                     Games, 2,000 items, batch sizes 1 8 32
        python bench/serve.py --dataset ../shared/data/ml-100k/ml-100k.inter --items 1000 --max-new-tokens 32
Writes ``bench/results/serve.json`` (``--out`` to change it), with the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


def say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def post(url: str, body: dict[str, Any]) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + "/recommend", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            resp.read()
            return resp.status, resp.headers.get("X-Recsift-Adapter-Version", "")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:  # no answer at all (connection refused or reset): a failed request
        return 0, ""


def load_dataset(dataset: Path, items: int, n: int) -> tuple[list[Any], list[list[str]]]:
    """The dataset's first ``items`` catalogue items (by id) and up to ``n`` users' histories within them (each
    user's events in order, the last left out as the item to predict), from any format recsift reads."""
    from recsift.data.datasets import catalog_for, detect_format, iter_events_or_payloads
    from recsift.stream.events import Event

    catalog = catalog_for(dataset)
    if catalog is None:
        raise SystemExit(f"{dataset} has no item catalogue beside it (items.tsv, a RecBole .item file)")
    chosen = sorted(catalog, key=lambda it: (len(it.item_id), it.item_id))[:items]
    keep = {it.item_id for it in chosen}
    users: dict[str, list[str]] = {}
    for e in iter_events_or_payloads(dataset, detect_format(dataset)):
        user, item = (e.user_id, e.item_id) if isinstance(e, Event) else (str(json.loads(e)["user_id"]),
                                                                          str(json.loads(e)["item_id"]))
        if item in keep:
            users.setdefault(user, []).append(item)
    pool = [h[:-1][-20:] for h in users.values() if len(h) > 1][:n]
    if not pool:
        raise SystemExit(f"no user of {dataset} has two events among the first {items} items")
    return chosen, pool


class Clients:
    """``n`` threads asking back to back until stopped; every answer as (sent, answered, status, version)."""

    def __init__(self, url: str, pool: list[list[str]], n: int, k: int) -> None:
        self.url, self.pool, self.k = url, pool, k
        self.answers: list[tuple[float, float, int, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._ask, args=(i,), daemon=True) for i in range(n)]

    def _ask(self, i: int) -> None:
        j = i
        while not self.stop.is_set():
            sent = time.monotonic()
            status, version = post(self.url, {"history": self.pool[j % len(self.pool)], "k": self.k})
            self.answers.append((sent, time.monotonic(), status, version))
            j += len(self.threads)

    def run_until(self, answered: int, progress: str) -> None:
        for t in self.threads:
            t.start()
        last = 0.0
        while len(self.answers) < answered:
            time.sleep(0.2)
            if time.monotonic() - last > 15:
                say(f"{progress}: {len(self.answers)} / {answered} answered")
                last = time.monotonic()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def start_server(cfg: Any) -> tuple[threading.Event, threading.Thread, str]:
    from recsift.serving.app import run_serve

    stop, ready = threading.Event(), threading.Event()
    url: list[str] = []
    def on_ready(u: str) -> None:
        url.append(u)
        ready.set()

    thread = threading.Thread(target=run_serve, args=(cfg, stop), kwargs={"on_ready": on_ready}, daemon=True)
    thread.start()
    while not ready.wait(1.0):
        if not thread.is_alive():
            raise SystemExit("the server stopped while starting; see the log above")
    return stop, thread, url[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "data" / "games",
                    help="any dataset recsift reads with its catalogue beside it: a DEALRec directory, a RecBole "
                    ".inter file (../shared/data/ml-100k/ml-100k.inter), ...")
    ap.add_argument("--items", type=int, default=2000, help="catalogue size: the dataset's first items")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--swap-batch", type=int, default=8, help="the batch size whose run also times two swaps")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client at each batch size")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: trainer.max_new_tokens (128)")
    ap.add_argument("--num-beams", type=int, default=None, help="default: trainer.num_beams (4)")
    ap.add_argument("--device", default="auto", help="trainer.device: auto (CUDA when present), cpu, cuda")
    ap.add_argument("--out", type=Path, default=RESULTS / "serve.json")
    args = ap.parse_args()
    if args.swap_batch not in args.batch_sizes:
        ap.error("--swap-batch must be one of --batch-sizes")

    import torch

    from recsift.config import load_config
    from recsift.trainer.llm import add_lora, default_cache_dir, load_llm, resolve_device
    from recsift.trainer.registry import AdapterRegistry

    work = Path(tempfile.mkdtemp(prefix="recsift-serve-bench-"))
    chosen, pool = load_dataset(args.dataset, args.items, 512)
    catalog = work / "items.jsonl"
    catalog.write_text("".join(json.dumps({"item_id": it.item_id, "title": it.title}) + "\n" for it in chosen))
    registry = AdapterRegistry(work / "adapters")
    overrides: dict[str, Any] = {"stream.catalog_path": str(catalog), "serve.registry_dir": str(registry.root),
                                 "serve.port": 0, "serve.max_wait_ms": 50, "serve.queue_size": 256,
                                 "serve.request_timeout_s": 3600, "trainer.device": args.device,
                                 "trainer.cache_dir": str(default_cache_dir()), "monitoring.log_level": "WARNING"}
    if args.max_new_tokens is not None:
        overrides["trainer.max_new_tokens"] = args.max_new_tokens
    if args.num_beams is not None:
        overrides["trainer.num_beams"] = args.num_beams
    base_cfg = load_config(overrides=overrides)
    device = resolve_device(args.device)
    say(f"{len(chosen):,} items, {len(pool)} histories, {device}, {base_cfg.trainer.num_beams} beams, "
        f"{base_cfg.trainer.max_new_tokens} new tokens; work in {work}")

    # two adapters to swap between: seeded random LoRA weights on SmolLM2 (the swap's cost does not depend on
    # what they learnt)
    llm = load_llm(base_cfg.trainer.base_model, base_cfg.trainer.cache_dir, "fp32", "cpu")
    names = []
    for seed in (1, 2):
        t = base_cfg.trainer
        model = add_lora(llm.model, t.lora_r, t.lora_alpha, 0.0, t.target_modules, seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01, generator=torch.Generator().manual_seed(seed))
        names.append(registry.save(model.save_pretrained, {"bench": seed}).name)
        llm.model = model.unload()
    del llm
    registry.promote(names[0])

    runs = []
    for b in args.batch_sizes:
        cfg = load_config(overrides={**overrides, "serve.max_batch": b})
        stop, thread, url = start_server(cfg)
        post(url, {"history": pool[0], "k": args.k})  # warm-up
        clients = Clients(url, pool, b, args.k)
        started = time.monotonic()
        clients.run_until(b * args.rounds, f"batch {b}")
        seconds = time.monotonic() - started
        answers = list(clients.answers)
        latency = np.array([(e - s) * 1000 for s, e, status, _ in answers if status == 200])
        run: dict[str, Any] = {"batch_size": b, "requests": len(answers), "failed": sum(a[2] != 200 for a in answers),
                               "rps": len(latency) / seconds, "p50_ms": float(np.percentile(latency, 50)),
                               "p95_ms": float(np.percentile(latency, 95)), "seconds": seconds}
        if b == args.swap_batch:  # swaps under this load
            swaps = []
            for name in (names[1], names[0]):
                promoted = time.monotonic()
                registry.promote(name)
                while not any(s >= promoted and v == name for s, _, _, v in clients.answers):
                    time.sleep(0.05)
                seen = min(e for s, e, _, v in clients.answers if s >= promoted and v == name)
                swaps.append((promoted, seen))
            during = [(e - s) * 1000 for s, e, status, _ in clients.answers
                      if any(s <= seen and e >= promoted for promoted, seen in swaps)]
            run.update({"swap_s": mean_swap_s(url), "swap_visible_s": float(np.mean([e - s for s, e in swaps])),
                        "p95_ms_during_swap": float(np.percentile(during, 95)) if during else None,
                        "failed_during_swap": sum(a[2] != 200 for a in clients.answers)})
        clients.close()
        stop.set()
        thread.join()
        runs.append(run)
        say(f"batch {b}: {run['rps']:.2f} requests/s, p50 {run['p50_ms']:,.0f} ms, p95 {run['p95_ms']:,.0f} ms"
            + (f", swap {run['swap_s']:.2f} s" if "swap_s" in run else ""))

    swap = next(r for r in runs if "swap_s" in r)
    result = {"command": " ".join(["python bench/serve.py", *sys.argv[1:]]), "dataset": str(args.dataset),
              "items": len(chosen), "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
              "num_beams": base_cfg.trainer.num_beams, "max_new_tokens": base_cfg.trainer.max_new_tokens,
              "rps": {str(r["batch_size"]): r["rps"] for r in runs},
              "p50_ms": {str(r["batch_size"]): r["p50_ms"] for r in runs},
              "p95_ms": {str(r["batch_size"]): r["p95_ms"] for r in runs},
              "swap_s": swap["swap_s"], "swap_visible_s": swap["swap_visible_s"],
              "p95_ms_during_swap": swap["p95_ms_during_swap"], "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'batch':>5} {'requests/s':>11} {'p50 ms':>9} {'p95 ms':>9}")
    for r in runs:
        print(f"{r['batch_size']:>5} {r['rps']:>11.2f} {r['p50_ms']:>9,.0f} {r['p95_ms']:>9,.0f}")
    print(f"swap: {swap['swap_s']:.3f} s in the server, {swap['swap_visible_s']:.2f} s to the first answer by the new "
          f"version; p95 during swaps {swap['p95_ms_during_swap'] or float('nan'):,.0f} ms, "
          f"{swap['failed_during_swap']} failed")
    print(f"wrote {args.out}")


def mean_swap_s(url: str) -> float:
    """The mean load + switch + unload time of the server's adapter swaps (its /metrics)."""
    import urllib.request

    values = {}
    for line in urllib.request.urlopen(url + "/metrics", timeout=10).read().decode().splitlines():
        if line.startswith("recsift_serve_swap_duration_seconds_"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values["recsift_serve_swap_duration_seconds_sum"] / values["recsift_serve_swap_duration_seconds_count"]


if __name__ == "__main__":
    main()
