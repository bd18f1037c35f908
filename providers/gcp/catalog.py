"""The configured machine-type catalog and the offers it yields: Compute Engine has no price or
availability search worth calling per placement, so offers are planned from config (machine type ×
zone × pricing model) and the insert says whether the zone really has the capacity.

A machine type is offered in a zone only where the catalog prices it (by zone, by region, or
``"*"``): a missing price means "not available there".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from providers.base import Offer, Requirements
from providers.gpus import any_gpu_matches
from providers.regions import any_region_matches

SPOT_SUFFIX = ":spot"


@dataclass(frozen=True)
class MachineType:
    name: str
    gpu: str | None
    gpu_count: int
    gpu_memory_gb: float
    accelerator_type: str | None
    on_demand: dict[str, float]
    spot: dict[str, float]

    def price(self, zone: str, spot: bool) -> float | None:
        """$/h in ``zone``: the zone's price, else its region's, else ``"*"``; None if not offered there."""
        prices = self.spot if spot else self.on_demand
        for key in (zone, region_of(zone), "*"):
            if key in prices:
                return float(prices[key])
        return None


def region_of(zone: str) -> str:
    """``us-central1-a`` → ``us-central1`` (a zone is its region plus one letter)."""
    head, sep, tail = zone.rpartition("-")
    return head if sep and len(tail) == 1 else zone


def parse_catalog(raw: Any, provider: str) -> dict[str, MachineType]:
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{provider}: 'machine_types' must map machine type names to their GPU and prices")
    catalog = {}
    for name, entry in raw.items():
        entry = entry or {}
        gpu_count = int(entry.get("gpu_count", 1 if entry.get("gpu") else 0))
        accelerator = entry.get("accelerator_type")
        if gpu_count and not accelerator and not str(name).startswith(("a2-", "a3-", "g2-")):
            # N1 machines take GPUs as guestAccelerators; A2/A3/G2 have them built in.
            raise ValueError(f"{provider}: machine type {name!r} needs 'accelerator_type' (e.g. nvidia-tesla-t4)")
        catalog[str(name)] = MachineType(
            name=str(name), gpu=entry.get("gpu"), gpu_count=gpu_count, gpu_memory_gb=float(entry.get("gpu_memory_gb", 0)),
            accelerator_type=str(accelerator) if accelerator else None,
            on_demand={str(k): float(v) for k, v in (entry.get("on_demand") or {}).items()},
            spot={str(k): float(v) for k, v in (entry.get("spot") or {}).items()})
    return catalog


def fits(offer: Offer, req: Requirements) -> bool:
    """The same checks placement makes, so we do not offer what it would drop."""
    return (
        any_gpu_matches(offer.gpu, req.gpu)
        and req.gpu_count <= offer.gpu_count
        and (req.min_gpu_memory_gb is None or offer.gpu_memory_gb >= req.min_gpu_memory_gb)
        and (req.max_price_per_hour is None or offer.price_per_hour <= req.max_price_per_hour)
        and not (req.interruptible is False and offer.interruptible)
        and any_region_matches(offer.region, req.regions)
    )


def offers(catalog: dict[str, MachineType], zones: list[str], req: Requirements, *, provider: str,
           kinds: list[str]) -> list[Offer]:
    found = []
    for machine in catalog.values():
        if req.needs_gpu() and not machine.gpu_count:
            continue
        for zone in zones:
            for spot in (False, True):
                price = machine.price(zone, spot)
                if price is None:
                    continue
                offer = Offer(
                    provider=provider, offer_id=f"{machine.name}@{zone}{SPOT_SUFFIX if spot else ''}",
                    gpu=machine.gpu, gpu_count=machine.gpu_count, gpu_memory_gb=machine.gpu_memory_gb, region=zone,
                    price_per_hour=price, capacity=1, kinds=list(kinds), interruptible=spot,
                    data={"machine_type": machine.name, "zone": zone, "spot": spot})
                if fits(offer, req):
                    found.append(offer)
    return sorted(found, key=lambda o: o.price_per_hour)


def parse_offer_id(offer_id: str) -> tuple[str, str, bool]:
    """``a2-highgpu-1g@us-central1-a:spot`` → (machine type, zone, spot), for offers back from JSON."""
    spot = offer_id.endswith(SPOT_SUFFIX)
    machine, _, zone = offer_id.removesuffix(SPOT_SUFFIX).partition("@")
    return machine, zone, spot
