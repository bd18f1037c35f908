"""A warm pool as a provider: its offers are the idle members (rented instances already running an
agent), so placement sees warm capacity next to everything else — at no extra price, since the
members' rent is paid and recorded on their own reservations. The autoscaler grows and shrinks it.

Unlike other adapters this one calls back into the orchestrator (orchestrator/services/warm_pools.py):
its "capacity" is our own reservations, not a third party's API. Config (providers.yaml)::

    warm-4090:
      type: warm
      tenant: acme            # whose jobs use it, whose budget pays
      provider: vastai        # where members are rented
      gpu: [RTX 4090]
      min_instances: 0
      max_instances: 3
      idle_seconds: 300       # idle this long, then back to min_instances
      cooldown_seconds: 60
      instance_seconds: 3600  # each member's reservation
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar

from providers.base import (
    Health,
    JobSpec,
    Lease,
    NoCapacity,
    Offer,
    Provider,
    ProviderKind,
    Requirements,
    RunHandle,
    RunStatus,
)

KINDS = ["command", "training"]
CACHE_SECONDS = 1.0  # placement asks often; a stale count only costs a NoCapacity at reserve


class WarmPoolProvider(Provider):
    kind: ClassVar[ProviderKind] = ProviderKind.cloud_pool
    default_start_timeout: ClassVar[float] = 30.0

    def __init__(self, name: str, config: dict[str, Any] | None = None) -> None:
        from orchestrator.services.warm_pools import WarmPoolConfig

        raw = {k: v for k, v in (config or {}).items() if k not in ("runs_dir", "state_dir")}
        super().__init__(name, raw)
        self.pool = WarmPoolConfig(**raw)
        self.kinds = KINDS
        self._idle: tuple[float, list[tuple[uuid.UUID, str]]] = (0.0, [])
        self._tenant_id: uuid.UUID | None = None

    def serves_tenant(self, tenant_id: uuid.UUID | None) -> bool:
        if self._tenant_id is None:
            from orchestrator.services.warm_pools import tenant_id_of

            self._tenant_id = tenant_id_of(self.pool.tenant)
        return tenant_id == self._tenant_id

    def serves(self, tenant_id: uuid.UUID, requirements: dict[str, Any]) -> bool:
        """Whether a queued job counts as demand for this pool (the autoscaler asks): the pool's tenant's,
        and a member could hold it — rented for a job it could never run, a member would only idle."""
        gpus = requirements.get("gpu")
        return (self.serves_tenant(tenant_id) and (not gpus or bool(set(gpus) & set(self.pool.gpu)))
                and int(requirements.get("gpu_count") or 0) <= self.pool.gpu_count)

    def _idle_members(self) -> list[tuple[uuid.UUID, str]]:
        from orchestrator.services.warm_pools import idle_members

        at, members = self._idle
        if time.monotonic() - at > CACHE_SECONDS:
            members = idle_members(self.name)
            self._idle = (time.monotonic(), members)
        return members

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        """One offer per idle member, so a member that fails a job is the one set aside; with none idle
        the pool still shows itself, full, so a job that wants it waits for the autoscaler to grow it."""
        if kind not in self.kinds or not spec.get("command"):
            return []  # members run commands through their agent
        idle: list[tuple[uuid.UUID | None, str]] = [*self._idle_members()] or [(None, "")]
        return [Offer(provider=self.name, offer_id=f"member-{member}" if member else "grow", gpu=self.pool.gpu[0],
                      gpu_count=self.pool.gpu_count, region=region, price_per_hour=0.0, capacity=1 if member else 0,
                      kinds=self.kinds)
                for member, region in idle]

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        from orchestrator.services.warm_pools import bind

        member = uuid.UUID(offer.offer_id.removeprefix("member-")) if offer.offer_id.startswith("member-") else None
        self._idle = (0.0, [])
        if member is None or not bind(self.name, member, uuid.UUID(job.job_id), job.attempt):
            raise NoCapacity(f"warm pool {self.name}: that instance is no longer idle")
        return Lease(provider=self.name, offer_id=offer.offer_id, external_id=str(member), label=job.label,
                     price_per_hour=0.0, reserved_at=time.time())

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        # The member's agent claims the job (it is bound to the member); the pipeline follows it there.
        return RunHandle(provider=self.name, lease=lease, started_at=time.time(),
                         data={"on_reservation": lease.external_id, "warm_pool": self.name})

    def poll(self, handle: RunHandle) -> RunStatus:
        return RunStatus(state="running")  # the outcome comes from the agent's report

    def release(self, lease: Lease, handle: RunHandle | None = None) -> None:
        """Nothing to give back: the member stays warm for the next job (the autoscaler shrinks the pool)."""

    def health(self) -> Health:
        return Health(ok=True, detail=f"{len(self._idle_members())} idle instances")

    def autoscale(self, depth: int, *, in_flight: int, waited_seconds: float) -> str | None:
        from orchestrator.services.warm_pools import autoscale

        return autoscale(self.name, self.pool, depth, in_flight, waited_seconds)
