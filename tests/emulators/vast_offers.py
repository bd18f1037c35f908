"""The Vast.ai emulator's market: default offers in the shape of real search rows, and the search
filters as the API applies them (the SDK sends numbers as strings and conditions as operator maps)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

DEFAULT_OFFERS: list[dict[str, Any]] = [
    {"id": 1001, "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24564, "dph_total": 0.40, "min_bid": 0.25,
     "reliability": 0.995, "geolocation": "Sweden, SE", "verified": True, "machine_id": 501, "host_id": 91},
    {"id": 1002, "gpu_name": "RTX 4090", "num_gpus": 2, "gpu_ram": 24564, "dph_total": 0.78, "min_bid": 0.48,
     "reliability": 0.97, "geolocation": "US", "verified": True, "machine_id": 502, "host_id": 92},
    {"id": 1003, "gpu_name": "A100 SXM4", "num_gpus": 1, "gpu_ram": 81920, "dph_total": 1.10, "min_bid": 0.70,
     "reliability": 0.99, "geolocation": "Germany, DE", "verified": True, "machine_id": 503, "host_id": 93},
    {"id": 1004, "gpu_name": "A100 SXM4", "num_gpus": 1, "gpu_ram": 40960, "dph_total": 0.85, "min_bid": 0.50,
     "reliability": 0.90, "geolocation": "California, US", "verified": False, "machine_id": 504, "host_id": 94},
    {"id": 1005, "gpu_name": "H100 SXM", "num_gpus": 1, "gpu_ram": 81559, "dph_total": 2.20, "min_bid": 1.40,
     "reliability": 0.985, "geolocation": "Germany, DE", "verified": True, "machine_id": 505, "host_id": 95},
    {"id": 1006, "gpu_name": "H100 SXM", "num_gpus": 8, "gpu_ram": 81559, "dph_total": 17.60, "min_bid": 11.0,
     "reliability": 0.999, "geolocation": "Texas, US", "verified": True, "machine_id": 506, "host_id": 96},
]

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq, "neq": operator.ne, "gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le,
}


def complete_offer(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill an offer with the other fields a real search row carries, so adapters see the full shape."""
    offer = {
        "ask_contract_id": raw["id"], "machine_id": raw["id"] + 1000, "host_id": 90, "num_gpus": 1,
        "gpu_name": "RTX 4090", "gpu_ram": 24564, "gpu_total_ram": None, "cpu_ram": 64000, "cpu_cores": 16,
        "disk_space": 500.0, "inet_up": 800.0, "inet_down": 900.0, "dph_total": 0.5, "min_bid": 0.3,
        "dlperf": 50.0, "score": 100.0, "reliability": 0.99, "geolocation": "US", "verified": True,
        "cuda_max_good": 12.4, "public_ipaddr": "203.0.113.10", "external": False, "hosting_type": 0,
        "storage_cost": 0.15, "inet_up_cost": 0.0, "inet_down_cost": 0.0,
    }
    offer.update(raw)
    offer["ask_contract_id"] = offer["id"]
    offer.setdefault("dph_base", round(offer["dph_total"] * 0.95, 4))
    offer["gpu_total_ram"] = offer["gpu_ram"] * offer["num_gpus"]
    offer["verification"] = "verified" if offer["verified"] else "unverified"
    return offer


def _country(geolocation: str) -> str:
    tail = geolocation.replace(",", " ").split()
    return tail[-1].upper() if tail else ""


def _coerce(want: Any, have: Any) -> Any:
    """The SDK sends numbers as strings ("0.95"): compare them as the row's type."""
    if isinstance(have, bool):
        return want in (True, 1, "true", "True", "1")
    if isinstance(have, int | float):
        return float(want)
    return str(want).lower() if isinstance(want, str) else want


def matches(row: dict[str, Any], name: str, cond: Any) -> bool:
    """One search filter, e.g. ``"reliability": {"gte": "0.95"}``; unknown fields and operators are ignored."""
    if name not in row:
        return True
    conds = cond if isinstance(cond, dict) else {"eq": cond}
    have = row[name]
    if name == "geolocation":
        return all(_geo_matches(str(have or ""), op, want) for op, want in conds.items())
    if isinstance(have, str):
        have = have.lower()
    for op, want in conds.items():
        try:
            if op in ("in", "notin"):
                ok = (have in [_coerce(w, have) for w in (want or [])]) == (op == "in")
            elif op in _COMPARE:
                ok = have is not None and _COMPARE[op](have, _coerce(want, have))
            else:
                ok = True
        except (TypeError, ValueError):
            ok = False
        if not ok:
            return False
    return True


def _geo_matches(geolocation: str, op: str, want: Any) -> bool:
    names = {geolocation.lower(), _country(geolocation).lower()}
    wanted = {str(w).lower() for w in (want if isinstance(want, list) else [want])}
    hit = bool(names & wanted)
    return hit if op in ("eq", "in") else not hit if op in ("neq", "notin") else True
