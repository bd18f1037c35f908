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


# --- latency: the checks' and real requests' ---------------------------------------------------------


def test_latencies_read_the_old_list_and_the_new_object_and_keep_both_kinds() -> None:
    from orchestrator.services.health import MIN_REQUEST_SAMPLES, REQUEST_MAX_AGE_SECONDS, Latencies

    old = Latencies.load([12.0, 15.5, "junk", None, 20])  # the column before request latency was kept
    assert old.probe == (12.0, 15.5, 20.0) and old.request == () and old.request_ewma_ms is None
    assert Latencies.load(None) == Latencies() == Latencies.load({"request": "nonsense"})
    now = T0
    mixed = old.with_requests([100.0, 100.0, 400.0], now)
    assert mixed.probe == old.probe and mixed.request == (100.0, 100.0, 400.0) and mixed.request_at == now
    assert mixed.request_ewma_ms == pytest.approx(190.0)  # same average as the checks': 100 → 100 → 190
    assert Latencies.load(mixed.dump()) == mixed  # JSON round trip
    assert mixed.with_probe([3.0]).request == mixed.request  # a check replaces only the checks' samples
    full = mixed.with_requests([float(i) for i in range(MAX_SAMPLES + 5)], now)
    assert len(full.request) == MAX_SAMPLES and full.request[-1] == MAX_SAMPLES + 4
    assert not mixed.requests_trusted(now)  # 3 < MIN_REQUEST_SAMPLES
    enough = mixed.with_requests([200.0] * (MIN_REQUEST_SAMPLES - 3), now)
    assert enough.requests_trusted(now + timedelta(seconds=REQUEST_MAX_AGE_SECONDS))
    assert not enough.requests_trusted(now + timedelta(seconds=REQUEST_MAX_AGE_SECONDS + 1))  # aged out


def monitor_view(**changes: object) -> object:
    from orchestrator.services.health import MonitorView

    base = {"provider": "api", "healthy": True, "breaker": CLOSED, "latency_ewma_ms": 12.0, "latency_p95_ms": 20.0,
            "error_rate": 0.0, "consecutive_failures": 0, "detail": "", "checked_at": T0, "fresh": True,
            "request_latency_ewma_ms": 700.0, "request_latency_p95_ms": 900.0, "request_samples": 8,
            "request_measured_at": T0, "request_trusted": True}
    return MonitorView(**{**base, **changes})  # type: ignore[arg-type]


def test_placement_latency_prefers_real_requests_then_fresh_checks() -> None:
    trusted = monitor_view()
    assert (trusted.latency_ms, trusted.latency_source) == (900.0, "requests")  # type: ignore[attr-defined]
    no_beat = monitor_view(fresh=False)
    assert no_beat.latency_ms == 900.0  # type: ignore[attr-defined]  # requests need no beat to be measured
    few = monitor_view(request_trusted=False, request_samples=2)
    assert (few.latency_ms, few.latency_source) == (20.0, "health checks")  # type: ignore[attr-defined]
    nothing = monitor_view(request_trusted=False, fresh=False)
    assert (nothing.latency_ms, nothing.latency_source) == (None, None)  # type: ignore[attr-defined]
    assert routable(trusted) == (True, "")  # type: ignore[arg-type]  # still a HealthView for placement


def test_request_latency_of_a_finished_job() -> None:
    from orchestrator.services.health import request_latency_ms
    from providers.base import Lease, RunHandle

    def handle(reserved_at: float, **data: object) -> RunHandle:
        lease = Lease(provider="api", offer_id="m", external_id="x", label="gpufleet-1", price_per_hour=0.0,
                      reserved_at=reserved_at)
        return RunHandle(provider="api", lease=lease, started_at=reserved_at + 0.8, data=dict(data))

    # A model API answers inside start(): from reserving to the answer, not the run's ~0 s "duration".
    assert request_latency_ms("inference", handle(1000.0), {"text": "hi"}, now=1000.85) == pytest.approx(850.0)
    assert request_latency_ms("transcription", handle(1000.0), None, now=1002.0) == pytest.approx(2000.0)
    # What the provider itself reports wins: it knows when the model answered.
    assert request_latency_ms("inference", handle(1000.0), {"latency_ms": 412.5}, now=1009.0) == 412.5
    assert request_latency_ms("training", handle(1000.0), {}, now=4600.0) is None  # a job's size, not latency
    assert request_latency_ms("command", handle(1000.0), {}, now=1001.0) is None
    assert request_latency_ms("inference", handle(1000.0, on_reservation="r-1"), {}, now=1001.0) is None
    assert request_latency_ms("inference", handle(0.0), {}, now=1001.0) is None  # no reserve time known
    assert request_latency_ms("inference", handle(1000.0), {}, now=999.0) is None  # clocks disagree


@pytest.fixture()
def embedded_health(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """The health monitor on the embedded default: a SQLite file, no beat, no Redis."""
    import os

    from orchestrator.db.engine import reset_engines
    from orchestrator.db.migrate import upgrade
    from orchestrator.services import health
    from orchestrator.settings import get_settings
    from providers.registry import _cache as providers_cache

    for name in [k for k in os.environ if k.startswith("GPUFLEET_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("GPUFLEET_DATA_DIR", str(tmp_path))

    def fresh() -> None:
        get_settings.cache_clear()
        reset_engines()
        providers_cache.clear()
        health._requests.reset()
        health._forget()

    fresh()
    upgrade(get_settings().database_url)
    yield health
    health.flush_request_latencies()
    fresh()


def test_request_latencies_and_checks_share_the_row_without_losing_each_other(embedded_health) -> None:  # type: ignore[no-untyped-def]
    health = embedded_health
    for ms in (800.0, 820.0, 790.0, 2000.0):
        health.record_outcome("local", True, latency_ms=ms)
    health.record_outcome("local", False, latency_ms=5.0, detail="start failed")  # a fast error is not fast
    health.flush_request_latencies()
    few = health.snapshot(max_age=0)["local"]
    assert few.request_samples == 4 and few.request_latency_p95_ms == 2000.0 and not few.request_trusted
    assert health.stats("local") == (None, 0.0)  # 4 samples and no checks yet: unmeasured

    health.probe_all()  # the beat's check rewrites the checks' samples and keeps the requests'
    checked = health.snapshot(max_age=0)["local"]
    assert checked.fresh and checked.latency_p95_ms is not None and checked.latency_p95_ms < 800
    assert checked.request_samples == 4 and checked.latency_source == "health checks"
    assert health.stats("local")[0] == checked.latency_p95_ms

    health.record_outcome("local", True, latency_ms=810.0)  # the fifth: requests now decide
    health.flush_request_latencies()
    measured = health.snapshot(max_age=0)["local"]
    assert measured.request_samples == 5 and measured.latency_source == "requests"
    assert measured.latency_p95_ms == checked.latency_p95_ms  # the checks' samples survived the write
    assert measured.request_latency_ewma_ms is not None and 800 < measured.request_latency_ewma_ms < 2000
    health._forget()
    assert health.stats("local") == (2000.0, measured.error_rate)


def test_request_latencies_are_written_once_a_second_per_process(embedded_health) -> None:  # type: ignore[no-untyped-def]
    import time

    health = embedded_health
    health.record_outcome("sandbox", True, latency_ms=100.0)  # the first in a while: written at once
    assert health.snapshot(max_age=0)["sandbox"].request_samples == 1
    for ms in (110.0, 120.0, 130.0):
        health.record_outcome("sandbox", True, latency_ms=ms)  # batched for this process's next write
    assert health.snapshot(max_age=0)["sandbox"].request_samples == 1
    deadline = time.monotonic() + 5
    while health.snapshot(max_age=0)["sandbox"].request_samples < 4:  # the timer writes them as one batch
        assert time.monotonic() < deadline, "the batch was never written"
        time.sleep(0.05)
    assert health.snapshot(max_age=0)["sandbox"].request_latency_p95_ms == 130.0
