"""A Managed Instance Group as a warm pool of model servers: its RUNNING members serve jobs over
HTTP (the ``pool`` adapter's client, signing and per-token pricing, reused by composition), and
``autoscale`` resizes the group from the queue.

Members are reached either through one fixed ``endpoint`` (an internal load balancer in front of
the group) or one by one through ``member_url``, a template filled with ``{name}``, ``{zone}`` and
``{project}`` (e.g. ``http://{name}.{zone}.c.{project}.internal:8000``). ``price_per_hour`` is one
member's cost; a slot costs a ``member_concurrency``-th of it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from typing import Any, ClassVar

from providers.base import (
    Health,
    JobSpec,
    Lease,
    NoCapacity,
    Offer,
    PermanentProviderError,
    Provider,
    ProviderError,
    ProviderKind,
    Requirements,
    RunHandle,
    RunStatus,
)
from providers.gcp.autoscale import Limits, StateFile, decide
from providers.gcp.catalog import fits
from providers.gcp.sdk import Compute, timed, translate

log = logging.getLogger(__name__)
_POOL_KEYS = ("secret_env", "kinds", "models", "gpu", "gpu_count", "gpu_memory_gb", "timeout", "price_per_1k_tokens",
              "assumed_tokens_per_second", "health_cache_seconds")


class GCPPoolProvider(Provider):
    kind: ClassVar[ProviderKind] = ProviderKind.cloud_pool

    def __init__(self, name: str = "gcp_pool", config: dict[str, Any] | None = None) -> None:
        super().__init__(name, config)
        c = self.config
        self.compute = Compute(name, c)
        self.zone = str(c.get("zone") or "")
        self.group = str(c.get("instance_group_manager") or "")
        if not self.zone or not self.group:
            raise ValueError(f"{name}: 'zone' and 'instance_group_manager' are required")
        self.endpoint = str(c.get("endpoint") or "").rstrip("/") or None
        self.member_url = str(c.get("member_url") or "") or None
        if bool(self.endpoint) == bool(self.member_url):
            raise ValueError(f"{name}: set exactly one of 'endpoint' (a URL fronting the group) or 'member_url' (a template)")
        self.limits = Limits(
            min_size=int(c.get("min_size", 0)), max_size=int(c.get("max_size", 1)),
            member_concurrency=int(c.get("member_concurrency", 4)),
            idle_seconds=float(c.get("scale_down_idle_seconds", 600)),
            cooldown_seconds=float(c.get("scale_cooldown_seconds", 120)))
        if not 0 <= self.limits.min_size <= self.limits.max_size or self.limits.member_concurrency < 1:
            raise ValueError(f"{name}: need 0 <= min_size <= max_size and member_concurrency >= 1")
        self.region = str(c.get("region") or self.zone)
        self.price_per_hour = float(c.get("price_per_hour", 0.0))
        self.timeout = float(c.get("timeout", 120))
        if "start_timeout" not in c:  # start waits for the whole request
            self.start_timeout = max(self.start_timeout, self.timeout + 30)
        self._pools: dict[str, Any] = {}
        self._pools_lock = threading.Lock()
        self._in_flight = 0
        self._state = StateFile(c.get("state_dir"), name)
        self._template = self._pool_for(self.endpoint or "http://member.invalid")  # validates kinds etc. now

    # --- members -----------------------------------------------------------------------------

    def _pool_for(self, url: str) -> Any:
        """The ``pool`` adapter for one URL: it owns the client, signing, cost and throughput measurement."""
        from providers.pools import PoolProvider

        with self._pools_lock:
            if url not in self._pools:
                config = {k: self.config[k] for k in _POOL_KEYS if k in self.config}
                config.update(endpoint=url, concurrency=self.limits.member_concurrency, price_per_hour=self.price_per_hour,
                              region=self.region)
                try:
                    self._pools[url] = PoolProvider(self.name, config)
                except ValueError as exc:
                    raise ValueError(str(exc).replace(f"pool {self.name}", self.name)) from None
            return self._pools[url]

    def members(self) -> list[dict[str, str]]:
        """The group's managed instances: name, instanceStatus and currentAction of each."""
        rows = self.compute.call("groups", f"listing members of {self.group}", lambda c: list(c.list_managed_instances(
            project=self.compute.project, zone=self.zone, instance_group_manager=self.group, retry=self.compute.retry(),
            timeout=self.compute.request_timeout)))
        return [{"name": str(m.name or str(m.instance).rsplit("/", 1)[-1]), "status": str(m.instance_status),
                 "action": str(m.current_action)} for m in rows]

    def _serving(self) -> list[str]:
        return [m["name"] for m in self.members() if m["status"] == "RUNNING" and m["action"] in ("NONE", "VERIFYING")]

    def _url_of(self, member: str) -> str:
        if self.endpoint:
            return self.endpoint
        assert self.member_url is not None
        return self.member_url.format(name=member, zone=self.zone, project=self.compute.project).rstrip("/")

    # --- Provider ----------------------------------------------------------------------------

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        model = spec.get("model")
        pool = self._template
        if kind not in pool.kinds or (model and pool.models and model not in pool.models):
            return []
        if self.limits.max_size == 0:
            return []  # can never serve: better "no offer" than jobs waiting forever
        serving = self._serving()
        # No free slot (none RUNNING yet, e.g. scaled to zero) is still an offer, of zero capacity: placement
        # then keeps the job queued, where the autoscaler counts it and grows the group, instead of failing it.
        capacity = max(0, len(serving) * self.limits.member_concurrency - self._in_flight)
        offer = Offer(provider=self.name, offer_id=f"mig:{self.group}", gpu=pool.gpu, gpu_count=pool.gpu_count,
                      gpu_memory_gb=pool.gpu_memory_gb, region=self.region, price_per_hour=0.0,
                      price_per_1k_tokens=pool.price_per_1k_tokens(kind), capacity=capacity, kinds=list(pool.kinds),
                      data={"members": serving, **({"model": model} if model else {})})
        return [offer] if fits(offer, req) else []

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        members = [str(m) for m in offer.data.get("members") or []]
        if not self.endpoint:
            members = self._serving() or members  # the offer's list may be stale by now
        if not members:
            raise NoCapacity(f"{self.name}: no RUNNING members in {self.group}")
        member = random.choice(members)
        return Lease(provider=self.name, offer_id=offer.offer_id, external_id=f"{self.group}-{uuid.uuid4().hex[:12]}",
                     label=job.label, price_per_hour=0.0, reserved_at=time.time(),
                     data={"member": member, "url": self._url_of(member)})

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        url = str(lease.data.get("url") or self._url_of(str(lease.data.get("member") or "")))
        with self._pools_lock:
            self._in_flight += 1
        try:
            handle = self._pool_for(url).start(lease, job)
        finally:
            with self._pools_lock:
                self._in_flight -= 1
        handle.provider = self.name
        handle.data["member"] = lease.data.get("member")
        return handle

    def poll(self, handle: RunHandle) -> RunStatus:
        return RunStatus(state="succeeded", result=handle.data["response"], cost=handle.data.get("cost"))

    def release(self, lease: Lease, handle: RunHandle | None = None) -> None:
        """Nothing was rented per job: the group's members stay for the next one."""

    def health(self) -> Health:
        try:
            group, ms = timed(lambda: self._get_group())
        except ProviderError as exc:
            return Health(ok=False, detail=str(exc))
        detail = f"{self.group}: target size {group.target_size}, Compute API answered in {ms:.0f} ms"
        if self.endpoint and group.target_size:
            served = self._template.health()
            return Health(ok=served.ok, detail=f"{detail}; endpoint: {served.detail}")
        return Health(ok=True, detail=detail)

    # --- autoscaling -------------------------------------------------------------------------

    def _get_group(self) -> Any:
        from google.api_core import exceptions

        try:
            return self.compute.call("groups", f"get of {self.group}", lambda c: c.get(
                project=self.compute.project, zone=self.zone, instance_group_manager=self.group,
                retry=self.compute.retry(), timeout=self.compute.request_timeout))
        except exceptions.NotFound as exc:
            raise PermanentProviderError(str(translate(exc, f"{self.name} get of {self.group}"))) from None

    def autoscale(self, queue_depth: int, now: float | None = None, *, in_flight: int | None = None) -> str | None:
        """Resize the group for ``queue_depth`` waiting jobs; a one-line account of the decision, None if
        nothing changed. ``in_flight`` is the number of jobs running on this pool (the caller knows it from
        the job table); without it, this process's own count is used."""
        now = time.time() if now is None else now
        state = self._state.load()
        current = int(self._get_group().target_size)
        busy = self._in_flight if in_flight is None else in_flight
        decision = decide(self.limits, state, current=current, queue_depth=max(0, queue_depth), in_flight=busy, now=now)
        if decision.size is None or decision.size == current:
            self._state.save(state)
            return None if decision.reason.startswith("steady") else f"{self.name}: {decision.reason}"
        self.compute.call("groups", f"resize of {self.group} to {decision.size}", lambda c: c.resize_unary(
            project=self.compute.project, zone=self.zone, instance_group_manager=self.group, size=decision.size,
            retry=self.compute.retry(), timeout=self.compute.request_timeout))
        state.last_resize_at = now
        self._state.save(state)
        log.info("%s: %s", self.name, decision.reason)
        return f"{self.name}: {decision.reason}"
