"""Placement: choose the provider and offer for a job, and say why.

Candidates → filters (requirements, residency, health; each rejection keeps its reason) →
ranking by the job's strategy (``strategies.py``: every option scored) → a Placement carrying
its rationale, the scores of what it considered, and the ordered failover list. Scheduling
policy lives here and in ``strategies.py`` / ``residency.py``, nowhere else.

Placement runs for every job and may see ten thousand offers (a marketplace lists every host; the
goal is p99 ≤ 5 ms at 10,000, measured by ``bench/placement.py``), so the per-offer path is one
read of the offer's fields and a chain of comparisons: the requirements are prepared once per
placement (``_Filter``) and each provider's offers go through one loop (``_Filter.scan``) that
returns a rule number per rejection; GPU-name and region matches are memoised by name; reason texts
are written only for the rejections the explanation lists (beyond ``MAX_LISTED_REJECTIONS`` the rest
are counted per provider and reason); and ranking orders and builds only the options it shows
(``strategies.Ranking``). Nothing is cached per offer object: adapters return new offers each time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from pydantic import BaseModel, Field, PrivateAttr

from orchestrator.errors import CapacityBusy, NoPlacement
from orchestrator.scheduling import residency
from orchestrator.scheduling.breaker import HealthView, routable
from orchestrator.scheduling.residency import Policy, Residency
from orchestrator.scheduling.strategies import Ranked, Ranking, Source, TurnCounter, Weights
from providers.base import Offer, PermanentProviderError, Provider, ProviderError, ProviderKind, Requirements
from providers.gpus import any_gpu_matches
from providers.llm_api.prices import TOKENS_PER_AUDIO_MINUTE

log = logging.getLogger(__name__)

# Rough run lengths used only to compare per-hour and per-token prices fairly.
_ESTIMATED_SECONDS = {"inference": 30, "transcription": 120, "training": 3600, "distillation": 600, "command": 60}


NO_FREE_CAPACITY = "no free capacity"
MAX_SCORES = 20
# Rejected offers listed one by one in the explanation; beyond this, the rest are counted per provider
# and reason (``rejected_summary``). Provider-level rejections (unhealthy, not allowed…) are always listed.
MAX_LISTED_REJECTIONS = 100
_USAGE_KINDS = ("inference", "transcription")


@dataclass(frozen=True)
class RoutingPolicy:
    """The configured routing defaults and residency policy (from settings, see ``routing_policy``)."""

    strategy: str = "lowest_cost"
    weights: Weights = Weights()
    hybrid_threshold_per_1k: float = 0.001
    residency: Policy = field(default_factory=Policy)


ProviderStats = Callable[[str], tuple[float | None, float]]  # provider → (latency ms, error rate)


def routing_policy(settings: Any = None) -> RoutingPolicy:
    from orchestrator.settings import get_settings

    settings = settings or get_settings()
    return RoutingPolicy(strategy=settings.placement_strategy, weights=Weights(**settings.placement_weights),
                         hybrid_threshold_per_1k=settings.hybrid_threshold_per_1k,
                         residency=residency.load(settings.residency_policy_file))


class Candidate(BaseModel):
    offer: Offer
    estimated_cost: float


class Placement(BaseModel):
    provider: str
    offer: Offer
    estimated_cost: float
    rationale: str
    considered: int
    # Why each rejected provider and offer was rejected: every provider, and every offer up to
    # MAX_LISTED_REJECTIONS (then a fair share of each provider's reasons; the rest are counted below).
    rejected: dict[str, str]
    strategy: str = "lowest_cost"
    data_class: str | None = None
    # How many providers and offers were rejected in all (``rejected`` may list fewer).
    rejected_total: int = 0
    # Rejected offers per provider and reason: {"provider", "reason", "count", "listed"}, most common first.
    rejected_summary: list[dict[str, Any]] = Field(default_factory=list)
    # The fitting options as ranked (best first, at most MAX_SCORES): the "why" of the choice.
    scores: list[dict[str, Any]] = Field(default_factory=list)
    _candidates: Sequence[Candidate] = PrivateAttr(default=())

    @property
    def candidates(self) -> Sequence[Candidate]:
        """Every fitting offer, best first: the budget check walks down this list (ordered lazily past
        the first few, see ``strategies.Ranking``). Not stored with the job."""
        return self._candidates

    def choose(self, index: int, budget_rejected: dict[str, str]) -> Placement:
        """The placement after the budget check skipped the first ``index`` candidates."""
        if index == 0 and not budget_rejected:
            return self
        pick = self.candidates[index]
        skipped = f"; {index} cheaper offer(s) over budget" if index else ""
        total = self.rejected_total + len(budget_rejected)
        return self.model_copy(update={
            "provider": pick.offer.provider, "offer": pick.offer, "estimated_cost": round(pick.estimated_cost, 6),
            "rationale": f"cheapest within budget: {offer_key(pick.offer)} (${pick.offer.price_per_hour:.2f}/h, "
                         f"est. ${pick.estimated_cost:.4f}){skipped}; {total} rejected",
            "rejected": {**self.rejected, **budget_rejected}, "rejected_total": total})


def offer_key(offer: Offer) -> str:
    return f"{offer.provider}/{offer.offer_id}"


def usage_priced(offer: Offer, kind: str) -> bool:
    """Billed per token for this kind of job, not per hour of capacity."""
    return offer.price_per_1k_tokens is not None and kind in ("inference", "transcription")


def usage_tokens(kind: str, spec: dict[str, Any]) -> int:
    """Tokens a usage-priced job is expected to bill: a transcription, the words spoken in its audio (a
    minute's when its length is unknown); anything else, its answer's budget plus a prompt."""
    if kind == "transcription":
        return math.ceil(float(spec.get("duration_seconds") or 60) / 60 * TOKENS_PER_AUDIO_MINUTE)
    return int(spec.get("max_tokens", 256)) + 200


def estimate_cost(offer: Offer, kind: str, spec: dict[str, Any], timeout_seconds: int) -> float:
    if offer.price_per_1k_tokens is not None and usage_priced(offer, kind):
        return offer.price_per_1k_tokens * usage_tokens(kind, spec) / 1000
    seconds = min(_ESTIMATED_SECONDS.get(kind, 60), timeout_seconds)
    return offer.price_per_hour * seconds / 3600


# The rules, in the order they are applied: an offer's reason is the first rule it breaks.
(FITS, FAILED_BEFORE, WRONG_KIND, NO_GPU, GPU_MODEL, GPU_COUNT, GPU_MEMORY, HOURLY_PRICE, TOKEN_PRICE, CONTEXT,
 CAPABILITY, RELIABILITY, INTERRUPTIBLE, REGION, FULL) = range(15)
RESIDENCY = FULL  # RESIDENCY + residency.check(offer): outside the job's data class
BUSY = RESIDENCY + 4  # full moments ago (the job's ``busy`` list)
_RULES = BUSY + 1

# Memoised GPU-name answers: wanted models → {offered model → matches}. Normalising and comparing names
# was most of placement's time; a fleet lists a few dozen distinct names.
_gpu_memos: dict[tuple[str, ...], residency.MatchMemo] = {}


def _gpu_memo(wanted: tuple[str, ...]) -> residency.MatchMemo:
    return residency.memo_for(_gpu_memos, wanted, any_gpu_matches)


def _suffixes(keys: set[str]) -> frozenset[str]:
    """Every part after a "/" of the keys: an offer whose id is not among them cannot have its key in
    ``keys``, so the key string is built only for offers that might (exact for any provider name)."""
    return frozenset(key[i + 1:] for key in keys for i, ch in enumerate(key) if ch == "/")


@dataclass
class _Scan:
    """What one provider's offers came to: the fitting ones with their estimated costs and the largest
    free capacity among them, and the rejected ones by rule (``rejected[rule]``; references to offers the
    provider already holds: appending is cheaper than counting and capping per offer)."""

    fits: list[Offer]
    costs: list[float]
    most_capacity: int
    rejected: list[list[Offer]]


class _Filter:
    """A job's requirements compiled for one placement: ``scan`` finds the first rule each offer breaks
    (the rules in order: FAILED_BEFORE … FULL, then residency, then busy) with the wanted GPU and
    region lists turned into memo tables once; ``describe`` writes the reason — only for the rejections
    that get listed."""

    def __init__(self, req: Requirements, kind: str, spec: dict[str, Any], timeout_seconds: int,
                 excluded: set[str], data: Residency | None = None, busy: set[str] | None = None) -> None:
        self.req, self.kind, self.spec, self.excluded, self.data = req, kind, spec, excluded, data
        self.busy = busy or set()
        self.seconds = min(_ESTIMATED_SECONDS.get(kind, 60), timeout_seconds)
        # Prepared once per placement, read into locals by every scan.
        self.excluded_ids = _suffixes(excluded) if excluded else None
        self.busy_ids = _suffixes(self.busy) if self.busy else None
        self.gpus = _gpu_memo(tuple(req.gpu)) if req.gpu else None
        self.regions = residency.region_memo(tuple(req.regions)) if req.regions else None
        self.capabilities = frozenset(req.capabilities) if req.capabilities else None
        self.residency = data.parts() if data is not None and data.restricts else None

    def scan(self, offers: Iterable[Offer], extra_capabilities: tuple[str, ...] = ()) -> _Scan:
        """Sort one provider's offers into fitting and rejected (``extra_capabilities``: the provider's
        own, which count as each offer's). This loop is placement's cost at scale, so each offer costs
        one read of its fields (``__dict__``: a pydantic model's attribute reads take a slow path) and a
        chain of comparisons, with everything else prepared before it; no object is built for a rejection.
        The residency rule is ``Residency.check``'s, inlined from its ``parts``."""
        req, kind, excluded, busy = self.req, self.kind, self.excluded, self.busy
        excluded_ids, busy_ids, gpus, regions = self.excluded_ids, self.busy_ids, self.gpus, self.regions
        needs_gpu = req.needs_gpu()
        min_count, min_memory = max(1, req.gpu_count), req.min_gpu_memory_gb
        max_hourly, max_1k = req.max_price_per_hour, req.max_price_per_1k_tokens
        usage_kind = kind in _USAGE_KINDS
        context, min_reliability, capabilities = req.context_window, req.min_reliability, self.capabilities
        no_spot = req.interruptible is False
        restricted = self.residency is not None
        allowed, denied, allowed_regions = self.residency or (None, frozenset(), None)
        seconds = self.seconds
        tokens: int | None = None
        fits: list[Offer] = []
        costs: list[float] = []
        rejected: list[list[Offer]] = [[] for _ in range(_RULES)]
        most = free = 0
        gpu = ""
        for offer in offers:
            d = offer.__dict__
            if excluded_ids and d["offer_id"] in excluded_ids and f"{d['provider']}/{d['offer_id']}" in excluded:
                rule = FAILED_BEFORE
            elif kind not in d["kinds"]:
                rule = WRONG_KIND
            elif needs_gpu and not (gpu := d["gpu"]):
                rule = NO_GPU
            elif gpus is not None and not gpus[gpu]:  # (gpus is set only when needs_gpu: gpu was read)
                rule = GPU_MODEL
            elif needs_gpu and d["gpu_count"] < min_count:
                rule = GPU_COUNT
            elif needs_gpu and min_memory and d["gpu_memory_gb"] < min_memory:
                rule = GPU_MEMORY
            elif (max_hourly is not None and d["price_per_hour"] > max_hourly
                  and not (usage_kind and d["price_per_1k_tokens"] is not None)):
                rule = HOURLY_PRICE
            elif max_1k is not None and d["price_per_1k_tokens"] is not None and d["price_per_1k_tokens"] > max_1k:
                rule = TOKEN_PRICE
            elif context is not None and (d["context_window"] or 0) < context:
                rule = CONTEXT
            elif capabilities is not None and not capabilities.issubset(
                    {*d["capabilities"], *extra_capabilities, *d["kinds"]}):
                rule = CAPABILITY
            elif min_reliability is not None and d["reliability"] < min_reliability:
                rule = RELIABILITY
            elif no_spot and d["interruptible"]:
                rule = INTERRUPTIBLE
            elif regions is not None and not regions[d["region"]]:
                rule = REGION
            elif (free := d["capacity"]) <= 0:
                rule = FULL
            elif restricted and allowed is not None and d["provider"] not in allowed:
                rule = RESIDENCY + residency.PROVIDER_NOT_ALLOWED
            elif restricted and d["provider"] in denied:
                rule = RESIDENCY + residency.PROVIDER_DENIED
            elif restricted and allowed_regions is not None and not allowed_regions[d["region"]]:
                rule = RESIDENCY + residency.REGION_NOT_ALLOWED
            elif busy_ids and d["offer_id"] in busy_ids and f"{d['provider']}/{d['offer_id']}" in busy:
                rule = BUSY
            else:  # it fits: its estimated cost (estimate_cost, inlined)
                per_1k = d["price_per_1k_tokens"]
                if usage_kind and per_1k is not None:
                    if tokens is None:
                        tokens = usage_tokens(self.kind, self.spec)
                    costs.append(per_1k * tokens / 1000)
                else:
                    costs.append(d["price_per_hour"] * seconds / 3600)
                fits.append(offer)
                if free > most:
                    most = free
                continue
            rejected[rule].append(offer)
        return _Scan(fits, costs, most, rejected)

    def describe(self, rule: int, offer: Offer, extra_capabilities: tuple[str, ...] = ()) -> str:
        """Why ``offer`` broke ``rule``, in words."""
        req = self.req
        if rule == FAILED_BEFORE:
            return "failed this job before"
        if rule == WRONG_KIND:
            return f"does not run {self.kind} jobs"
        if rule == NO_GPU:
            return "no GPU"
        if rule == GPU_MODEL:
            return f"GPU {offer.gpu} not in {req.gpu}"
        if rule == GPU_COUNT:
            return f"{offer.gpu_count} GPUs < {req.gpu_count}"
        if rule == GPU_MEMORY:
            return f"{offer.gpu_memory_gb:g} GB GPU memory < {req.min_gpu_memory_gb:g}"
        if rule == HOURLY_PRICE:
            return f"${offer.price_per_hour:.2f}/h > max ${req.max_price_per_hour:.2f}/h"
        if rule == TOKEN_PRICE:
            return f"${offer.price_per_1k_tokens:g}/1K tokens > max ${req.max_price_per_1k_tokens:g}/1K"
        if rule == CONTEXT:
            have = f"{offer.context_window} tokens" if offer.context_window else "not declared"
            return f"context window {have} < {req.context_window} needed"
        if rule == CAPABILITY:
            missing = sorted(set(req.capabilities or ()) - {*offer.capabilities, *extra_capabilities, *offer.kinds})
            return f"missing capability {', '.join(missing)}"
        if rule == RELIABILITY:
            return f"reliability {offer.reliability:.3f} < {req.min_reliability}"
        if rule == INTERRUPTIBLE:
            return "interruptible (spot) capacity not allowed"
        if rule == REGION:
            return f"region {offer.region} not in {req.regions}"
        if rule in (FULL, BUSY):
            return NO_FREE_CAPACITY
        assert self.data is not None
        return self.data.describe(rule - RESIDENCY, offer)

    def category(self, rule: int) -> str:
        """What the offers rejected under ``rule`` have in common: a line of the summary."""
        req = self.req
        same = {FAILED_BEFORE: "failed this job before", WRONG_KIND: f"does not run {self.kind} jobs", NO_GPU: "no GPU",
                INTERRUPTIBLE: "interruptible (spot) capacity not allowed", FULL: NO_FREE_CAPACITY, BUSY: NO_FREE_CAPACITY}
        if rule in same:
            return same[rule]
        if rule == GPU_MODEL:
            return f"GPU not in {req.gpu}"
        if rule == GPU_COUNT:
            return f"fewer GPUs than {req.gpu_count}"
        if rule == GPU_MEMORY:
            return f"GPU memory < {req.min_gpu_memory_gb:g} GB"
        if rule == HOURLY_PRICE:
            return f"over max ${req.max_price_per_hour:.2f}/h"
        if rule == TOKEN_PRICE:
            return f"over max ${req.max_price_per_1k_tokens:g}/1K tokens"
        if rule == CONTEXT:
            return f"context window < {req.context_window} needed"
        if rule == CAPABILITY:
            return f"missing capability (needs {', '.join(req.capabilities or ())})"
        if rule == RELIABILITY:
            return f"reliability < {req.min_reliability}"
        if rule == REGION:
            return f"region not in {req.regions}"
        assert self.data is not None
        return self.data.category(rule - RESIDENCY)


def rejection(offer: Offer, req: Requirements, kind: str, excluded: set[str]) -> str | None:
    """Why this offer cannot take the job, or None if it can (residency and busy offers aside: those are
    placement's, per job)."""
    rules = _Filter(req, kind, {}, 3600, excluded)
    rule = next((rule for rule, offers in enumerate(rules.scan([offer]).rejected) if offers), FITS)
    return rules.describe(rule, offer) if rule else None


@dataclass
class _Rejected:
    """One provider's rejected offers under one rule: how many, and the offers (the first are listed)."""

    provider: str
    rule: int
    count: int
    offers: list[Offer]
    capabilities: tuple[str, ...]
    listed: int = 0


def _listed(groups: list[_Rejected], limit: int) -> list[tuple[_Rejected, Offer]]:
    """The rejected offers to list one by one: all of them up to ``limit``; beyond it, a fair share of
    each provider's reasons (round robin over the groups), so every reason has an example."""
    if sum(g.count for g in groups) <= limit:
        return [(g, o) for g in groups for o in g.offers]
    picked: list[tuple[_Rejected, Offer]] = []
    depth = 0
    while len(picked) < limit:
        row = [(g, g.offers[depth]) for g in groups if depth < len(g.offers)]
        if not row:
            break
        picked.extend(row[:limit - len(picked)])
        depth += 1
    return picked


def _in_listing_order(listed: list[tuple[_Rejected, Offer]],
                      listings: Mapping[str, list[Offer]]) -> list[tuple[_Rejected, Offer]]:
    """The listed rejections in the order the providers listed the offers (rare: only when an offer key
    appears twice, so that the later offer's reason stands, as it did when offers were filtered one by one)."""
    names = {group.provider for group, _ in listed}
    position = {id(offer): (p, i) for p, (name, offers) in enumerate(listings.items()) if name in names
                for i, offer in enumerate(offers)}
    return sorted(listed, key=lambda pair: position[id(pair[1])])


def place(
    providers: Mapping[str, Provider],
    kind: str,
    spec: dict[str, Any],
    requirements: Requirements,
    timeout_seconds: int,
    excluded: set[str] | None = None,
    *,
    policy: RoutingPolicy | None = None,
    stats: ProviderStats | None = None,
    seed: str = "",
    busy: set[str] | None = None,
    monitor: Mapping[str, HealthView] | None = None,
    turns: TurnCounter | None = None,
) -> Placement:
    """``stats``: measured (latency ms, error rate) per provider, for latency limits and the score;
    ``busy``: offers that were full moments ago (they count as full: the job waits rather than fails);
    ``monitor``: the health monitor's views (``services.health.snapshot()``): a fresh one is used instead
    of asking the provider's ``health()``; ``turns``: whose turn it is under ``round_robin`` (default: the
    counter every worker shares, ``services.turns.shared_turns()``)."""
    policy = policy or routing_policy()
    data = residency.resolve(policy.residency, requirements.data_class)
    strategy = requirements.strategy or policy.strategy
    excluded = excluded or set()
    rules = _Filter(requirements, kind, spec, timeout_seconds, excluded, data, busy)
    rejected: dict[str, str] = {}  # provider-level now; the listed offers are added at the end
    groups: list[_Rejected] = []
    fits: list[Offer] = []
    costs: list[float] = []
    sources: list[Source] = []
    most_capacity = 0
    listings: dict[str, list[Offer]] = {}  # each provider's offers as it listed them
    down = False  # a provider that may come back (unhealthy, API error): worth waiting for
    if requirements.providers:
        for name in requirements.providers:
            if name not in providers:
                rejected[name] = "not a configured provider"
    for name, provider in providers.items():
        if requirements.providers and name not in requirements.providers:
            rejected[name] = "provider not allowed by the job"
            continue
        if requirements.exclude_providers and name in requirements.exclude_providers:
            rejected[name] = "provider excluded by the job"
            continue
        latency, error_rate = stats(name) if stats else (None, 0.0)
        if requirements.max_latency_ms is not None and latency is not None and latency > requirements.max_latency_ms:
            rejected[name] = f"too slow: {latency:.0f} ms measured > {requirements.max_latency_ms:.0f} ms"
            continue
        try:
            healthy, unhealthy_reason = _health(name, provider, monitor)
            offers = provider.offers(requirements, kind, spec) if healthy else []
        except ProviderError as exc:
            rejected[name] = f"unavailable: {exc}"
            down = down or not isinstance(exc, PermanentProviderError)
            continue
        except Exception as exc:  # an adapter bug must not stop placement on every other provider
            log.exception("provider %s failed while listing offers", name)
            rejected[name] = f"unavailable: internal error ({type(exc).__name__})"
            continue
        if not healthy:
            rejected[name] = unhealthy_reason
            down = True
            continue
        capabilities = tuple(provider.capabilities)
        source = Source(kind=getattr(provider, "kind", ProviderKind.marketplace), tier=provider.tier,
                        latency_ms=latency, error_rate=error_rate, weight=provider.weight, priority=provider.priority,
                        last_resort=provider.last_resort, capabilities=capabilities)
        if not isinstance(offers, list):
            offers = list(offers)
        listings[name] = offers
        scan = rules.scan(offers, capabilities)
        fits += scan.fits
        costs += scan.costs
        sources += [source] * len(scan.fits)
        most_capacity = max(most_capacity, scan.most_capacity)
        groups.extend(_Rejected(name, rule, len(these), these, capabilities)
                      for rule, these in enumerate(scan.rejected) if these)
    offers_rejected = sum(g.count for g in groups)
    everything_listed = offers_rejected <= MAX_LISTED_REJECTIONS
    listed = _listed(groups, MAX_LISTED_REJECTIONS)
    if everything_listed and len({offer_key(offer) for _, offer in listed}) < len(listed):
        listed = _in_listing_order(listed, listings)  # a key listed twice: the later offer's reason stands
    for group, offer in listed:
        rejected[offer_key(offer)] = rules.describe(group.rule, offer, group.capabilities)
        group.listed += 1
    # All listed: the dict's size, as it always was (an offer listed twice counts once); else the sum.
    total = len(rejected) if everything_listed else len(rejected) - sum(g.listed for g in groups) + offers_rejected
    summary = _summary(groups, rules)
    if not fits:
        detail = _detail(rejected, summary, everything_listed) or "no provider offers this kind of job"
        # Listed in full, the listing decides (as it always did: of an offer key seen twice, the later reason);
        # otherwise the counts do, since a full offer may not be among those listed.
        full = (NO_FREE_CAPACITY in rejected.values() if everything_listed
                else any(g.rule in (FULL, BUSY) for g in groups))
        if full:
            raise CapacityBusy(f"every fitting offer is full ({detail})")
        if down:
            raise CapacityBusy(f"nothing fits now and a provider is unavailable ({detail})")
        raise NoPlacement(f"no offer meets the job's constraints ({detail})")
    if strategy == "round_robin" and turns is None:
        turns = _shared_turns()
    ranking = Ranking(fits, costs, sources, strategy, weights=policy.weights, seed=seed,
                      failover_order=requirements.failover_order, value_per_1k=requirements.max_price_per_1k_tokens,
                      hybrid_threshold_per_1k=policy.hybrid_threshold_per_1k, turns=turns, most_capacity=most_capacity)
    first = ranking[0].option
    best, cost = first.offer, first.estimated_cost
    runner_up = (f"; next best {offer_key(ranking[1].option.offer)} at ~${ranking[1].option.estimated_cost:.4f}"
                 if len(ranking) > 1 else "")
    price = f"${best.price_per_1k_tokens}/1K tokens" if usage_priced(best, kind) else f"${best.price_per_hour:.2f}/h"
    if first.last_resort:
        how = "last resort, nothing else fits"
    elif strategy == "lowest_cost":
        how = f"cheapest of {len(ranking)} fitting offers"
    else:
        how = f"{strategy}: first of {len(ranking)} fitting offers"
    rationale = (f"{how}: {offer_key(best)} ({best.gpu or 'cpu'}, {best.region}, "
                 f"{price}, est. ${cost:.4f}){runner_up}; {total} rejected")
    placement = Placement(provider=best.provider, offer=best, estimated_cost=round(cost, 6), rationale=rationale,
                          considered=len(ranking) + total, rejected=rejected, strategy=strategy, data_class=data.name,
                          rejected_total=total, rejected_summary=summary,
                          scores=[_explained(r) for r in ranking[:MAX_SCORES]])
    placement._candidates = _Candidates(ranking)
    return placement


def _summary(groups: list[_Rejected], rules: _Filter) -> list[dict[str, Any]]:
    """Rejected offers counted per provider and reason (full and busy offers are one reason), most common
    first within each provider."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for g in groups:
        reason = rules.category(g.rule)
        row = merged.setdefault((g.provider, reason), {"provider": g.provider, "reason": reason, "count": 0, "listed": 0})
        row["count"] += g.count
        row["listed"] += g.listed
    order = {name: i for i, name in enumerate(dict.fromkeys(g.provider for g in groups))}
    return sorted(merged.values(), key=lambda r: (order[r["provider"]], -r["count"]))


def _detail(rejected: dict[str, str], summary: list[dict[str, Any]], everything_listed: bool) -> str:
    """The rejections for an error message, on one line: each listed one, then what was only counted."""
    detail = "; ".join(f"{k}: {v}" for k, v in sorted(rejected.items()))
    if everything_listed:
        return detail
    unlisted = [r for r in summary if r["count"] > r["listed"]]
    rest = "; ".join(f"{r['provider']}: {r['count'] - r['listed']:,} × {r['reason']}" for r in unlisted)
    hidden = sum(r["count"] - r["listed"] for r in unlisted)
    return f"{detail}; and {hidden:,} more offers ({rest})"


class _Candidates(Sequence[Candidate]):
    """``Placement.candidates``: the ranking's options as candidates, each built when first read."""

    def __init__(self, ranking: Ranking) -> None:
        self._ranking = ranking
        self._made: dict[int, Candidate] = {}

    def __len__(self) -> int:
        return len(self._ranking)

    @overload
    def __getitem__(self, index: int) -> Candidate: ...

    @overload
    def __getitem__(self, index: slice) -> list[Candidate]: ...

    def __getitem__(self, index: int | slice) -> Candidate | list[Candidate]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        made = self._made.get(index)
        if made is None:
            option = self._ranking[index].option
            made = self._made[index] = Candidate.model_construct(offer=option.offer, estimated_cost=option.estimated_cost)
        return made

    def __iter__(self) -> Iterator[Candidate]:
        for index in range(len(self)):
            yield self[index]


def _shared_turns() -> TurnCounter:
    """The deployment-wide turn counter, looked up only for round_robin jobs: every other strategy places
    without touching Redis. Imported here, not at the top, because the services layer builds on this one."""
    from orchestrator.services.turns import shared_turns

    return shared_turns()


def _health(name: str, provider: Provider, monitor: Mapping[str, HealthView] | None) -> tuple[bool, str]:
    """(routable, why not): the monitor's fresh verdict if it has one (no call to the provider), else the
    provider's own answer, as when no monitor runs."""
    view = monitor.get(name) if monitor else None
    if view is not None and view.fresh:
        return routable(view)
    health = provider.health()
    return health.ok, f"unhealthy: {health.detail}"


def _explained(ranked: Ranked) -> dict[str, Any]:
    o = ranked.option
    return {"offer": offer_key(o.offer), "tier": o.tier, "estimated_cost": round(o.estimated_cost, 6),
            "price_per_hour": o.offer.price_per_hour, "price_per_1k_tokens": o.offer.price_per_1k_tokens,
            "region": o.offer.region, "latency_ms": o.latency_ms, "error_rate": round(o.error_rate, 4),
            "free_capacity": o.offer.capacity, "score": ranked.score, "components": ranked.components}
