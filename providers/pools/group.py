"""What the cloud warm pools share, ``aws_pool`` (an EC2 Auto Scaling Group) and ``gcp_pool`` (a
Managed Instance Group): members that run a model server, served through the ``pool`` adapter.

Each member URL gets its own ``PoolProvider`` (client, HMAC signing, cost), built on first use;
they share the group's throughput measurements, hence one per-token price. Members are reached
through one ``endpoint`` fronting them all (a load balancer) or one by one through
``member_url``, a template the cloud adapter fills with each member's fields.

Nothing is rented per job: a lease is a slot, held in this process from ``reserve`` until
``start`` returns or the lease is released, on the least busy member; ``start`` sends the
request and waits for the answer, ``poll`` reports it. Capacity is serving members ×
``member_concurrency`` minus the slots held. A group with no member serving (scaled to zero,
booting) still offers, with zero capacity: placement keeps the job queued, where the beat's
``autoscale`` counts it and grows the group, instead of failing it. A group whose maximum size
is zero can never serve and offers nothing.

Keys read here: ``endpoint`` or ``member_url`` (exactly one), ``member_concurrency`` (4),
``price_per_hour`` (one member, default 0), ``timeout`` (120), ``scale_down_idle_seconds``,
``scale_cooldown_seconds`` (120), and the ``pool`` adapter's ``kinds`` (default [inference];
transcription allowed), ``models``, ``gpu``, ``gpu_count``, ``gpu_memory_gb``, ``secret_env``,
``price_per_1k_tokens``, ``assumed_tokens_per_second``, ``health_cache_seconds``.
"""

from __future__ import annotations

import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from providers.base import (
    JobSpec,
    Lease,
    NoCapacity,
    Offer,
    PermanentProviderError,
    Provider,
    ProviderKind,
    Requirements,
    RunHandle,
    RunStatus,
)
from providers.pools.provider import PoolProvider
from providers.pools.scaling import Limits

ENDPOINT_MEMBER = "*"  # the slot owner when one endpoint fronts every member
_POOL_KEYS = ("secret_env", "kinds", "models", "gpu", "gpu_count", "gpu_memory_gb", "price_per_1k_tokens",
              "assumed_tokens_per_second", "health_cache_seconds")


@dataclass
class _Slots:
    """Slots held in this process (lease id → member) for one group."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    held: dict[str, str] = field(default_factory=dict)

    def count(self, member: str | None = None) -> int:
        return sum(1 for m in self.held.values() if member is None or m == member)


# Keyed by (provider name, group) so a rebuilt provider object keeps the slots this process holds.
_SLOTS: dict[tuple[str, str], _Slots] = {}
_SLOTS_LOCK = threading.Lock()


def _slots_for(name: str, group: str) -> _Slots:
    with _SLOTS_LOCK:
        return _SLOTS.setdefault((name, group), _Slots())


class GroupPool(Provider, ABC):
    """Base of the cloud warm pools. A subclass lists the members serving now (``serving``), fills
    the ``member_url`` template (``member_urls``) and resizes the group (``autoscale``)."""

    kind: ClassVar[ProviderKind] = ProviderKind.cloud_pool
    offer_prefix: ClassVar[str] = "group:"  # offer ids are this + the group's name
    member_url_example: ClassVar[str] = "http://{name}:8000"
    default_idle_seconds: ClassVar[float] = 600.0

    def __init__(self, name: str, config: dict[str, Any], *, group: str, region: str) -> None:
        super().__init__(name, config)
        c = self.config
        self.group_name, self.region = group, region
        self.endpoint = str(c.get("endpoint") or "").rstrip("/") or None
        self.member_url = str(c.get("member_url") or "") or None
        if bool(self.endpoint) == bool(self.member_url):
            raise ValueError(f"{name}: set exactly one of 'endpoint' (a URL fronting the group) or 'member_url' "
                             f"(a template such as {self.member_url_example})")
        self.member_concurrency = int(c.get("member_concurrency", 4))
        if self.member_concurrency < 1:
            raise ValueError(f"{name}: member_concurrency must be at least 1")
        self.price_per_hour = float(c.get("price_per_hour", 0.0))
        self.timeout = float(c.get("timeout", 120))
        if "start_timeout" not in c:  # start waits for the whole request
            self.start_timeout = max(self.start_timeout, self.timeout + 30)
        self.idle_seconds = float(c.get("scale_down_idle_seconds", self.default_idle_seconds))
        self.cooldown_seconds = float(c.get("scale_cooldown_seconds", 120))
        self._slots = _slots_for(name, group)
        self._pools: dict[str, PoolProvider] = {}
        self._pools_lock = threading.Lock()
        self.template = self.pool_for(self.endpoint or "http://member.invalid")  # checks kinds, prices… now
        self.kinds, self.models = self.template.kinds, self.template.models  # the autoscaler counts these kinds

    # --- for the subclass ----------------------------------------------------------------------

    @abstractmethod
    def serving(self) -> tuple[list[str], int]:
        """(ids of the members that can take work now, the group's maximum size)."""

    @abstractmethod
    def member_urls(self, members: list[str]) -> dict[str, str]:
        """Each reachable member's URL, from ``member_address``."""

    def member_address(self, **fields: str) -> str:
        assert self.member_url is not None
        return self.member_url.format(**fields).rstrip("/")

    def limits(self, min_size: int, max_size: int) -> Limits:
        return Limits(min_size=min_size, max_size=max_size, member_concurrency=self.member_concurrency,
                      idle_seconds=self.idle_seconds, cooldown_seconds=self.cooldown_seconds)

    def held_slots(self) -> int:
        """Slots this process holds: the work in flight, as far as this process can see."""
        return self._slots.count()

    def pool_for(self, url: str) -> PoolProvider:
        """The ``pool`` adapter for one URL: it owns the client, signing, cost and throughput measurement."""
        with self._pools_lock:
            if url not in self._pools:
                config = {k: self.config[k] for k in _POOL_KEYS if k in self.config}
                for key in ("kinds", "models"):
                    if isinstance(config.get(key), str):  # `kinds: inference` means one
                        config[key] = [config[key]]
                config.update(endpoint=url, concurrency=self.member_concurrency, price_per_hour=self.price_per_hour,
                              region=self.region, timeout=self.timeout)
                try:
                    self._pools[url] = PoolProvider(self.name, config, stats_key=f"group:{self.group_name}")
                except ValueError as exc:
                    raise ValueError(str(exc).replace(f"pool {self.name}", self.name)) from None
            return self._pools[url]

    # --- Provider ------------------------------------------------------------------------------

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        model = spec.get("model")
        pool = self.template
        if kind not in pool.kinds or (model and pool.models and model not in pool.models):
            return []
        serving, max_size = self.serving()
        if max_size == 0:
            return []  # can never serve: better "no offer" than jobs waiting forever
        free = len(serving) * self.member_concurrency - self._slots.count()
        return [Offer(provider=self.name, offer_id=f"{self.offer_prefix}{self.group_name}", gpu=pool.gpu,
                      gpu_count=pool.gpu_count, gpu_memory_gb=pool.gpu_memory_gb, region=self.region,
                      price_per_hour=0.0, price_per_1k_tokens=pool.price_per_1k_tokens(kind), capacity=max(0, free),
                      kinds=list(pool.kinds), data={"members": serving, **({"model": model} if model else {})})]

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        """A slot on the least busy serving member, or NoCapacity."""
        serving, _ = self.serving()
        if not serving:
            raise NoCapacity(f"{self.name}: no member of {self.group_name} is serving yet")
        urls = {ENDPOINT_MEMBER: self.endpoint} if self.endpoint else self.member_urls(serving)
        room = len(serving) * self.member_concurrency if self.endpoint else self.member_concurrency
        lease_id = f"{self.group_name}-{uuid.uuid4().hex[:12]}"
        with self._slots.lock:
            busy, member = min(((self._slots.count(m), m) for m in urls), default=(room, ""))
            if busy >= room:
                raise NoCapacity(f"{self.name}: every slot of {len(serving)} serving members is busy "
                                 f"({len(urls)} reachable)")
            self._slots.held[lease_id] = member
        return Lease(provider=self.name, offer_id=offer.offer_id, external_id=lease_id, label=job.label,
                     price_per_hour=0.0, reserved_at=time.time(),
                     data={"member": member, "url": urls[member], "price_per_1k_tokens": offer.price_per_1k_tokens})

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        url = str(lease.data.get("url") or self.endpoint or "")
        try:
            if not url:
                raise PermanentProviderError(f"{self.name}: lease {lease.external_id} names no member URL")
            handle = self.pool_for(url).start(lease, job)
        finally:
            self._free(lease.external_id)
        handle.provider = self.name
        handle.data["member"] = lease.data.get("member")
        return handle

    def poll(self, handle: RunHandle) -> RunStatus:
        return RunStatus(state="succeeded", result=handle.data["response"], cost=handle.data.get("cost"))

    def release(self, lease: Lease, handle: RunHandle | None = None) -> None:
        """Nothing was rented per job; a slot still held (start never ran) is freed."""
        self._free(lease.external_id)

    def _free(self, lease_id: str) -> None:
        with self._slots.lock:
            self._slots.held.pop(lease_id, None)
