"""Optional refresh of catalog spot prices from ``describe_spot_price_history``, cached.

The catalog stays the source of truth: a refresh only replaces spot prices the catalog already
has, and a failed refresh keeps them (logged), so offers never depend on this call working.
Per instance type we keep the highest current price across zones: it is also our MaxPrice, and
a bid below one zone's price would be refused there.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from providers.aws.clients import Clients
from providers.base import ProviderError

log = logging.getLogger(__name__)
_MAX_PAGES = 5


class SpotPrices:
    def __init__(self, clients: Clients, ttl: float = 300.0) -> None:
        self.clients = clients
        self.ttl = ttl
        self._cache: dict[str, tuple[float, dict[str, float]]] = {}
        self._lock = threading.Lock()

    def for_regions(self, wanted: dict[str, list[str]]) -> dict[tuple[str, str], float]:
        """``{region: [instance types]}`` → ``{(region, type): $/h}`` for what AWS answered."""
        out: dict[tuple[str, str], float] = {}
        for region, types in wanted.items():
            if types:
                out.update({(region, t): p for t, p in self._region(region, sorted(types)).items()})
        return out

    def _region(self, region: str, types: list[str]) -> dict[str, float]:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(region)
            if cached is not None and now - cached[0] < self.ttl:
                return cached[1]
        prices = self._fetch(region, types)
        with self._lock:
            self._cache[region] = (now, prices)  # a failure is cached too: no hammering a broken API
        return prices

    def _fetch(self, region: str, types: list[str]) -> dict[str, float]:
        prices: dict[str, float] = {}
        params: dict[str, Any] = {"InstanceTypes": types, "ProductDescriptions": ["Linux/UNIX"],
                                  "StartTime": datetime.now(UTC), "MaxResults": 1000}
        try:
            for _ in range(_MAX_PAGES):
                page = self.clients.call("ec2", region, "describe_spot_price_history", "spot price refresh", quick=True,
                                         **params)
                for row in page.get("SpotPriceHistory") or []:
                    name, price = row.get("InstanceType"), row.get("SpotPrice")
                    if name in types and price is not None:
                        prices[name] = max(prices.get(name, 0.0), float(price))
                token = page.get("NextToken")
                if not token:
                    break
                params["NextToken"] = token
        except ProviderError as exc:
            log.warning("aws: spot price refresh in %s failed, keeping catalog prices: %s", region, exc)
            return {}
        return prices
