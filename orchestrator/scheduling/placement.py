"""Placement: choose the provider and offer for a job, and say why.

This issue's policy is "cheapest healthy offer that fits"; the routing engine will
replace the ranking, not the shape: candidates → filters (each rejection has a reason)
→ ranking by estimated cost → a Placement carrying its rationale.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from orchestrator.errors import CapacityBusy, NoPlacement
from providers.base import Offer, PermanentProviderError, Provider, ProviderError, Requirements
from providers.gpus import any_gpu_matches
from providers.regions import any_region_matches

log = logging.getLogger(__name__)

# Rough run lengths used only to compare per-hour and per-token prices fairly.
_ESTIMATED_SECONDS = {"inference": 30, "transcription": 120, "training": 3600, "distillation": 600, "command": 60}


NO_FREE_CAPACITY = "no free capacity"


class Candidate(BaseModel):
    offer: Offer
    estimated_cost: float


class Placement(BaseModel):
    provider: str
    offer: Offer
    estimated_cost: float
    rationale: str
    considered: int
    rejected: dict[str, str]
    # Every fitting offer, best first: the budget check walks down this list. Not stored with the job.
    candidates: list[Candidate] = Field(default_factory=list, exclude=True)

    def choose(self, index: int, budget_rejected: dict[str, str]) -> Placement:
        """The placement after the budget check skipped the first ``index`` candidates."""
        if index == 0 and not budget_rejected:
            return self
        pick = self.candidates[index]
        skipped = f"; {index} cheaper offer(s) over budget" if index else ""
        return self.model_copy(update={
            "provider": pick.offer.provider, "offer": pick.offer, "estimated_cost": round(pick.estimated_cost, 6),
            "rationale": f"cheapest within budget: {offer_key(pick.offer)} (${pick.offer.price_per_hour:.2f}/h, "
                         f"est. ${pick.estimated_cost:.4f}){skipped}; {len(self.rejected) + len(budget_rejected)} rejected",
            "rejected": {**self.rejected, **budget_rejected}})


def offer_key(offer: Offer) -> str:
    return f"{offer.provider}/{offer.offer_id}"


def usage_priced(offer: Offer, kind: str) -> bool:
    """Billed per token for this kind of job, not per hour of capacity."""
    return offer.price_per_1k_tokens is not None and kind in ("inference", "transcription")


def estimate_cost(offer: Offer, kind: str, spec: dict[str, Any], timeout_seconds: int) -> float:
    if offer.price_per_1k_tokens is not None and usage_priced(offer, kind):
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
        if req.gpu and not any_gpu_matches(offer.gpu, req.gpu):
            return f"GPU {offer.gpu} not in {req.gpu}"
        if offer.gpu_count < max(1, req.gpu_count):
            return f"{offer.gpu_count} GPUs < {req.gpu_count}"
        if req.min_gpu_memory_gb and offer.gpu_memory_gb < req.min_gpu_memory_gb:
            return f"{offer.gpu_memory_gb:g} GB GPU memory < {req.min_gpu_memory_gb:g}"
    if req.max_price_per_hour is not None and not usage_priced(offer, kind) and offer.price_per_hour > req.max_price_per_hour:
        return f"${offer.price_per_hour:.2f}/h > max ${req.max_price_per_hour:.2f}/h"
    if req.min_reliability is not None and offer.reliability < req.min_reliability:
        return f"reliability {offer.reliability:.3f} < {req.min_reliability}"
    if req.interruptible is False and offer.interruptible:
        return "interruptible (spot) capacity not allowed"
    if req.regions and not any_region_matches(offer.region, req.regions):
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
    down = False  # a provider that may come back (unhealthy, API error): worth waiting for
    fits: list[tuple[bool, float, float, Offer]] = []
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
            down = down or not isinstance(exc, PermanentProviderError)
            continue
        except Exception as exc:  # an adapter bug must not stop placement on every other provider
            log.exception("provider %s failed while listing offers", name)
            rejected[name] = f"unavailable: internal error ({type(exc).__name__})"
            continue
        if not health.ok:
            rejected[name] = f"unhealthy: {health.detail}"
            down = True
            continue
        for offer in offers:
            reason = rejection(offer, requirements, kind, excluded)
            if reason:
                rejected[offer_key(offer)] = reason
                continue
            # Last-resort providers after all others; then cheapest first; among equals, the more reliable.
            fits.append((provider.last_resort, estimate_cost(offer, kind, spec, timeout_seconds), -offer.reliability, offer))
    if not fits:
        detail = "; ".join(f"{k}: {v}" for k, v in sorted(rejected.items())) or "no provider offers this kind of job"
        if any(reason == NO_FREE_CAPACITY for reason in rejected.values()):
            raise CapacityBusy(f"every fitting offer is full ({detail})")
        if down:
            raise CapacityBusy(f"nothing fits now and a provider is unavailable ({detail})")
        raise NoPlacement(f"no offer meets the job's constraints ({detail})")
    fits.sort(key=lambda item: (item[0], item[1], item[2], offer_key(item[3])))
    last_resort, cost, _, best = fits[0]
    runner_up = f"; next best {offer_key(fits[1][3])} at ~${fits[1][1]:.4f}" if len(fits) > 1 else ""
    price = f"${best.price_per_1k_tokens}/1K tokens" if usage_priced(best, kind) else f"${best.price_per_hour:.2f}/h"
    how = "last resort, nothing else fits" if last_resort else f"cheapest of {len(fits)} fitting offers"
    rationale = (f"{how}: {offer_key(best)} ({best.gpu or 'cpu'}, {best.region}, "
                 f"{price}, est. ${cost:.4f}){runner_up}; {len(rejected)} rejected")
    return Placement(provider=best.provider, offer=best, estimated_cost=round(cost, 6), rationale=rationale,
                     considered=len(fits) + len(rejected), rejected=rejected,
                     candidates=[Candidate(offer=o, estimated_cost=c) for _, c, _, o in fits])
