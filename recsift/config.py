"""recsift configuration: one frozen settings tree, a section per package.

Precedence (highest first): CLI overrides > environment (``RECSIFT_SECTION__KEY``) > YAML file
(``--config``) > defaults. Unknown keys are errors, so a typo never silently falls back to a default.
Secrets are ``SecretStr`` and print masked.
"""

from __future__ import annotations

import contextvars
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from recsift.vocab import Drift

DEFAULT_DATA_DIR = Path("../shared/data")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the bad value."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    moved: ClassVar[dict[str, str]] = {}  # old key → where it lives now (an error names the new place)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            gone = [f"{key} moved to {cls.moved[key]}" for key in data if key in cls.moved]
            if gone:
                raise ValueError("; ".join(gone))
        return data


class ComponentSpec(BaseModel):
    """A pluggable component as configured: its registered ``type`` and that type's options. The package
    that owns the component validates it against its registry's discriminated union of configs
    (:mod:`recsift.registry`), so a new implementation needs no change here. A bare name means
    ``{type: name}``."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: str

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        return {"type": data} if isinstance(data, str) else data

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ScorerSpec(ComponentSpec):
    type: str = "dealrec"


class SelectorSpec(ComponentSpec):
    type: str = "stratified"


class SyntheticConfig(_Section):
    """The deterministic synthetic stream (the default feed of the embedded broker)."""

    seed: int = 0
    users: int = Field(2_000, gt=0)
    items: int = Field(1_000, gt=1)
    events: int = Field(200_000, gt=0, description="stream length; the generator is lazy")
    tastes: int = Field(8, gt=0, description="latent taste groups shared by users and items")
    zipf_a: float = Field(1.1, gt=1.0, description="Zipf exponent of item popularity")
    new_item_share: float = Field(0.2, ge=0.0, lt=1.0, description="share of items that appear mid-stream")
    shift_at: float = Field(0.5, ge=0.0, le=1.0, description="stream fraction where popularity shifts")
    events_per_second: float = Field(5.0, gt=0, description="event-time rate: seconds between events")
    start_ts: float = 1_700_000_000.0


class StreamConfig(_Section):
    """Where events come from and how they are validated."""

    source: Literal["embedded", "kafka", "file"] = "embedded"
    # Kafka
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "interactions"
    group_id: str = "recsift"
    dead_letter_topic: str = "interactions.dlq"
    catalog_topic: str | None = None
    coreset_topic: str | None = Field(
        None, description="publish the committed coreset and validation reservoir to this compacted topic "
                          "(recsift.selection.publish); None: not published")
    worker_id: str | None = Field(None, description="this worker's name in the coreset topic; None: the host name")
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int | None = Field(
        None, ge=1000, description="None: 2000 on the embedded broker, 10000 on real Kafka"
    )
    heartbeat_interval_ms: int | None = Field(None, ge=100)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    poll_max_records: int = Field(2_000, gt=0)
    poll_timeout_ms: int = Field(200, ge=0)
    backpressure_high: int = Field(20_000, gt=0, description="pause partitions above this many pending samples")
    backpressure_low: int = Field(5_000, ge=0, description="resume below this many")
    stop_when_idle_s: float | None = Field(None, gt=0, description="exit after this long with no new records")
    fetch_process: bool = Field(
        True, description="decode Kafka records in a child process, in parallel with the pipeline (uses a 2nd core)"
    )
    # embedded broker
    partitions: int = Field(3, gt=0, description="partitions of the topic the embedded broker creates")
    feed: str = Field("synthetic", description="embedded feed: synthetic, ml-100k, games, or a file path")
    data_dir: Path = DEFAULT_DATA_DIR
    synthetic: SyntheticConfig = SyntheticConfig()
    # file source
    file_path: Path | None = None
    file_format: Literal["auto", "jsonl", "csv", "inter", "dealrec", "movielens"] = "auto"
    dead_letter_path: Path | None = Field(None, description="where the file source writes its dead letters (JSON "
                                          "lines); unset: <checkpoint.state_dir>/dead_letter.jsonl")
    # validation
    catalog_path: Path | None = None
    unknown_items: Literal["reject", "accept"] = "accept"
    max_message_bytes: int = Field(64 * 1024, gt=0)
    dedup_capacity: int = Field(100_000, ge=0, description="recent event ids remembered to reject duplicates")

    @model_validator(mode="after")
    def _check(self) -> StreamConfig:
        if self.backpressure_low >= self.backpressure_high:
            raise ValueError(
                f"backpressure_low ({self.backpressure_low}) must be below backpressure_high ({self.backpressure_high})"
            )
        if self.source == "file" and self.file_path is None:
            raise ValueError("source 'file' needs stream.file_path")
        return self


class WindowConfig(_Section):
    """Per-user histories and event-time windows."""

    max_history: int = Field(50, gt=0, description="L: items of history kept per user and put in a sample")
    window_seconds: float = Field(3600.0, gt=0, description="tumbling event-time window size")
    allowed_lateness_s: float = Field(600.0, ge=0)
    max_batch: int = Field(512, gt=0, description="a window emits a micro-batch when it holds this many samples")
    idle_flush_s: float = Field(2.0, gt=0, description="processing-time bound on how long a sample waits")
    max_users: int = Field(1_000_000, gt=0, description="least recently active users beyond this are evicted")
    user_ttl_s: float = Field(90 * 86400.0, gt=0, description="users idle this long in event time are evicted")


class CheckpointConfig(_Section):
    state_dir: Path = Path("state")
    interval_events: int = Field(100_000, gt=0, description="checkpoint at least every this many records")
    interval_s: float = Field(10.0, gt=0, description="and at least this often while records flow")
    journal_samples: bool = Field(False, description="record every emitted sample id (audits, crash tests)")
    changelog_topic: str | None = Field(
        None, description="write the stream state's changes to this compacted topic and restore assigned "
                          "partitions from it (recsift.stream.changelog): workers on separate hosts; None: off")
    worker_state: bool = Field(
        True, description="with a changelog, also keep this worker's own state (scorer, selection) in "
                          "<changelog_topic>.workers, so a worker restarted on an empty disk continues exactly; "
                          "each checkpoint after a surrogate update then writes the scorer's whole state "
                          "(recsift_changelog_worker_state_bytes_total). false: an empty disk starts a new scorer")

    @property
    def path(self) -> Path:
        return self.state_dir / "recsift.sqlite"


class ScoringConfig(_Section):
    """DEALRec scoring: the surrogate, influence, effort (consumed by recsift.scoring)."""

    moved: ClassVar[dict[str, str]] = {"lissa_damping": "scoring.scorer.damping", "lissa_scale": "scoring.scorer.scale",
                                       "lissa_depth": "scoring.scorer.depth"}

    enabled: bool = Field(True, description="false: ingest only (histories, windows, checkpoint), no scoring")
    seed: int = 0
    effort_weight: float = Field(
        0.0, ge=0.0,
        description="λ in overall = minmax(influence) + λ·minmax(effort). DEALRec uses 0.3 on Games; the LLM "
                    "gradient costs ~0.16 s per sample on a 2-core CPU (bench/scoring.py), so 0 (off) is the CPU default")
    surrogate: Literal["sasrec", "gru4rec", "bert4rec"] = Field(
        "sasrec", description="the surrogate recommender scores are taken on (recsift.scoring.registry.SURROGATES); "
                              "hidden, layers, heads (attention only) and dropout apply to each")
    hidden: int = Field(64, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(2, gt=0)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    scorer: ScorerSpec = Field(ScorerSpec(), description="type (dealrec, random, loss, el2n, grand) and its "
                               "options, e.g. {type: dealrec, depth: 100} (recsift.scoring.registry)")
    batch_size: int = Field(4096, gt=0, description="samples per surrogate update and scoring pass on the stream")
    train_rows: int = Field(512, gt=0, description="new rows per surrogate step (plus as many replayed); the "
                            "rest of a scoring batch is scored but not trained on")
    reestimate_every: int = Field(20, gt=0, description="scoring batches between H⁻¹v re-estimates (new version)")
    reference_size: int = Field(1024, gt=0, description="reference reservoir: v, Hessian batches, score bounds")
    replay: int = Field(10_000, gt=0, description="surrogate replay buffer (rows) against forgetting")
    item_capacity: int = Field(100_000, gt=0, description="surrogate item rows; later new items share one row")
    item_rows_start: int = Field(1024, ge=3, description="item rows allocated at start; the table doubles as new "
                                 "items arrive, up to item_capacity, so the scorer's state follows the items in use")


class SelectionConfig(_Section):
    """Coverage-enhanced stratified selection (consumed by recsift.selection)."""

    moved: ClassVar[dict[str, str]] = {k: f"selection.selector.{k}" for k in (
        "strata", "hard_prune", "sketch_size", "half_life_s", "user_cap", "spares")}

    seed: int = 0
    budget: int = Field(1024, gt=0)
    partition_budgets: bool = Field(True, description="with a Kafka source, a worker selects ⌊budget / partitions⌋ "
                                    "(+1 for the lowest-numbered) per partition it owns, so the workers of one "
                                    "group together keep one budget; false: every worker keeps the whole budget")
    selector: SelectorSpec = Field(SelectorSpec(), description="type (stratified) and its options, e.g. {type: "
                                   "stratified, strata: 50, hard_prune: 0.1} (recsift.selection.registry)")
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="hash-chosen share kept out of the coreset")
    validation_size: int = Field(2048, gt=0, description="recent validation samples kept")
    recent_window: int = Field(4096, gt=0, description="recent samples drift is measured against")
    coverage_clusters: int = Field(32, ge=2)
    coverage_constraint: bool = Field(False, description="never evict the last member of a heavy cluster")
    goracs_size: int | None = Field(None, gt=0, description="run GORACS over the coreset pool to choose this many "
                                    "(the refresh subset); unset: off")
    goracs_every: int = Field(16, gt=0, description="selection batches between GORACS runs")
    goracs_lambda: float = Field(0.1, ge=0.0, description="weight of the normalised gradient norm in the OT cost")
    goracs_max_exchanges: int = Field(20, ge=0)
    goracs_exchange_candidates: int = Field(5, gt=0)


class HookTarget(_Section):
    """One place ``trainer.on_promote`` tells about each change of the serving adapter (recsift.trainer.hooks)."""

    type: Literal["vllm", "webhook"] = Field(description="vllm: its runtime LoRA API (recsift serve answers it "
                                             "too); webhook: a signed JSON POST")
    url: str = Field(description="vllm: the server's base URL (http://vllm:8000); webhook: the URL posted to")
    name: str | None = Field(None, description="the metric label; default: <type>-<position in the list>")
    api_key: SecretStr | None = Field(None, description="vllm: sent as Authorization: Bearer (vLLM's --api-key, "
                                      "recsift serve's admin.token)")
    secret: SecretStr | None = Field(None, description="webhook: the HMAC-SHA256 key of X-Recsift-Signature")
    lora_root: str | None = Field(None, description="vllm: the registry directory as that server sees it (a "
                                  "mounted volume); unset: the registry's own absolute path")
    timeout_s: float = Field(10.0, gt=0)
    max_backoff_s: float = Field(60.0, gt=0, description="retries back off exponentially from 1 s up to this")

    @model_validator(mode="after")
    def _complete(self) -> HookTarget:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must be http:// or https:// (got {self.url!r})")
        if self.type == "webhook" and self.secret is None:
            raise ValueError("a webhook target needs a secret (its requests are signed)")
        return self


class TigerConfig(_Section):
    """The TIGER backend (``trainer.backend: tiger``, recsift.trainer.tiger): semantic IDs from an RQ-VAE over the
    items' title embeddings, and a small T5 that generates the next item's ID."""

    levels: int = Field(3, gt=0, description="RQ-VAE codebooks (TIGER: 3); an ID is levels codes + a collision suffix")
    codes: int = Field(256, ge=2, description="codes per codebook (TIGER: 256)")
    latent: int = Field(32, gt=0, description="the RQ-VAE's latent size (TIGER: 32)")
    rqvae_hidden: int = Field(256, gt=0, description="the RQ-VAE encoder's and decoder's hidden width")
    rqvae_epochs: int = Field(200, gt=0, description="RQ-VAE training epochs over the catalogue")
    max_collision_rate: float = Field(0.2, ge=0.0, le=1.0, description="retrain the IDs (and start a fresh T5) when "
                                      "a larger share of items shares its codes with another item")
    max_error_ratio: float = Field(2.0, gt=0.0, description="... or when the items given IDs since the training are "
                                   "reconstructed this many times worse than the trained ones")
    d_model: int = Field(128, gt=0, description="the T5's width")
    layers: int = Field(2, gt=0, description="encoder and decoder layers")
    heads: int = Field(4, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    history: int = Field(20, gt=0, description="most recent history items the T5 reads")
    learning_rate: float = Field(1e-3, gt=0)
    epochs: int = Field(10, gt=0, description="fine-tuning epochs per refresh (early stopping on validation)")
    batch_size: int = Field(64, gt=0)
    beams: int = Field(20, gt=0, description="constrained beam search width when recommending")

    @model_validator(mode="after")
    def _heads_divide(self) -> TigerConfig:
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} must be a multiple of heads {self.heads}")
        return self


class TrainerConfig(_Section):
    """Few-shot LoRA refresh of the LLM recommender (consumed by recsift.trainer)."""

    seed: int = 0
    backend: Literal["bigrec", "tiger"] = Field(
        "bigrec", description="what a refresh trains (recsift.trainer.refresh.BACKENDS): bigrec = LoRA adapters on "
        "base_model, which generates titles; tiger = a T5 over semantic IDs of base_model's title embeddings")
    tiger: TigerConfig = Field(TigerConfig(), description="the TIGER backend's options")
    base_model: str = "smollm2"
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    cache_dir: Path = Field(Path.home() / ".cache" / "recsift", description="dequantised base models, title embeddings")
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on a CUDA device that "
                                                          "supports it and on a CPU with native bf16 (AVX-512 BF16, AMX, "
                                                          "Arm BF16); emulated bf16 is many times slower than fp32")
    domain: Literal["items", "games", "movies"] = Field("items", description="the prompt's wording")
    max_prompt_tokens: int = Field(256, ge=16, description="oldest history items are dropped to fit")
    prompt_history: int | None = Field(None, gt=0, description="at most this many recent history items in a "
                                       "prompt; unset: as many as max_prompt_tokens allows")
    train_on_inputs: bool = Field(True, description="loss over prompt + response (the reference setting); the "
                                  "effort score uses the same loss; false: response tokens only")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="refresh, effort and evaluation device; "
                                                   "auto: CUDA when present (bf16 there)")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up, then linear decay to 0 (transformers' "
                              "scheduler); at most half of a run's steps")
    min_eval_samples: int = Field(16, gt=0, description="a refresh with fewer validation samples is rejected "
                                  "(no_validation), never promoted")
    eval_candidates: int = Field(20, ge=2, description="candidates per validation sample for the likelihood "
                                 "metrics: the target and negatives within one token of its title length "
                                 "(half by popularity, half uniform)")
    candidate_score: Literal["pmi", "loglik"] = Field(
        "pmi", description="how candidates are ranked: pmi = log p(title | prompt) − log p(title | prompt "
        "with no history), what the history adds; loglik = the summed log-likelihood alone (negatives are "
        "length-matched either way)")
    effort_batch_size: int = Field(8, gt=0)
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(8, gt=0, description="bf16 batch 8 is the measured sweet spot on a 2-core CPU")
    early_stopping_patience: int = Field(1, ge=0, description="epochs without validation improvement before stopping")
    eval_samples: int = Field(128, gt=0, description="validation-reservoir samples a refresh is judged on")
    promote_tolerance: float = Field(0.01, ge=0.0, description="promote unless the new validation loss is worse "
                                     "than the serving adapter's by more than this fraction")
    in_worker: bool = Field(True, description="refresh inside `recsift run` (one process); false: a separate "
                            "`recsift trainer` reads stream.coreset_topic and refreshes")
    refresh_interval_s: float | None = Field(1800.0, gt=0, description="interval trigger; unset: no interval refreshes")
    drift_thresholds: dict[str, float] = Field(default_factory=lambda: {"target_js": 0.3, "embedding_sw": 0.5},
                                               description="drift trigger: a metric above its threshold")
    drift_cooldown_s: float = Field(600.0, ge=0.0, description="at least this long between drift-triggered refreshes")
    max_new_tokens: int = Field(128, gt=0, description="generation length before grounding (BIGRec: 128)")
    num_beams: int = Field(4, gt=0, description="beam search width of generation (BIGRec: 4)")
    refresh_every_samples: int | None = Field(None, gt=0, description="also refresh after this many scored samples")
    refresh_samples: int | None = Field(None, gt=0, description="train on a seeded uniform subset of this many "
                                        "snapshot members (CPU demos); unset: the whole snapshot")
    refresh_timeout_s: float = Field(3600.0, gt=0, description="a refresh process running longer is killed (failed)")
    on_promote: tuple[HookTarget, ...] = Field((), description="targets told about every promotion and rollback "
                                               "(recsift.trainer.hooks): [{type: vllm, url: ...}, {type: webhook, "
                                               "url: ..., secret: ...}]")

    @field_validator("drift_thresholds")
    @classmethod
    def _known_drift_names(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(Drift.values()))
        if unknown:  # a misspelt name would never trigger
            raise ValueError(f"unknown drift metrics {unknown}; known: {', '.join(Drift.values())}")
        return value


class ServeConfig(_Section):
    """``recsift serve``: the HTTP recommender on the base model + the serving adapter (recsift.serving)."""

    host: str = "127.0.0.1"
    port: int = Field(9500, ge=0, le=65535, description="0 picks a free port")
    follow: Literal["registry", "api"] = Field(
        "registry", description="registry: serve the registry's current version, swapping on promotion and "
        "rollback; api: serve what POST /v1/load_lora_adapter loaded last (a trainer's vllm hook drives it)")
    registry_dir: Path | None = Field(None, description="the adapter registry (a shared volume); unset: "
                                      "<checkpoint.state_dir>/adapters")
    history_dirs: tuple[Path, ...] = Field((), description="workers' state directories that {user_id} requests "
                                           "read histories from (read-only); unset: checkpoint.state_dir")
    generate: bool = Field(True, description="generation + grounding (BIGRec); false: ground the prompt's own "
                           "last-token state (no generation: fast, weaker)")
    max_batch: int = Field(8, gt=0, description="requests run together in one batch")
    max_wait_ms: float = Field(10.0, ge=0, description="how long the first request of a batch waits for more")
    queue_size: int = Field(64, gt=0, description="requests waiting beyond this are answered 503 at once")
    request_timeout_s: float = Field(120.0, gt=0, description="a request not answered by then gets 503")
    max_k: int = Field(100, gt=0)
    max_items: int = Field(200, gt=0, description="most history items or candidates one request may name")
    max_body_bytes: int = Field(65_536, gt=0)
    watch_interval_s: float = Field(1.0, gt=0, description="how often the registry pointer is read")


class MonitoringConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(9400, ge=0, le=65535, description="0 disables the HTTP endpoint")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    progress: bool = True


class AdminConfig(_Section):
    token: SecretStr | None = Field(None, description="bearer token for /admin/*; unset disables admin endpoints")


_yaml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("recsift_yaml_file", default=None)


class Settings(BaseSettings):
    """The whole recsift configuration. Build it with :func:`load_config`."""

    model_config = SettingsConfigDict(
        env_prefix="RECSIFT_", env_nested_delimiter="__", frozen=True, extra="forbid", case_sensitive=False
    )

    stream: StreamConfig = StreamConfig()
    window: WindowConfig = WindowConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    scoring: ScoringConfig = ScoringConfig()
    selection: SelectionConfig = SelectionConfig()
    trainer: TrainerConfig = TrainerConfig()
    serve: ServeConfig = ServeConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    admin: AdminConfig = AdminConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = _yaml_file.get()
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    def masked(self) -> dict[str, Any]:
        """The effective configuration as plain JSON-able data, secrets masked."""
        return json.loads(self.model_dump_json())  # SecretStr dumps as '**********'


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in YAML syntax) into a key path and a value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"override {text!r}: the key must name a section and a field, e.g. stream.topic")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def _nest(overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    items: list[tuple[list[str], Any]]
    if isinstance(overrides, dict):
        items = [(k.split("."), v) for k, v in overrides.items() if v is not None]
    else:
        items = [parse_override(o) for o in overrides]
    tree: dict[str, Any] = {}
    for path, value in items:
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _secret(name: str) -> bool:
    return any(w in name for w in ("password", "token", "secret", "api_key"))


def _masked(value: Any) -> Any:
    """``value`` with the values of secret-named keys masked, at any depth (for error messages)."""
    if isinstance(value, dict):
        return {k: "<secret>" if _secret(str(k)) else _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def load_config(yaml_file: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Settings:
    """Build the frozen settings from a YAML file, the environment and overrides (``section.key`` → value).

    Raises :class:`ConfigError` whose message names every bad field and its value.
    """
    path = Path(yaml_file) if yaml_file is not None else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    token = _yaml_file.set(path)
    try:
        return Settings(**_nest(overrides or {}))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            bad = err.get("input")
            shown = "<secret>" if _secret(loc) else repr(_masked(bad))
            lines.append(f"{loc}: {err['msg']} (got {shown})")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    finally:
        _yaml_file.reset(token)
