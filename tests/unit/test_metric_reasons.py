"""Rejection reasons → the fixed categories of ``gpufleet_routing_rejections``.

The reasons are produced by the code that writes them (placement, residency, the breaker, budgets)
wherever it can be called here, so a rewording there fails this test instead of silently turning a
category into ``other``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from orchestrator.errors import CapacityBusy, NoPlacement
from orchestrator.scheduling.breaker import HealthView, routable
from orchestrator.scheduling.placement import NO_FREE_CAPACITY, place, rejection
from orchestrator.scheduling.residency import DataClassRule
from orchestrator.services.provider_metrics import (
    REJECTION_CATEGORIES,
    provider_of,
    rejection_category,
    rejections_in_error,
)
from providers.base import Offer, Requirements, TransientProviderError
from providers.sandbox import SandboxProvider

GPU_OFFER = Offer(provider="sandbox", offer_id="a100", gpu="A100", gpu_count=1, gpu_memory_gb=80, region="us-east",
                  price_per_hour=1.29, capacity=1, reliability=0.9, kinds=["training", "inference"], interruptible=True)
TOKEN_OFFER = Offer(provider="api", offer_id="m", region="us-east", price_per_1k_tokens=0.002, capacity=5,
                    kinds=["inference"], context_window=8000)


def _reject(offer: Offer, kind: str = "training", excluded: set[str] | None = None, **req: Any) -> str:
    reason = rejection(offer, Requirements(**req), kind, excluded or set())
    assert reason is not None
    return reason


@pytest.mark.parametrize(("reason", "category"), [
    (_reject(GPU_OFFER, excluded={"sandbox/a100"}), "failed_before"),
    (_reject(GPU_OFFER, kind="command"), "missing_capability"),
    (_reject(TOKEN_OFFER, kind="inference", gpu_count=1), "gpu"),
    (_reject(GPU_OFFER, gpu=["H100"]), "gpu"),
    (_reject(GPU_OFFER, gpu_count=4), "gpu"),
    (_reject(GPU_OFFER, min_gpu_memory_gb=141), "gpu"),
    (_reject(GPU_OFFER, max_price_per_hour=1.0), "price"),
    (_reject(TOKEN_OFFER, kind="inference", max_price_per_1k_tokens=0.00001), "price"),
    (_reject(TOKEN_OFFER, kind="inference", context_window=128000), "missing_capability"),
    (_reject(TOKEN_OFFER, kind="inference", capabilities=["reasoning"]), "missing_capability"),
    (_reject(GPU_OFFER, min_reliability=0.99), "other"),
    (_reject(GPU_OFFER, interruptible=False), "other"),
    (_reject(GPU_OFFER, regions=["EU"]), "region_not_allowed"),
    (_reject(GPU_OFFER.model_copy(update={"capacity": 0})), "no_capacity"),
    (NO_FREE_CAPACITY, "no_capacity"),
    (DataClassRule(regions=["EU"]).rejection(GPU_OFFER, "pii-eu"), "region_not_allowed"),
    (DataClassRule(providers=["aws"]).rejection(GPU_OFFER, "phi-us"), "provider_not_allowed"),
    (DataClassRule(deny_providers=["sandbox"]).rejection(GPU_OFFER, "secret"), "provider_not_allowed"),
    ("something nobody has written yet", "other"),
    ("", "other"),
])
def test_reasons_written_by_placement_and_residency_fall_in_their_category(reason: str, category: str) -> None:
    assert rejection_category(reason) == category


def _view(**changes: object) -> HealthView:
    base = {"provider": "p", "healthy": True, "breaker": "closed", "latency_ewma_ms": None, "latency_p95_ms": None,
            "error_rate": 0.49, "consecutive_failures": 3, "detail": "API unreachable", "checked_at": None,
            "fresh": True}
    return HealthView(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(("view", "category"), [
    (_view(breaker="open"), "circuit_open"),
    (_view(breaker="half_open"), "circuit_open"),
    (_view(healthy=False), "unhealthy"),
])
def test_breaker_reasons(view: HealthView, category: str) -> None:
    ok, reason = routable(view)
    assert not ok and rejection_category(reason) == category


def test_budget_reasons_are_over_budget() -> None:
    """The real messages of ``budgets.hold``, from a real (in-memory) ledger."""
    from orchestrator.db.models import Base, Tenant
    from orchestrator.services import budgets

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    messages = []
    with Session(engine) as s:
        tenant = Tenant(id=uuid.uuid4(), name="acme", created_at=datetime.now(UTC))
        s.add(tenant)
        s.flush()
        budgets.set_budget(s, "provider", "sandbox", monthly_limit=0.01, hourly_limit=None)
        budgets.set_budget(s, "tenant", "acme", monthly_limit=None, hourly_limit=0.5)
        for amount, rate in ((1.0, 0.0), (0.0, 2.0)):
            with pytest.raises(budgets.OverBudget) as caught:
                budgets.hold(s, tenant.id, "sandbox", amount, rate)
            messages.append(str(caught.value))
    assert len(messages) == 2 and all(rejection_category(m) == "over_budget" for m in messages)


def test_reasons_from_a_failed_placement_error_parse_back_to_offers(tmp_path: Path) -> None:
    """``place`` lists every rejection in its exception; the pipeline stores it as the job's error (prefixed when
    the job gave up waiting, suffixed with the offers it tried). The parser gets them back per offer, including
    reasons that themselves contain ``: `` and parentheses."""
    sandbox = SandboxProvider("sandbox", {"state_dir": str(tmp_path), "offers": [
        {"offer_id": "a100-us", "gpu": "A100", "gpu_memory_gb": 80, "region": "us-east", "price_per_hour": 1.29},
        {"offer_id": "h100-de", "gpu": "H100", "gpu_memory_gb": 80, "region": "eu-de", "price_per_hour": 2.49}]})
    slow = SandboxProvider("slowbox", {"state_dir": str(tmp_path), "offers": [
        {"offer_id": "l4", "gpu": "L4", "gpu_memory_gb": 24, "region": "eu-se", "price_per_hour": 0.3}]})
    requirements = Requirements(gpu=["B200"], max_latency_ms=100)

    def stats(name: str) -> tuple[float | None, float]:
        return (900.0, 0.0) if name == "slowbox" else (None, 0.0)

    with pytest.raises(NoPlacement) as no_fit:
        place({"sandbox": sandbox, "slowbox": slow}, "training", {"base_model": "m"}, requirements, 3600, stats=stats)
    parsed = _by_key(rejections_in_error(f"{no_fit.value} after trying sandbox/x"))
    assert {k: rejection_category(v) for k, v in parsed.items()} == {
        "sandbox/a100-us": "gpu", "sandbox/h100-de": "gpu", "slowbox": "too_slow"}

    down = {"downbox": _view(provider="downbox", breaker="open")}
    with pytest.raises(CapacityBusy) as busy:  # a provider that may come back: the job waits, then gives up
        place({"sandbox": sandbox, "slowbox": slow, "downbox": slow}, "training", {"base_model": "m"}, requirements,
              3600, stats=stats, monitor=down)
    parsed = _by_key(rejections_in_error(f"no capacity within 60s: {busy.value}"))
    assert {k: rejection_category(v) for k, v in parsed.items()} == {
        "sandbox/a100-us": "gpu", "sandbox/h100-de": "gpu", "slowbox": "too_slow", "downbox": "circuit_open"}
    assert parsed["downbox"].startswith("circuit open: 3 consecutive failures (error rate 49%)")
    assert {provider_of(k) for k in parsed} == {"sandbox", "slowbox", "downbox"}


class _Flaky(SandboxProvider):
    def offers(self, req: Requirements, kind: str, spec: dict[str, object]) -> list[Offer]:
        raise TransientProviderError("listing offers failed: 503")


def test_provider_level_reasons_from_a_real_placement(tmp_path: Path) -> None:
    offers = [{"offer_id": "a100-us", "gpu": "A100", "gpu_memory_gb": 80, "region": "us-east", "price_per_hour": 1.29}]
    registry = {name: cls(name, {"state_dir": str(tmp_path), "offers": offers})
                for name, cls in (("sandbox", SandboxProvider), ("other", SandboxProvider), ("flaky", _Flaky),
                                  ("denied", SandboxProvider))}
    chosen = place(registry, "training", {"base_model": "m"},
                   Requirements(gpu=["A100"], providers=["sandbox", "flaky", "denied", "nowhere"],
                                exclude_providers=["denied"]), 3600)
    assert chosen.provider == "sandbox"
    assert {k: rejection_category(v) for k, v in chosen.rejected.items()} == {
        "other": "provider_not_allowed", "denied": "provider_not_allowed", "nowhere": "provider_not_allowed",
        "flaky": "unhealthy"}


def _by_key(entries: list[tuple[str, str, int]]) -> dict[str, str]:
    assert all(times == 1 for _, _, times in entries) and len({k for k, _, _ in entries}) == len(entries)
    return {key: reason for key, reason, _ in entries}


def test_budget_and_waiting_errors_parse_and_other_errors_do_not() -> None:
    over = ("over budget: sandbox/a100-us: over the provider 'sandbox' budget: needs $1.2900 held, $0.0100 of $0.01 "
            "left this month ($0.0000 spent, $0.0000 held); sandbox/h100: over the global budget's $1.00/h limit: "
            "$2.4900/h more would exceed it")
    assert {k: rejection_category(v) for k, v in _by_key(rejections_in_error(over)).items()} == {
        "sandbox/a100-us": "over_budget", "sandbox/h100": "over_budget"}
    waited = "no capacity within 60s: every fitting offer is full (local/local: no free capacity; api: unavailable: 503)"
    assert {k: rejection_category(v) for k, v in _by_key(rejections_in_error(waited)).items()} == {
        "local/local": "no_capacity", "api": "unhealthy"}
    assert rejections_in_error("sandbox host for offer a100 was lost mid-job") == []
    assert rejections_in_error("") == []


def test_offers_placement_counts_instead_of_listing_are_counted_with_their_number() -> None:
    """Past its listing limit placement counts the remaining offers per provider and reason, in a summary
    phrased per group (``GPU not in …``, ``fewer GPUs than …``, ``over max $…``)."""
    error = ("no offer meets the job's constraints (local: does not run training jobs; vastai/1: GPU A10 not in "
             "['B200']; and 1,234 more offers (vastai: 1,200 × GPU not in ['B200']; vastai: 30 × fewer GPUs than 2; "
             "runpod: 4 × over max $2.00/h))")
    assert [(k, rejection_category(r), n) for k, r, n in rejections_in_error(error)] == [
        ("local", "missing_capability", 1), ("vastai/1", "gpu", 1), ("vastai", "gpu", 1200), ("vastai", "gpu", 30),
        ("runpod", "price", 4)]
    for summary, category in (("GPU memory < 80 GB", "gpu"), ("over max $0.002/1K tokens", "price"),
                              ("region not in ['EU']", "region_not_allowed"),
                              ("region not allowed for data class 'pii-eu' (EU)", "region_not_allowed"),
                              ("provider denied for data class 'secret'", "provider_not_allowed"),
                              ("provider not allowed for data class 'phi-us'", "provider_not_allowed"),
                              ("missing capability (needs reasoning)", "missing_capability"),
                              ("context window < 128000 needed", "missing_capability"),
                              ("reliability < 0.99", "other")):
        assert rejection_category(summary) == category, summary


def test_categories_are_the_documented_fixed_set() -> None:
    assert len(set(REJECTION_CATEGORIES)) == len(REJECTION_CATEGORIES) == 12
    assert "other" in REJECTION_CATEGORIES
