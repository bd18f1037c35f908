"""The health monitor end to end: our API, worker and beat on Postgres and Redis, two OpenAI-compatible
APIs (emulated) serving the same model at different prices.

Users judge this on: a provider that goes down stops getting work within moments — jobs go to the
next one and say why — it gets work back on its own once it recovers, placement does not knock on
every provider's door for every job, and `gpufleet providers` shows what the breaker thinks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.emulators.llm_apis import OpenAIEmulator

from .conftest import KEY_A, Stack, isolated_stack

KEY = "sk-test-" + "h" * 24
INTERVAL = 1.0
OPEN_SECONDS = 3.0


def _providers_yaml(cheap: str, dear: str) -> str:
    return f"""
providers:
  cheap:
    type: openai_api
    base_url: "{cheap}/v1"
    api_key_env: GPUFLEET_TEST_HEALTH_KEY
    health_ttl: 0
    models:
      llama-3-8b: {{input_per_1k: 0.0001, output_per_1k: 0.0002}}
  dear:
    type: openai_api
    base_url: "{dear}/v1"
    api_key_env: GPUFLEET_TEST_HEALTH_KEY
    health_ttl: 0
    models:
      llama-3-8b: {{input_per_1k: 0.001, output_per_1k: 0.002}}
"""


@pytest.fixture(scope="module")
def apis() -> Iterator[tuple[OpenAIEmulator, OpenAIEmulator]]:
    with OpenAIEmulator(api_key=KEY, models=["llama-3-8b"]) as cheap, OpenAIEmulator(api_key=KEY, models=["llama-3-8b"]) as dear:
        yield cheap, dear


@pytest.fixture(scope="module")
def health_stack(apis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    env = {"GPUFLEET_TEST_HEALTH_KEY": KEY, "GPUFLEET_HEALTH_INTERVAL_SECONDS": str(INTERVAL),
           "GPUFLEET_BREAKER_FAILURES": "2", "GPUFLEET_BREAKER_OPEN_SECONDS": str(OPEN_SECONDS)}
    with isolated_stack(tmp_path_factory.mktemp("health"), 6, _providers_yaml(apis[0].url, apis[1].url), env) as running:
        yield running


@pytest.fixture()
def client(health_stack: Stack):  # type: ignore[no-untyped-def]
    from orchestrator.sdk import Client

    with Client(health_stack.url, KEY_A) as c:
        yield c


def _eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout}s")


def _breakers(client) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    return {p["name"]: p for p in client.providers()}


def _monitor() -> dict[str, Any]:
    """The monitor's rows as every worker reads them (this process shares the stack's database)."""
    from orchestrator.services import health

    return health.snapshot(max_age=0)


def _chat(client, text: str):  # type: ignore[no-untyped-def]
    job = client.submit("inference", {"model": "llama-3-8b", "messages": [{"role": "user", "content": text}],
                                      "max_tokens": 8}, max_attempts=3)
    return client.wait(job.id, timeout=30)


def test_an_outage_opens_the_breaker_traffic_moves_and_comes_back(client, apis) -> None:  # type: ignore[no-untyped-def]
    cheap, dear = apis
    _eventually(lambda: {n: (v.breaker, v.fresh) for n, v in _monitor().items()} == {
        "cheap": ("closed", True), "dear": ("closed", True)}, 20, "the monitor never checked both providers")

    # (a) Healthy: the cheap API serves, and placement trusts the monitor instead of asking it per job.
    asked_before, started = len(cheap.requests("/v1/models")), time.monotonic()
    jobs = [client.submit("inference", {"model": "llama-3-8b", "prompt": f"hello {i}", "max_tokens": 8})
            for i in range(8)]
    done = [client.wait(j.id, timeout=30) for j in jobs]
    assert all(j.status.value == "succeeded" and j.provider == "cheap" for j in done), [(j.provider, j.error) for j in done]
    checks = len(cheap.requests("/v1/models")) - asked_before
    assert checks <= (time.monotonic() - started) / INTERVAL + 2, f"{checks} health checks for 8 jobs"

    # (b) Outage: within moments the breaker opens and new work goes to the dearer API, saying why.
    cheap.down()
    went_down = time.monotonic()
    _eventually(lambda: _monitor()["cheap"].breaker == "open", 10, "the breaker never opened")
    opened_after = time.monotonic() - went_down
    assert opened_after < 2 * INTERVAL + 3, f"took {opened_after:.1f}s"
    moved = _chat(client, "still there?")
    assert moved.status.value == "succeeded" and moved.provider == "dear", moved.error
    reason = moved.placement["rejected"]["cheap"]
    assert reason.startswith("circuit open: ") and "consecutive failures" in reason, reason

    # (d) GET /v1/providers (and `gpufleet providers`) shows the breaker and what it measured.
    shown = _breakers(client)
    assert shown["cheap"]["breaker"] in ("open", "half_open") and shown["cheap"]["error_rate"] > 0
    assert shown["cheap"]["consecutive_failures"] >= 2 and not shown["cheap"]["healthy"]
    assert shown["dear"]["breaker"] == "closed" and shown["dear"]["error_rate"] == 0
    assert shown["dear"]["latency_p95_ms"] is not None and shown["dear"]["latency_ewma_ms"] is not None

    # (c) Recovery: after open_seconds the next check is the half-open trial; it passes, cheap serves again.
    cheap.up()
    came_back = time.monotonic()
    _eventually(lambda: _monitor()["cheap"].breaker == "closed", OPEN_SECONDS + 10, "the breaker never closed")
    assert time.monotonic() - came_back < OPEN_SECONDS + 2 * INTERVAL + 3
    back = _chat(client, "welcome back")
    assert back.status.value == "succeeded" and back.provider == "cheap", back.error
    assert "cheap" not in back.placement["rejected"]


def test_outcomes_of_real_work_feed_the_same_breaker(health_stack) -> None:  # type: ignore[no-untyped-def]
    """record_outcome's one-statement UPDATE follows the same rules as the checks (breaker.observe)."""
    from orchestrator.services import health

    health.record_outcome("ghost", False, detail="start failed: connection reset")  # creates the row
    assert _monitor()["ghost"].breaker == "closed"
    health.record_outcome("ghost", False, detail="start failed: connection reset")
    opened = _monitor()["ghost"]
    assert (opened.breaker, opened.consecutive_failures, opened.detail) == ("open", 2, "start failed: connection reset")
    ok, why = health.routable(opened)
    rate = f"{opened.error_rate:.0%}"
    assert not ok and why == f"circuit open: 2 consecutive failures (error rate {rate}): start failed: connection reset"
    health.record_outcome("ghost", True)  # a late success while resting changes the counts, not the breaker
    resting = _monitor()["ghost"]
    assert resting.breaker == "open" and resting.consecutive_failures == 0
    time.sleep(OPEN_SECONDS + 0.2)
    assert _monitor()["ghost"].breaker == "half_open"
    health.record_outcome("ghost", True)  # the trial
    assert _monitor()["ghost"].breaker == "closed"


def test_latency_limits_use_what_real_requests_took_not_the_checks(client) -> None:  # type: ignore[no-untyped-def]
    """The cheap API answers its checks in milliseconds; say its real requests have been taking 2.5 s
    (as the pipeline reports finished jobs): jobs that need an answer within a second go elsewhere."""
    from orchestrator.services import health

    _eventually(lambda: _monitor()["cheap"].fresh and _monitor()["cheap"].breaker == "closed", 20, "cheap never checked")
    for _ in range(10):
        health.record_outcome("cheap", True, latency_ms=2500.0)
    health.flush_request_latencies()
    time.sleep(2 * INTERVAL + health.CACHE_SECONDS)  # beats rewrite the row meanwhile; workers' caches expire
    view = _monitor()["cheap"]
    assert view.request_latency_p95_ms == 2500.0 and view.request_samples >= 10, view  # kept through the beats
    assert view.latency_p95_ms is not None and view.latency_p95_ms < 1000 and view.fresh  # the checks': fast
    assert (view.latency_source, view.latency_ms) == ("requests", 2500.0)

    shown = _breakers(client)["cheap"]  # GET /v1/providers: both latencies, and which one placement uses
    assert shown["request_latency_p95_ms"] == 2500.0 and shown["request_latency_ewma_ms"] > 1000
    assert shown["latency_p95_ms"] < 1000 and shown["request_latency_samples"] >= 10
    assert (shown["latency_source"], shown["placement_latency_ms"]) == ("requests", 2500.0)

    job = client.submit("inference", {"model": "llama-3-8b", "prompt": "quick!", "max_tokens": 8},
                        requirements={"max_latency_ms": 1000})
    done = client.wait(job.id, timeout=30)
    assert done.status.value == "succeeded" and done.provider == "dear", (done.provider, done.error)
    assert done.placement["rejected"]["cheap"] == "too slow: 2500 ms measured > 1000 ms"
    relaxed = _chat(client, "no hurry")  # without a limit the cheapest still serves
    assert relaxed.status.value == "succeeded" and relaxed.provider == "cheap", relaxed.error
