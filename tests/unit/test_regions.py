"""Region matching across the languages providers speak: countries, sandbox names, AWS and GCP regions."""

from __future__ import annotations

import pytest

from providers.regions import region_matches


@pytest.mark.parametrize(("region", "wanted", "expected"), [
    ("Sweden, SE", "EU", True), ("eu-se", "SE", True), ("eu-se", "EU", True), ("us-east", "NA", True),
    ("us-east-1", "us-east", True), ("us-east-1a", "US", True), ("eu-west-1", "EU", True), ("eu-west-1", "eu", True),
    ("eu-west-2", "EU", False), ("eu-west-2", "EUROPE", True), ("eu-central-2", "EU", False),
    ("eu-central-1", "DE", True), ("ap-southeast-2", "OC", True), ("ap-southeast-2", "AS", False),
    ("europe-west4-a", "EU", True), ("europe-west4-a", "NL", True), ("europe-west2-b", "EU", False),
    ("us-central1-a", "NA", True), ("asia-northeast1-b", "JP", True), ("us-west", "EU", False),
    # Names we cannot place on a map match no continent (they used to match all but Europe).
    ("local", "NA", False), ("on-prem", "OC", False), ("global", "AS", False),
])
def test_region_matches(region: str, wanted: str, expected: bool) -> None:
    assert region_matches(region, wanted) is expected
