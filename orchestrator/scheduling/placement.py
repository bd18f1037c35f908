"""Placement: choose the provider and offer for a job, and say why.

Candidates → filters (requirements, residency, health; each rejection keeps its reason) →
ranking by the job's strategy (``strategies.py``: every option scored) → a Placement carrying
its rationale, the scores of what it considered, and the ordered failover list. Scheduling
policy lives here and in ``strategies.py`` / ``residency.py``, nowhere else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from orchestrator.errors import CapacityBusy, NoPlacement
from orchestrator.scheduling import residency
from orchestrator.scheduling.breaker import HealthView, routable
from orchestrator.scheduling.residency import Policy
from orchestrator.scheduling.strategies import Option, Ranked, TurnCounter, Weights, default_tier, rank
from providers.base import Offer, PermanentProviderError, Provider, ProviderError, ProviderKind, Requirements
from providers.gpus import any_gpu_matches
from providers.regions import any_region_matches

log = logging.getLogger(__name__)

# Rough run lengths used only to compare per-hour and per-token prices fairly.
_ESTIMATED_SECONDS = {"inference": 30, "transcription": 120, "training": 3600, "distillation": 600, "command": 60}


NO_FREE_CAPACITY = "no free capacity"
MAX_SCORES = 20


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
    rejected: dict[str, str]
    strategy: str = "lowest_cost"
    data_class: str | None = None
    # The fitting options as ranked (best first, at most MAX_SCORES): the "why" of the choice.
    scores: list[dict[str, Any]] = Field(default_factory=list)
    # Every fitting offer, best first: the budget check walks down this list. Not stored with the job.
    candidates: list[Candidate] = Field(default_factory=list, exclude=True)

    def choose(self, index: int, budget_rejected: dict[str, str]) -> Placement:
        """The placement after the budget check skipped the first ``index`` candidates."""
        if index == 0 and not budget_rejected:
            return self
        pick = self.candidates[index]
        skipped = f"; {index} cheaper offer(s) over budget" if index else ""
        return self.model_copy(update={
            "provider": pick.offer.provider, "offer": pick.offer, "estimated_cost": round(pick.estimated_cost, 6),
            "rationale": f"cheapest within budget: {offer_key(pick.offer)} (${pick.offer.price_per_hour:.2f}/h, "
                         f"est. ${pick.estimated_cost:.4f}){skipped}; {len(self.rejected) + len(budget_rejected)} rejected",
            "rejected": {**self.rejected, **budget_rejected}})


def offer_key(offer: Offer) -> str:
    return f"{offer.provider}/{offer.offer_id}"


def usage_priced(offer: Offer, kind: str) -> bool:
    """Billed per token for this kind of job, not per hour of capacity."""
    return offer.price_per_1k_tokens is not None and kind in ("inference", "transcription")


def estimate_cost(offer: Offer, kind: str, spec: dict[str, Any], timeout_seconds: int) -> float:
    if offer.price_per_1k_tokens is not None and usage_priced(offer, kind):
        tokens = int(spec.get("max_tokens", 256)) + 200
        return offer.price_per_1k_tokens * tokens / 1000
    seconds = min(_ESTIMATED_SECONDS.get(kind, 60), timeout_seconds)
    return offer.price_per_hour * seconds / 3600


def rejection(offer: Offer, req: Requirements, kind: str, excluded: set[str]) -> str | None:
    """Why this offer cannot take the job, or None if it can."""
    if offer_key(offer) in excluded:
        return "failed this job before"
    if kind not in offer.kinds:
        return f"does not run {kind} jobs"
    if req.needs_gpu():
        if not offer.gpu:
            return "no GPU"
        if req.gpu and not any_gpu_matches(offer.gpu, req.gpu):
            return f"GPU {offer.gpu} not in {req.gpu}"
        if offer.gpu_count < max(1, req.gpu_count):
            return f"{offer.gpu_count} GPUs < {req.gpu_count}"
        if req.min_gpu_memory_gb and offer.gpu_memory_gb < req.min_gpu_memory_gb:
            return f"{offer.gpu_memory_gb:g} GB GPU memory < {req.min_gpu_memory_gb:g}"
    if req.max_price_per_hour is not None and not usage_priced(offer, kind) and offer.price_per_hour > req.max_price_per_hour:
        return f"${offer.price_per_hour:.2f}/h > max ${req.max_price_per_hour:.2f}/h"
    if (req.max_price_per_1k_tokens is not None and offer.price_per_1k_tokens is not None
            and offer.price_per_1k_tokens > req.max_price_per_1k_tokens):
        return f"${offer.price_per_1k_tokens:g}/1K tokens > max ${req.max_price_per_1k_tokens:g}/1K"
    if req.context_window is not None and (offer.context_window or 0) < req.context_window:
        have = f"{offer.context_window} tokens" if offer.context_window else "not declared"
        return f"context window {have} < {req.context_window} needed"
    if req.capabilities:
        missing = sorted(set(req.capabilities) - {*offer.capabilities, *offer.kinds})
        if missing:
            return f"missing capability {', '.join(missing)}"
    if req.min_reliability is not None and offer.reliability < req.min_reliability:
        return f"reliability {offer.reliability:.3f} < {req.min_reliability}"
    if req.interruptible is False and offer.interruptible:
        return "interruptible (spot) capacity not allowed"
    if req.regions and not any_region_matches(offer.region, req.regions):
        return f"region {offer.region} not in {req.regions}"
    if offer.capacity <= 0:
        return NO_FREE_CAPACITY
    return None


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
    rejected: dict[str, str] = {}
    down = False  # a provider that may come back (unhealthy, API error): worth waiting for
    fits: list[Option] = []
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
        for offer in offers:
            if provider.capabilities:
                offer = offer.model_copy(update={"capabilities": [*offer.capabilities, *provider.capabilities]})
            reason = rejection(offer, requirements, kind, excluded) or data.rejection(offer)
            if reason is None and busy and offer_key(offer) in busy:
                reason = NO_FREE_CAPACITY
            if reason:
                rejected[offer_key(offer)] = reason
                continue
            provider_kind = getattr(provider, "kind", ProviderKind.marketplace)
            fits.append(Option(offer=offer, estimated_cost=estimate_cost(offer, kind, spec, timeout_seconds),
                               provider_kind=provider_kind, tier=provider.tier or default_tier(provider_kind, offer),
                               latency_ms=latency, error_rate=error_rate, weight=provider.weight,
                               priority=provider.priority, last_resort=provider.last_resort))
    if not fits:
        detail = "; ".join(f"{k}: {v}" for k, v in sorted(rejected.items())) or "no provider offers this kind of job"
        if any(reason == NO_FREE_CAPACITY for reason in rejected.values()):
            raise CapacityBusy(f"every fitting offer is full ({detail})")
        if down:
            raise CapacityBusy(f"nothing fits now and a provider is unavailable ({detail})")
        raise NoPlacement(f"no offer meets the job's constraints ({detail})")
    if strategy == "round_robin" and turns is None:
        turns = _shared_turns()
    ranked = rank(fits, strategy, weights=policy.weights, seed=seed, failover_order=requirements.failover_order,
                  value_per_1k=requirements.max_price_per_1k_tokens, hybrid_threshold_per_1k=policy.hybrid_threshold_per_1k,
                  turns=turns)
    first = ranked[0].option
    best, cost = first.offer, first.estimated_cost
    runner_up = (f"; next best {offer_key(ranked[1].option.offer)} at ~${ranked[1].option.estimated_cost:.4f}"
                 if len(ranked) > 1 else "")
    price = f"${best.price_per_1k_tokens}/1K tokens" if usage_priced(best, kind) else f"${best.price_per_hour:.2f}/h"
    if first.last_resort:
        how = "last resort, nothing else fits"
    elif strategy == "lowest_cost":
        how = f"cheapest of {len(ranked)} fitting offers"
    else:
        how = f"{strategy}: first of {len(ranked)} fitting offers"
    rationale = (f"{how}: {offer_key(best)} ({best.gpu or 'cpu'}, {best.region}, "
                 f"{price}, est. ${cost:.4f}){runner_up}; {len(rejected)} rejected")
    return Placement(provider=best.provider, offer=best, estimated_cost=round(cost, 6), rationale=rationale,
                     considered=len(ranked) + len(rejected), rejected=rejected, strategy=strategy,
                     data_class=data.name, scores=[_explained(r) for r in ranked[:MAX_SCORES]],
                     candidates=[Candidate(offer=r.option.offer, estimated_cost=r.option.estimated_cost) for r in ranked])


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
