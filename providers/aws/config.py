"""The ``aws`` provider's config, read once and checked, so a typo fails at startup, not at reserve."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from providers.aws.catalog import InstanceType, parse_catalog
from providers.aws.clients import refuse_credentials

DEFAULT_KINDS = ["command", "training"]
# Kinds an instance can serve only by running a command the spec carries.
COMMAND_KINDS = ("inference", "transcription")


def flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def names(value: Any) -> list[str]:
    if value in (None, ""):
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


@dataclass
class AWSConfig:
    regions: list[str]
    images: dict[str, str]  # region -> AMI; "*" for every region
    catalog: dict[str, InstanceType]
    endpoint_url: str | None
    profile: str | None
    subnet_id: str | dict[str, str] | None
    security_group_ids: list[str] | dict[str, list[str]]
    key_name: str | None
    use_spot: bool
    refresh_spot_prices: bool
    spot_price_ttl: float
    spot_reliability: float
    kinds: list[str]
    capacity: int
    default_command: list[str] | str | None
    iam_instance_profile: str | None
    root_volume_gb: int | None
    retry: int
    max_retry_wait: float
    request_timeout: float
    not_found_grace: float

    @classmethod
    def parse(cls, name: str, c: dict[str, Any]) -> AWSConfig:
        refuse_credentials(c, name)
        regions = names(c.get("regions") or c.get("region") or ["us-east-1"])
        raw_image = c.get("image_id")
        if not raw_image:
            raise ValueError(f"{name}: image_id is required (an AMI id, or a map of region to AMI id)")
        images = {str(k): str(v) for k, v in raw_image.items()} if isinstance(raw_image, dict) else {"*": str(raw_image)}
        groups = c.get("security_group_ids") or []
        config = cls(
            regions=regions, images=images, catalog=parse_catalog(c.get("instance_types")),
            endpoint_url=str(c["endpoint_url"]) if c.get("endpoint_url") else None,
            profile=str(c["profile"]) if c.get("profile") else None,
            subnet_id=c.get("subnet_id") or None,
            security_group_ids={str(k): names(v) for k, v in groups.items()} if isinstance(groups, dict) else names(groups),
            key_name=str(c["key_name"]) if c.get("key_name") else None,
            use_spot=flag(c.get("use_spot", True)),
            refresh_spot_prices=flag(c.get("refresh_spot_prices", False)),
            spot_price_ttl=float(c.get("spot_price_ttl", 300)),
            spot_reliability=float(c.get("spot_reliability", 0.9)),
            kinds=names(c.get("kinds", DEFAULT_KINDS)),
            capacity=int(c.get("max_instances", 8)),
            default_command=c.get("default_command") or None,
            iam_instance_profile=str(c["iam_instance_profile"]) if c.get("iam_instance_profile") else None,
            root_volume_gb=int(c["root_volume_gb"]) if c.get("root_volume_gb") else None,
            retry=int(c.get("retry", 3)),
            max_retry_wait=float(c.get("max_retry_wait", 5)),
            request_timeout=float(c.get("request_timeout", 30)),
            not_found_grace=float(c.get("not_found_grace", 60)),
        )
        if not regions or config.capacity < 1 or config.retry < 1 or config.request_timeout <= 0:
            raise ValueError(f"{name}: regions must not be empty, max_instances and retry >= 1, request_timeout > 0")
        if len(regions) > 1 and (isinstance(config.subnet_id, str) or (config.security_group_ids and
                                                                       isinstance(config.security_group_ids, list))):
            raise ValueError(f"{name}: subnets and security groups are regional: with several regions give "
                             "subnet_id and security_group_ids as maps of region to value")
        if not 0 <= config.spot_reliability <= 1:
            raise ValueError(f"{name}: spot_reliability must be within 0..1")
        return config

    def image_for(self, region: str) -> str | None:
        return self.images.get(region) or self.images.get("*")

    def subnet_for(self, region: str) -> str | None:
        if isinstance(self.subnet_id, dict):
            value = self.subnet_id.get(region)
            return str(value) if value else None
        return str(self.subnet_id) if self.subnet_id else None

    def groups_for(self, region: str) -> list[str]:
        if isinstance(self.security_group_ids, dict):
            return self.security_group_ids.get(region, [])
        return self.security_group_ids
