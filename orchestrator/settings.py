"""One settings object for every process (API, workers, beat, CLI, migrations).

Everything is read from ``GPUFLEET_*`` environment variables (or a ``.env`` file).
With nothing set, gpufleet runs embedded: a SQLite file and a filesystem broker in
``data_dir``, so ``gpufleet demo`` needs no services. Two variables —
``GPUFLEET_DATABASE_URL`` and ``GPUFLEET_BROKER_URL`` — switch to Postgres and Redis.
"""

from __future__ import annotations

import json
import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from orchestrator.errors import ConfigError
from providers.base import StrategyName

QUEUE_NAMES = ("high_priority", "inference", "default", "training", "distillation", "low_priority")
CONTROL_QUEUE = "control"

DEFAULT_CONCURRENCY: dict[str, int] = {
    "high_priority": 2,
    "inference": 4,
    "default": 4,
    "training": 2,
    "distillation": 2,
    "low_priority": 2,
    "control": 1,
}


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "gpufleet"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GPUFLEET_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str = ""
    broker_url: str = ""
    result_url: str = ""
    api_url: str = "http://127.0.0.1:8000"
    api_key: str = ""
    # The API's address as rented instances reach it (they report outcomes there); defaults to api_url.
    callback_url: str = ""
    # Object storage for artifacts, checkpoints and exports: s3://bucket/prefix (any S3-compatible
    # endpoint) or a directory; unset: <data_dir>/artifacts. Rented instances get presigned S3 URLs.
    artifact_base_uri: str = ""
    storage_endpoint_url: str = ""
    storage_region: str = ""

    # "tenant:key" pairs created at start-up so a fresh stack is usable without a CLI step.
    bootstrap_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)

    queue_concurrency: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_CONCURRENCY))

    providers_file: Path | None = None
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)

    # One visibility timeout for broker and results: a message unacked for longer is redelivered.
    visibility_timeout: int = Field(default=3600, ge=60)
    # A non-terminal job whose next check is this overdue is re-published by the sweeper.
    sweep_interval_seconds: float = Field(default=10.0, gt=0)
    sweep_grace_seconds: float = Field(default=30.0, ge=0)

    # Global hard limits in USD (per calendar month, and per hour of capacity held at once); unset: none.
    # Per-provider limits are the providers' `monthly_budget` / `max_cost_per_hour`; tenants set their own.
    monthly_budget: float | None = Field(default=None, ge=0)
    max_cost_per_hour: float | None = Field(default=None, ge=0)

    max_payload_bytes: int = Field(default=1_048_576, ge=1024)
    max_batch_size: int = Field(default=10_000, ge=1)
    default_max_attempts: int = Field(default=3, ge=1, le=20)
    default_timeout_seconds: int = Field(default=3600, ge=1)
    # Routing: the strategy jobs get unless they name one; the score's weights (cost, latency, errors,
    # capacity); the $/1K-token line of the "hybrid" strategy; the data-residency policy file.
    placement_strategy: StrategyName = "lowest_cost"
    placement_weights: dict[str, float] = Field(default_factory=dict)
    hybrid_threshold_per_1k: float = Field(default=0.001, ge=0)
    residency_policy_file: Path | None = None
    # A job nothing can take right now (all full, unhealthy or over budget) waits and retries with
    # exponential backoff between these bounds, for at most max_wait_seconds (and its own timeout).
    capacity_retry_seconds: float = Field(default=2.0, gt=0)
    capacity_retry_max_seconds: float = Field(default=30.0, gt=0)
    max_wait_seconds: int = Field(default=24 * 3600, ge=0)
    # Distillation: pairs scoring below the threshold are kept but not exported; a judge model grades
    # teacher answers (else their agreement with the student does); pairs older than the retention
    # are deleted; after this many new accepted pairs a student is trained again (0: only on request).
    distill_quality_threshold: float = Field(default=0.8, ge=0, le=1)
    distill_judge_model: str = ""
    distill_retention_days: int = Field(default=90, ge=1)
    distill_auto_train_pairs: int = Field(default=0, ge=0)
    distill_test_fraction: float = Field(default=0.1, ge=0, lt=1)
    # The training command for students (its env: GPUFLEET_TRAIN_DATA, GPUFLEET_VALIDATION_DATA,
    # GPUFLEET_BASE_MODEL, GPUFLEET_ARTIFACT_URI…); default: the small stand-in trainer.
    distill_train_command: str = ""
    # How long POST /v1/chat/completions holds the connection before answering 504 (the job goes on).
    front_door_timeout_seconds: float = Field(default=300.0, gt=0)
    # Runs' collected output: kept this many days, and at most this many characters per job (beyond
    # it only checkpoint lines are still read), so a chatty run cannot fill the database.
    log_retention_days: int = Field(default=30, ge=1)
    max_log_chars_per_job: int = Field(default=20_000_000, ge=10_000)
    # A warm pool member's agent asks for work every few seconds: one that has not taken a job bound to
    # it within this many seconds is stuck (on a cancelled job) or gone, and is given back.
    warm_claim_seconds: float = Field(default=60.0, gt=0)
    # How often pool providers (ASG, MIG) are resized from their queue depth.
    autoscale_interval_seconds: float = Field(default=15.0, gt=0)
    # Health monitor: every provider is checked on the beat this often, and the result shared through
    # Postgres (placement reads it instead of asking each provider for every job). A row older than
    # health_max_age_seconds (default 3 × the interval: the beat is presumed down) is ignored and
    # placement asks the provider itself, as without a monitor.
    health_interval_seconds: float = Field(default=10.0, gt=0)
    health_max_age_seconds: float | None = Field(default=None, gt=0)
    # Circuit breaker per provider: it opens after breaker_failures failures in a row, or when the
    # failure rate (a moving average, 0..1) exceeds breaker_error_rate after breaker_min_samples
    # observations; open, the provider gets no work for breaker_open_seconds, then one check decides
    # (success closes it, failure opens it again).
    breaker_failures: int = Field(default=3, ge=1)
    breaker_error_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_min_samples: int = Field(default=10, ge=1)
    breaker_open_seconds: float = Field(default=30.0, ge=0)

    flower_basic_auth: str = ""
    log_level: str = "INFO"

    @field_validator("placement_weights")
    @classmethod
    def _known_weights(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - {"cost", "latency", "errors", "capacity"})
        if unknown:
            raise ValueError(f"unknown weight(s) {', '.join(unknown)}: use cost, latency, errors, capacity")
        if any(v < 0 for v in value.values()):
            raise ValueError("weights must be >= 0")
        return value

    @field_validator("bootstrap_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("bootstrap_api_keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        for item in value:
            tenant, _, key = item.partition(":")
            if not tenant or len(key) < 16:
                raise ValueError("each entry must be 'tenant:key' with a key of at least 16 characters")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if value.startswith(("postgresql://", "postgres://")):  # Heroku/Fly style
            return "postgresql+psycopg://" + value.split("://", 1)[1]
        if value and not value.startswith(("sqlite", "postgresql+psycopg")):
            raise ValueError("must start with sqlite://, postgres:// or postgresql+psycopg://")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str) -> str:
        allowed = ("redis://", "rediss://", "amqp://", "pyamqp://", "filesystem://", "memory://")
        if value and not value.startswith(allowed):
            raise ValueError("must be a redis://, amqp:// or filesystem:// URL")
        return value

    @field_validator("queue_concurrency")
    @classmethod
    def _check_concurrency(cls, value: dict[str, int]) -> dict[str, int]:
        merged = dict(DEFAULT_CONCURRENCY)
        for queue, n in value.items():
            if n < 1:
                raise ValueError(f"concurrency for {queue!r} must be at least 1")
            merged[queue] = n
        return merged

    @model_validator(mode="after")
    def _fill_embedded_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'gpufleet.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if self.health_max_age_seconds is None:
            self.health_max_age_seconds = 3 * self.health_interval_seconds
        return self

    @property
    def embedded(self) -> bool:
        """True when running without external services (SQLite + filesystem broker)."""
        return self.database_url.startswith("sqlite") and self.broker_url.startswith(("filesystem", "memory"))

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    def provider_configs(self) -> dict[str, dict[str, Any]]:
        """Provider configs from the file, overlaid by ``GPUFLEET_PROVIDERS__<NAME>__<KEY>`` env values."""
        configs: dict[str, dict[str, Any]] = {}
        if self.providers_file:
            configs = _load_providers_file(self.providers_file)
        for name, overrides in self.providers.items():
            configs.setdefault(name, {}).update({key: _env_value(value) for key, value in overrides.items()})
        return configs


def _env_value(value: Any) -> Any:
    """An override from the environment as the JSON value it spells ("0" → 0, "true" → True), else the
    string itself; pydantic-settings versions differ in whether they decode nested values."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _load_providers_file(path: Path) -> dict[str, dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"GPUFLEET_PROVIDERS_FILE: cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"GPUFLEET_PROVIDERS_FILE: {path} is not valid: {exc}".splitlines()[0]) from None
    data = data or {}
    providers = data.get("providers", data) if isinstance(data, dict) else data
    if not isinstance(providers, dict) or not all(isinstance(v, dict) for v in providers.values()):
        raise ConfigError(f"GPUFLEET_PROVIDERS_FILE: {path} must map provider names to tables")
    return providers


def load_settings(**overrides: Any) -> Settings:
    """Build settings, turning a validation error into one line that names the variable."""
    try:
        return Settings(**overrides)
    except SettingsError as exc:
        field = str(exc).split('field "', 1)[-1].split('"', 1)[0].upper()
        raise ConfigError(f"GPUFLEET_{field}: cannot parse the value (expected JSON for structured settings)") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]).upper() if err["loc"] else "SETTINGS"
        raise ConfigError(f"GPUFLEET_{field}: {err['msg'].removeprefix('Value error, ')}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
