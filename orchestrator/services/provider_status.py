"""What each configured provider looks like right now (``gpufleet providers``, ``GET /v1/providers``):
health and how long asking took, what it offers — capacity, GPUs, regions, cheapest prices — and what
the health monitor has measured over time (circuit breaker, error rate, latency average and p95 of its
checks and of real requests, and which of the two placement uses)."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from orchestrator.services import health as monitor
from providers.base import Offer, Provider, Requirements
from providers.registry import get_providers

log = logging.getLogger(__name__)
KINDS = ("inference", "transcription", "training", "command")


class ProviderStatus(BaseModel):
    name: str
    kind: str
    healthy: bool
    detail: str
    latency_ms: float
    offers: int
    capacity: int
    gpus: list[str]
    regions: list[str]
    kinds: list[str]
    min_price_per_hour: float | None
    min_price_per_1k_tokens: float | None
    # From the health monitor (None until it has checked the provider): closed | open | half_open.
    breaker: str | None = None
    error_rate: float | None = None
    consecutive_failures: int | None = None
    # The checks' latency (the beat's health() calls): moving average and p95 of the last 50.
    latency_ewma_ms: float | None = None
    latency_p95_ms: float | None = None
    checked_at: datetime | None = None
    # Real requests' latency (finished inference/transcription jobs): average, p95, samples in the window.
    request_latency_ewma_ms: float | None = None
    request_latency_p95_ms: float | None = None
    request_latency_samples: int | None = None
    request_latency_at: datetime | None = None
    # What latency limits and the score use now: requests' p95 once there are enough recent ones, else the
    # checks' p95 while fresh; the source says which ("requests" | "health checks"; None: unmeasured).
    placement_latency_ms: float | None = None
    latency_source: str | None = None


def _models(provider: Provider) -> list[str]:
    models = provider.config.get("models") or []
    return list(models) if isinstance(models, dict | list) else []


def _catalog(provider: Provider) -> list[Offer]:
    """Everything it offers for any kind of job (model APIs answer per model, so ask per model)."""
    seen: dict[str, Offer] = {}
    specs: list[dict[str, Any]] = [{}] + [{"model": m} for m in _models(provider)]
    for kind in KINDS:
        for spec in specs:
            try:
                for offer in provider.offers(Requirements(), kind, spec):
                    seen.setdefault(offer.offer_id, offer)
            except Exception as exc:  # one adapter's failure must not hide the others
                log.debug("offers of %s for %s failed: %s", provider.name, kind, exc)
    return list(seen.values())


def describe(provider: Provider, view: monitor.HealthView | None = None) -> ProviderStatus:
    started = time.perf_counter()
    try:
        health = provider.health()
        healthy, detail = health.ok, health.detail
    except Exception as exc:
        healthy, detail = False, f"health check failed: {type(exc).__name__}: {str(exc)[:200]}"
    latency = (time.perf_counter() - started) * 1000
    offers = _catalog(provider) if healthy else []
    hourly = [o.price_per_hour for o in offers if o.price_per_hour > 0]
    per_token = [o.price_per_1k_tokens for o in offers if o.price_per_1k_tokens is not None]
    return ProviderStatus(
        name=provider.name, kind=str(provider.kind), healthy=healthy, detail=detail, latency_ms=round(latency, 1),
        offers=len(offers), capacity=sum(o.capacity for o in offers),
        gpus=sorted({o.gpu for o in offers if o.gpu}), regions=sorted({o.region for o in offers}),
        kinds=sorted({k for o in offers for k in o.kinds}),
        min_price_per_hour=min(hourly) if hourly else None,
        min_price_per_1k_tokens=min(per_token) if per_token else None,
        **_measured(view))


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _measured(view: monitor.HealthView | None) -> dict[str, Any]:
    if view is None:
        return {}
    measured = {"breaker": view.breaker, "error_rate": round(view.error_rate, 4),
                "consecutive_failures": view.consecutive_failures, "checked_at": view.checked_at,
                "latency_ewma_ms": _ms(view.latency_ewma_ms), "latency_p95_ms": _ms(view.latency_p95_ms)}
    if isinstance(view, monitor.MonitorView):
        measured.update(request_latency_ewma_ms=_ms(view.request_latency_ewma_ms),
                        request_latency_p95_ms=_ms(view.request_latency_p95_ms),
                        request_latency_samples=view.request_samples, request_latency_at=view.request_measured_at,
                        placement_latency_ms=_ms(view.latency_ms), latency_source=view.latency_source)
    return measured


def status_all() -> list[ProviderStatus]:
    views = monitor.snapshot()
    return [describe(p, views.get(name)) for name, p in get_providers().items()]
