"""How the offers that fit a job are put in order: the routing strategies, tiers and the score.

Filtering (what may run the job at all) happens before this module and records a reason for
each rejection; here every fitting option gets a score from its cost, measured latency, error
rate and free capacity — shown in the job's explanation whatever the strategy — and the
strategy decides the order. The placement takes the first option whose budget hold fits and
keeps the rest, in order, as its failover list.

Strategies:

- ``lowest_cost``: cheapest estimated cost first (the default).
- ``lowest_latency``: lowest measured latency first (unmeasured last), then cost.
- ``score``: lowest weighted score first (weights configurable).
- ``round_robin``: providers take turns, each with its cheapest offer first. Whose turn it is comes
  from a ``TurnCounter`` (placement passes one shared by every worker: ``services/turns.py``); without
  one, turns are counted in this process.
- ``weighted_random``: providers drawn in proportion to their configured ``weight``, seeded by the job.
- ``failover``: the job's ``failover_order`` (else providers' configured ``priority``), then cost.
- ``tiered``: primary (own clusters, fixed cost) → secondary (spot/interruptible) → tertiary
  (on-demand clouds, external APIs); each tier overflows to the next when full or unhealthy.
- ``cluster_first`` / ``external_first``: own clusters or external APIs first, each by cost.
- ``hybrid``: requests worth less than a $/1K-token threshold go to own clusters (external as
  fallback); the rest to the cheapest external API (clusters as fallback).
- ``capability``: the job's required capabilities filter offers (as for every strategy); the
  rest are ranked by score.

Last-resort providers come after every other option in every strategy.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_args

from providers.base import Offer, ProviderKind, StrategyName

STRATEGIES: tuple[str, ...] = get_args(StrategyName)
TIERS = ("primary", "secondary", "tertiary")

_OWN_KINDS = {ProviderKind.local, ProviderKind.self_hosted, ProviderKind.cloud_pool}
_EXTERNAL_KINDS = {ProviderKind.model_api, ProviderKind.serverless}


@dataclass(frozen=True)
class Weights:
    """How much each normalised component (0 best … 1 worst among the options) adds to the score."""

    cost: float = 1.0
    latency: float = 0.5
    errors: float = 1.0
    capacity: float = 0.25


@dataclass(frozen=True)
class Option:
    """One fitting offer with what ranking needs to know about it and its provider."""

    offer: Offer
    estimated_cost: float
    provider_kind: ProviderKind | str
    tier: str
    latency_ms: float | None = None
    error_rate: float = 0.0
    weight: float = 1.0
    priority: int | None = None
    last_resort: bool = False

    @property
    def own(self) -> bool:
        return self.provider_kind in _OWN_KINDS

    @property
    def external(self) -> bool:
        return self.provider_kind in _EXTERNAL_KINDS


@dataclass
class Ranked:
    option: Option
    score: float
    components: dict[str, float] = field(default_factory=dict)


def default_tier(kind: ProviderKind | str, offer: Offer) -> str:
    """Own capacity is primary, interruptible capacity secondary, everything billed on demand tertiary."""
    if kind in _OWN_KINDS:
        return "primary"
    if offer.interruptible:
        return "secondary"
    return "tertiary"


def _normalised(values: list[float | None]) -> list[float]:
    """0 for the best (lowest) value, 1 for the worst; unknown values count as the worst."""
    known = [v for v in values if v is not None]
    if not known:
        return [0.0 for _ in values]
    low, high = min(known), max(known)
    span = high - low
    return [1.0 if v is None else (0.0 if span <= 0 else (v - low) / span) for v in values]


def score_all(options: list[Option], weights: Weights) -> list[Ranked]:
    costs = _normalised([o.estimated_cost for o in options])
    latencies = _normalised([o.latency_ms for o in options])
    free = [max(0, o.offer.capacity) for o in options]
    most = max(free, default=0) or 1
    ranked = []
    for o, cost, latency, slots in zip(options, costs, latencies, free, strict=True):
        parts = {"cost": round(weights.cost * cost, 4), "latency": round(weights.latency * latency, 4),
                 "errors": round(weights.errors * min(1.0, o.error_rate), 4),
                 "capacity": round(weights.capacity * (1 - slots / most), 4)}
        ranked.append(Ranked(option=o, score=round(sum(parts.values()), 4), components=parts))
    return ranked


# round_robin's turn: candidate set key (the providers, sorted, comma-joined) → how many turns that set
# has had before this one (0, 1, 2, …). Keyed by the set, so jobs limited to some providers take turns
# among those and do not shift the turns of jobs that may go anywhere.
TurnCounter = Callable[[str], int]


class LocalTurns:
    """Turns counted in this process: right when one process places every job (embedded, tests), and
    the fallback of the shared counter when Redis cannot be reached."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()  # the thread pool places concurrently

    def __call__(self, key: str) -> int:
        with self._lock:
            turn = self._counts.get(key, 0)
            self._counts[key] = turn + 1
        return turn


_local_turns = LocalTurns()


def turn_key(providers: list[str]) -> str:
    """The key of a candidate set: the same providers give the same key in every process."""
    return ",".join(sorted(providers))


def rank(options: list[Option], strategy: str, *, weights: Weights | None = None, seed: str = "",
         failover_order: list[str] | None = None, value_per_1k: float | None = None,
         hybrid_threshold_per_1k: float = 0.001, turns: TurnCounter | None = None) -> list[Ranked]:
    """The options best first under ``strategy``, each with its score and score components.

    ``value_per_1k``: what the request is worth per 1K tokens (the job's max $/1K), for ``hybrid``;
    ``turns``: whose turn it is, for ``round_robin`` (asked only by that strategy, once per call;
    default: counted in this process)."""
    scored = score_all(options, weights or Weights())

    def cost(r: Ranked) -> tuple[Any, ...]:
        return (r.option.estimated_cost, -r.option.offer.reliability, _key(r.option))

    key: Callable[[Ranked], tuple[Any, ...]]

    if strategy in ("score", "capability"):
        key = lambda r: (r.score, *cost(r))  # noqa: E731
    elif strategy == "lowest_latency":
        key = lambda r: (r.option.latency_ms is None, r.option.latency_ms or 0.0, *cost(r))  # noqa: E731
    elif strategy == "tiered":
        key = lambda r: (_tier_index(r.option.tier), *cost(r))  # noqa: E731
    elif strategy == "cluster_first":
        key = lambda r: (not r.option.own, *cost(r))  # noqa: E731
    elif strategy == "external_first":
        key = lambda r: (not r.option.external, *cost(r))  # noqa: E731
    elif strategy == "hybrid":
        cheap = value_per_1k is not None and value_per_1k <= hybrid_threshold_per_1k
        if value_per_1k is None:  # no stated value: judge by what the cheapest external API would charge
            external = [r.option.offer.price_per_1k_tokens for r in scored
                        if r.option.external and r.option.offer.price_per_1k_tokens is not None]
            cheap = bool(external) and min(external) <= hybrid_threshold_per_1k
        key = (lambda r: (not r.option.own, *cost(r))) if cheap else (lambda r: (not r.option.external, *cost(r)))
    elif strategy == "failover":
        order = {name: i for i, name in enumerate(failover_order or [])}
        key = lambda r: (order.get(r.option.offer.provider, len(order)),  # noqa: E731
                         r.option.priority if r.option.priority is not None else 1_000_000, *cost(r))
    elif strategy == "round_robin":
        providers = sorted({r.option.offer.provider for r in scored})
        start = (turns or _local_turns)(turn_key(providers)) % len(providers) if providers else 0
        turn = {name: (i - start) % len(providers) for i, name in enumerate(providers)}
        key = lambda r: (turn[r.option.offer.provider], *cost(r))  # noqa: E731
    elif strategy == "weighted_random":
        draw = random.Random(seed)
        providers = sorted({r.option.offer.provider for r in scored})
        weight = {r.option.offer.provider: max(r.option.weight, 1e-9) for r in scored}
        # Weighted sampling without replacement (Efraimidis–Spirakis): a higher weight, an earlier turn.
        keys = {name: draw.random() ** (1 / weight[name]) for name in providers}
        key = lambda r: (-keys[r.option.offer.provider], *cost(r))  # noqa: E731
    else:  # lowest_cost
        key = cost
    return sorted(scored, key=lambda r: (r.option.last_resort, *key(r)))


def _tier_index(tier: str) -> int:
    return TIERS.index(tier) if tier in TIERS else len(TIERS)


def _key(option: Option) -> str:
    return f"{option.offer.provider}/{option.offer.offer_id}"
