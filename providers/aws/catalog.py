"""Our own EC2 price catalog and the offers it yields.

AWS has no cheap "what GPU capacity is free, at what price" call: the pricing API is slow and
us-east-1 only, and spot availability is only known by trying. So the config carries a catalog
(instance type → GPU facts and $/h per region and market); offers are that catalog filtered by
the job's requirements, and a capacity shortage surfaces at reserve time as ``NoCapacity``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from providers.base import Offer, Requirements
from providers.gpus import any_gpu_matches
from providers.regions import any_region_matches

MARKETS = ("on_demand", "spot")


@dataclass(frozen=True)
class InstanceType:
    name: str
    gpu: str | None
    gpu_count: int
    gpu_memory_gb: float
    # market -> region -> $/h
    prices: dict[str, dict[str, float]] = field(default_factory=dict)


def parse_catalog(raw: Any) -> dict[str, InstanceType]:
    if not isinstance(raw, dict) or not raw:
        raise ValueError("aws: instance_types must map instance type names to {gpu, gpu_count, gpu_memory_gb, "
                         "on_demand: {region: $/h}, spot: {region: $/h}}")
    catalog = {}
    for name, facts in raw.items():
        if not isinstance(facts, dict):
            raise ValueError(f"aws: instance_types.{name} must be a mapping")
        prices = {}
        for market in MARKETS:
            table = facts.get(market) or {}
            if not isinstance(table, dict):
                raise ValueError(f"aws: instance_types.{name}.{market} must map regions to $/h")
            prices[market] = {str(region): float(price) for region, price in table.items()}
        catalog[str(name)] = InstanceType(name=str(name), gpu=facts.get("gpu") or None,
                                          gpu_count=int(facts.get("gpu_count", 1 if facts.get("gpu") else 0)),
                                          gpu_memory_gb=float(facts.get("gpu_memory_gb", 0)), prices=prices)
    return catalog


def offer_id(region: str, instance_type: str, market: str) -> str:
    return f"{region}/{instance_type}/{market}"


def parse_offer_id(value: str) -> tuple[str, str, str] | None:
    parts = value.split("/")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and parts[2] in MARKETS else None


def fits(it: InstanceType, req: Requirements) -> bool:
    if req.needs_gpu():
        if not it.gpu or it.gpu_count < max(1, req.gpu_count):
            return False
        if req.gpu and not any_gpu_matches(it.gpu, req.gpu):
            return False
        if req.min_gpu_memory_gb is not None and it.gpu_memory_gb < req.min_gpu_memory_gb:
            return False
    return True


def build_offers(provider: str, catalog: dict[str, InstanceType], regions: list[str], req: Requirements, *,
                 spot: bool, kinds: list[str], capacity: int, spot_reliability: float,
                 spot_prices: dict[tuple[str, str], float] | None = None) -> list[Offer]:
    """Every (region × type × market) of the catalog that meets ``req``; spot only if ``spot``."""
    markets = MARKETS if spot else ("on_demand",)
    offers = []
    for region in regions:
        if not any_region_matches(region, req.regions):
            continue
        for it in catalog.values():
            if not fits(it, req):
                continue
            for market in markets:
                price = it.prices.get(market, {}).get(region)
                if price is None:
                    continue
                if market == "spot" and spot_prices and (region, it.name) in spot_prices:
                    price = spot_prices[(region, it.name)]
                if req.max_price_per_hour is not None and price > req.max_price_per_hour:
                    continue
                offers.append(Offer(
                    provider=provider, offer_id=offer_id(region, it.name, market), gpu=it.gpu, gpu_count=it.gpu_count,
                    gpu_memory_gb=it.gpu_memory_gb, region=region, price_per_hour=price, capacity=capacity,
                    reliability=spot_reliability if market == "spot" else 1.0, kinds=list(kinds),
                    interruptible=market == "spot",
                    data={"instance_type": it.name, "market": market, "region": region}))
    return offers


def catalog_price(catalog: dict[str, InstanceType], region: str, instance_type: str, market: str) -> float:
    it = catalog.get(instance_type)
    return it.prices.get(market, {}).get(region, 0.0) if it else 0.0
