"""The one interface every capacity source implements, and the values that cross it.

Values here are pydantic models because leases and run handles are stored in the job
row between short Celery tasks: a provider worker that restarts must be able to pick
up a run from its JSON alone.
"""

from __future__ import annotations

import enum
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

JobKindName = Literal["inference", "transcription", "training", "distillation", "command"]
# How placement orders the offers that fit (orchestrator/scheduling/strategies.py implements them).
StrategyName = Literal["lowest_cost", "lowest_latency", "score", "round_robin", "weighted_random", "failover",
                       "tiered", "cluster_first", "external_first", "hybrid", "capability"]


class ProviderKind(enum.StrEnum):
    marketplace = "marketplace"
    serverless = "serverless"
    cloud_pool = "cloud_pool"
    self_hosted = "self_hosted"
    model_api = "model_api"
    local = "local"


# --- errors -----------------------------------------------------------------------------


class ProviderError(Exception):
    """Base of the provider error tree. Messages must never contain credentials."""


class NoCapacity(ProviderError):
    """The offer is gone or full: try the next offer."""


class TransientProviderError(ProviderError):
    """A failure worth retrying elsewhere or later (network, provider hiccup, crashed host)."""


class PermanentProviderError(ProviderError):
    """The job cannot run as asked (bad image, rejected request): fail it and say why."""


class NotYetReleased(ProviderError):
    """Release started but is not finished: call release again later."""


# --- values -----------------------------------------------------------------------------


class Requirements(BaseModel):
    """What a job needs from capacity; providers turn it into a search, placement filters on it."""

    model_config = ConfigDict(extra="forbid")

    gpu: list[str] | None = Field(default=None, description="Acceptable GPU models, e.g. ['A100', 'H100'].")
    gpu_count: int = Field(default=0, ge=0, le=64, description="0 means no GPU is needed.")
    min_gpu_memory_gb: float | None = Field(default=None, gt=0)
    max_price_per_hour: float | None = Field(default=None, gt=0)
    min_reliability: float | None = Field(default=None, ge=0, le=1, description="Marketplace host reliability, 0..1.")
    regions: list[str] | None = Field(default=None, description="Region codes, country codes or continents (EU, NA, AS…).")
    providers: list[str] | None = Field(default=None, description="Only these providers.")
    exclude_providers: list[str] | None = Field(default=None, description="Never these providers.")
    interruptible: bool | None = Field(default=None, description="True: spot/bid capacity is allowed; False: on-demand only.")
    max_price_per_1k_tokens: float | None = Field(default=None, gt=0, description="For usage-priced offers (model APIs, pools).")
    max_latency_ms: float | None = Field(default=None, gt=0, description="Providers measured slower (p95) are skipped.")
    context_window: int | None = Field(default=None, gt=0, description="Tokens of context the model must accept.")
    capabilities: list[str] | None = Field(default=None, description="e.g. large-context, reasoning, transcription.")
    data_class: str | None = Field(default=None, max_length=64, description="Residency class from the policy file.")
    strategy: StrategyName | None = Field(default=None, description="Routing strategy; default from the configuration.")
    failover_order: list[str] | None = Field(default=None, description="Provider order for the 'failover' strategy.")

    def needs_gpu(self) -> bool:
        return self.gpu_count > 0 or bool(self.gpu) or self.min_gpu_memory_gb is not None


class Offer(BaseModel):
    provider: str
    offer_id: str
    gpu: str | None = None
    gpu_count: int = 0
    gpu_memory_gb: float = 0
    region: str = "local"
    price_per_hour: float = 0.0
    price_per_1k_tokens: float | None = None
    capacity: int = 1
    reliability: float = 1.0
    kinds: list[str] = Field(default_factory=list)
    interruptible: bool = False
    context_window: int | None = None
    capabilities: list[str] = Field(default_factory=list)
    # Provider-specific facts the adapter needs again at reserve time (ask id, bid, GPU type id…).
    data: dict[str, Any] = Field(default_factory=dict)


class JobSpec(BaseModel):
    """What a provider needs to run a job: no tenant data beyond the job itself."""

    job_id: str
    kind: JobKindName
    attempt: int
    spec: dict[str, Any]
    timeout_seconds: int
    # GPUFLEET_JOB_ID, GPUFLEET_CALLBACK_URL, GPUFLEET_JOB_TOKEN, GPUFLEET_ARTIFACT_URI…: what the run needs to report.
    env: dict[str, str] = Field(default_factory=dict)
    # The reservation's label: the adapter must store it on whatever it rents (instance label, pod name, tag),
    # because the reaper finds our resources by it.
    label: str = ""


class Lease(BaseModel):
    provider: str
    offer_id: str
    external_id: str
    label: str
    price_per_hour: float
    reserved_at: float
    data: dict[str, Any] = Field(default_factory=dict)


class RunHandle(BaseModel):
    provider: str
    lease: Lease
    started_at: float
    data: dict[str, Any] = Field(default_factory=dict)


RunState = Literal["running", "succeeded", "failed"]


class RunStatus(BaseModel):
    state: RunState
    result: dict[str, Any] | None = None
    error: str | None = None
    # A failure of the capacity rather than of the job: worth failing over.
    transient: bool = False
    # Usage-priced work (model APIs) reports its own cost; rented time is priced by the caller.
    cost: float | None = None
    # The capacity is still booting (image pull, host start): not yet billed as active.
    provisioning: bool = False
    # Output the run printed since the last poll, as (stream, text) — for runs whose output we read
    # ourselves (this machine's processes); rented instances send theirs through the wrapper instead.
    output: list[tuple[str, str]] = Field(default_factory=list)


class ExternalResource(BaseModel):
    """Something a provider holds for us, as its own listing shows it (for the reaper)."""

    provider: str
    external_id: str
    label: str
    offer_id: str = ""
    created_at: float | None = None
    price_per_hour: float = 0.0

    def as_lease(self) -> Lease:
        return Lease(provider=self.provider, offer_id=self.offer_id, external_id=self.external_id, label=self.label,
                     price_per_hour=self.price_per_hour, reserved_at=self.created_at or 0.0)


class Health(BaseModel):
    ok: bool
    detail: str = ""


LABEL_PREFIX = "gpufleet-"


class Provider:
    """Base class for adapters. Methods must return quickly: waiting is the caller's job.

    ``reserve`` may return a lease whose capacity is still booting; ``poll`` reports
    progress without blocking; ``release`` is idempotent and raises ``NotYetReleased``
    to be called again.
    """

    kind: ClassVar[ProviderKind]
    # How long reserve + start may take before the sweeper presumes the executor lost.
    default_start_timeout: ClassVar[float] = 120.0
    # How long rented capacity may stay booting before poll gives up on it (bad hosts hang here).
    default_provisioning_timeout: ClassVar[float] = 300.0
    # True if owned() lists every lease this provider holds for us, so a lease missing from it is gone.
    lists_all_leases: ClassVar[bool] = False
    # Runs on this machine (its processes share our disk and credentials' reach), not on rented capacity.
    runs_here: ClassVar[bool] = False
    # Placement facts from the provider's config, set by the registry (adapters never see these keys):
    # placed only when nothing else fits (``last_resort: true``, e.g. the Fly fallback chat service);
    # cost tier; share under weighted_random; rank under the failover strategy; what it can do.
    last_resort: bool = False
    tier: str | None = None
    weight: float = 1.0
    priority: int | None = None
    capabilities: tuple[str, ...] = ()

    def __init__(self, name: str, config: dict[str, Any] | None = None) -> None:
        self.name = name
        self.config = config or {}
        self.start_timeout = float(self.config.get("start_timeout", self.default_start_timeout))
        self.provisioning_timeout = float(self.config.get("provisioning_timeout", self.default_provisioning_timeout))

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        """Offers that could run this job; placement filters and ranks them."""
        raise NotImplementedError

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        raise NotImplementedError

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        raise NotImplementedError

    def poll(self, handle: RunHandle) -> RunStatus:
        raise NotImplementedError

    def release(self, lease: Lease, handle: RunHandle | None = None) -> None:
        raise NotImplementedError

    def owned(self) -> list[ExternalResource]:
        """Everything the provider holds whose label starts with ``LABEL_PREFIX``."""
        return []

    def health(self) -> Health:
        return Health(ok=True)

    def serves_tenant(self, tenant_id: uuid.UUID | None) -> bool:
        """Capacity that belongs to one tenant (a warm pool it pays for) is offered to that tenant only."""
        return True
