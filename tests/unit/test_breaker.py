"""The circuit breaker: when a provider stops getting work, when it gets it back, and what placement is told."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.scheduling.breaker import (
    CLOSED,
    HALF_OPEN,
    MAX_SAMPLES,
    OPEN,
    BreakerConfig,
    BreakerState,
    HealthView,
    effective,
    ewma,
    observe,
    p95,
    routable,
)
from orchestrator.scheduling.placement import place
from providers.base import Health, Offer, Provider, ProviderKind, Requirements

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
CFG = BreakerConfig(failures=3, error_rate=0.5, min_samples=10, open_seconds=30)


def run(outcomes: str, state: BreakerState | None = None, start: datetime = T0, step: float = 1.0,
        config: BreakerConfig = CFG) -> BreakerState:
    """Apply outcomes one second apart: '+' success, '-' failure."""
    state = state or BreakerState()
    for i, mark in enumerate(outcomes):
        state = observe(state, mark == "+", start + timedelta(seconds=i * step), config)
    return state


def test_consecutive_failures_open_the_breaker_and_a_success_resets_the_count() -> None:
    assert run("--").breaker == CLOSED
    assert run("--+--").breaker == CLOSED
    opened = run("+---")
    assert (opened.breaker, opened.consecutive_failures, opened.opened_at) == (OPEN, 3, T0 + timedelta(seconds=3))


def test_error_rate_opens_the_breaker_only_after_enough_observations() -> None:
    # Alternating failures never reach 3 in a row, but the failure average climbs past 50%.
    flaky = run("-+--+--+--", config=BreakerConfig(failures=3, error_rate=0.5, min_samples=10))
    assert flaky.breaker == OPEN and flaky.consecutive_failures == 2 and flaky.error_rate > 0.5
    early = run("-+--+--+--", config=BreakerConfig(failures=3, error_rate=0.5, min_samples=11))
    assert early.breaker == CLOSED and early.error_rate > 0.5  # 10 observations < 11 needed


def test_open_turns_half_open_after_open_seconds_and_a_success_closes_it() -> None:
    opened = run("---")
    at = opened.opened_at
    assert at is not None
    assert effective(opened, at + timedelta(seconds=29), CFG) == OPEN
    assert effective(opened, at + timedelta(seconds=30), CFG) == HALF_OPEN
    still_open = observe(opened, True, at + timedelta(seconds=10), CFG)  # late success while resting: no change
    assert still_open.breaker == OPEN and still_open.opened_at == at and still_open.consecutive_failures == 0
    closed = observe(opened, True, at + timedelta(seconds=31), CFG)
    assert (closed.breaker, closed.opened_at, closed.consecutive_failures, closed.observations) == (CLOSED, None, 0, 0)


def test_a_failed_trial_reopens_the_breaker_for_another_full_period() -> None:
    opened = run("---")
    assert opened.opened_at is not None
    trial_at = opened.opened_at + timedelta(seconds=45)
    reopened = observe(opened, False, trial_at, CFG)
    assert reopened.breaker == OPEN and reopened.opened_at == trial_at
    assert effective(reopened, trial_at + timedelta(seconds=29), CFG) == OPEN
    # A failure while resting does not re-time it: only the trial does.
    resting = observe(opened, False, opened.opened_at + timedelta(seconds=5), CFG)
    assert resting.opened_at == opened.opened_at and resting.consecutive_failures == 4


def test_after_recovery_the_old_error_rate_needs_fresh_observations_to_reopen() -> None:
    flaky = run("-+--+--+--")
    assert flaky.breaker == OPEN and flaky.opened_at is not None
    recovered = observe(flaky, True, flaky.opened_at + timedelta(seconds=30), CFG)
    assert recovered.breaker == CLOSED and recovered.error_rate > 0.4
    one_more = observe(recovered, False, flaky.opened_at + timedelta(seconds=31), CFG)
    assert one_more.breaker == CLOSED  # 1 observation since closing, not 10


def test_latency_average_and_p95() -> None:
    assert ewma(None, 100.0, 0.3) == 100.0
    assert ewma(100.0, 200.0, 0.3) == pytest.approx(130.0)
    state = BreakerState()
    for i, ms in enumerate([100.0, 100.0, 400.0]):
        state = observe(state, True, T0 + timedelta(seconds=i), CFG, latency_ms=ms)
    assert state.latency_ewma_ms == pytest.approx(190.0)  # 100 → 100 → 100*0.7 + 400*0.3
    assert state.latency_samples == (100.0, 100.0, 400.0)
    assert p95([]) is None and p95([7.0]) == 7.0
    assert p95([float(v) for v in range(1, 101)]) == 95.0
    assert p95([float(v) for v in range(1, 21)]) == 19.0
    for i in range(MAX_SAMPLES + 10):
        state = observe(state, True, T0, CFG, latency_ms=float(i))
    assert len(state.latency_samples) == MAX_SAMPLES and state.latency_samples[-1] == MAX_SAMPLES + 9


def view(**changes: object) -> HealthView:
    base = {"provider": "api", "healthy": True, "breaker": CLOSED, "latency_ewma_ms": 12.0, "latency_p95_ms": 20.0,
            "error_rate": 0.0, "consecutive_failures": 0, "detail": "", "checked_at": T0, "fresh": True}
    return HealthView(**{**base, **changes})  # type: ignore[arg-type]


def test_routable_says_why_not() -> None:
    assert routable(view()) == (True, "")
    assert routable(view(breaker=OPEN, consecutive_failures=3, error_rate=0.488, detail="connection refused")) == (
        False, "circuit open: 3 consecutive failures (error rate 49%): connection refused")
    assert routable(view(healthy=False, detail="rate limited"))[1] == "unhealthy: rate limited"
    assert routable(view(breaker=HALF_OPEN))[1].startswith("circuit half-open")


class _Api(Provider):
    """A usage-priced API whose own health check says ok and counts how often it is asked."""

    kind = ProviderKind.model_api

    def __init__(self, name: str, price: float) -> None:
        super().__init__(name)
        self.price, self.asked = price, 0

    def health(self) -> Health:
        self.asked += 1
        return Health(ok=True)

    def offers(self, req: Requirements, kind: str, spec: dict[str, object]) -> list[Offer]:  # type: ignore[override]
        return [Offer(provider=self.name, offer_id="m", price_per_1k_tokens=self.price, kinds=["inference"], capacity=5)]


def test_placement_trusts_a_fresh_monitor_view_and_asks_the_provider_when_it_is_stale() -> None:
    cheap, dear = _Api("cheap", 0.0001), _Api("dear", 0.001)
    providers = {"cheap": cheap, "dear": dear}

    def go(monitor: dict[str, HealthView]) -> object:
        return place(providers, "inference", {"model": "m"}, Requirements(), 60, monitor=monitor)

    opened = view(provider="cheap", breaker=OPEN, consecutive_failures=3, detail="connection refused")
    placement = go({"cheap": opened, "dear": view(provider="dear")})
    assert placement.provider == "dear"  # type: ignore[attr-defined]
    assert placement.rejected["cheap"].startswith("circuit open: 3 consecutive failures")  # type: ignore[attr-defined]
    assert cheap.asked == dear.asked == 0  # fresh views: nobody was asked
    stale = go({"cheap": view(provider="cheap", breaker=OPEN, fresh=False)})
    assert stale.provider == "cheap" and cheap.asked == 1 and dear.asked == 1  # type: ignore[attr-defined]
