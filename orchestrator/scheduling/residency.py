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
from collections.abc import Callable
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
        """Why the offer is outside data class ``name`` (this rule), or None (the rules: ``Residency.check``)."""
        return Residency(name, self).rejection(offer)


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_class: str = "public"
    classes: dict[str, DataClassRule] = Field(default_factory=lambda: {"public": DataClassRule()})


# Why an offer is outside a data class (``Residency.check``); 0: inside it.
PROVIDER_NOT_ALLOWED, PROVIDER_DENIED, REGION_NOT_ALLOWED = 1, 2, 3


@dataclass(frozen=True)
class Residency:
    name: str
    rule: DataClassRule

    @property
    def restricts(self) -> bool:
        """False for a class that allows anything: placement then skips the check for every offer."""
        rule = self.rule
        return rule.providers is not None or bool(rule.deny_providers) or bool(rule.regions and "*" not in rule.regions)

    def parts(self) -> tuple[frozenset[str] | None, frozenset[str], MatchMemo | None]:
        """(allowed providers or None: any, denied providers, region memo or None: anywhere) — the rule as
        placement's scan applies it inline, in ``check``'s order, for every offer that meets the job's
        requirements (the region answer memoised per region name)."""
        rule = self.rule
        allowed = frozenset(rule.providers) if rule.providers is not None else None
        regions = region_memo(tuple(rule.regions)) if rule.regions and "*" not in rule.regions else None
        return allowed, frozenset(rule.deny_providers), regions

    def check(self, offer: Offer) -> int:
        """Which rule the offer breaks (0: none), in the order ``DataClassRule.rejection`` applies them."""
        allowed, denied, regions = self.parts()
        if allowed is not None and offer.provider not in allowed:
            return PROVIDER_NOT_ALLOWED
        if offer.provider in denied:
            return PROVIDER_DENIED
        if regions is not None and not regions[offer.region]:
            return REGION_NOT_ALLOWED
        return 0

    def describe(self, code: int, offer: Offer) -> str:
        """The reason ``check``'s answer stands for, for this offer."""
        name, rule = self.name, self.rule
        if code == PROVIDER_NOT_ALLOWED:
            return f"data class {name!r} does not allow provider {offer.provider}"
        if code == PROVIDER_DENIED:
            return f"data class {name!r} denies provider {offer.provider}"
        return f"region {offer.region} not allowed for data class {name!r} ({', '.join(rule.regions or [])})"

    def category(self, code: int) -> str:
        """What every offer rejected with ``code`` has in common (the explanation's summary line)."""
        if code == PROVIDER_NOT_ALLOWED:
            return f"provider not allowed for data class {self.name!r}"
        if code == PROVIDER_DENIED:
            return f"provider denied for data class {self.name!r}"
        return f"region not allowed for data class {self.name!r} ({', '.join(self.rule.regions or [])})"

    def rejection(self, offer: Offer) -> str | None:
        code = self.check(offer)
        return self.describe(code, offer) if code else None


class MatchMemo(dict[str, bool]):
    """Whether a name (an offer's region, its GPU model) matches a wanted list, computed on first use:
    a fleet of ten thousand offers has a few dozen distinct names, and placement asks for every offer.
    A hit is one dict subscript (``__missing__`` runs only on a miss)."""

    def __init__(self, matches: Callable[[str], bool]) -> None:
        super().__init__()
        self._matches = matches

    def __missing__(self, name: str) -> bool:
        answer = self[name] = self._matches(name)
        return answer


_MEMO_LIMIT = 4096


def memo_for(memos: dict[tuple[str, ...], MatchMemo], wanted: tuple[str, ...],
             matches: Callable[[str, list[str]], bool]) -> MatchMemo:
    """The memo of ``wanted`` in ``memos`` (made on first use). Bounded, because a provider can list any
    name it likes: a full table is dropped and refilled rather than grown."""
    memo = memos.get(wanted)
    if memo is None or len(memo) > _MEMO_LIMIT:
        if len(memos) > 256:
            memos.clear()
        names = list(wanted)
        memo = memos[wanted] = MatchMemo(lambda name: matches(name, names))
    return memo


_region_memos: dict[tuple[str, ...], MatchMemo] = {}


def region_memo(wanted: tuple[str, ...]) -> MatchMemo:
    """offer region → ``any_region_matches(region, wanted)``, memoised."""
    return memo_for(_region_memos, wanted, any_region_matches)


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
