"""Placement: the cheapest fitting offer wins, and every rejection says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import CapacityBusy, NoPlacement
from orchestrator.scheduling.placement import estimate_cost, offer_key, place
from orchestrator.scheduling.queues import provider_queue, queue_for
from providers.base import Health, JobSpec, Offer, Provider, ProviderKind, Requirements, TransientProviderError
from providers.local import LocalProvider
from providers.sandbox import SandboxProvider

OFFERS = [
    {"offer_id": "cheap-4090", "gpu": "RTX 4090", "gpu_memory_gb": 24, "region": "eu-se", "price_per_hour": 0.39,
     "capacity": 1},
    {"offer_id": "a100", "gpu": "A100", "gpu_memory_gb": 80, "region": "us-east", "price_per_hour": 1.29},
    {"offer_id": "h100", "gpu": "H100", "gpu_memory_gb": 80, "region": "us-west", "price_per_hour": 2.49},
    {"offer_id": "tokens", "gpu": "L4", "gpu_memory_gb": 24, "region": "us-east", "price_per_hour": 5.0,
     "price_per_1k_tokens": 0.0001, "kinds": ["inference"]},
]


@pytest.fixture()
def providers(tmp_path: Path) -> dict[str, object]:
    return {
        "local": LocalProvider("local", {"runs_dir": str(tmp_path / "runs"), "slots": 2}),
        "sandbox": SandboxProvider("sandbox", {"state_dir": str(tmp_path), "offers": OFFERS}),
    }


def _place(registry, kind="training", spec=None, excluded=None, **req):  # type: ignore[no-untyped-def]
    return place(registry, kind, spec or {"base_model": "m", "dataset_uri": "d"}, Requirements(**req), 3600, excluded)


def test_cheapest_fitting_gpu_offer_wins_with_rationale(providers) -> None:  # type: ignore[no-untyped-def]
    placement = _place(providers, gpu_count=1)
    assert placement.offer.offer_id == "cheap-4090"
    assert "cheapest of 3 fitting offers: sandbox/cheap-4090" in placement.rationale
    assert placement.rejected["local/local"] == "does not run training jobs"


def test_command_without_gpu_goes_to_the_free_local_machine(providers) -> None:  # type: ignore[no-untyped-def]
    placement = _place(providers, kind="command", spec={"command": ["true"]})
    assert (placement.provider, placement.estimated_cost) == ("local", 0.0)


@pytest.mark.parametrize(
    ("req", "winner", "rejected", "reason"),
    [
        ({"gpu": ["A100", "H100"]}, "a100", "sandbox/cheap-4090", "GPU RTX 4090 not in ['A100', 'H100']"),
        ({"min_gpu_memory_gb": 40}, "a100", "sandbox/cheap-4090", "24 GB GPU memory < 40"),
        ({"gpu_count": 1, "max_price_per_hour": 2.0}, "cheap-4090", "sandbox/h100", "$2.49/h > max $2.00/h"),
        ({"gpu_count": 1, "regions": ["us-west"]}, "h100", "sandbox/a100", "region us-east not in ['us-west']"),
        ({"gpu_count": 2}, None, "sandbox/a100", "1 GPUs < 2"),
    ],
)
def test_each_constraint_rejects_with_a_reason(providers, req, winner, rejected, reason) -> None:  # type: ignore[no-untyped-def]
    if winner is None:
        with pytest.raises(NoPlacement) as err:
            _place(providers, **req)
        assert f"{rejected}: {reason}" in str(err.value)
        return
    placement = _place(providers, **req)
    assert placement.offer.offer_id == winner
    assert placement.rejected[rejected] == reason


def test_provider_filter_and_exclusions(providers) -> None:  # type: ignore[no-untyped-def]
    assert _place(providers, kind="command", spec={"command": ["x"]}, providers=["sandbox"]).provider == "sandbox"
    placement = _place(providers, gpu_count=1, excluded={"sandbox/cheap-4090"})
    assert placement.offer.offer_id == "a100"
    assert placement.rejected["sandbox/cheap-4090"] == "failed this job before"


def test_full_offers_make_the_job_wait_not_fail(providers) -> None:  # type: ignore[no-untyped-def]
    sandbox = providers["sandbox"]
    offer = next(o for o in sandbox.offers(Requirements(), "training", {}) if o.offer_id == "cheap-4090")
    sandbox.reserve(offer, JobSpec(job_id="j", kind="training", attempt=1, spec={}, timeout_seconds=60))
    with pytest.raises(CapacityBusy, match="every fitting offer is full"):
        _place(providers, gpu=["RTX 4090"])


def test_per_token_offers_compete_on_estimated_cost(providers) -> None:  # type: ignore[no-untyped-def]
    placement = _place(providers, kind="inference", spec={"model": "m", "prompt": "p", "max_tokens": 100})
    assert placement.offer.offer_id == "tokens"  # $5/h, but ~300 tokens cost far less than 30 s of a GPU
    assert placement.estimated_cost == pytest.approx(0.0001 * 300 / 1000)


def test_queue_routing() -> None:
    assert queue_for("training", "high") == "high_priority"
    assert queue_for("inference", "low") == "low_priority"
    expected = {"inference": "inference", "transcription": "inference", "training": "training",
                "distillation": "distillation", "command": "default"}
    for kind, queue in expected.items():
        assert queue_for(kind, "normal") == queue


# --- more cases -----------------------------------------------------------------------------------

class _Stub(Provider):
    """A provider whose health and offers the test dictates."""

    def __init__(self, name: str, offers: list[Offer] | None = None, healthy: bool = True,
                 broken: bool = False) -> None:
        super().__init__(name, {})
        self._offers, self._healthy, self._broken = offers or [], healthy, broken

    def health(self) -> Health:
        return Health(ok=self._healthy, detail="api down" if not self._healthy else "")

    def offers(self, req, kind, spec):  # type: ignore[no-untyped-def, override]
        if self._broken:
            raise TransientProviderError("timed out listing offers")
        return [o for o in self._offers if kind in o.kinds]


def _offer(provider: str, offer_id: str, price: float, **extra: object) -> Offer:
    return Offer(provider=provider, offer_id=offer_id, gpu=extra.pop("gpu", "A100"),  # type: ignore[arg-type]
                 gpu_count=1, gpu_memory_gb=80, region="us-east", price_per_hour=price, capacity=1,
                 kinds=["training", "inference"], **extra)  # type: ignore[arg-type]


def test_cheapest_wins_across_providers_and_runner_up_is_named(providers) -> None:  # type: ignore[no-untyped-def]
    registry = {**providers, "other": _Stub("other", [_offer("other", "cheaper-a100", 0.2)])}
    placement = _place(registry, gpu=["A100"])
    assert (placement.provider, placement.offer.offer_id) == ("other", "cheaper-a100")
    assert placement.estimated_cost == pytest.approx(0.2)  # training: est. one hour
    assert "next best sandbox/a100" in placement.rationale
    assert placement.considered == len(placement.rejected) + 2


def test_equal_cost_prefers_the_more_reliable_offer() -> None:
    registry = {"p": _Stub("p", [_offer("p", "flaky", 1.0, reliability=0.5),
                                 _offer("p", "solid", 1.0, reliability=0.99)])}
    assert _place(registry, gpu_count=1).offer.offer_id == "solid"


def test_gpu_model_match_is_case_insensitive(providers) -> None:  # type: ignore[no-untyped-def]
    assert _place(providers, gpu=["h100"]).offer.offer_id == "h100"
    assert _place(providers, gpu=["rtx 4090"]).offer.offer_id == "cheap-4090"


def test_gpu_job_rejects_a_machine_without_gpus(providers) -> None:  # type: ignore[no-untyped-def]
    placement = _place(providers, kind="command", spec={"command": ["x"]}, gpu_count=1)
    assert placement.provider == "sandbox"
    assert placement.rejected["local/local"] == "no GPU"


def test_local_gpus_win_when_declared(tmp_path: Path) -> None:
    registry = {
        "local": LocalProvider("local", {"runs_dir": str(tmp_path / "r"), "gpus": ["A100"], "gpu_memory_gb": 80}),
        "sandbox": SandboxProvider("sandbox", {"state_dir": str(tmp_path), "offers": OFFERS}),
    }
    placement = _place(registry, kind="training", spec={"base_model": "m", "dataset_uri": "d", "command": ["t"]},
                       gpu=["A100"])
    assert (placement.provider, placement.estimated_cost) == ("local", 0.0)


def test_no_placement_lists_every_reason(providers) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NoPlacement) as err:
        _place(providers, gpu=["B200"], regions=["mars"])
    assert not isinstance(err.value, CapacityBusy)
    message = str(err.value)
    assert message.startswith("no offer meets the job's constraints (")
    for part in ("local/local: does not run training jobs", "sandbox/a100: GPU A100 not in ['B200']",
                 "sandbox/h100: GPU H100 not in ['B200']", "sandbox/cheap-4090: GPU RTX 4090 not in ['B200']"):
        assert part in message
    assert "\n" not in message


def test_region_and_price_rejections_are_listed_when_nothing_fits(providers) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NoPlacement) as err:
        _place(providers, gpu=["H100"], max_price_per_hour=1.0)
    assert "sandbox/h100: $2.49/h > max $1.00/h" in str(err.value)
    with pytest.raises(NoPlacement) as err:
        _place(providers, gpu=["A100"], regions=["eu-de"])
    assert "sandbox/a100: region us-east not in ['eu-de']" in str(err.value)


def test_max_price_also_filters_cpu_offers(providers) -> None:  # type: ignore[no-untyped-def]
    placement = _place(providers, kind="command", spec={"command": ["x"]}, max_price_per_hour=0.5,
                       providers=["sandbox"])
    assert placement.offer.offer_id == "cheap-4090"
    assert placement.rejected["sandbox/a100"] == "$1.29/h > max $0.50/h"


def test_excluding_every_fitting_offer_says_so(providers) -> None:  # type: ignore[no-untyped-def]
    excluded = {"sandbox/cheap-4090", "sandbox/a100", "sandbox/h100"}
    with pytest.raises(NoPlacement) as err:
        _place(providers, gpu_count=1, excluded=excluded)
    assert not isinstance(err.value, CapacityBusy)
    assert str(err.value).count("failed this job before") == 3


def test_full_cheapest_offer_is_skipped_for_the_next(providers) -> None:  # type: ignore[no-untyped-def]
    sandbox = providers["sandbox"]
    full = next(o for o in sandbox.offers(Requirements(), "training", {}) if o.offer_id == "cheap-4090")
    sandbox.reserve(full, JobSpec(job_id="other", kind="training", attempt=1, spec={}, timeout_seconds=60))
    placement = _place(providers, gpu_count=1)
    assert placement.offer.offer_id == "a100"
    assert placement.rejected["sandbox/cheap-4090"] == "no free capacity"


def test_offer_full_in_another_process_is_skipped(providers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    elsewhere = SandboxProvider("sandbox", {"state_dir": str(tmp_path), "offers": OFFERS})  # same ledger
    full = next(o for o in elsewhere.offers(Requirements(), "training", {}) if o.offer_id == "cheap-4090")
    elsewhere.reserve(full, JobSpec(job_id="other", kind="training", attempt=1, spec={}, timeout_seconds=60))
    assert _place(providers, gpu_count=1).offer.offer_id == "a100"


def test_capacity_busy_is_a_no_placement(providers) -> None:  # type: ignore[no-untyped-def]
    sandbox = providers["sandbox"]
    full = next(o for o in sandbox.offers(Requirements(), "training", {}) if o.offer_id == "cheap-4090")
    sandbox.reserve(full, JobSpec(job_id="other", kind="training", attempt=1, spec={}, timeout_seconds=60))
    with pytest.raises(NoPlacement) as err:  # callers catching NoPlacement also see "busy"
        _place(providers, gpu=["RTX 4090"])
    assert isinstance(err.value, CapacityBusy)
    assert "sandbox/cheap-4090: no free capacity" in str(err.value)


def test_per_token_offer_loses_when_the_job_asks_for_many_tokens(providers) -> None:  # type: ignore[no-untyped-def]
    # ~200,200 tokens at $0.0001/1K = $0.02; 30 s of the $0.39/h 4090 = $0.00325.
    spec = {"model": "m", "prompt": "p", "max_tokens": 200_000}
    placement = _place(providers, kind="inference", spec=spec, gpu_count=1)
    assert placement.offer.offer_id == "cheap-4090"
    assert placement.estimated_cost == pytest.approx(0.39 * 30 / 3600, rel=1e-3)
    assert "next best sandbox/a100" in placement.rationale  # the per-token offer ranks below both


def test_estimate_cost() -> None:
    hourly = Offer(provider="p", offer_id="h", price_per_hour=3.6)
    tokens = Offer(provider="p", offer_id="t", price_per_hour=3.6, price_per_1k_tokens=0.5)
    assert estimate_cost(hourly, "inference", {}, 3600) == pytest.approx(3.6 * 30 / 3600)
    assert estimate_cost(hourly, "training", {}, 3600) == pytest.approx(3.6)
    assert estimate_cost(hourly, "training", {}, 60) == pytest.approx(3.6 * 60 / 3600)  # capped by the timeout
    assert estimate_cost(tokens, "inference", {"max_tokens": 800}, 3600) == pytest.approx(0.5)
    assert estimate_cost(tokens, "inference", {}, 3600) == pytest.approx(0.5 * 456 / 1000)
    assert estimate_cost(tokens, "training", {}, 3600) == pytest.approx(3.6)  # per-token price only for inference
    assert offer_key(tokens) == "p/t"


def test_unhealthy_or_failing_providers_are_rejected_with_a_reason(providers) -> None:  # type: ignore[no-untyped-def]
    registry = {**providers, "down": _Stub("down", [_offer("down", "free", 0.0)], healthy=False),
                "flaky": _Stub("flaky", [_offer("flaky", "free", 0.0)], broken=True)}
    placement = _place(registry, gpu_count=1)
    assert placement.offer.offer_id == "cheap-4090"
    assert placement.rejected["down"] == "unhealthy: api down"
    assert placement.rejected["flaky"] == "unavailable: timed out listing offers"


def test_provider_filter_keeps_other_providers_out(providers) -> None:  # type: ignore[no-untyped-def]
    placement = _place(providers, kind="command", spec={"command": ["x"]}, providers=["sandbox"])
    assert placement.provider == "sandbox"
    with pytest.raises(NoPlacement, match="does not run training jobs"):
        _place(providers, providers=["local"])


def test_provider_filter_reason_is_reported(providers) -> None:  # type: ignore[no-untyped-def]
    placement = _place(providers, kind="command", spec={"command": ["x"]}, providers=["sandbox"])
    assert any("not allowed" in reason for key, reason in placement.rejected.items() if key.startswith("local"))


def test_unknown_provider_in_filter_is_named_in_no_placement(providers) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NoPlacement) as err:
        _place(providers, kind="command", spec={"command": ["x"]}, providers=["nowhere"])
    assert "nowhere" in str(err.value)


def test_no_providers_at_all() -> None:
    with pytest.raises(NoPlacement, match="no provider offers this kind of job"):
        place({}, "command", {"command": "x"}, Requirements(), 60)


@pytest.mark.parametrize("kind", ["inference", "transcription", "training", "distillation", "command"])
def test_priority_overrides_kind(kind: str) -> None:
    assert queue_for(kind, "high") == "high_priority"
    assert queue_for(kind, "low") == "low_priority"


def test_provider_queue_name() -> None:
    assert provider_queue("sandbox") == "p.sandbox"


def test_max_hourly_price_does_not_reject_per_token_billing(providers) -> None:  # type: ignore[no-untyped-def]
    placement = _place(providers, kind="inference", spec={"model": "m", "prompt": "p"}, max_price_per_hour=0.10)
    assert placement.offer.offer_id == "tokens"  # $5/h listed, but inference there is billed per token
    with pytest.raises(NoPlacement, match=r"\$1.29/h > max \$0.10/h"):
        _place(providers, kind="training", gpu=["A100"], max_price_per_hour=0.10)


def test_a_last_resort_provider_serves_only_when_nothing_else_fits(providers) -> None:  # type: ignore[no-untyped-def]
    fallback = _Stub("fallback", [_offer("fallback", "free-a100", 0.0)])
    fallback.last_resort = True
    registry = {**providers, "fallback": fallback}
    assert _place(registry, gpu=["A100"]).offer.offer_id == "a100"  # dearer, but not the last resort
    placement = _place(registry, gpu=["A100"], excluded={"sandbox/a100"})
    assert placement.offer.offer_id == "free-a100" and placement.rationale.startswith("last resort")


# --- routing: requirements, residency, strategies, explanations -------------------------------------

def _api(name: str, per_1k: float, **extra: object) -> _Stub:
    extra = {"region": "global", "capacity": 4, **extra}
    offer = Offer(provider=name, offer_id="m", price_per_1k_tokens=per_1k, kinds=["inference"], **extra)  # type: ignore[arg-type]
    stub = _Stub(name, [offer])
    stub.kind = ProviderKind.model_api  # type: ignore[misc]
    return stub


CHAT = {"model": "m", "prompt": "hello", "max_tokens": 50}


def test_token_price_context_capability_and_deny_filters_say_why() -> None:
    cheap, big = _api("cheap", 0.0001, context_window=8_000), _api("big", 0.003, context_window=200_000)
    big.capabilities = ("reasoning",)
    registry = {"cheap": cheap, "big": big}
    assert _place(registry, "inference", CHAT).provider == "cheap"
    long = _place(registry, "inference", CHAT, context_window=100_000)
    assert long.provider == "big" and "context window 8000 tokens < 100000" in long.rejected["cheap/m"]
    assert _place(registry, "inference", CHAT, capabilities=["reasoning"]).provider == "big"
    with pytest.raises(NoPlacement, match=r"big/m: \$0.003/1K tokens > max"):
        _place(registry, "inference", CHAT, max_price_per_1k_tokens=0.001, exclude_providers=["cheap"])


def test_latency_limit_uses_measurements() -> None:
    registry = {"slow": _api("slow", 0.0001), "fast": _api("fast", 0.0005)}
    stats = {"slow": (2500.0, 0.0), "fast": (200.0, 0.1)}
    placement = place(registry, "inference", CHAT, Requirements(max_latency_ms=1000), 60, stats=stats.get)
    assert placement.provider == "fast" and placement.rejected["slow"].startswith("too slow: 2500 ms")
    by_latency = place(registry, "inference", CHAT, Requirements(strategy="lowest_latency"), 60, stats=stats.get)
    assert by_latency.provider == "fast" and by_latency.strategy == "lowest_latency"
    assert [s["offer"] for s in by_latency.scores] == ["fast/m", "slow/m"]
    assert by_latency.scores[1]["components"]["latency"] > 0 and by_latency.scores[0]["latency_ms"] == 200.0


def test_residency_keeps_data_in_its_regions_and_says_so() -> None:
    from orchestrator.errors import InvalidInput
    from orchestrator.scheduling.placement import RoutingPolicy
    from orchestrator.scheduling.residency import DataClassRule, Policy

    policy = RoutingPolicy(residency=Policy(default_class="public", classes={
        "public": DataClassRule(), "pii-eu": DataClassRule(regions=["EU"], replication=False)}))
    registry = {"us": _api("us", 0.0001, region="us-east-1"), "eu": _api("eu", 0.0009, region="eu-central-1"),
                "uk": _api("uk", 0.0002, region="eu-west-2")}
    assert place(registry, "inference", CHAT, Requirements(), 60, policy=policy).provider == "us"
    eu = place(registry, "inference", CHAT, Requirements(data_class="pii-eu"), 60, policy=policy)
    assert eu.provider == "eu" and eu.data_class == "pii-eu"
    assert "region eu-west-2 not allowed for data class 'pii-eu'" in eu.rejected["uk/m"]
    registry["eu"] = _api("eu", 0.0009, region="eu-central-1", capacity=0)
    with pytest.raises(CapacityBusy):  # the EU offer is full: wait, never go elsewhere
        place(registry, "inference", CHAT, Requirements(data_class="pii-eu"), 60, policy=policy)
    with pytest.raises(InvalidInput, match="unknown data class 'secret'"):
        place(registry, "inference", CHAT, Requirements(data_class="secret"), 60, policy=policy)


def test_strategy_from_policy_or_job_and_provider_tiers(providers) -> None:  # type: ignore[no-untyped-def]
    from orchestrator.scheduling.placement import RoutingPolicy

    pool, api = _api("pool", 0.002), _api("api", 0.0001)
    pool.kind = ProviderKind.self_hosted  # type: ignore[misc]
    registry = {"pool": pool, "api": api}
    assert place(registry, "inference", CHAT, Requirements(), 60).provider == "api"
    tiered = place(registry, "inference", CHAT, Requirements(), 60, policy=RoutingPolicy(strategy="tiered"))
    assert tiered.provider == "pool" and tiered.rationale.startswith("tiered: first of 2")
    assert [s["tier"] for s in tiered.scores] == ["primary", "tertiary"]
    ordered = place(registry, "inference", CHAT, Requirements(strategy="failover", failover_order=["pool", "api"]), 60)
    assert ordered.provider == "pool"


# --- round_robin: turns shared by every worker ----------------------------------------------------

class _FakeRedis:
    """INCR/EXPIRE through a pipeline, as RedisTurns uses them; ``down`` makes every call fail."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.ttl: dict[str, int] = {}
        self.calls = 0
        self.down = False

    def pipeline(self, transaction: bool = True) -> _FakeRedis:
        assert transaction is False  # one round trip, no MULTI needed: INCR alone is atomic
        self._ops: list[tuple[str, str, int]] = []
        return self

    def incr(self, name: str) -> None:
        self._ops.append(("incr", name, 0))

    def expire(self, name: str, seconds: int) -> None:
        self._ops.append(("expire", name, seconds))

    def execute(self) -> list[object]:
        import redis

        self.calls += 1
        if self.down:
            raise redis.ConnectionError("connection refused")
        out: list[object] = []
        for op, name, seconds in self._ops:
            if op == "incr":
                self.counts[name] = self.counts.get(name, 0) + 1
                out.append(self.counts[name])
            else:
                self.ttl[name] = seconds
                out.append(True)
        return out


def _round_robin_registry() -> dict[str, Provider]:
    return {name: _api(name, price) for name, price in (("alpha", 0.0001), ("beta", 0.0005), ("gamma", 0.0009))}


def test_round_robin_turns_are_shared_by_every_worker() -> None:
    from orchestrator.scheduling.strategies import LocalTurns
    from orchestrator.services.turns import KEY_PREFIX, RedisTurns

    registry = _round_robin_registry()
    rr = Requirements(strategy="round_robin")
    redis_server = _FakeRedis()
    # Two worker processes: each its own client and fallback, one Redis between them.
    workers = [RedisTurns("redis://fake/7", client=redis_server), RedisTurns("redis://fake/7", client=redis_server)]
    shared = [place(registry, "inference", CHAT, rr, 60, turns=workers[i % 2]).provider for i in range(6)]
    assert shared == ["alpha", "beta", "gamma", "alpha", "beta", "gamma"]  # global turns, whoever placed
    assert redis_server.counts == {KEY_PREFIX + "alpha,beta,gamma": 6} and redis_server.ttl[KEY_PREFIX + "alpha,beta,gamma"] > 0
    # What per-process counters did: each worker starts its own rotation, so providers repeat back to back.
    local = [LocalTurns(), LocalTurns()]
    per_process = [place(registry, "inference", CHAT, rr, 60, turns=local[i % 2]).provider for i in range(6)]
    assert per_process == ["alpha", "alpha", "beta", "beta", "gamma", "gamma"]


def test_round_robin_counts_each_candidate_set_apart_and_only_round_robin_asks() -> None:
    from orchestrator.scheduling.strategies import LocalTurns

    registry = _round_robin_registry()
    turns = LocalTurns()
    asked: list[str] = []

    def counting(key: str) -> int:
        asked.append(key)
        return turns(key)

    only_two = Requirements(strategy="round_robin", providers=["alpha", "gamma"])
    assert [place(registry, "inference", CHAT, only_two, 60, turns=counting).provider for _ in range(3)] == [
        "alpha", "gamma", "alpha"]
    assert place(registry, "inference", CHAT, Requirements(strategy="round_robin"), 60, turns=counting).provider == "alpha"
    assert asked == ["alpha,gamma"] * 3 + ["alpha,beta,gamma"]
    for strategy in ("lowest_cost", "score", "lowest_latency", "weighted_random"):
        place(registry, "inference", CHAT, Requirements(strategy=strategy), 60, turns=counting)
    assert len(asked) == 4  # no other strategy pays for a turn


def test_round_robin_falls_back_to_this_process_while_redis_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.services import turns as turns_module
    from orchestrator.services.turns import RedisTurns

    redis_server = _FakeRedis()
    counter = RedisTurns("redis://fake/7", client=redis_server)
    assert [counter("a,b") for _ in range(2)] == [0, 1]
    redis_server.down = True
    assert [counter("a,b") for _ in range(3)] == [0, 1, 2]  # this process's own count
    assert redis_server.calls == 3  # after one failure Redis is left alone for RETRY_SECONDS: placement stays fast
    clock = turns_module.time.monotonic() + turns_module.RETRY_SECONDS + 1
    monkeypatch.setattr(turns_module.time, "monotonic", lambda: clock)
    redis_server.down = False
    assert counter("a,b") == 2 and redis_server.calls == 4  # back on the shared count


def test_shared_turns_use_the_deployments_redis_or_count_in_process_when_embedded(tmp_path: Path) -> None:
    from orchestrator.scheduling.strategies import LocalTurns
    from orchestrator.services.turns import RedisTurns, redis_url, shared_turns
    from orchestrator.settings import Settings

    embedded = Settings(data_dir=tmp_path, database_url="", broker_url="", result_url="")
    assert redis_url(embedded) is None and isinstance(shared_turns(embedded), LocalTurns)
    assert shared_turns(embedded) is shared_turns(embedded)  # one counter per process
    production = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0", result_url="")
    counter = shared_turns(production)
    assert isinstance(counter, RedisTurns) and counter.url == "redis://127.0.0.1:6379/0"
    cached = Settings(data_dir=tmp_path, broker_url="amqp://guest@rabbit//", result_url="rediss://cache:6380/2")
    assert redis_url(cached) == "rediss://cache:6380/2"


# --- the fast path gives what the straightforward one gave ---------------------------------------------------

def _reference_rejection(offer: Offer, req: Requirements, kind: str, excluded: set[str],
                         provider_capabilities: tuple[str, ...] = ()) -> str | None:
    """Placement's filter as first written, one offer at a time (the specification of ``_Filter.scan``)."""
    from providers.gpus import any_gpu_matches
    from providers.regions import any_region_matches

    caps = [*offer.capabilities, *provider_capabilities]
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
    usage = offer.price_per_1k_tokens is not None and kind in ("inference", "transcription")
    if req.max_price_per_hour is not None and not usage and offer.price_per_hour > req.max_price_per_hour:
        return f"${offer.price_per_hour:.2f}/h > max ${req.max_price_per_hour:.2f}/h"
    if (req.max_price_per_1k_tokens is not None and offer.price_per_1k_tokens is not None
            and offer.price_per_1k_tokens > req.max_price_per_1k_tokens):
        return f"${offer.price_per_1k_tokens:g}/1K tokens > max ${req.max_price_per_1k_tokens:g}/1K"
    if req.context_window is not None and (offer.context_window or 0) < req.context_window:
        have = f"{offer.context_window} tokens" if offer.context_window else "not declared"
        return f"context window {have} < {req.context_window} needed"
    if req.capabilities:
        missing = sorted(set(req.capabilities) - {*caps, *offer.kinds})
        if missing:
            return f"missing capability {', '.join(missing)}"
    if req.min_reliability is not None and offer.reliability < req.min_reliability:
        return f"reliability {offer.reliability:.3f} < {req.min_reliability}"
    if req.interruptible is False and offer.interruptible:
        return "interruptible (spot) capacity not allowed"
    if req.regions and not any_region_matches(offer.region, req.regions):
        return f"region {offer.region} not in {req.regions}"
    if offer.capacity <= 0:
        return "no free capacity"
    return None


def _random_case(rng):  # type: ignore[no-untyped-def]
    """A random fleet (≤ 100 offers: every rejection is listed), requirements, residency and exclusions."""
    from orchestrator.scheduling.placement import RoutingPolicy
    from orchestrator.scheduling.residency import DataClassRule, Policy

    gpus = ["A100", "A100 SXM4 80GB", "NVIDIA A100-PCIE", "H100 NVL", "NVIDIA GeForce RTX 4090", "L4", None, ""]
    regions = ["eu-west-1", "eu-west-2", "DE", "Texas, US", "us-east", "EU-RO-1", "europe-west4-a", "JP", "local"]
    kinds = [["training", "inference", "command"], ["inference"], ["inference", "transcription"], ["command"]]
    registry: dict[str, Provider] = {}
    for name in rng.sample(["p", "q", "p-q", "api"], rng.randint(1, 4)):
        offers = [Offer(provider=name, offer_id=f"o{rng.randrange(40)}", gpu=rng.choice(gpus),
                        gpu_count=rng.choice([0, 1, 2, 8]), gpu_memory_gb=rng.choice([0, 24, 80]),
                        region=rng.choice(regions), price_per_hour=rng.choice([0.0, 0.4, 1.2, 1.2, 3.0]),
                        price_per_1k_tokens=rng.choice([None, None, 0.0005, 0.004]), capacity=rng.choice([0, 1, 1, 4]),
                        reliability=rng.choice([0.8, 0.95, 0.99]), kinds=rng.choice(kinds),
                        interruptible=rng.random() < 0.3, context_window=rng.choice([None, 8000, 128000]),
                        capabilities=rng.choice([[], ["reasoning"], ["json", "vision"]]))
                  for _ in range(rng.randint(0, 30))]
        stub = _Stub(name, offers)
        stub.kind = rng.choice(list(ProviderKind))  # type: ignore[misc]
        stub.capabilities = rng.choice([(), ("reasoning",)])
        stub.last_resort = rng.random() < 0.1
        registry[name] = stub
    requirements = {key: value for key, value in {
        "gpu": rng.choice([None, ["A100"], ["H100", "4090"], ["a100"]]), "gpu_count": rng.choice([0, 0, 1, 2]),
        "min_gpu_memory_gb": rng.choice([None, 40.0]), "max_price_per_hour": rng.choice([None, 1.0, 2.5]),
        "max_price_per_1k_tokens": rng.choice([None, 0.001]), "context_window": rng.choice([None, 100_000]),
        "capabilities": rng.choice([None, ["reasoning"], ["inference"]]), "min_reliability": rng.choice([None, 0.9]),
        "interruptible": rng.choice([None, False, True]), "regions": rng.choice([None, ["EU"], ["US", "DE"]]),
        "strategy": rng.choice(["lowest_cost", "score", "tiered", "failover", "weighted_random"]),
        "failover_order": rng.choice([None, ["q", "p"]]), "data_class": rng.choice([None, "pii-eu", "no-api"]),
    }.items() if value is not None}
    policy = RoutingPolicy(residency=Policy(classes={
        "public": DataClassRule(), "pii-eu": DataClassRule(regions=["EU"]),
        "no-api": DataClassRule(providers=["p", "q", "p-q"], deny_providers=["q"])}))
    keys = [offer_key(o) for stub in registry.values() for o in stub._offers]  # type: ignore[attr-defined]
    excluded = set(rng.sample(keys, min(len(keys), rng.randint(0, 2))))
    busy = set(rng.sample(keys, min(len(keys), rng.randint(0, 2))))
    kind = rng.choice(["training", "inference", "command"])
    return registry, kind, Requirements(**requirements), policy, excluded, busy


def test_placement_decides_and_explains_as_the_one_offer_at_a_time_filter_did() -> None:
    import random

    from orchestrator.scheduling.placement import NO_FREE_CAPACITY, Placement
    from orchestrator.scheduling.residency import resolve
    from orchestrator.scheduling.strategies import LocalTurns, Option, default_tier
    from tests.unit.test_strategies import _reference_rank

    rng = random.Random(5)
    spec = {"model": "m", "prompt": "p", "max_tokens": 100}
    outcomes = {"placed": 0, "busy": 0, "none": 0}
    for trial in range(400):
        registry, kind, req, policy, excluded, busy = _random_case(rng)
        data = resolve(policy.residency, req.data_class)
        expected: dict[str, str] = {}
        options: list[Option] = []
        rejections = 0  # offers, not keys: a key listed twice is one entry of ``expected``
        for stub in registry.values():
            for offer in stub.offers(req, kind, spec):
                reason = (_reference_rejection(offer, req, kind, excluded, stub.capabilities)
                          or data.rule.rejection(offer, data.name))
                if reason is None and offer_key(offer) in busy:
                    reason = NO_FREE_CAPACITY
                if reason:
                    expected[offer_key(offer)] = reason
                    rejections += 1
                    continue
                if stub.capabilities:
                    offer = offer.model_copy(update={"capabilities": [*offer.capabilities, *stub.capabilities]})
                options.append(Option(offer=offer, estimated_cost=estimate_cost(offer, kind, spec, 600),
                                      provider_kind=stub.kind, tier=stub.tier or default_tier(stub.kind, offer),
                                      last_resort=stub.last_resort))
        try:
            placement: Placement = place(registry, kind, spec, req, 600, excluded, policy=policy, busy=busy,
                                         seed=f"job-{trial}", turns=LocalTurns())
        except NoPlacement as err:
            assert not options, trial
            detail = "; ".join(f"{k}: {v}" for k, v in sorted(expected.items())) or "no provider offers this kind of job"
            full = NO_FREE_CAPACITY in expected.values()
            assert isinstance(err, CapacityBusy) == full, trial
            assert str(err).endswith(f"({detail})"), (trial, str(err), detail)
            outcomes["busy" if full else "none"] += 1
            continue
        outcomes["placed"] += 1
        ranked = _reference_rank(options, req.strategy or "lowest_cost", seed=f"job-{trial}",
                                 failover_order=req.failover_order, value_per_1k=req.max_price_per_1k_tokens,
                                 turns=LocalTurns())
        assert placement.rejected == expected, trial
        assert placement.rejected_total == len(expected) and placement.considered == len(expected) + len(options)
        assert [(c.offer, c.estimated_cost) for c in placement.candidates] == [(r[0].offer, r[0].estimated_cost)
                                                                                for r in ranked], trial
        assert [(s["offer"], s["score"], s["components"]) for s in placement.scores] == [
            (offer_key(r[0].offer), r[1], r[2]) for r in ranked[:20]]
        assert placement.rationale.endswith(f"; {len(expected)} rejected")
        assert sum(row["count"] for row in placement.rejected_summary) == rejections
    assert min(outcomes.values()) > 20, outcomes  # every outcome was exercised


def _many(provider: str, count: int, start: int = 0, **fields: object) -> list[Offer]:
    base: dict[str, object] = {"gpu": "A100", "gpu_count": 1, "gpu_memory_gb": 80, "region": "us-east", "price_per_hour": 1.0,
                               "capacity": 1, "kinds": ["training"], **fields}
    return [Offer(provider=provider, offer_id=f"o{i}", **base) for i in range(start, start + count)]  # type: ignore[arg-type]


def test_thousands_of_rejections_are_counted_by_provider_and_reason_with_examples_listed() -> None:
    from orchestrator.scheduling.placement import MAX_LISTED_REJECTIONS

    big = _Stub("big", [*_many("big", 600, gpu="RTX 4090"), *_many("big", 300, 600, region="eu-west-1"),
                        *_many("big", 5, 900, capacity=0, price_per_hour=0.05), *_many("big", 40, 905, price_per_hour=9.0),
                        *_many("big", 1, 945, price_per_hour=0.5)])
    other = _Stub("other", _many("other", 80, gpu="L4"))
    registry = {"big": big, "other": other, "down": _Stub("down", _many("down", 3), healthy=False)}
    placement = _place(registry, gpu=["A100"], regions=["US"], max_price_per_hour=2.0)
    assert placement.offer.offer_id == "o945"
    offers_listed = {k: v for k, v in placement.rejected.items() if "/" in k}
    assert len(offers_listed) == MAX_LISTED_REJECTIONS and placement.rejected["down"] == "unhealthy: api down"
    assert placement.rejected["big/o900"] == "no free capacity"  # every reason has examples, however rare
    assert placement.rejected["big/o905"] == "$9.00/h > max $2.00/h"
    assert placement.rejected["big/o600"] == "region eu-west-1 not in ['US']"
    assert placement.rejected["big/o0"] == "GPU RTX 4090 not in ['A100']"
    assert placement.rejected_total == 600 + 300 + 5 + 40 + 80 + 1 and placement.considered == placement.rejected_total + 1
    assert placement.rationale.endswith(f"; {placement.rejected_total} rejected")
    summary = {(r["provider"], r["reason"]): (r["count"], r["listed"]) for r in placement.rejected_summary}
    assert summary[("big", "GPU not in ['A100']")][0] == 600 and summary[("big", "no free capacity")] == (5, 5)
    assert summary[("big", "region not in ['US']")][0] == 300 and summary[("big", "over max $2.00/h")][0] == 40
    assert summary[("other", "GPU not in ['A100']")][0] == 80
    assert sum(listed for _, listed in summary.values()) == MAX_LISTED_REJECTIONS
    assert [r["provider"] for r in placement.rejected_summary][0] == "big"  # providers in order, commonest first

    with pytest.raises(CapacityBusy) as err:  # nothing fits but some are full: wait, and say what was counted
        _place(registry, gpu=["A100"], regions=["US"], max_price_per_hour=0.1)
    message = str(err.value)
    assert message.startswith("every fitting offer is full (") and "\n" not in message
    assert "big/o900: no free capacity" in message and "more offers (big: " in message
    assert "× GPU not in ['A100']" in message


def test_candidates_past_the_first_few_come_in_full_order() -> None:
    from orchestrator.scheduling.strategies import HEAD

    offers = [_offer("p", f"o{i}", price=round(1 + (i * 7919 % 101) / 100, 2)) for i in range(HEAD * 3)]
    placement = _place({"p": _Stub("p", offers)}, gpu=["A100"])
    got = [(c.estimated_cost, c.offer.offer_id) for c in placement.candidates]
    assert got == sorted(got, key=lambda pair: (pair[0], f"p/{pair[1]}")) and len(got) == HEAD * 3
    later = placement.choose(HEAD + 5, {"p/x": "over budget"})
    assert later.offer == placement.candidates[HEAD + 5].offer and later.rejected_total == placement.rejected_total + 1


def test_gpufleet_why_shows_the_counted_rejections(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli.render import placement_explanation

    big = _Stub("big", [*_many("big", 300, gpu="RTX 4090"), *_many("big", 1, 300, price_per_hour=0.5)])
    stored = _place({"big": big}, gpu=["A100"]).model_dump(mode="json")  # as the job row keeps it
    assert "candidates" not in stored and stored["rejected_total"] == 300
    why = {"job_id": "j", "status": "running", "attempt": 1, "strategy": stored["strategy"], "data_class": "public",
           "rationale": stored["rationale"], "scores": stored["scores"], "rejected": stored["rejected"],
           "rejected_total": stored["rejected_total"], "rejected_summary": stored["rejected_summary"], "history": []}
    placement_explanation(why)
    out = capsys.readouterr().out
    assert "rejected (100 of 300 listed)" in out and "big/o0" in out and "GPU RTX 4090 not in ['A100']" in out
    assert "rejected offers by provider and reason" in out and "300" in out


def test_a_transcription_priced_per_token_is_estimated_from_its_audio_length() -> None:
    from orchestrator.scheduling.placement import estimate_cost

    offer = Offer(provider="api", offer_id="whisper", price_per_hour=0.0, price_per_1k_tokens=0.002,
                  kinds=["transcription"])
    # About 150 words a minute: two minutes of audio bill ~300 tokens; unknown length counts as a minute.
    assert estimate_cost(offer, "transcription", {"duration_seconds": 120}, 600) == pytest.approx(0.0006)
    assert estimate_cost(offer, "transcription", {}, 600) == pytest.approx(0.0003)
