"""Region matching shared by adapters and placement.

Providers speak different region languages — Vast.ai gives country codes ("SE"),
clouds give region names ("eu-west-1"), the sandbox "eu-se". Users ask in whichever is
natural ("EU", "DE", "us-east"), so one function decides whether an offer's region is
among the wanted ones.
"""

from __future__ import annotations

CONTINENTS: dict[str, frozenset[str]] = {
    "EU": frozenset("AT BE BG HR CY CZ DK EE FI FR DE GR HU IE IT LV LT LU MT NL PL PT RO SK SI ES SE".split()),
    "EUROPE": frozenset(
        "AT BE BG HR CY CZ DK EE FI FR DE GR HU IE IT LV LT LU MT NL PL PT RO SK SI ES SE "
        "GB UK NO CH IS UA RS".split()),
    "NA": frozenset("US CA MX".split()),
    "SA": frozenset("BR AR CL CO PE".split()),
    "AS": frozenset("JP KR CN HK TW SG IN TH VN MY ID PH IL AE".split()),
    "OC": frozenset("AU NZ".split()),
    "AF": frozenset("ZA NG KE EG MA".split()),
}
# Cloud-style prefixes (eu-west-1, us-east, ap-south) to continents.
_PREFIXES = {"eu": "EUROPE", "us": "NA", "ca": "NA", "na": "NA", "sa": "SA", "ap": "AS", "as": "AS", "me": "AS",
             "af": "AF", "au": "OC"}


def country_of(region: str) -> str | None:
    """The two-letter country in a region string: "SE", "Sweden, SE", "eu-se" → "SE"."""
    tail = region.replace(",", " ").replace("-", " ").split()
    if not tail:
        return None
    last = tail[-1].upper()
    return last if len(last) == 2 and last.isalpha() else None


def region_matches(region: str, wanted: str) -> bool:
    """True if an offer in ``region`` satisfies a request for ``wanted``."""
    have, want = region.strip().lower(), wanted.strip().lower()
    if not want:
        return False
    if have == want or have.startswith(want + "-"):
        return True
    group = CONTINENTS.get(want.upper())
    if group is not None:
        country = country_of(region)
        if country and country in group:
            return True
        prefix = have.split("-", 1)[0]
        return _PREFIXES.get(prefix) in (want.upper(), "EUROPE" if want.upper() == "EU" else None)
    country = country_of(region)
    return len(want) == 2 and country is not None and country == want.upper()


def any_region_matches(region: str, wanted: list[str] | None) -> bool:
    return not wanted or any(region_matches(region, w) for w in wanted)
