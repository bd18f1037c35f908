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
# Cloud-style prefixes (eu-west-1, us-east, ap-south, europe-west4) to continents, when the
# region is not in the table below.
_PREFIXES = {"eu": "EUROPE", "europe": "EUROPE", "us": "NA", "ca": "NA", "na": "NA", "northamerica": "NA",
             "sa": "SA", "southamerica": "SA", "ap": "AS", "as": "AS", "asia": "AS", "me": "AS", "af": "AF",
             "africa": "AF", "au": "OC", "australia": "OC"}
# Cloud regions (AWS, GCP) to the country they are in: "EU" must not include London or Zurich.
_CLOUD_COUNTRIES = {
    # AWS
    "eu-west-1": "IE", "eu-west-2": "GB", "eu-west-3": "FR", "eu-central-1": "DE", "eu-central-2": "CH",
    "eu-north-1": "SE", "eu-south-1": "IT", "eu-south-2": "ES", "ap-northeast-1": "JP", "ap-northeast-2": "KR",
    "ap-northeast-3": "JP", "ap-south-1": "IN", "ap-south-2": "IN", "ap-southeast-1": "SG", "ap-southeast-2": "AU",
    "ap-southeast-3": "ID", "ap-southeast-4": "AU", "ap-east-1": "HK", "ca-central-1": "CA", "ca-west-1": "CA",
    "sa-east-1": "BR", "mx-central-1": "MX", "me-central-1": "AE", "me-south-1": "BH", "il-central-1": "IL",
    "af-south-1": "ZA",
    # GCP
    "europe-west1": "BE", "europe-west2": "GB", "europe-west3": "DE", "europe-west4": "NL", "europe-west6": "CH",
    "europe-west8": "IT", "europe-west9": "FR", "europe-west10": "DE", "europe-west12": "IT", "europe-north1": "FI",
    "europe-north2": "SE", "europe-central2": "PL", "europe-southwest1": "ES", "northamerica-northeast1": "CA",
    "northamerica-northeast2": "CA", "northamerica-south1": "MX", "southamerica-east1": "BR",
    "southamerica-west1": "CL", "asia-east1": "TW", "asia-east2": "HK", "asia-northeast1": "JP",
    "asia-northeast2": "JP", "asia-northeast3": "KR", "asia-south1": "IN", "asia-south2": "IN",
    "asia-southeast1": "SG", "asia-southeast2": "ID", "australia-southeast1": "AU", "australia-southeast2": "AU",
    "me-west1": "IL", "me-central1": "QA", "africa-south1": "ZA",
}


def _cloud_region(region: str) -> str:
    """Drop a zone suffix: europe-west4-a → europe-west4, us-east-1a → us-east-1."""
    name = region.strip().lower()
    if len(name) > 2 and name[-2] == "-" and name[-1].isalpha() and name[-3].isdigit():
        return name[:-2]
    if len(name) > 1 and name[-1].isalpha() and name[-2].isdigit():
        return name[:-1]
    return name


def country_of(region: str) -> str | None:
    """The two-letter country in a region string: "SE", "Sweden, SE", "eu-se", "eu-central-1" → "SE"… "DE"."""
    cloud = _cloud_region(region)
    if cloud in _CLOUD_COUNTRIES:
        return _CLOUD_COUNTRIES[cloud]
    if cloud.startswith("us-"):
        return "US"
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
    if have == want:
        return True
    group = CONTINENTS.get(want.upper())
    if group is not None:
        country = country_of(region)
        if country is not None:
            return country in group
        continent = _PREFIXES.get(have.split("-", 1)[0])
        return continent is not None and continent in (want.upper(), "EUROPE" if want.upper() == "EU" else "")
    if have.startswith(want + "-"):
        return True
    country = country_of(region)
    return len(want) == 2 and country is not None and country == want.upper()


def any_region_matches(region: str, wanted: list[str] | None) -> bool:
    return not wanted or any(region_matches(region, w) for w in wanted)
