"""The RunPod provider's configuration, validated once: a typo in a key fails at start-up
(pydantic's ValidationError is a ValueError, which the registry reports as a config error)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"  # has python3, which the wrapper needs


class EndpointConfig(BaseModel):
    """A serverless endpoint someone deployed on RunPod; we send it requests and, with ``autoscale``,
    set its max workers from the work in sight (``providers.runpod.autoscaling``).

    ``min_workers``/``max_workers`` are our limits for the endpoint (``max_workers`` is also the
    offer's capacity); the ``scale_*`` keys are named as the cloud pools name theirs. Autoscaling is
    opt-in because it rewrites a setting of an endpoint that someone else may manage by hand."""

    model_config = ConfigDict(extra="forbid")

    endpoint_id: str = Field(min_length=1)
    gpu: str | None = None
    gpu_types: list[str] = Field(default_factory=list, description="RunPod GPU type ids; informational.")
    gpu_count: int = Field(default=1, ge=1)
    gpu_memory_gb: float = Field(default=0, ge=0)
    region: str = "US"
    min_workers: int = Field(default=0, ge=0)
    max_workers: int = Field(default=1, ge=0)
    idle_timeout: int = Field(default=5, ge=0)
    price_per_second: float | None = Field(default=None, ge=0)
    price_per_hour: float | None = Field(default=None, ge=0)
    kinds: list[str] = Field(default_factory=lambda: ["inference", "transcription"])
    models: list[str] = Field(default_factory=list, description="Model names it serves; empty means any.")
    autoscale: bool = Field(default=False, description="Let the beat set workersMax within [min_workers, max_workers].")
    worker_concurrency: int = Field(default=1, ge=1, description="Requests one worker serves at once.")
    scale_cooldown_seconds: float = Field(default=120, ge=0, description="No resize sooner than this after the last.")
    scale_down_idle_seconds: float = Field(default=600, ge=0, description="Idle this long before going to min_workers.")

    @model_validator(mode="after")
    def _one_price(self) -> EndpointConfig:
        if (self.price_per_second is None) == (self.price_per_hour is None):
            raise ValueError(f"endpoint {self.endpoint_id}: set exactly one of price_per_second, price_per_hour")
        return self

    @model_validator(mode="after")
    def _limits(self) -> EndpointConfig:
        # Checked only when we scale: min_workers is otherwise informational and old configs stay valid.
        if self.autoscale and self.min_workers > self.max_workers:
            raise ValueError(f"endpoint {self.endpoint_id}: autoscale needs min_workers <= max_workers")
        return self

    @property
    def per_second(self) -> float:
        return self.price_per_second if self.price_per_second is not None else (self.price_per_hour or 0.0) / 3600


class PodsConfig(BaseModel):
    """Pods rented per job: which GPU types to consider and how to start them."""

    model_config = ConfigDict(extra="forbid")

    gpu_types: list[str] = Field(min_length=1, description="RunPod GPU type ids, e.g. 'NVIDIA A100 80GB PCIe'.")
    cloud_type: Literal["ALL", "SECURE", "COMMUNITY"] = "ALL"
    image: str = DEFAULT_IMAGE
    container_disk_gb: int = Field(default=20, ge=1)
    volume_gb: int = Field(default=0, ge=0)
    interruptible: bool = Field(default=False, description="Offer spot pods when the job does not say.")
    region: str | None = None
    country_code: str | None = None
    ports: str | None = None
    kinds: list[str] = Field(default_factory=lambda: ["training", "command"])
    default_command: list[str] | str | None = None

    @property
    def offer_region(self) -> str:
        """Where our pods land, as placement matches it: unknown unless a region or country is pinned."""
        return self.region or self.country_code or "any"


class RunPodConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the base class and the registry add their own keys

    api_key: SecretStr | None = None  # SecretStr: never shown by a repr or a validation error
    api_key_env: str = "RUNPOD_API_KEY"
    api_base_url: str = "https://api.runpod.io"
    endpoint_base_url: str = "https://api.runpod.ai/v2"
    request_timeout: float = Field(default=30, gt=0)
    health_timeout: float = Field(default=5, gt=0)
    health_cache_seconds: float = Field(default=10, ge=0)
    retry_budget_seconds: float = Field(default=8, ge=0)
    max_attempts: int = Field(default=4, ge=1)
    endpoints: list[EndpointConfig] = Field(default_factory=list)
    pods: PodsConfig | None = None

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> RunPodConfig:
        """Validate; unknown top-level keys are only warned about, since the registry and the base
        class add keys of their own."""
        unknown = sorted(set(raw) - set(cls.model_fields) - _SHARED_KEYS)
        if unknown:
            log.warning("RunPod provider: ignoring unknown config keys %s", ", ".join(unknown))
        return cls.model_validate(raw)


# Keys the base Provider and the registry put in every provider's config.
_SHARED_KEYS = frozenset({"start_timeout", "provisioning_timeout", "runs_dir", "state_dir", "type", "enabled"})
