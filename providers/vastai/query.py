"""Vast.ai offer search: from our Requirements to the filter dict POST /api/v0/bundles/ takes,
and from its rows to our Offers.

The server-side filters only narrow the search (Vast returns at most ``limit`` rows, cheapest
first, so a search for H100s must not be crowded out by cheap consumer cards); the
authoritative check runs client-side in ``accepts`` because users write "A100" or "EU" where
Vast lists "A100 SXM4" and "Sweden, SE".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from providers.base import Offer
from providers.gpus import any_gpu_matches, gpu_matches
from providers.regions import CONTINENTS, any_region_matches, country_of

# GPU names as Vast lists them (`gpu_name`). A wanted GPU that matches none of these is
# filtered client-side only, so an unknown or new model is never excluded by the server.
VAST_GPU_NAMES: tuple[str, ...] = (
    "RTX 5090", "RTX 5080", "RTX 4090", "RTX 4080", "RTX 4080S", "RTX 4070", "RTX 4070 Ti", "RTX 4060 Ti",
    "RTX 3090", "RTX 3090 Ti", "RTX 3080", "RTX 3080 Ti", "RTX 3070", "RTX 3060", "RTX 2080 Ti",
    "RTX A6000", "RTX A5000", "RTX A4000", "RTX 6000Ada", "RTX 5000Ada", "RTX 4000Ada", "Q RTX 8000",
    "A100 SXM4", "A100 PCIE", "A100X", "A800 PCIE", "A40", "A10", "L40S", "L40", "L4",
    "H100 SXM", "H100 PCIE", "H100 NVL", "H200", "H200 NVL", "GH200 SXM", "B200",
    "Tesla V100", "Tesla T4", "Tesla P100",
)
BID_SUFFIX = "-bid"


@dataclass(frozen=True)
class Search:
    """One search's constraints, already merged from the job's requirements and the provider config."""

    gpus: tuple[str, ...] = ()
    gpu_count: int = 1
    min_gpu_memory_gb: float | None = None
    max_price: float | None = None
    min_reliability: float = 0.0
    regions: tuple[str, ...] = ()
    verified_only: bool = True
    interruptible: bool = False


def server_gpu_names(wanted: tuple[str, ...]) -> list[str] | None:
    """Vast names covering every wanted GPU, or None when one of them is not in our catalog."""
    names: list[str] = []
    for want in wanted:
        found = [name for name in VAST_GPU_NAMES if gpu_matches(name, want)]
        if not found:
            return None
        names.extend(n for n in found if n not in names)
    return names


def country_codes(regions: tuple[str, ...]) -> list[str] | None:
    """Country codes covering every wanted region, or None when one is not a country or continent."""
    codes: list[str] = []
    for region in regions:
        upper = region.strip().upper()
        group = CONTINENTS.get(upper)
        if group is not None:
            codes.extend(sorted(group))
        elif len(upper) == 2 and upper.isalpha():
            codes.append(upper)
        else:
            return None
    return sorted(set(codes))


def filters(search: Search, bid: bool, bid_ratio: float) -> dict[str, Any]:
    """The query body for ``search_offers(query=…, no_default=True)``; numbers as strings, like the SDK sends."""
    query: dict[str, Any] = {
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "external": {"eq": False},
        "num_gpus": {"eq": str(search.gpu_count)},
    }
    if search.verified_only:
        query["verified"] = {"eq": True}
    if search.min_reliability > 0:
        query["reliability"] = {"gte": str(search.min_reliability)}
    if search.min_gpu_memory_gb:
        # Offers show gpu_memory_gb = round(gpu_ram MiB / 1024): ask for what rounds up to the minimum.
        query["gpu_ram"] = {"gte": str(round((search.min_gpu_memory_gb - 0.5) * 1024))}
    if search.max_price is not None:
        if bid:
            query["min_bid"] = {"lte": str(round(search.max_price / bid_ratio, 6))}
        else:
            query["dph_total"] = {"lte": str(search.max_price)}
    if search.gpus and (names := server_gpu_names(search.gpus)):
        query["gpu_name"] = {"in": names}
    if search.regions and (codes := country_codes(search.regions)):
        query["geolocation"] = {"in": codes}
    return query


def _number(value: Any, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def to_offer(row: dict[str, Any], *, provider: str, kinds: list[str], bid: bool, bid_ratio: float) -> Offer | None:
    """One search row as an Offer, or None if the row lacks what renting needs (id, price)."""
    ask_id = row.get("id") or row.get("ask_contract_id")
    price = row.get("min_bid") if bid else row.get("dph_total")
    if ask_id is None or price is None or (bid and _number(price) <= 0):
        return None
    geolocation = str(row.get("geolocation") or "")
    data: dict[str, Any] = {
        "ask_id": int(ask_id),
        "machine_id": row.get("machine_id"),
        "host_id": row.get("host_id"),
        "min_bid": row.get("min_bid"),
        "verified": bool(row.get("verified") or row.get("verification") == "verified"),
        "geolocation": geolocation,
    }
    per_hour = _number(price)
    if bid:
        per_hour = round(per_hour * bid_ratio, 4)
        data["bid"] = per_hour
    return Offer(
        provider=provider,
        offer_id=f"{ask_id}{BID_SUFFIX}" if bid else str(ask_id),
        gpu=row.get("gpu_name"),
        gpu_count=int(_number(row.get("num_gpus"))),
        gpu_memory_gb=float(round(_number(row.get("gpu_ram")) / 1024)),
        region=country_of(geolocation) or geolocation or "unknown",
        price_per_hour=per_hour,
        capacity=1,
        reliability=_number(row.get("reliability", row.get("reliability2")), 0.0),
        kinds=list(kinds),
        interruptible=bid,
        data=data,
    )


def accepts(offer: Offer, search: Search) -> bool:
    """The client-side check of every constraint (the server may ignore or differ on some)."""
    return (
        any_gpu_matches(offer.gpu, list(search.gpus) or None)
        and offer.gpu_count == search.gpu_count
        and (not search.min_gpu_memory_gb or offer.gpu_memory_gb >= search.min_gpu_memory_gb)
        and (search.max_price is None or offer.price_per_hour <= search.max_price)
        and offer.reliability >= search.min_reliability
        and (not search.verified_only or bool(offer.data.get("verified")))
        and (not search.regions or any_region_matches(offer.region, list(search.regions))
             or any_region_matches(str(offer.data.get("geolocation") or ""), list(search.regions)))
    )


def ask_id_of(offer: Offer) -> int:
    """The Vast ask (offer) id to rent, whether the offer came fresh or back from JSON storage."""
    raw = offer.data.get("ask_id") or offer.offer_id.removesuffix(BID_SUFFIX)
    return int(raw)
