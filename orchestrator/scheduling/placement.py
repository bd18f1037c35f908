"""Placement: choose the provider and offer for a job, and say why.

This issue's policy is "cheapest healthy offer that fits"; the routing engine will
replace the ranking, not the shape: candidates → filters (each rejection has a reason)
→ ranking by estimated cost → a Placement carrying its rationale.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from orchestrator.errors import CapacityBusy, NoPlacement
from providers.base import Offer, Provider, ProviderError, Requirements

# Rough run lengths used only to compare per-hour and per-token prices fairly.
_ESTIMATED_SECONDS = {"inference": 30, "transcription": 120, "training": 3600, "distillation": 600, "command": 60}


NO_FREE_CAPACITY = "no free capacity"


class Placement(BaseModel):
    provider: str
    offer: Offer
    estimated_cost: float
    rationale: str
    considered: int
    rejected: dict[str, str]


def offer_key(offer: Offer) -> str:
    return f"{offer.provider}/{offer.offer_id}"


def estimate_cost(offer: Offer, kind: str, spec: dict[str, Any], timeout_seconds: int) -> float:
    if offer.price_per_1k_tokens is not None and kind in ("inference", "transcription"):
        tokens = int(spec.get("max_tokens", 256)) + 200
        return offer.price_per_1k_tokens * tokens / 1000
    seconds = min(_ESTIMATED_SECONDS.get(kind, 60), timeout_seconds)
    return offer.price_per_hour * seconds / 3600


def rejection(offer: Offer, req: Requirements, kind: str, excluded: set[str]) -> str | None:
    """Why this offer cannot take the job, or None if it can."""
    if offer_key(offer) in excluded:
        return "failed this job before"
    if kind not in offer.kinds:
        return f"does not run {kind} jobs"
    if req.needs_gpu():
        if not offer.gpu:
            return "no GPU"
        if req.gpu and not any(g.lower() == offer.gpu.lower() for g in req.gpu):
            return f"GPU {offer.gpu} not in {req.gpu}"
        if offer.gpu_count < max(1, req.gpu_count):
            return f"{offer.gpu_count} GPUs < {req.gpu_count}"
        if req.min_gpu_memory_gb and offer.gpu_memory_gb < req.min_gpu_memory_gb:
            return f"{offer.gpu_memory_gb:g} GB GPU memory < {req.min_gpu_memory_gb:g}"
    per_token = offer.price_per_1k_tokens is not None and kind in ("inference", "transcription")
    if req.max_price_per_hour is not None and not per_token and offer.price_per_hour > req.max_price_per_hour:
        return f"${offer.price_per_hour:.2f}/h > max ${req.max_price_per_hour:.2f}/h"
    if req.regions and offer.region not in req.regions:
        return f"region {offer.region} not in {req.regions}"
    if offer.capacity <= 0:
        return NO_FREE_CAPACITY
    return None


def place(
    providers: Mapping[str, Provider],
    kind: str,
    spec: dict[str, Any],
    requirements: Requirements,
    timeout_seconds: int,
    excluded: set[str] | None = None,
) -> Placement:
    excluded = excluded or set()
    rejected: dict[str, str] = {}
    fits: list[tuple[float, float, Offer]] = []
    if requirements.providers:
        for name in requirements.providers:
            if name not in providers:
                rejected[name] = "not a configured provider"
    for name, provider in providers.items():
        if requirements.providers and name not in requirements.providers:
            rejected[name] = "provider not allowed by the job"
            continue
        try:
            health = provider.health()
            offers = provider.offers(requirements, kind, spec) if health.ok else []
        except ProviderError as exc:
            rejected[name] = f"unavailable: {exc}"
            continue
        if not health.ok:
            rejected[name] = f"unhealthy: {health.detail}"
            continue
        for offer in offers:
            reason = rejection(offer, requirements, kind, excluded)
            if reason:
                rejected[offer_key(offer)] = reason
                continue
            # Cheapest first; among equals, the more reliable offer.
            fits.append((estimate_cost(offer, kind, spec, timeout_seconds), -offer.reliability, offer))
    if not fits:
        detail = "; ".join(f"{k}: {v}" for k, v in sorted(rejected.items())) or "no provider offers this kind of job"
        if any(reason == NO_FREE_CAPACITY for reason in rejected.values()):
            raise CapacityBusy(f"every fitting offer is full ({detail})")
        raise NoPlacement(f"no offer meets the job's constraints ({detail})")
    fits.sort(key=lambda item: (item[0], item[1], offer_key(item[2])))
    cost, _, best = fits[0]
    runner_up = f"; next best {offer_key(fits[1][2])} at ~${fits[1][0]:.4f}" if len(fits) > 1 else ""
    per_token = best.price_per_1k_tokens is not None and kind in ("inference", "transcription")
    price = f"${best.price_per_1k_tokens}/1K tokens" if per_token else f"${best.price_per_hour:.2f}/h"
    rationale = (f"cheapest of {len(fits)} fitting offers: {offer_key(best)} ({best.gpu or 'cpu'}, {best.region}, "
                 f"{price}, est. ${cost:.4f}){runner_up}; {len(rejected)} rejected")
    return Placement(provider=best.provider, offer=best, estimated_cost=round(cost, 6), rationale=rationale,
                     considered=len(fits) + len(rejected), rejected=rejected)
