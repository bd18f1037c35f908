"""Offer search across every configured provider (``gpufleet offers``), ranked like placement."""

from __future__ import annotations

from providers.base import Offer, ProviderError, Requirements
from providers.registry import get_providers


def search(kind: str, gpu: list[str] | None, count: int, max_price: float | None, regions: list[str] | None,
           min_reliability: float | None, interruptible: bool | None) -> tuple[list[Offer], dict[str, str]]:
    """Fitting offers cheapest first, and why each provider that could not answer did not."""
    from orchestrator.scheduling.placement import rejection

    req = Requirements(gpu=gpu, gpu_count=count, max_price_per_hour=max_price, regions=regions,
                       min_reliability=min_reliability, interruptible=interruptible)
    found: list[Offer] = []
    unavailable: dict[str, str] = {}
    for name, provider in get_providers().items():
        try:
            offers = provider.offers(req, kind, {})
        except ProviderError as exc:
            unavailable[name] = f"unavailable: {exc}"
            continue
        found += [o for o in offers if rejection(o, req, kind, set()) is None
                  and (interruptible is not True or o.interruptible)]
    found.sort(key=lambda o: (o.price_per_hour, -o.reliability, o.provider, o.offer_id))
    return found, unavailable
