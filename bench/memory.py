"""Where the service's memory goes: `recsift run` on the synthetic stream (embedded broker, no refreshes),
probed every ``--step`` events: RSS, the C heap (glibc ``mallinfo2``: in use, free inside its arenas,
mmapped), Python objects by type (growth since the last probe), CPU seconds per thread and per child
process, with ``--tracemalloc`` the Python allocation sites that grew, and with ``--census`` the bytes held by
torch tensors and numpy arrays that Python can reach, by shape (what the C heap's growth is made of, if arrays).

Usage:  python bench/memory.py [--events 600000] [--step 100000] [--tracemalloc] [--census] [--tag NAME]
Writes ``bench/results/memory[-NAME].json``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread of this process, by Python thread name (unnamed native threads: their comm)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick, out = os.sysconf("SC_CLK_TCK"), {}  # type: ignore[var-annotated]
    for task in Path("/proc/self/task").iterdir():
        try:
            comm = names.get(int(task.name)) or (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[comm] = round(out.get(comm, 0.0) + (int(fields[11]) + int(fields[12])) / tick, 1)
    return out


def children_cpu() -> dict[str, float]:
    import psutil

    out: dict[str, float] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            out[child.name()] = round(out.get(child.name(), 0.0) + t.user + t.system, 1)
        except psutil.NoSuchProcess:
            pass
    return out


def array_census() -> dict[str, float]:
    """MB held by torch tensors and numpy arrays reachable from Python's tracked objects, by type, dtype and shape
    (one buffer counted once, by its address, however many views share it: a tensor and its ``.numpy()`` too)."""
    import numpy as np
    import torch

    seen: set[int] = set()
    sizes: Counter[str] = Counter()

    def count(obj: object) -> None:
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                return
            key, nbytes = storage.data_ptr(), storage.nbytes()
            kind = f"tensor {str(obj.dtype).removeprefix('torch.')} {tuple(obj.shape)}"
        elif isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):
                base = base.base
            key, nbytes = base.__array_interface__["data"][0], base.nbytes
            kind = f"ndarray {obj.dtype} {obj.shape}"
        else:
            return
        if key and key not in seen:
            seen.add(key)
            sizes[kind] += nbytes

    with warnings.catch_warnings():  # isinstance() on torch's deprecated aliases warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            count(obj)
            for ref in gc.get_referents(obj):  # arrays are not tracked by gc themselves: found through their holders
                count(ref)
    return {k: v / 2**20 for k, v in sizes.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=600_000)
    ap.add_argument("--step", type=int, default=100_000)
    ap.add_argument("--tracemalloc", action="store_true", help="Python allocation sites too (slows the run)")
    ap.add_argument("--census", action="store_true", help="tensor and array bytes by shape at each probe")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    from recsift import service
    from recsift.config import load_config
    from recsift.monitoring.metrics import Metrics

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if args.tracemalloc:
        tracemalloc.start(1)
    state = Path(tempfile.mkdtemp(prefix="recsift-memory-"))
    cfg = load_config(overrides={"checkpoint.state_dir": str(state), "monitoring.port": 0, "monitoring.progress": False,
                                 "stream.synthetic.events": args.events, "trainer.refresh_interval_s": 1e9,
                                 "trainer.drift_thresholds": {}})
    metrics = Metrics()
    done = threading.Event()
    probes: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    started = time.perf_counter()

    def probe(events: float) -> None:
        gc.collect()
        info = libc.mallinfo2()
        types = Counter(type(o).__name__ for o in gc.get_objects())
        row: dict[str, Any] = {"events": events, "seconds": round(time.perf_counter() - started, 1),
                               "rss_mb": rss_mb(), "heap_in_use_mb": info.uordblks / 2**20,
                               "heap_free_mb": info.fordblks / 2**20, "heap_mmapped_mb": info.hblkhd / 2**20,
                               "objects": sum(types.values())}
        if "types" in last:
            row["object_growth"] = (types - last["types"]).most_common(8)
        last["types"] = types
        if args.tracemalloc:
            snap = tracemalloc.take_snapshot()
            row["traced_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
            if "snap" in last:
                row["traced_growth_mb"] = [(str(s.traceback), round(s.size_diff / 2**20, 2))
                                           for s in snap.compare_to(last["snap"], "lineno")[:8]]
            last["snap"] = snap
        if args.census:
            census = array_census()
            row["arrays_mb"] = sum(census.values())
            if "census" in last:
                growth = Counter({k: v - last["census"].get(k, 0.0) for k, v in census.items()})
                row["array_growth_mb"] = [(k, round(v, 2)) for k, v in growth.most_common(8)]
            else:
                row["array_largest_mb"] = [(k, round(v, 2)) for k, v in Counter(census).most_common(12)]
            last["census"] = census
        row["cpu_s_by_thread"], row["cpu_s_by_child"] = thread_cpu(), children_cpu()
        probes.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {events:,.0f} events: RSS {row['rss_mb']:,.0f} MB, heap in use "
              f"{row['heap_in_use_mb']:,.0f} MB, free in arenas {row['heap_free_mb']:,.0f} MB"
              + (f", arrays {row['arrays_mb']:,.0f} MB" if args.census else ""), file=sys.stderr, flush=True)

    def sampler() -> None:
        mark = args.step
        while not done.is_set():
            n = metrics.registry.get_sample_value("recsift_events_consumed_total") or 0.0
            if n >= mark:
                probe(n)
                mark += args.step
            time.sleep(0.25)

    thread = threading.Thread(target=sampler, name="sampler", daemon=True)
    thread.start()
    service.run(cfg, max_events=args.events, metrics=metrics)
    done.set()
    thread.join(5)
    probe(float(args.events))  # after the run: its state released
    marks = [p for p in probes[:-1] if p["events"] >= 3 * args.step]
    out = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "events": args.events,
           "command": " ".join(["python bench/memory.py", *sys.argv[1:]]), "probes": probes,
           "rss_growth_from_third_probe": marks[-1]["rss_mb"] / marks[0]["rss_mb"] - 1 if len(marks) > 1 else None}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"memory{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
