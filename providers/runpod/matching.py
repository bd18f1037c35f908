"""Requirements applied to RunPod offers before placement sees them: fewer, truer offers, and no
API calls spent on reserving something placement would reject anyway."""

from __future__ import annotations

from providers.base import Offer, Requirements
from providers.gpus import any_gpu_matches
from providers.regions import any_region_matches


def spot_allowed(req: Requirements, default: bool) -> bool:
    """Spot capacity only when the job allows it, or says nothing and the provider is configured for it."""
    return req.interruptible if req.interruptible is not None else default


def fits(offer: Offer, req: Requirements, *aliases: str) -> bool:
    """True if ``offer`` meets ``req``; ``aliases`` are other names of its GPU (RunPod's type id)."""
    if req.gpu and not any(any_gpu_matches(name, req.gpu) for name in (offer.gpu, *aliases) if name):
        return False
    if req.gpu_count > offer.gpu_count:
        return False
    if req.min_gpu_memory_gb is not None and offer.gpu_memory_gb < req.min_gpu_memory_gb:
        return False
    if req.max_price_per_hour is not None and offer.price_per_hour > req.max_price_per_hour:
        return False
    if req.interruptible is False and offer.interruptible:
        return False
    return any_region_matches(offer.region, req.regions)
