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

import heapq
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress, groupby, repeat
from operator import le
from typing import Any, get_args, overload

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


def score_all(options: list[Option], weights: Weights) -> list[Ranked]:
    """Every option with its score and components, in the given order."""
    ranking = Ranking.of(options, "lowest_cost", weights=weights)
    return [ranking.ranked_at(i) for i in range(len(options))]


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
    default: counted in this process). Placement uses ``Ranking`` directly, which orders only as far as
    it is read; this is the same order, all of it."""
    return list(Ranking.of(options, strategy, weights=weights, seed=seed, failover_order=failover_order,
                           value_per_1k=value_per_1k, hybrid_threshold_per_1k=hybrid_threshold_per_1k, turns=turns))


@dataclass(frozen=True, slots=True)
class Source:
    """What ranking needs to know about the provider behind some options: the same for all of them, so
    placement builds one per provider instead of an ``Option`` per fitting offer."""

    kind: ProviderKind | str
    tier: str | None = None  # configured; None: ``default_tier`` of each offer
    latency_ms: float | None = None
    error_rate: float = 0.0
    weight: float = 1.0
    priority: int | None = None
    last_resort: bool = False
    # The provider's configured capabilities, added to each offer it surfaces (the explanation, the
    # candidates): filtering already counted them, and copying every fitting offer would cost more than it.
    capabilities: tuple[str, ...] = ()


# How many options are put in order at once; the rest only if someone reads past them (the budget walk
# rarely does).
HEAD = 32


class Ranking(Sequence[Ranked]):
    """Options best first under a strategy, ordered lazily and built lazily.

    Ten thousand offers can leave thousands that fit; placement shows twenty and nearly always takes the
    first. Every strategy's order is (prefix, primary value, the rest): the prefix is the last-resort flag
    and the strategy's own criteria (tier, turn…), which take a handful of values; the primary value is
    the estimated cost (the score under ``score``) — a plain float per option. The first ``HEAD`` are
    found per prefix from the ``HEAD``-th smallest of those floats (a heap built in C), and full sort keys
    (reliability, offer key) are built only for the options at or under that threshold: the same
    positions a full sort gives, without a key tuple per option. Reading past ``HEAD`` sorts everything once. ``Option`` and
    ``Ranked`` objects (with the score components) are made only for the positions read; scores are
    normalised across every option, as before.

    The options come as parallel lists — each fitting offer, its estimated cost, its provider's facts —
    because a tuple or ``Option`` per fitting offer is what made ranking slow. Offers are pydantic models,
    whose attribute reads take a slow path (BaseModel defines ``__getattr__``), so the loops over every
    option read their fields from ``__dict__``."""

    def __init__(self, offers: Sequence[Offer], costs: Sequence[float], sources: Sequence[Source], strategy: str, *,
                 weights: Weights | None = None, seed: str = "", failover_order: list[str] | None = None,
                 value_per_1k: float | None = None, hybrid_threshold_per_1k: float = 0.001,
                 turns: TurnCounter | None = None, options: Sequence[Option] | None = None, head: int = HEAD,
                 most_capacity: int | None = None) -> None:
        """``most_capacity``: the largest ``capacity`` among the offers, when the caller already knows it."""
        self._offers, self._costs, self._sources = offers, costs, sources
        self._options = options
        self._weights = weights or Weights()
        self._built: dict[int, Ranked] = {}
        self._fixed: dict[int, tuple[float, float]] = {}  # id(source) → (latency part, errors part)
        self._cost_low = min(costs, default=0.0)
        self._cost_span = max(costs, default=0.0) - self._cost_low
        # Placement passes one Source per provider, repeated for each of its options: the distinct ones are
        # the heads of runs of the same object (groupby compares identical objects without calling __eq__).
        self._distinct = [source for source, _ in groupby(sources)]
        latencies = [latency for latency in {s.latency_ms for s in self._distinct} if latency is not None]
        self._any_latency = bool(latencies)
        self._latency_low = min(latencies, default=0.0)
        self._latency_span = max(latencies, default=0.0) - self._latency_low
        if most_capacity is None:
            most_capacity = max([o.__dict__["capacity"] for o in offers], default=0)
        self._most = max(0, most_capacity) or 1
        self._by_score = strategy in ("score", "capability")
        # How far an approximate primary value can sort from the exact one: two roundings to 4 places
        # (≤ 5e-5 each) and float error, with room to spare. Costs are exact: no margin.
        self._margin = 3e-4 if self._by_score else 0.0
        self._prefixes, self._primary = self._criteria(strategy, seed, failover_order, value_per_1k,
                                                        hybrid_threshold_per_1k, turns)
        self._order = self._head(head)
        self._complete = len(self._order) == len(offers)

    @classmethod
    def of(cls, options: Sequence[Option], strategy: str, **kwargs: Any) -> Ranking:
        """A ranking of ready-made options (tests, ``rank``): each is its own source."""
        sources = [Source(kind=o.provider_kind, tier=o.tier, latency_ms=o.latency_ms, error_rate=o.error_rate,
                          weight=o.weight, priority=o.priority, last_resort=o.last_resort) for o in options]
        return cls([o.offer for o in options], [o.estimated_cost for o in options], sources, strategy, options=options,
                   **kwargs)

    # --- the order -----------------------------------------------------------------------------

    def _criteria(self, strategy: str, seed: str, failover_order: list[str] | None, value_per_1k: float | None,
                  hybrid_threshold_per_1k: float, turns: TurnCounter | None) -> tuple[list[Any], Sequence[float]]:
        """(prefix, primary value) per option: the order is (prefix, primary, [cost,] -reliability, offer key).
        A prefix made of the last-resort flag and a small rank is one int (flag × ranks + rank): the same
        order as the tuple, cheaper to build and compare."""
        offers, costs, sources = self._offers, self._costs, self._sources
        if self._by_score or strategy not in STRATEGIES or strategy == "lowest_cost":
            # (last resort) only: one value for every option unless some provider is a last resort.
            mixed = len({s.last_resort for s in self._distinct}) > 1
            prefixes = [s.last_resort for s in sources] if mixed else [False] * len(sources)
            return prefixes, self._approximate_scores() if self._by_score else costs
        if strategy == "lowest_latency":
            return [(s.last_resort, s.latency_ms is None, s.latency_ms or 0.0) for s in sources], costs
        if strategy == "tiered":
            ranks = len(TIERS) + 1
            return [s.last_resort * ranks + _tier_index(s.tier or default_tier(s.kind, o))
                    for o, s in zip(offers, sources, strict=True)], costs
        if strategy in ("cluster_first", "external_first", "hybrid"):
            own = strategy == "cluster_first"
            if strategy == "hybrid":
                own = value_per_1k is not None and value_per_1k <= hybrid_threshold_per_1k
                if value_per_1k is None:  # no stated value: judge by what the cheapest external API would charge
                    external = [o.price_per_1k_tokens for o, s in zip(offers, sources, strict=True)
                                if s.kind in _EXTERNAL_KINDS and o.price_per_1k_tokens is not None]
                    own = bool(external) and min(external) <= hybrid_threshold_per_1k
            kinds = _OWN_KINDS if own else _EXTERNAL_KINDS
            return [s.last_resort * 2 + (s.kind not in kinds) for s in sources], costs
        names = [o.__dict__["provider"] for o in offers]
        turn: dict[str, int]
        if strategy == "failover":
            order = {name: i for i, name in enumerate(failover_order or [])}
            return [(s.last_resort, order.get(name, len(order)), s.priority if s.priority is not None else 1_000_000)
                    for name, s in zip(names, sources, strict=True)], costs
        if strategy == "round_robin":
            providers = sorted(set(names))
            start = (turns or _local_turns)(turn_key(providers)) % len(providers) if providers else 0
            turn = {name: (i - start) % len(providers) for i, name in enumerate(providers)}
        else:  # weighted_random
            draw = random.Random(seed)
            providers = sorted(set(names))
            weight = dict(zip(names, [s.weight for s in sources], strict=True))  # per provider: its last option's
            # Weighted sampling without replacement (Efraimidis–Spirakis): a higher weight, an earlier turn.
            drawn = {name: draw.random() ** (1 / max(weight[name], 1e-9)) for name in providers}
            distinct = sorted(set(drawn.values()), reverse=True)  # the highest draw goes first
            turn = {name: distinct.index(value) for name, value in drawn.items()}
        ranks = len(turn) or 1
        return [s.last_resort * ranks + turn[name] for name, s in zip(names, sources, strict=True)], costs

    def _full_key(self, i: int) -> tuple[Any, ...]:
        d = self._offers[i].__dict__
        if self._by_score:
            return (self._prefixes[i], self._score(i), self._costs[i], -d["reliability"], f"{d['provider']}/{d['offer_id']}")
        return (self._prefixes[i], self._primary[i], -d["reliability"], f"{d['provider']}/{d['offer_id']}")

    def _head(self, head: int) -> list[int]:
        """The first ``head`` positions, exactly as ``sorted(range(n), key=full key)[:head]`` gives them.

        Per prefix, in order: the ``need``-th smallest primary value is a threshold; whatever is above it
        (plus the score's rounding margin) sorts after at least ``need`` others, so only the rest get full
        keys and a sort."""
        n, prefixes, primary, margin = len(self._offers), self._prefixes, self._primary, self._margin
        if n <= head:
            return sorted(range(n), key=self._full_key)
        if prefixes.count(prefixes[0]) == n:
            groups: list[Any] = [None]  # one prefix (the usual case): no per-option grouping
        else:
            groups = sorted(set(prefixes))
        order: list[int] = []
        for prefix in groups:
            need = head - len(order)
            members = None if prefix is None else [i for i, p in enumerate(prefixes) if p == prefix]
            values = list(primary) if members is None else [primary[i] for i in members]
            if len(values) > need:
                limit = _smallest(values, need) + margin
                # Loops in C: the positions whose value is at most the limit.
                members = list(compress(range(n), map(le, primary, repeat(limit)))) if members is None else \
                    [i for i in members if primary[i] <= limit]
            elif members is None:
                members = list(range(n))
            order += sorted(members, key=self._full_key)[:need]
            if len(order) >= head:
                break
        return order

    def _sorted_to(self, index: int) -> None:
        if index >= len(self._order) and not self._complete:
            seen = set(self._order)
            self._order += [i for i in sorted(range(len(self._offers)), key=self._full_key) if i not in seen]
            self._complete = True

    # --- scores --------------------------------------------------------------------------------

    def _source_parts(self, source: Source) -> tuple[float, float]:
        """The latency and errors components, the same for every option of a provider."""
        fixed = self._fixed.get(id(source))
        if fixed is None:
            w, latency = self._weights, source.latency_ms
            if not self._any_latency:
                normalised = 0.0
            elif latency is None:
                normalised = 1.0
            else:
                normalised = 0.0 if self._latency_span <= 0 else (latency - self._latency_low) / self._latency_span
            fixed = self._fixed[id(source)] = (round(w.latency * normalised, 4),
                                               round(w.errors * min(1.0, source.error_rate), 4))
        return fixed

    def _parts(self, i: int) -> tuple[float, float, float, float]:
        """The score components of option ``i`` (each 0 best … its weight worst among the options)."""
        w, cost = self._weights, self._costs[i]
        latency, errors = self._source_parts(self._sources[i])
        relative = 0.0 if self._cost_span <= 0 else (cost - self._cost_low) / self._cost_span
        return (round(w.cost * relative, 4), latency, errors,
                round(w.capacity * (1 - max(0, self._offers[i].__dict__["capacity"]) / self._most), 4))

    def _approximate_scores(self) -> list[float]:
        """Every option's score without its two roundings to 4 places (``round`` on a float costs more than
        the rest together): within 1e-4 of the score, so ``_head`` widens its threshold by ``_margin`` and
        compares exact scores (``_score``) among what remains."""
        w, low, span, most = self._weights, self._cost_low, self._cost_span, self._most
        fixed = {key: sum(self._source_parts(s)) for key, s in {id(s): s for s in self._sources}.items()}
        capacity: dict[int, float] = {}
        scores = []
        for o, cost, s in zip(self._offers, self._costs, self._sources, strict=True):
            free = o.__dict__["capacity"]
            part = capacity.get(free)
            if part is None:
                part = capacity[free] = round(w.capacity * (1 - max(0, free) / most), 4)
            scores.append(w.cost * (0.0 if span <= 0 else (cost - low) / span) + fixed[id(s)] + part)
        return scores

    def _score(self, i: int) -> float:
        cost, latency, errors, capacity = self._parts(i)
        return round(cost + latency + errors + capacity, 4)

    def ranked_at(self, i: int) -> Ranked:
        """Option ``i`` (in the order given, not ranked) with its score."""
        built = self._built.get(i)
        if built is None:
            cost, latency, errors, capacity = self._parts(i)
            parts = {"cost": cost, "latency": latency, "errors": errors, "capacity": capacity}
            built = self._built[i] = Ranked(option=self._option(i), score=round(cost + latency + errors + capacity, 4),
                                            components=parts)
        return built

    def _option(self, i: int) -> Option:
        if self._options is not None:
            return self._options[i]
        offer, cost, s = self._offers[i], self._costs[i], self._sources[i]
        if s.capabilities:
            offer = offer.model_copy(update={"capabilities": [*offer.capabilities, *s.capabilities]})
        return Option(offer=offer, estimated_cost=cost, provider_kind=s.kind, tier=s.tier or default_tier(s.kind, offer),
                      latency_ms=s.latency_ms, error_rate=s.error_rate, weight=s.weight, priority=s.priority,
                      last_resort=s.last_resort)

    # --- Sequence --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._offers)

    @overload
    def __getitem__(self, index: int) -> Ranked: ...

    @overload
    def __getitem__(self, index: slice) -> list[Ranked]: ...

    def __getitem__(self, index: int | slice) -> Ranked | list[Ranked]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("ranking index out of range")
        self._sorted_to(index)
        return self.ranked_at(self._order[index])

    def __iter__(self) -> Iterator[Ranked]:
        for index in range(len(self)):
            yield self[index]


def _smallest(values: list[float], k: int) -> float:
    """The k-th smallest of ``values`` (which it reorders): a heap built in C and k pops, instead of
    ``heapq.nsmallest``'s Python loop over every value."""
    heapq.heapify(values)
    for _ in range(k - 1):
        heapq.heappop(values)
    return values[0]


def _tier_index(tier: str) -> int:
    return TIERS.index(tier) if tier in TIERS else len(TIERS)
