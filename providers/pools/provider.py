"""Self-hosted pools: GPUs we already run (on-prem, CoreWeave-style clusters) behind an HTTP
endpoint that speaks the OpenAI shape (llama.cpp, vLLM, Ollama) or our transcription shim.

Nothing is rented, so a lease is only a slot; ``start`` sends the request and waits for the
answer (as the local provider does) and ``poll`` reports it. The pool is priced per token so
placement can weigh it against model APIs: its hourly cost divided by the throughput we
measure on it.

Config keys (registry type ``pool``):

- ``endpoint`` (required): server root URL, e.g. ``http://10.0.4.7:8000``.
- ``secret_env``: name of the env var holding the HMAC shared secret; requests are signed when
  set. Never the secret itself.
- ``kinds``: job kinds served, default ``["inference"]``; may include ``"transcription"``.
- ``models``: model names served; empty means any (the server decides).
- ``concurrency``: request slots, default 4. Capacity = slots minus requests this process has in flight.
- ``gpu``, ``gpu_count`` (default 1 with a gpu, else 0), ``gpu_memory_gb``, ``region`` (default ``on-prem``),
  ``context_window`` (tokens the served models accept, if declared: jobs may require a size).
- ``price_per_hour``: what the whole pool costs per hour (amortised or billed), default 0.
- ``price_per_1k_tokens``: a fixed per-token price; wins over the derivation below when set.
- ``assumed_tokens_per_second``: whole-pool throughput assumed until measured, default 500.
- ``timeout``: seconds per request, default 120 (and ``health_cache_seconds``, default 10).

Derived price per 1K tokens = ``price_per_hour / 3600 / throughput * 1000``, where throughput is
an EWMA of tokens/s per completed request times ``concurrency`` (the pool's rate at full load,
if the server batches concurrent requests without slowing each). Measurements live in this
process only, per pool and job kind. A run costs its tokens at the price after its own
measurement; a run that reports no tokens (a transcription billed in audio seconds) costs its
share of the pool's time, ``price_per_hour / 3600 * elapsed / concurrency``.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from providers.base import (
    Health,
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
from providers.pools.client import PoolClient

SERVED_KINDS = ("inference", "transcription")
EWMA_ALPHA = 0.3


@dataclass
class _PoolStats:
    """Per-process facts about one pool: requests in flight and measured tokens/s per job kind."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    tokens_per_second: dict[str, float] = field(default_factory=dict)  # per request, not per pool

    def measure(self, kind: str, tokens: int, seconds: float) -> float:
        """Fold one completed request into the EWMA; the first one replaces the assumption."""
        rate = tokens / max(seconds, 1e-6)
        with self.lock:
            old = self.tokens_per_second.get(kind)
            self.tokens_per_second[kind] = rate if old is None else EWMA_ALPHA * rate + (1 - EWMA_ALPHA) * old
        return rate


# Keyed by (provider name, endpoint or stats_key) so a rebuilt provider object keeps what this process learned.
_STATS: dict[tuple[str, str], _PoolStats] = {}
_STATS_LOCK = threading.Lock()


def _stats_for(name: str, endpoint: str) -> _PoolStats:
    with _STATS_LOCK:
        return _STATS.setdefault((name, endpoint), _PoolStats())


class PoolProvider(Provider):
    kind: ClassVar[ProviderKind] = ProviderKind.self_hosted

    def __init__(self, name: str = "pool", config: dict[str, Any] | None = None, *, stats_key: str | None = None) -> None:
        """``stats_key``: whose throughput measurements to share (default this endpoint's); the cloud
        pools give every member's adapter the group's, so one price covers the group."""
        super().__init__(name, config)
        c = self.config
        self.endpoint = str(c.get("endpoint") or "").rstrip("/")
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"pool {name}: 'endpoint' must be an http(s) URL")
        self.secret_env: str | None = c.get("secret_env") or None
        self.kinds: list[str] = list(c.get("kinds") or ["inference"])
        if unknown := set(self.kinds) - set(SERVED_KINDS):
            raise ValueError(f"pool {name}: kinds {sorted(unknown)} are not served by pools (only {list(SERVED_KINDS)})")
        self.models: list[str] = [str(m) for m in c.get("models") or []]
        self.concurrency = int(c.get("concurrency", 4))
        if self.concurrency < 1:
            raise ValueError(f"pool {name}: 'concurrency' must be at least 1")
        self.gpu: str | None = c.get("gpu")
        self.gpu_count = int(c.get("gpu_count", 1 if self.gpu else 0))
        self.gpu_memory_gb = float(c.get("gpu_memory_gb", 0))
        self.region = str(c.get("region", "on-prem"))
        # The served models' context size, if the operator declares it (jobs may require one).
        self.context_window = int(c["context_window"]) if c.get("context_window") else None
        self.price_per_hour = float(c.get("price_per_hour", 0.0))
        fixed = c.get("price_per_1k_tokens")
        self.fixed_price_per_1k: float | None = float(fixed) if fixed is not None else None
        self.assumed_tokens_per_second = float(c.get("assumed_tokens_per_second", 500))
        if self.assumed_tokens_per_second <= 0 or self.price_per_hour < 0:
            raise ValueError(f"pool {name}: assumed_tokens_per_second must be > 0 and price_per_hour >= 0")
        self.timeout = float(c.get("timeout", 120))
        if "start_timeout" not in c:  # start waits for the whole request
            self.start_timeout = max(self.start_timeout, self.timeout + 30)
        self.health_cache_seconds = float(c.get("health_cache_seconds", 10))
        self._stats = _stats_for(name, stats_key or self.endpoint)
        self._client: PoolClient | None = None
        self._client_lock = threading.Lock()
        self._health: tuple[float, Health] | None = None

    # --- pricing ---------------------------------------------------------------------------------

    def price_per_1k_tokens(self, kind: str) -> float:
        """The per-token price placement sees: fixed if configured, else hourly cost over throughput."""
        if self.fixed_price_per_1k is not None:
            return self.fixed_price_per_1k
        per_request = self._stats.tokens_per_second.get(kind)
        throughput = per_request * self.concurrency if per_request else self.assumed_tokens_per_second
        return round(self.price_per_hour / 3600 / throughput * 1000, 10)

    def _cost(self, kind: str, result: dict[str, Any], elapsed: float) -> tuple[float, float | None]:
        """(cost, price per 1K tokens used or None if priced by time); measures throughput on the way."""
        tokens = int((result.get("usage") or {}).get("total_tokens") or 0)
        if tokens:
            self._stats.measure(kind, tokens, elapsed)
            price = self.price_per_1k_tokens(kind)
            return round(tokens * price / 1000, 10), price
        if self.fixed_price_per_1k is not None:  # no count from the server: about 4 characters a token
            result["usage_estimated"] = True
            estimate = math.ceil(len(str(result.get("text", ""))) / 4)
            return round(estimate * self.fixed_price_per_1k / 1000, 10), self.fixed_price_per_1k
        return round(self.price_per_hour / 3600 * elapsed / self.concurrency, 10), None

    # --- Provider --------------------------------------------------------------------------------

    def offers(self, req: Requirements, kind: str, spec: dict[str, Any]) -> list[Offer]:
        model = spec.get("model")
        if kind not in self.kinds or (model and self.models and model not in self.models):
            return []
        return [Offer(
            provider=self.name, offer_id="pool", gpu=self.gpu, gpu_count=self.gpu_count,
            gpu_memory_gb=self.gpu_memory_gb, region=self.region, price_per_hour=0.0,
            price_per_1k_tokens=self.price_per_1k_tokens(kind), capacity=max(0, self.concurrency - self._stats.in_flight),
            kinds=list(self.kinds), context_window=self.context_window, data={"model": model} if model else {},
        )]

    def reserve(self, offer: Offer, job: JobSpec) -> Lease:
        if self._stats.in_flight >= self.concurrency:
            raise NoCapacity(f"pool {self.name}: all {self.concurrency} slots are busy")
        return Lease(provider=self.name, offer_id=offer.offer_id, external_id=f"pool-{uuid.uuid4().hex[:12]}",
                     label=job.label, price_per_hour=0.0, reserved_at=time.time(),
                     data={"price_per_1k_tokens": offer.price_per_1k_tokens})

    def start(self, lease: Lease, job: JobSpec) -> RunHandle:
        if job.kind not in self.kinds:
            raise PermanentProviderError(f"pool {self.name} does not serve {job.kind} jobs")
        model = job.spec.get("model")
        if job.kind == "inference" and not model:
            raise PermanentProviderError(f"pool {self.name}: inference jobs need a 'model'")
        if model and self.models and model not in self.models:
            raise PermanentProviderError(f"pool {self.name} does not serve model {model!r}")
        client = self._get_client()
        timeout = min(self.timeout, float(job.timeout_seconds))
        now, began = time.time(), time.monotonic()
        with self._stats.lock:
            self._stats.in_flight += 1
        try:
            if job.kind == "transcription":
                result = client.transcribe(job.spec, timeout=timeout)
            else:
                result = client.chat(job.spec, timeout=timeout)
        finally:
            with self._stats.lock:
                self._stats.in_flight -= 1
        elapsed = time.monotonic() - began
        cost, price = self._cost(job.kind, result, elapsed)
        data = {"response": result, "cost": cost, "price_per_1k_tokens": price, "elapsed_seconds": round(elapsed, 6)}
        return RunHandle(provider=self.name, lease=lease, started_at=now, data=data)

    def poll(self, handle: RunHandle) -> RunStatus:
        return RunStatus(state="succeeded", result=handle.data["response"], cost=handle.data["cost"])

    def release(self, lease: Lease, handle: RunHandle | None = None) -> None:
        """Nothing was rented: the slot frees itself when the request ends."""

    def health(self) -> Health:
        """The server's own health, cached briefly because placement asks before every job."""
        cached = self._health
        if cached is not None and time.monotonic() - cached[0] < self.health_cache_seconds:
            return cached[1]
        try:
            health = self._get_client().health()
        except PermanentProviderError as exc:
            health = Health(ok=False, detail=str(exc))
        self._health = (time.monotonic(), health)
        return health

    def _get_client(self) -> PoolClient:
        """Built on first use, so a process that never talks to the pool needs no secret."""
        with self._client_lock:
            if self._client is None:
                secret = None
                if self.secret_env:
                    secret = os.environ.get(self.secret_env)
                    if not secret:
                        raise PermanentProviderError(f"pool {self.name}: ${self.secret_env} (its shared secret) is not set")
                self._client = PoolClient(self.endpoint, secret=secret, timeout=self.timeout, name=self.name)
            return self._client
