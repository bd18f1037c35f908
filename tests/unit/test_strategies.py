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
