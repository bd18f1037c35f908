"""Routing strategies: each orders the same fitting options differently, every option keeps its score."""

from __future__ import annotations

from collections import Counter

import pytest

from orchestrator.scheduling.strategies import STRATEGIES, Option, Weights, default_tier, rank, score_all
from providers.base import Offer, ProviderKind


def _option(provider: str, cost: float, kind: ProviderKind, *, latency: float | None = None, errors: float = 0.0,
            capacity: int = 4, interruptible: bool = False, per_1k: float | None = None, weight: float = 1.0,
            priority: int | None = None, tier: str | None = None, last_resort: bool = False) -> Option:
    offer = Offer(provider=provider, offer_id="o", capacity=capacity, interruptible=interruptible,
                  price_per_1k_tokens=per_1k, kinds=["inference"])
    return Option(offer=offer, estimated_cost=cost, provider_kind=kind, tier=tier or default_tier(kind, offer),
                  latency_ms=latency, error_rate=errors, weight=weight, priority=priority, last_resort=last_resort)


OPTIONS = [
    _option("onprem", 0.004, ProviderKind.self_hosted, latency=300, per_1k=0.002),
    _option("vast-spot", 0.003, ProviderKind.marketplace, latency=900, interruptible=True),
    _option("openai", 0.001, ProviderKind.model_api, latency=600, per_1k=0.0005),
    _option("groq", 0.002, ProviderKind.model_api, latency=120, errors=0.4, per_1k=0.0008),
]


def _order(strategy: str, options: list[Option] = OPTIONS, **kwargs: object) -> list[str]:
    return [r.option.offer.provider for r in rank(options, strategy, **kwargs)]  # type: ignore[arg-type]


def test_each_strategy_has_its_own_order() -> None:
    assert _order("lowest_cost") == ["openai", "groq", "vast-spot", "onprem"]
    assert _order("lowest_latency") == ["groq", "onprem", "openai", "vast-spot"]
    assert _order("tiered") == ["onprem", "vast-spot", "openai", "groq"]  # primary, secondary, tertiary
    assert _order("cluster_first")[0] == "onprem"
    assert _order("external_first")[:2] == ["openai", "groq"]
    assert _order("failover", failover_order=["groq", "onprem"])[:2] == ["groq", "onprem"]


def test_score_combines_cost_latency_errors_and_capacity() -> None:
    ranked = {r.option.offer.provider: r for r in score_all(OPTIONS, Weights())}
    assert ranked["openai"].components["cost"] == 0.0 and ranked["onprem"].components["cost"] == 1.0
    assert ranked["groq"].components["latency"] == 0.0 and ranked["groq"].components["errors"] == 0.4
    assert all(r.score == pytest.approx(sum(r.components.values()), abs=1e-3) for r in ranked.values())
    # With errors weighted heavily, the flaky provider loses its latency edge.
    assert _order("score", weights=Weights(cost=0.1, latency=1.0, errors=5.0, capacity=0))[0] == "onprem"


def test_hybrid_sends_cheap_requests_to_own_clusters_and_the_rest_to_the_cheapest_api() -> None:
    assert _order("hybrid", value_per_1k=0.0005, hybrid_threshold_per_1k=0.001)[0] == "onprem"
    assert _order("hybrid", value_per_1k=0.01, hybrid_threshold_per_1k=0.001)[:2] == ["openai", "groq"]
    # External remains the fallback of cluster-bound requests, and the other way round.
    assert _order("hybrid", value_per_1k=0.0005, hybrid_threshold_per_1k=0.001)[1:3] == ["openai", "groq"]


def test_weighted_random_follows_weights_and_is_reproducible_per_job() -> None:
    options = [_option("big", 1.0, ProviderKind.model_api, weight=3.0), _option("small", 1.0, ProviderKind.model_api)]
    firsts = Counter(_order("weighted_random", options, seed=f"job-{i}")[0] for i in range(2000))
    assert 0.70 < firsts["big"] / 2000 < 0.80  # 3:1
    assert _order("weighted_random", options, seed="job-7") == _order("weighted_random", options, seed="job-7")


def test_round_robin_takes_turns() -> None:
    firsts = Counter(_order("round_robin")[0] for _ in range(40))
    assert set(firsts) == {"onprem", "vast-spot", "openai", "groq"} and max(firsts.values()) == 10


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_last_resort_comes_last_in_every_strategy(strategy: str) -> None:
    options = [*OPTIONS, _option("fallback", 0.0, ProviderKind.model_api, latency=1, last_resort=True, weight=100,
                                 priority=0, tier="primary")]
    assert _order(strategy, options, failover_order=["fallback"])[-1] == "fallback"


# --- Ranking orders lazily and by threshold: it must give exactly what a full sort gives ------------------

def _reference_rank(options: list[Option], strategy: str, *, weights: Weights | None = None, seed: str = "",
                    failover_order: list[str] | None = None, value_per_1k: float | None = None,
                    hybrid_threshold_per_1k: float = 0.001, turns=None) -> list[tuple[Option, float, dict[str, float]]]:  # type: ignore[no-untyped-def]
    """The ranking as it was first written (score every option, sort them all): the specification."""
    import random

    from orchestrator.scheduling.strategies import TIERS, turn_key

    weights = weights or Weights()

    def normalised(values: list[float | None]) -> list[float]:
        known = [v for v in values if v is not None]
        if not known:
            return [0.0 for _ in values]
        low, high = min(known), max(known)
        return [1.0 if v is None else (0.0 if high - low <= 0 else (v - low) / (high - low)) for v in values]

    costs = normalised([o.estimated_cost for o in options])
    latencies = normalised([o.latency_ms for o in options])
    free = [max(0, o.offer.capacity) for o in options]
    most = max(free, default=0) or 1
    scored = []
    for o, c, lat, slots in zip(options, costs, latencies, free, strict=True):
        parts = {"cost": round(weights.cost * c, 4), "latency": round(weights.latency * lat, 4),
                 "errors": round(weights.errors * min(1.0, o.error_rate), 4),
                 "capacity": round(weights.capacity * (1 - slots / most), 4)}
        scored.append((o, round(sum(parts.values()), 4), parts))

    def cost(r):  # type: ignore[no-untyped-def]
        return (r[0].estimated_cost, -r[0].offer.reliability, f"{r[0].offer.provider}/{r[0].offer.offer_id}")

    tier = {name: i for i, name in enumerate(TIERS)}
    if strategy in ("score", "capability"):
        key = lambda r: (r[1], *cost(r))  # noqa: E731
    elif strategy == "lowest_latency":
        key = lambda r: (r[0].latency_ms is None, r[0].latency_ms or 0.0, *cost(r))  # noqa: E731
    elif strategy == "tiered":
        key = lambda r: (tier.get(r[0].tier, len(TIERS)), *cost(r))  # noqa: E731
    elif strategy == "cluster_first":
        key = lambda r: (not r[0].own, *cost(r))  # noqa: E731
    elif strategy == "external_first":
        key = lambda r: (not r[0].external, *cost(r))  # noqa: E731
    elif strategy == "hybrid":
        cheap = value_per_1k is not None and value_per_1k <= hybrid_threshold_per_1k
        if value_per_1k is None:
            external = [r[0].offer.price_per_1k_tokens for r in scored
                        if r[0].external and r[0].offer.price_per_1k_tokens is not None]
            cheap = bool(external) and min(external) <= hybrid_threshold_per_1k
        key = (lambda r: (not r[0].own, *cost(r))) if cheap else (lambda r: (not r[0].external, *cost(r)))
    elif strategy == "failover":
        order = {name: i for i, name in enumerate(failover_order or [])}
        key = lambda r: (order.get(r[0].offer.provider, len(order)),  # noqa: E731
                         r[0].priority if r[0].priority is not None else 1_000_000, *cost(r))
    elif strategy == "round_robin":
        providers = sorted({r[0].offer.provider for r in scored})
        start = turns(turn_key(providers)) % len(providers) if providers else 0
        turn = {name: (i - start) % len(providers) for i, name in enumerate(providers)}
        key = lambda r: (turn[r[0].offer.provider], *cost(r))  # noqa: E731
    elif strategy == "weighted_random":
        draw = random.Random(seed)
        providers = sorted({r[0].offer.provider for r in scored})
        weight = {r[0].offer.provider: max(r[0].weight, 1e-9) for r in scored}
        keys = {name: draw.random() ** (1 / weight[name]) for name in providers}
        key = lambda r: (-keys[r[0].offer.provider], *cost(r))  # noqa: E731
    else:
        key = cost
    return sorted(scored, key=lambda r: (r[0].last_resort, *key(r)))


def _random_options(rng, count: int) -> list[Option]:  # type: ignore[no-untyped-def]
    """Options built to collide: few distinct costs and reliabilities, provider names where the offer key
    and the provider name sort differently ("a-b/…" < "a/…"), exact duplicates, a last-resort provider."""
    kinds = [ProviderKind.marketplace, ProviderKind.self_hosted, ProviderKind.model_api, ProviderKind.serverless,
             ProviderKind.local]
    facts = {name: {"kind": rng.choice(kinds), "latency": rng.choice([None, 80.0, 120.0, 120.0]),
                    "errors": rng.choice([0.0, 0.05, 0.3]), "weight": rng.choice([1.0, 2.0, 0.5]),
                    "priority": rng.choice([None, 1, 2]), "tier": rng.choice([None, None, "primary", "tertiary", "odd"]),
                    "last_resort": name == "zz-fallback" and rng.random() < 0.7}
             for name in ("a", "a-b", "b", "c", "zz-fallback")}
    options = []
    for _ in range(count):
        name = rng.choice(list(facts))
        f = facts[name]
        offer = Offer(provider=name, offer_id=f"o{rng.randrange(count // 2 + 1)}", capacity=rng.choice([0, 1, 1, 4, 8]),
                      reliability=rng.choice([0.9, 0.95, 0.95, 0.99]), interruptible=rng.random() < 0.3,
                      price_per_1k_tokens=rng.choice([None, 0.0004, 0.002]), kinds=["inference"])
        cost = rng.choice([0.01, 0.02, 0.02, 0.05]) if rng.random() < 0.6 else round(rng.uniform(0.001, 0.1), 5)
        options.append(Option(offer=offer, estimated_cost=cost, provider_kind=f["kind"],
                              tier=f["tier"] or default_tier(f["kind"], offer), latency_ms=f["latency"],
                              error_rate=f["errors"], weight=f["weight"], priority=f["priority"],
                              last_resort=f["last_resort"]))
        if rng.random() < 0.05:
            options.append(options[-1])  # listed twice
    return options


@pytest.mark.parametrize("strategy", [*STRATEGIES, "unknown"])
def test_the_lazy_ranking_is_exactly_the_full_sort(strategy: str) -> None:
    import random

    from orchestrator.scheduling.strategies import LocalTurns, Ranking

    rng = random.Random(strategy)
    for trial in range(40):
        options = _random_options(rng, rng.choice([1, 2, 5, 40, 300]))
        kwargs = {"seed": f"job-{trial}", "failover_order": ["c", "a-b"], "weights": Weights(capacity=rng.choice([0.25, 3.0])),
                  "value_per_1k": rng.choice([None, 0.0001, 0.01])}
        expected = _reference_rank(options, strategy, turns=LocalTurns(), **kwargs)  # type: ignore[arg-type]
        for head in (1, 3, 32):
            ranking = Ranking.of(options, strategy, head=head, turns=LocalTurns(), **kwargs)
            first = [ranking[i] for i in range(min(head, len(options)))]  # the head alone, then everything
            got = [(r.option, r.score, r.components) for r in [*first, *list(ranking)[len(first):]]]
            assert [id(g[0]) for g in got] == [id(e[0]) for e in expected], (strategy, trial, head)
            assert [(g[1], g[2]) for g in got] == [(e[1], e[2]) for e in expected]
