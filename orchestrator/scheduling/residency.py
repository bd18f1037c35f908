"""Data residency as policy: which regions (and providers) may see a job's data, by its data class.

The policy is a file the operator owns (``GPUFLEET_RESIDENCY_POLICY_FILE``, YAML or JSON)::

    default_class: public
    classes:
      public: {}                                   # anywhere
      pii-eu: {regions: [EU], replication: false}  # EU regions only; never fanned out to a second provider
      phi-us: {regions: [US], providers: [aws, onprem]}
      secret: {regions: [on-prem], deny_providers: [openai, claude]}

``regions`` use the same vocabulary as job requirements (continents, countries, cloud regions);
an offer outside them is rejected with that reason, and a job whose allowed capacity is busy
waits rather than going elsewhere. ``replication: false`` forbids sending the data to more than
one provider for the same request (shadow and teacher/student traffic honour it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import ConfigError, InvalidInput
from providers.base import Offer
from providers.regions import any_region_matches


class DataClassRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    regions: list[str] | None = Field(default=None, description="Allowed regions; none or ['*']: anywhere.")
    providers: list[str] | None = Field(default=None, description="Only these providers.")
    deny_providers: list[str] = Field(default_factory=list)
    replication: bool = True

    def rejection(self, offer: Offer, name: str) -> str | None:
        if self.providers is not None and offer.provider not in self.providers:
            return f"data class {name!r} does not allow provider {offer.provider}"
        if offer.provider in self.deny_providers:
            return f"data class {name!r} denies provider {offer.provider}"
        if self.regions and "*" not in self.regions and not any_region_matches(offer.region, self.regions):
            return f"region {offer.region} not allowed for data class {name!r} ({', '.join(self.regions)})"
        return None


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_class: str = "public"
    classes: dict[str, DataClassRule] = Field(default_factory=lambda: {"public": DataClassRule()})


@dataclass(frozen=True)
class Residency:
    name: str
    rule: DataClassRule

    def rejection(self, offer: Offer) -> str | None:
        return self.rule.rejection(offer, self.name)


def load(path: str | Path | None) -> Policy:
    """The policy in ``path`` (re-read when the file changes), or "anything goes" without one."""
    if not path:
        return Policy()
    file = Path(path)
    try:
        mtime = file.stat().st_mtime
    except OSError as exc:
        raise ConfigError(f"GPUFLEET_RESIDENCY_POLICY_FILE: cannot read {file}: {exc.strerror}") from None
    return _load(str(file), mtime)


@lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> Policy:
    text = Path(path).read_text()
    try:
        raw: Any = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        policy = Policy.model_validate(raw or {})
    except (ValueError, yaml.YAMLError, ValidationError) as exc:
        first = str(exc).splitlines()[0] if not isinstance(exc, ValidationError) else \
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"GPUFLEET_RESIDENCY_POLICY_FILE {path}: {first}") from None
    if policy.default_class not in policy.classes:
        raise ConfigError(f"GPUFLEET_RESIDENCY_POLICY_FILE {path}: default_class {policy.default_class!r} is not "
                          f"one of the classes ({', '.join(sorted(policy.classes))})")
    return policy


def resolve(policy: Policy, data_class: str | None) -> Residency:
    """The rule a job's data class names (its default when none); InvalidInput for an unknown class."""
    name = data_class or policy.default_class
    rule = policy.classes.get(name)
    if rule is None:
        raise InvalidInput("requirements.data_class", f"unknown data class {name!r}; the policy defines "
                           f"{', '.join(sorted(policy.classes))}")
    return Residency(name, rule)
