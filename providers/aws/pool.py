"""An EC2 Auto Scaling Group kept warm as an inference pool (``type: aws_pool``).

Members run a model server; jobs go to them over HTTP through the shared ``PoolClient`` (HMAC
signed), either straight to a member (``member_url``, e.g. ``http://{private_ip}:8000``) or to
one URL that fronts them all (``endpoint``, e.g. a load balancer). Nothing is rented per job:
a lease is a slot, ``start`` sends the request and waits for the answer, ``poll`` reports it.
Capacity is in-service members × ``member_concurrency`` minus this process's requests in
flight. A group with no member in service but room to grow offers zero capacity, so jobs wait
while ``autoscale`` (run from Celery beat) grows it; scaling never happens inside placement.

Config keys:
    asg_name (required), region (default us-east-1), endpoint_url (AWS API endpoint, tests)
    endpoint              one URL in front of every member, or
    member_url            per-member URL template: {private_ip}, {instance_id}
    member_concurrency    requests one member serves at once (default 4)
    price_per_hour        what one member costs per hour (default 0)
    price_per_1k_tokens   fixed per-token price; else price_per_hour / 3600 / member throughput × 1000
    assumed_tokens_per_second  one member's throughput until measured (default 500)
    gpu, gpu_count, gpu_memory_gb, kinds (default [inference]; transcription allowed), models
    scale_down_idle_seconds (default 900), scale_cooldown_seconds (default 120)
    secret_env            env var holding the pool's HMAC secret (never the secret itself)
    timeout (120), group_cache_seconds (5), retry, max_retry_wait, request_timeout
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from providers.aws import asg
from providers.aws.clients import Clients, refuse_credentials
from providers.aws.config import names
from providers.aws.scaling import decide
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

log = logging.getLogger(__name__)

SERVED_KINDS = ("inference", "transcription")
EWMA_ALPHA = 0.3
ENDPOINT_MEMBER = "*"  # the slot owner when one endpoint fronts every member


@dataclass
class _Slots:
    """Per-process facts about one pool: held slots (lease id → member) and measured tokens/s per request."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    held: dict[str, str] = field(default_factory=dict)
    tokens_per_second: dict[str, float] = field(default_factory=dict)

    def count(self, member: str | None = None) -> int:
        return sum(1 for m in self.held.values() if member is None or m == member)


_SLOTS: dict[tuple[str, str], _Slots] = {}
_SLOTS_LOCK = threading.Lock()


def _slots_for(name: str, group: str) -> _Slots:
    with _SLOTS_LOCK:
        return _SLOTS.setdefault((name, group), _Slots())


class AWSPoolProvider(Provider):
    kind: ClassVar[ProviderKind] = ProviderKind.cloud_pool

    def __init__(self, name: str = "aws_pool", config: dict[str, Any] | None = None) -> None:
        super().__init__(name, config)
        c = self.config
        refuse_credentials(c, name)
        self.asg_name = str(c.get("asg_name") or "")
        if not self.asg_name:
            raise ValueError(f"{name}: asg_name is required")
        self.region = str(c.get("region") or "us-east-1")
        self.endpoint = str(c.get("endpoint") or "").rstrip("/") or None
        self.member_url = str(c.get("member_url") or "") or None
        if bool(self.endpoint) == bool(self.member_url):
            raise ValueError(f"{name}: give exactly one of endpoint (one URL for the pool) or member_url "
                             "(a template such as http://{private_ip}:8000)")
        self.member_concurrency = int(c.get("member_concurrency", 4))
        self.kinds = names(c.get("kinds") or ["inference"])
        if unknown := set(self.kinds) - set(SERVED_KINDS):
            raise ValueError(f"{name}: kinds {sorted(unknown)} are not served by pools (only {list(SERVED_KINDS)})")
        self.models = names(c.get("models"))
        self.gpu: str | None = c.get("gpu") or None
        self.gpu_count = int(c.get("gpu_count", 1 if self.gpu else 0))
        self.gpu_memory_gb = float(c.get("gpu_memory_gb", 0))
        self.price_per_hour = float(c.get("price_per_hour", 0.0))
        fixed = c.get("price_per_1k_tokens")
        self.fixed_price_per_1k: float | None = float(fixed) if fixed is not None else None
        self.assumed_tokens_per_second = float(c.get("assumed_tokens_per_second", 500))
        self.scale_down_idle_seconds = float(c.get("scale_down_idle_seconds", 900))
        self.scale_cooldown_seconds = float(c.get("scale_cooldown_seconds", 120))
        self.secret_env: str | None = c.get("secret_env") or None
        self.timeout = float(c.get("timeout", 120))
        self.group_cache_seconds = float(c.get("group_cache_seconds", 5))
        if self.member_concurrency < 1 or self.assumed_tokens_per_second <= 0 or self.price_per_hour < 0:
            raise ValueError(f"{name}: member_concurrency >= 1, assumed_tokens_per_second > 0, price_per_hour >= 0")
        if "start_timeout" not in c:  # start waits for the whole request
            self.start_timeout = max(self.start_timeout, self.timeout + 30)
        self.clients = Clients(endpoint_url=c.get("endpoint_url") or None, profile=c.get("profile") or None,
                               retry=int(c.get("retry", 2)), max_retry_wait=float(c.get("max_retry_wait", 2)),
                               read_timeout=float(c.get("request_timeout", 15)))
        self._slots = _slots_for(name, self.asg_name)
        self._group: tuple[float, asg.Group | None] | None = None
        self._pool_clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    # --- the group ---------------------------------------------------------------------------

    def group(self, fresh: bool = False) -> asg.Group | None:
        """The group as last described, re-read after ``group_cache_seconds`` (placement asks per job)."""
        cached = self._group
        if not fresh and cached is not None and time.monotonic() - cached[0] < self.group_cache_seconds:
            return cached[1]
        found = asg.describe_group(self.clients, self.region, self.asg_name)
        self._group = (time.monotonic(), found)
        return found

    def _require_group(self) -> asg.Group:
        found = self.group()
        if found is None:
            raise PermanentProviderError(f"{self.name}: auto scaling group {self.asg_name!r} does not exist in {self.region}")
        return found

    # --- pricing -----------------------------------------------------------------------------

    def price_per_1k_tokens(self, kind: str) -> float:
        if self.fixed_price_per_1k is not None:
            return self.fixed_price_per_1k
        per_request = self._slots.tokens_per_second.get(kind)
        throughput = per_request * self.member_concurrency if per_request else self.assumed_tokens_per_second
        return round(self.price_per_hour / 3600 / throughput * 1000, 10)

    def _cost(self, kind: str, result: dict[str, Any], elapsed: float) -> float:
        tokens = int((result.get("usage") or {}).get("total_tokens") or 0)
        if tokens:
            rate = tokens / max(elapsed, 1e-6)
            with self._slots.lock:
                old = self._slots.tokens_per_second.get(kind)
                self._slots.tokens_per_second[kind] = rate if old is None else EWMA_ALPHA * rate + (1 - EWMA_ALPHA) * old
            return round(tokens * self.price_per_1k_tokens(kind) / 1000, 10)
        # No token count (audio billed in seconds): the request's share of a member's time.
        return round(self.price_per_hour / 3600 * elapsed / self.member_concurrency, 10)

    # --- Provider ----------------------------------------------------------------------------

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        model = spec.get("model")
        if kind not in self.kinds or (model and self.models and model not in self.models):
            return []
        group = self._require_group()
        if group.max_size == 0:
            return []  # can never serve: better "no offer" than jobs waiting forever
        free = len(group.in_service) * self.member_concurrency - self._slots.count()
        return [Offer(provider=self.name, offer_id=f"asg/{self.asg_name}", gpu=self.gpu, gpu_count=self.gpu_count,
                      gpu_memory_gb=self.gpu_memory_gb, region=self.region, price_per_hour=0.0,
                      price_per_1k_tokens=self.price_per_1k_tokens(kind), capacity=max(0, free), kinds=list(self.kinds),
                      data={"members": len(group.in_service), "desired": group.desired, "max": group.max_size})]

    def _pick_member(self, group: asg.Group) -> tuple[str, str]:
        """(slot owner, URL) of the least busy member with a free slot, or NoCapacity."""
        if self.endpoint:
            if self._slots.count() >= len(group.in_service) * self.member_concurrency:
                raise NoCapacity(f"{self.name}: every slot of {len(group.in_service)} in-service members is busy")
            return ENDPOINT_MEMBER, self.endpoint
        ips = asg.private_ips(self.clients, self.region, list(group.in_service))
        load = sorted((self._slots.count(iid), iid) for iid in ips)
        for busy, iid in load:
            if busy < self.member_concurrency:
                assert self.member_url is not None
                return iid, self.member_url.format(private_ip=ips[iid], instance_id=iid)
        raise NoCapacity(f"{self.name}: no in-service member has a free slot ({len(ips)} reachable)")

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        member, url = self._pick_member(self._require_group())
        lease_id = f"{self.asg_name}-{uuid.uuid4().hex[:12]}"
        with self._slots.lock:
            self._slots.held[lease_id] = member
        return Lease(provider=self.name, offer_id=offer.offer_id, external_id=lease_id, label=job.label,
                     price_per_hour=0.0, reserved_at=time.time(),
                     data={"member": member, "url": url, "price_per_1k_tokens": offer.price_per_1k_tokens})

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        if job.kind not in self.kinds:
            raise PermanentProviderError(f"{self.name} does not serve {job.kind} jobs")
        model = job.spec.get("model")
        if model and self.models and model not in self.models:
            raise PermanentProviderError(f"{self.name} does not serve model {model!r}")
        client = self._client(str(lease.data.get("url") or self.endpoint or ""))
        timeout = min(self.timeout, float(job.timeout_seconds))
        now, began = time.time(), time.monotonic()
        try:
            if job.kind == "transcription":
                result = client.transcribe(job.spec, timeout=timeout)
            else:
                result = client.chat(job.spec, timeout=timeout)
        finally:
            self._free(lease.external_id)
        elapsed = time.monotonic() - began
        data = {"response": result, "cost": self._cost(job.kind, result, elapsed), "member": lease.data.get("member"),
                "elapsed_seconds": round(elapsed, 6)}
        return RunHandle(provider=self.name, lease=lease, started_at=now, data=data)

    def poll(self, handle: RunHandle) -> RunStatus:
        return RunStatus(state="succeeded", result=handle.data["response"], cost=handle.data["cost"])

    def release(self, lease: Lease, handle: RunHandle | None = None) -> None:
        """Nothing was rented; a slot still held (start never ran) is freed."""
        self._free(lease.external_id)

    def _free(self, lease_id: str) -> None:
        with self._slots.lock:
            self._slots.held.pop(lease_id, None)

    def health(self) -> Health:
        try:
            group = asg.describe_group(self.clients, self.region, self.asg_name, quick=True)
        except ProviderError as exc:
            return Health(ok=False, detail=str(exc))
        if group is None:
            return Health(ok=False, detail=f"auto scaling group {self.asg_name!r} not found in {self.region}")
        self._group = (time.monotonic(), group)
        return Health(ok=True, detail=f"{len(group.in_service)} of {group.desired} members in service "
                                      f"(min {group.min_size}, max {group.max_size})")

    def _client(self, url: str) -> Any:
        """One PoolClient per URL, built on first use so a process that never sends work needs no secret."""
        from providers.pools.client import PoolClient

        with self._lock:
            if url not in self._pool_clients:
                secret = None
                if self.secret_env:
                    secret = os.environ.get(self.secret_env)
                    if not secret:
                        raise PermanentProviderError(f"{self.name}: ${self.secret_env} (the pool's shared secret) is not set")
                self._pool_clients[url] = PoolClient(url, secret=secret, timeout=self.timeout, name=self.name)
            return self._pool_clients[url]

    # --- scaling -----------------------------------------------------------------------------

    def autoscale(self, queue_depth: int, now: float | None = None, *, in_flight: int | None = None) -> str | None:
        """Resize the group for the work in sight; a one-line note when it changed, else None.

        ``in_flight`` is the number of this pool's jobs being served; it defaults to this process's
        count, which is right only where the requests are sent, so a beat task should pass the
        number of running jobs on this provider.
        """
        now = time.time() if now is None else now
        group = self.group(fresh=True)
        if group is None:
            raise PermanentProviderError(f"{self.name}: auto scaling group {self.asg_name!r} does not exist in {self.region}")
        busy = self._slots.count() if in_flight is None else in_flight
        decision = decide(group, queue_depth=queue_depth, in_flight=busy, member_concurrency=self.member_concurrency,
                          now=now, cooldown=self.scale_cooldown_seconds, idle_seconds=self.scale_down_idle_seconds)
        if decision.desired is not None:
            asg.set_desired(self.clients, self.region, self.asg_name, decision.desired)
            self._group = None
        if decision.tags:
            asg.write_tags(self.clients, self.region, self.asg_name, decision.tags)
        if decision.note:
            log.info("%s: %s", self.name, decision.note)
        return decision.note

