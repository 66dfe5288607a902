"""The ``recsift`` command.

Every subcommand takes ``--config FILE`` and repeatable ``--set section.key=value``; dedicated flags
(``--topic``, ``--bootstrap-servers``, ...) are shorthands for the same overrides. Precedence:
flags > ``--set`` > environment (``RECSIFT_SECTION__KEY``) > YAML file > defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args

from recsift.config import ConfigError, ScoringConfig, Settings, TrainerConfig, load_config, parse_override
from recsift.vocab import AdminAction, Outcome, Role, Trigger

if TYPE_CHECKING:  # the command imports what it runs lazily, so `recsift --help` stays fast
    from collections.abc import Callable, Sequence

    from recsift.service import ServiceSummary
    from recsift.stream.pipeline import Pipeline, RunSummary
    from recsift.trainer.refresh import RefreshOutcome

log = logging.getLogger("recsift")

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


SURROGATES = get_args(ScoringConfig.model_fields["surrogate"].annotation)  # the surrogates a config may name
BACKENDS = get_args(TrainerConfig.model_fields["backend"].annotation)  # the trainer backends a config may name


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML configuration file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting (repeatable; value in YAML syntax)")


def _kafka_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", dest="stream.bootstrap_servers", help="Kafka bootstrap servers host:port[,...]")
    p.add_argument("--topic", dest="stream.topic", help="interactions topic")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsift", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="consume the interaction stream (embedded default when nothing is configured)")
    _common(run)
    _kafka_flags(run)
    run.add_argument("--source", dest="stream.source", choices=["embedded", "kafka", "file"])
    run.add_argument("--group-id", dest="stream.group_id")
    run.add_argument("--dataset", dest="stream.feed", metavar="NAME|PATH",
                     help="embedded feed: synthetic (default), ml-100k, games, or a file")
    run.add_argument("--input", dest="stream.file_path", type=Path, help="replay this file (implies --source file)")
    run.add_argument("--format", dest="stream.file_format", choices=["auto", "jsonl", "csv", "inter", "dealrec", "movielens"])
    run.add_argument("--state-dir", dest="checkpoint.state_dir", type=Path)
    run.add_argument("--max-events", type=int, help="stop after this many records and print the summary")
    run.add_argument("--journal", dest="checkpoint.journal_samples", action="store_const", const=True,
                     help="record every emitted sample id in the checkpoint")
    run.add_argument("--no-progress", dest="monitoring.progress", action="store_const", const=False)
    run.add_argument("--surrogate", dest="scoring.surrogate", choices=SURROGATES,
                     help="the surrogate the stream is scored on (scoring.surrogate)")
    run.add_argument("--backend", dest="trainer.backend", choices=BACKENDS,
                     help="what the refreshes train (trainer.backend): bigrec adapters or a tiger T5")

    replay = sub.add_parser("replay", help="produce a file (or the synthetic stream) into a Kafka topic")
    _common(replay)
    _kafka_flags(replay)
    replay.add_argument("file", metavar="FILE", help="a file, a dataset name (ml-100k, games) or 'synthetic'")
    replay.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    replay.add_argument("--format", dest="replay_format", default="auto")
    replay.add_argument("--limit", type=int, help="produce at most this many events")
    replay.add_argument("--partitions", dest="stream.partitions", type=int, help="partitions if the topic is created")

    prune = sub.add_parser("prune", help="score every training sample of a DEALRec dataset (batch DEALRec pipeline)")
    _common(prune)
    prune.add_argument("--dataset", default="games", help="games, or a directory with DEALRec train.txt")
    prune.add_argument("--method", default="dealrec", choices=["dealrec", "random", "grand", "el2n", "ccs", "loss"])
    prune.add_argument("--budget", type=int, default=1024)
    prune.add_argument("--epochs", type=int, default=10, help="surrogate training epochs")
    prune.add_argument("--surrogate", dest="scoring.surrogate", choices=SURROGATES,
                       help="the surrogate the scores are taken on (default: scoring.surrogate, sasrec)")
    prune.add_argument("--backend", dest="trainer.backend", choices=BACKENDS,
                       help="whose effort score (λ > 0): bigrec's LLM (default) or tiger's T5")
    prune.add_argument("--out", type=Path, help="output directory (default: state/prune/DATASET-METHOD)")

    coreset = sub.add_parser("coreset", help="inspect the committed coreset and its snapshots")
    coreset_sub = coreset.add_subparsers(dest="coreset_command", required=True)
    c_show = coreset_sub.add_parser("show", help="size, strata, scorer versions and snapshots")
    c_export = coreset_sub.add_parser("export", help="write a snapshot as JSONL (takes one when --snapshot is not given)")
    for p in (c_show, c_export):
        _common(p)
        p.add_argument("--state-dir", dest="checkpoint.state_dir", type=Path)
    c_export.add_argument("--snapshot", type=int, help="snapshot id (default: take a new one now)")
    c_export.add_argument("--out", type=Path, required=True)

    adapters = sub.add_parser("adapters", help="the adapter registry: list, promote, roll back")
    a_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    for name, text in (("list", "versions and the serving one"), ("promote", "serve VERSION"),
                       ("rollback", "serve the version served before the current one")):
        p = a_sub.add_parser(name, help=text)
        _common(p)
        p.add_argument("--state-dir", dest="checkpoint.state_dir", type=Path)
        if name == "promote":
            p.add_argument("version")

    refresh = sub.add_parser("refresh", help="run one refresh (a LoRA adapter, or a TIGER T5) on the committed "
                             "coreset now")
    _common(refresh)
    refresh.add_argument("--state-dir", dest="checkpoint.state_dir", type=Path)
    refresh.add_argument("--catalog", dest="stream.catalog_path", type=Path, help="item titles for the prompts")
    refresh.add_argument("--backend", dest="trainer.backend", choices=BACKENDS, help="bigrec (default) or tiger")

    trainer = sub.add_parser("trainer", help="refresh from the workers' coreset topic (workers run with "
                             "trainer.in_worker=false)")
    _common(trainer)
    _kafka_flags(trainer)
    trainer.add_argument("--coreset-topic", dest="stream.coreset_topic", help="the workers' coreset topic")
    trainer.add_argument("--state-dir", dest="checkpoint.state_dir", type=Path,
                         help="the trainer's own directory: the coreset mirror and the adapter registry")
    trainer.add_argument("--catalog", dest="stream.catalog_path", type=Path, help="item titles for the prompts")

    serve = sub.add_parser("serve", help="answer recommendation requests over HTTP on the base model + the serving "
                           "adapter, swapping adapters as they are promoted")
    _common(serve)
    serve.add_argument("--state-dir", dest="checkpoint.state_dir", type=Path,
                       help="where the registry (adapters/) and a worker's histories are, unless set apart")
    serve.add_argument("--registry", dest="serve.registry_dir", type=Path, help="the adapter registry directory")
    serve.add_argument("--catalog", dest="stream.catalog_path", type=Path, help="the item catalogue")
    serve.add_argument("--host", dest="serve.host")
    serve.add_argument("--port", dest="serve.port", type=int)
    serve.add_argument("--follow", dest="serve.follow", choices=["registry", "api"],
                       help="registry: serve its current version; api: what /v1/load_lora_adapter loaded")

    evaluate = sub.add_parser("evaluate", help="Recall/NDCG@10,20 of an adapter on a DEALRec dataset's test users")
    _common(evaluate)
    evaluate.add_argument("--dataset", default="games")
    evaluate.add_argument("--backend", dest="trainer.backend", choices=BACKENDS,
                          help="bigrec (default): a LoRA adapter on the base model; tiger: a TIGER version (--adapter)")
    evaluate.add_argument("--adapter", type=Path, help="a registry version's directory (default: the base model; "
                          "TIGER needs one)")
    evaluate.add_argument("--users", type=int, default=200, help="seeded sample of test users (0: all)")
    evaluate.add_argument("--no-generate", action="store_true", help="ground from the prompt (no generation)")

    admin = sub.add_parser("admin", help="talk to a running service: status, refresh, pause, resume, rollback")
    admin.add_argument("action", choices=AdminAction.values())
    admin.add_argument("--url", default="http://127.0.0.1:9400", help="the service's monitoring address")
    admin.add_argument("--token-file", type=Path, help="read the bearer token from this file "
                       "(default: the RECSIFT_ADMIN__TOKEN environment variable)")
    admin.add_argument("--wait", action="store_true", help="refresh: follow the run to its outcome")
    admin.add_argument("--timeout", type=float, default=3600.0)

    broker = sub.add_parser("broker", help="run the embedded tansu broker in the foreground")
    broker.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")

    config = sub.add_parser("config", help="show the effective configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the effective configuration, secrets masked")
    _common(show)
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """The frozen settings for a command: flags outrank ``--set``, which outranks env, YAML and defaults."""
    overrides: dict[str, Any] = {}
    for text in getattr(args, "overrides", []):
        path, value = parse_override(text)
        overrides[".".join(path)] = value
    flags = {k: v for k, v in vars(args).items() if "." in k and v is not None}
    if "stream.file_path" in flags and "stream.source" not in flags:
        flags["stream.source"] = "file"
    overrides.update(flags)
    return load_config(getattr(args, "config", None), overrides)


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


# ---------------------------------------------------------------------- progress: one style
# A tqdm bar (on stderr) for long work with a count; logging for everything else.


Bar = TypeVar("Bar", bound="CountBar")


class CountBar:
    """A tqdm bar fed cumulative counts (what the library's ``progress`` callbacks report)."""

    def __init__(self, total: int | None, unit: str, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
        self.done = 0

    def __call__(self, done: int) -> None:
        if done != self.done:
            self.bar.update(done - self.done)
            self.done = done

    def __enter__(self: Bar) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


class IngestBar(CountBar):
    """``recsift run``'s bar: events consumed, with samples, rejects and users, driven by the pipeline loop."""

    def __init__(self, total: int | None) -> None:
        super().__init__(total, "ev", "ingest")
        self.last_postfix = 0.0
        self.pipeline: Pipeline | None = None

    def tick(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self(pipeline.summary.consumed)
        now = time.monotonic()
        if now - self.last_postfix >= 0.5:
            self.last_postfix = now
            self.bar.set_postfix(samples=pipeline.state.counts.samples, rejected=sum(pipeline.summary.rejected.values()),
                                 users=pipeline.state.users)

    def __exit__(self, *exc: object) -> None:
        if self.pipeline is not None:  # the last line shows the run's final counts, not the last half-second's
            s = self.pipeline.summary
            self.bar.set_postfix(samples=s.samples, rejected=sum(s.rejected.values()), users=s.users,
                                 refresh=False)  # closing draws it once
        super().__exit__(*exc)


# ---------------------------------------------------------------------- summaries


def ingest_rows(s: RunSummary) -> list[tuple[str, str]]:
    return [
        ("events consumed", f"{s.consumed:,}"),
        ("events accepted", f"{s.accepted:,}"),
        *((f"  rejected: {k}", f"{v:,}") for k, v in s.rejected.items()),
        ("late events", f"{s.late:,}"),
        ("samples emitted", f"{s.samples:,}"),
        ("users tracked", f"{s.users:,}"),
        ("checkpoints", f"{s.checkpoints:,}"),
        ("elapsed", f"{s.elapsed_s:.1f} s ({s.rate:,.0f} events/s)"),
        ("stopped by", s.stopped_by),
    ]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def run_rows(s: ServiceSummary) -> list[tuple[str, str]]:
    """The ``recsift run`` summary table: ingest, then scoring, selection and refreshes (when on)."""
    if not s.budget:  # scoring (and so selection) was off
        return ingest_rows(s.ingest)
    rate = s.scored / s.scoring_busy_s if s.scoring_busy_s else 0.0
    return [
        *ingest_rows(s.ingest),
        ("samples scored", f"{s.scored:,} ({rate:,.0f}/s while scoring)"),
        ("samples awaiting scoring", f"{s.awaiting_scoring:,} (kept in the checkpoint)"),
        ("samples unscorable", f"{s.unscorable:,}"),
        ("scorer version", str(s.scorer_version)),
        ("surrogate loss", f"{s.surrogate_loss:.4f}"),
        ("coreset", f"{s.coreset:,} / {s.budget:,}"),
        ("validation samples", f"{s.validation:,}"),
        ("coverage", f"{s.coverage:.3f}"),
        *((f"  drift: {k}", f"{v:.4f}") for k, v in (s.drift or {}).items()),
        *(refresh_summary_rows(s.refreshes, s.adapter) if s.refreshes is not None
          else [("refreshes", "by `recsift trainer` (trainer.in_worker = false)")]),
    ]


def refresh_summary_rows(refreshes: list[RefreshOutcome], adapter: str | None) -> list[tuple[str, str]]:
    """The refresh part of a summary: how many, one row each, and the adapter serving at the end."""
    return [("refreshes", str(len(refreshes))), *refresh_rows(refreshes), ("serving adapter", adapter or "base model")]


def refresh_rows(refreshes: list[RefreshOutcome]) -> list[tuple[str, str]]:
    """One summary row per refresh: trigger, outcome, version, validation loss before → after, metrics."""
    return [(f"  {r.trigger}: {r.outcome}", f"{r.version or '-'}, validation loss {_num(r.serving_loss)} → "
             f"{_num(r.new_loss)}" + "".join(f", {k} {v:.4f}" for k, v in r.metrics.items()) + f", {r.seconds:.0f} s"
             + (f" ({r.error})" if r.error else "")) for r in refreshes]


def cmd_run(args: argparse.Namespace) -> int:
    from recsift import service

    cfg = settings_from(args)
    logging.getLogger().setLevel(cfg.monitoring.log_level)
    if cfg.monitoring.progress:
        with IngestBar(args.max_events) as bar:
            summary = service.run(cfg, max_events=args.max_events, progress=bar.tick)
    else:
        summary = service.run(cfg, max_events=args.max_events)
    print_table("recsift run summary", run_rows(summary))
    return 0


def stop_on_signals() -> threading.Event:
    """An event SIGTERM and SIGINT set: a long-running command stops cleanly and prints its summary."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_trainer(args: argparse.Namespace) -> int:
    from recsift import service

    cfg = settings_from(args)
    logging.getLogger().setLevel(cfg.monitoring.log_level)
    summary = service.run_trainer(cfg, stop=stop_on_signals())
    print_table("recsift trainer summary", [
        ("workers", f"{summary.workers:,}"), ("coreset", f"{summary.members:,}"),
        ("validation samples", f"{summary.validation:,}"), *refresh_summary_rows(summary.refreshes, summary.adapter)])
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from recsift.serving.app import run_serve

    cfg = settings_from(args)
    logging.getLogger().setLevel(cfg.monitoring.log_level)
    summary = run_serve(cfg, stop_on_signals(), on_ready=lambda url: print(f"recsift serve: listening on {url}", flush=True))
    print_table("recsift serve summary", [("url", summary.url), ("serving", summary.version),
                                          ("requests", f"{summary.requests:,}")])
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from recsift.data.datasets import (
        detect_format,
        iter_events_or_payloads,
        resolve_dataset,
    )
    from recsift.data.synthetic import SyntheticStream
    from recsift.stream.kafka import ensure_topic, keyed, produce_events

    cfg = settings_from(args)
    if args.file == "synthetic":
        synth = cfg.stream.synthetic
        if args.limit is not None:
            synth = synth.model_copy(update={"events": args.limit})
        payloads: Any = SyntheticStream(synth).payloads()
    else:
        path = resolve_dataset(args.file, cfg.stream.data_dir)
        fmt = detect_format(path) if args.replay_format == "auto" else args.replay_format
        payloads = keyed(iter_events_or_payloads(path, fmt))
        if args.limit is not None:
            payloads = islice(payloads, args.limit)
    ensure_topic(cfg.stream, False, cfg.stream.topic, cfg.stream.partitions)
    with CountBar(args.limit, "ev", "replay") as bar:
        n = produce_events(cfg.stream, False, payloads, cfg.stream.topic, rate=args.rate, progress=bar)
    print(f"produced {n:,} events to {cfg.stream.topic!r} on {cfg.stream.bootstrap_servers}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from recsift.data.datasets import catalog_for, resolve_dataset
    from recsift.selection.prune import METHODS, prune
    from recsift.service import scorer_options, stratified_options, surrogate_options
    from recsift.stream.catalog import Catalog

    cfg = settings_from(args)
    path = resolve_dataset(args.dataset, cfg.stream.data_dir)
    out = args.out or cfg.checkpoint.state_dir / "prune" / f"{path.name}-{args.method}"
    effort_weight = cfg.scoring.effort_weight if args.method == "dealrec" else 0.0
    effort = None
    if effort_weight > 0:
        from recsift.service import build_effort

        effort = build_effort(cfg, catalog_for(path) or Catalog())
    strata = stratified_options(cfg)
    report = prune(path, args.method, args.budget, out, epochs=args.epochs, seed=cfg.scoring.seed,
                   scorer_options=scorer_options(cfg, METHODS[args.method].scorer), surrogate=cfg.scoring.surrogate,
                   surrogate_options=surrogate_options(cfg),
                   strata=strata.strata, hard_prune=strata.hard_prune, effort_weight=effort_weight, effort=effort,
                   progress=log.info)
    print_table(f"recsift prune: {args.method} on {path.name}", [
        ("surrogate", report.surrogate),
        ("users", f"{report.users:,}"),
        ("samples scored", f"{report.scored:,}"),
        ("excluded (one item, no input)", f"{report.too_short:,}"),
        ("surrogate epochs", f"{report.epochs} ({sum(report.epoch_seconds):.1f} s, final loss {report.final_loss:.4f})"),
        ("prepare (LiSSA for dealrec)", f"{report.prepare_seconds:.1f} s"),
        ("scoring", f"{report.score_seconds:.1f} s ({report.rate:,.0f} samples/s)"),
        ("effort weight λ", f"{effort_weight}"),
        ("selected", f"{report.selected:,} of budget {report.budget:,}"),
        ("scores", report.scores_path),
        ("selection", report.selected_path),
    ])
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from recsift.stream.broker import EmbeddedBroker

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with EmbeddedBroker(port=args.port) as broker:
        print(f"tansu broker listening on {broker.bootstrap_servers} (Ctrl-C to stop)", flush=True)
        while not done.wait(0.5):
            if not broker.running:
                print("the broker exited", file=sys.stderr)
                return 1
    return 0


def cmd_coreset(args: argparse.Namespace) -> int:
    from collections import Counter

    from recsift.selection.store import (
        export_snapshot,
        list_snapshots,
        live_members,
        take_snapshot,
    )

    db = settings_from(args).checkpoint.path
    if not db.is_file():
        raise FileNotFoundError(f"no checkpoint at {db}: run `recsift run` first (or pass --state-dir)")
    if args.coreset_command == "export":
        sid = args.snapshot if args.snapshot is not None else take_snapshot(db, "export").snapshot_id
        info = export_snapshot(db, args.out, sid)
        print(f"snapshot {info.snapshot_id}: {info.size:,} members written to {args.out}")
        return 0
    members = live_members(db)
    strata = Counter(m[4] for m in members)
    versions = Counter(m[5] for m in members)
    snaps = list_snapshots(db)
    rows = [("members", f"{len(members):,}"), ("users", f"{len({m[1] for m in members}):,}"),
            ("scorer versions", ", ".join(f"v{v}: {n}" for v, n in sorted(versions.items())) or "-"),
            ("members per stratum", " ".join(f"{k}:{n}" for k, n in sorted(strata.items())) or "-"),
            ("snapshots", f"{len(snaps)}" + (f" (latest {snaps[-1].snapshot_id}: {snaps[-1].size:,} members, "
                                              f"{snaps[-1].reason})" if snaps else ""))]
    print_table(f"coreset in {db}", rows)
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    from recsift.trainer.refresh import registry_for

    registry = registry_for(settings_from(args))
    if args.adapters_command == "promote":
        print(f"serving {registry.promote(args.version, reason='cli').name}")
        return 0
    if args.adapters_command == "rollback":
        print(f"serving {registry.rollback().name}")
        return 0
    current = registry.current()
    rows = [(("* " if current and v.name == current.name else "  ") + v.name,
             f"snapshot {v.metadata.get('snapshot_id')}, {v.metadata.get('trigger')}, "
             f"validation loss {v.metadata.get('metrics', {}).get('validation_loss')}") for v in registry.versions()]
    print_table(f"adapters in {registry.root}", rows or [("(none)", "")])
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    from recsift.data.catalogs import load_catalog
    from recsift.lock import DirectoryLock
    from recsift.trainer.refresh import refresh, registry_for

    cfg = settings_from(args)
    if not cfg.checkpoint.path.is_file():
        raise FileNotFoundError(f"no checkpoint at {cfg.checkpoint.path}: run `recsift run` first")
    with DirectoryLock(registry_for(cfg).root, Role.TRAINER):  # a running service refreshes into it too
        outcome = refresh(cfg, Trigger.MANUAL, load_catalog(cfg), progress=log.info)
    print_table("recsift refresh", [("outcome", outcome.outcome), ("snapshot", str(outcome.snapshot_id)),
                                    ("version", str(outcome.version)), ("serving before", str(outcome.serving_before)),
                                    ("validation loss before / after", f"{outcome.serving_loss} / {outcome.new_loss}"),
                                    ("seconds", f"{outcome.seconds:.1f}"), ("error", outcome.error or "-")])
    return 0 if outcome.outcome in (Outcome.PROMOTED, Outcome.SKIPPED) else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    from recsift.data.datasets import catalog_for, read_dealrec_split, resolve_dataset
    from recsift.trainer.evaluate import evaluate_dealrec, sample_test_users
    from recsift.trainer.llm import load_llm
    from recsift.trainer.prompts import builder_for
    from recsift.trainer.recommender import Recommender

    cfg = settings_from(args)
    t = cfg.trainer
    path = resolve_dataset(args.dataset, cfg.stream.data_dir)
    train, valid, test = (read_dealrec_split(path, s) for s in ("train", "valid", "test"))
    users = sample_test_users(test, args.users or None, t.seed)
    recommend: Callable[[Sequence[str], int], list[str]]
    if t.backend == "tiger":  # constrained beam search over the version's semantic IDs
        from recsift.trainer.tiger.backend import load_tiger

        if args.adapter is None:
            raise ConfigError("--backend tiger evaluates a TIGER version: name its directory with --adapter")
        tiger = load_tiger(args.adapter, t.tiger.history)
        recommend = lambda h, k: tiger.recommend([h], k, beams=t.tiger.beams)[0]  # noqa: E731
    else:
        catalog = catalog_for(path)
        if catalog is None:
            raise FileNotFoundError(f"{path} has no items.tsv: grounding needs titles")
        llm = load_llm(t.base_model, t.cache_dir, t.dtype, t.device)
        model = llm.model
        if args.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(args.adapter))
        builder = builder_for(llm.encode, catalog.title, llm.eos_token_id, llm.pad_token_id, t)
        log.info("embedding %s titles (cached under %s)", f"{len(catalog):,}", t.cache_dir)
        rec = Recommender(llm, model, catalog, builder, t.cache_dir, t.max_new_tokens, t.num_beams)
        recommend = lambda h, k: rec.recommend(h, k, generate=not args.no_generate)  # noqa: E731
    with CountBar(len(users), "user", "evaluate") as bar:
        metrics = evaluate_dealrec(recommend, train, valid, test, users, progress=bar)
    print_table(f"recsift evaluate on {path.name} ({len(users)} users)", [(k, f"{v:.4f}") for k, v in metrics.items()])
    return 0


def _http(url: str, method: str = "GET", token: str | None = None) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {"error": exc.reason}


def cmd_admin(args: argparse.Namespace) -> int:
    import os
    import urllib.error

    base = args.url.rstrip("/")
    token = args.token_file.read_text().strip() if args.token_file else os.environ.get("RECSIFT_ADMIN__TOKEN")
    try:
        if args.action == "status":
            code, body = _http(base + "/status")
        else:
            if not token:
                print("recsift admin: no token (set RECSIFT_ADMIN__TOKEN or pass --token-file)", file=sys.stderr)
                return EXIT_USAGE
            if any(c.isspace() for c in token):
                print("recsift admin: the token must be one line without spaces", file=sys.stderr)
                return EXIT_USAGE
            before = _http(base + "/status")[1].get("last_refresh") if args.action == "refresh" and args.wait else None
            code, body = _http(f"{base}/admin/{args.action}", "POST", token)
            if code == 200 and args.action == "refresh" and args.wait:
                end = time.monotonic() + args.timeout
                while time.monotonic() < end:
                    status = _http(base + "/status")[1]
                    last = status.get("last_refresh")
                    if last and last != before and not status.get("refresh_running"):
                        body = {"refresh": last, "adapter": status.get("adapter")}
                        code = 200 if last.get("outcome") in (Outcome.PROMOTED, Outcome.SKIPPED) else 1
                        break
                    time.sleep(1.0)
                else:
                    print("recsift admin: timed out waiting for the refresh", file=sys.stderr)
                    return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"recsift admin: cannot reach {base}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print(json.dumps(body, indent=2, default=str))
    if code == 401:
        print("recsift admin: the token was refused", file=sys.stderr)
    return 0 if code == 200 else 1


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    data = settings_from(args).masked()
    print(json.dumps(data, indent=2) if args.json else yaml.safe_dump(data, sort_keys=False), end="")
    return 0


COMMANDS = {"run": cmd_run, "trainer": cmd_trainer, "replay": cmd_replay, "prune": cmd_prune, "coreset": cmd_coreset,
            "adapters": cmd_adapters, "refresh": cmd_refresh, "evaluate": cmd_evaluate, "admin": cmd_admin,
            "serve": cmd_serve, "broker": cmd_broker, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    from recsift.data.datasets import DatasetNotFound
    from recsift.lock import AlreadyOwned
    from recsift.process import log_to_stderr
    from recsift.selection.store import SnapshotNotFound
    from recsift.stream.broker import BrokerUnavailable
    from recsift.trainer.registry import AdapterNotFound

    args = build_parser().parse_args(argv)
    log_to_stderr()
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DatasetNotFound, FileNotFoundError, AdapterNotFound, SnapshotNotFound, AlreadyOwned) as exc:
        # what a user can fix; anything else is a bug and surfaces with its traceback (exit 1)
        print(f"recsift: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokerUnavailable as exc:
        print(f"recsift: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
