"""Hard budgets and reservations against the real Postgres: concurrent holds never overshoot,
jobs over budget wait or fail with a clear reason, standalone reservations wait, activate,
expire and settle, and every charge lands in the cost report."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from sqlalchemy import func, select

from .conftest import KEY_A

HOLD = 0.5


def _fresh_tenant_budget(limit: float) -> tuple[uuid.UUID, uuid.UUID]:
    from orchestrator.db.engine import session_scope
    from orchestrator.db.models import Tenant
    from orchestrator.services import budgets

    name = f"budget-{uuid.uuid4().hex[:8]}"
    with session_scope() as s:
        tenant = Tenant(id=uuid.uuid4(), name=name)
        s.add(tenant)
        s.flush()
        budget = budgets.set_budget(s, "tenant", name, monthly_limit=limit, hourly_limit=None)
        return tenant.id, budget.id


def test_fifty_concurrent_holds_against_a_budget_that_fits_ten(stack) -> None:
    from orchestrator.db.engine import session_scope
    from orchestrator.db.models import BudgetPeriod
    from orchestrator.services import budgets

    tenant_id, budget_id = _fresh_tenant_budget(limit=10 * HOLD)
    barrier = threading.Barrier(50)
    results: list[str] = []

    def place() -> None:
        barrier.wait()
        try:
            with session_scope() as s:
                budgets.hold(s, tenant_id, "sandbox", HOLD, 0.0)
            results.append("held")
        except budgets.OverBudget as exc:
            results.append("wait" if exc.can_wait else "refused")

    threads = [threading.Thread(target=place) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("held") == 10 and results.count("wait") == 40
    with session_scope() as s:
        ledger = s.get_one(BudgetPeriod, (budget_id, budgets.current_period()))
        assert ledger.held == pytest.approx(10 * HOLD) and ledger.spent == 0
        # Settling one hold at a real cost below it makes room for exactly one more.
        budgets.settle(s, [str(budget_id)], budgets.current_period(), HOLD, 0.0, 0.1)
    with session_scope() as s:
        budgets.hold(s, tenant_id, "sandbox", HOLD - 0.1, 0.0)
    with pytest.raises(budgets.OverBudget), session_scope() as s:
        budgets.hold(s, tenant_id, "sandbox", 0.01, 0.0)


def test_jobs_over_a_tenant_budget_wait_and_the_ledger_never_exceeds_it(stack, client) -> None:
    """50 jobs whose holds fit ten at a time: at most ten run at once, all finish, spend stays under the limit."""
    from orchestrator.db.engine import session_scope
    from orchestrator.db.models import Reservation
    from orchestrator.services import budgets

    hold = 1.29 * 60 / 3600  # a100-us at $1.29/h for the 60 s timeout
    limit = round(hold * 10 + hold / 2, 6)
    with session_scope() as s:
        budgets.set_budget(s, "tenant", "acme", monthly_limit=limit + _acme_spent(s), hourly_limit=None)
    try:
        batch = client.submit_batch([client.job_body("command", {"command": "sleep 1"}, timeout_seconds=60,
                                                     requirements={"gpu": ["A100"], "providers": ["sandbox"]})
                                     for _ in range(50)])
        peak = 0
        deadline = time.monotonic() + 180
        while True:
            with session_scope() as s:
                live = s.scalar(select(func.count()).select_from(Reservation).where(
                    Reservation.job_id.in_(batch.job_ids), Reservation.state.in_(["requested", "provisioning", "active",
                                                                                  "releasing"]))) or 0
                row = budgets.status(s, [b for b in budgets.all_budgets(s) if b.scope_key == "acme"])[0]
            peak = max(peak, live)
            assert row["spent"] + row["held"] <= row["monthly_limit"] + 1e-9
            jobs = client.list(batch_id=batch.batch_id, limit=100).jobs
            if all(j.done for j in jobs):
                break
            assert time.monotonic() < deadline, "the batch never finished"
            time.sleep(0.1)
        assert peak == 10
        assert {j.status.value for j in jobs} == {"succeeded"}
        waited = [e.reason for j in jobs[:50] for e in client.get(j.id).events if "budget" in e.reason]
        assert any("over the tenant 'acme' budget" in r for r in waited)
    finally:
        with session_scope() as s:
            budgets.set_budget(s, "tenant", "acme", monthly_limit=None, hourly_limit=None)


def _acme_spent(session) -> float:  # type: ignore[no-untyped-def]
    from orchestrator.services import budgets

    rows = [b for b in budgets.status(session) if b["scope"] == "tenant" and b["key"] == "acme"]
    return (rows[0]["spent"] + rows[0]["held"]) if rows else 0.0


def test_job_that_can_never_fit_the_budget_fails_with_the_reason(stack, client) -> None:
    from orchestrator.db.engine import session_scope
    from orchestrator.services import budgets

    with session_scope() as s:
        budgets.set_budget(s, "provider", "sandbox", monthly_limit=0.001, hourly_limit=None)
    try:
        done = client.wait(client.submit("training", {"base_model": "m", "dataset_uri": "d"},
                                         requirements={"gpu": ["H100"], "providers": ["sandbox"]}).id, timeout=30)
    finally:
        with session_scope() as s:
            budgets.set_budget(s, "provider", "sandbox", monthly_limit=None, hourly_limit=None)
    assert done.status.value == "failed"
    assert done.error.startswith("over budget:") and "over the provider 'sandbox' budget" in done.error


def test_standalone_reservation_activates_expires_and_is_charged(stack, client) -> None:
    out = client.reserve("A100", duration_seconds=60, max_price_per_hour=2.0, provider="sandbox")
    assert out["state"] == "requested" and out["provider"] is None
    deadline = time.monotonic() + 30
    while (row := client.reservation(out["id"]))["state"] != "active":
        assert row["state"] in ("requested", "provisioning"), row
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert row["offer_id"] == "a100-us" and row["hold_amount"] == pytest.approx(1.29 * 60 / 3600)
    assert row["expires_at"] is not None
    deleted = client.release_reservation(out["id"])
    assert deleted["id"] == out["id"]
    while (row := client.reservation(out["id"]))["state"] != "released":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert 0 < row["cost"] < row["hold_amount"]
    costs = client.costs()
    assert costs["by_kind"]["reservation"] >= row["cost"] - 1e-6 and costs["by_provider"]["sandbox"] > 0


def test_reservation_that_cannot_be_served_waits_then_fails_and_bad_input_is_refused(stack, client) -> None:
    from orchestrator.sdk import ValidationError

    with pytest.raises(ValidationError, match="provider"):
        client.reserve("A100", duration_seconds=60, provider="nowhere")
    with pytest.raises(ValidationError, match="duration_seconds"):
        client.reserve("A100", duration_seconds=1)
    out = client.reserve("B200", duration_seconds=60, provider="sandbox")
    deadline = time.monotonic() + 30
    while (row := client.reservation(out["id"]))["state"] == "requested":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert row["state"] == "failed" and "B200" in row["error"]


def test_costs_endpoint_groups_spend(stack, client) -> None:
    done = client.wait(client.submit("training", {"base_model": "m", "dataset_uri": "d", "max_steps": 2},
                                     requirements={"gpu": ["A100"]}).id, timeout=30)
    assert done.status.value == "succeeded" and done.cost > 0
    report = client.costs()
    assert report["total"] >= done.cost - 1e-6 and report["by_kind"]["training"] >= done.cost - 1e-6
    assert sum(report["by_day"].values()) == pytest.approx(report["total"])
    assert KEY_A not in str(report)


def test_run_report_needs_the_job_token_and_a_running_job(stack, client) -> None:
    import httpx

    job = client.submit("command", {"command": "sleep 5"})
    wait = time.monotonic() + 20
    while client.get(job.id).status.value != "running":
        assert time.monotonic() < wait
        time.sleep(0.05)
    url = f"{stack.url}/v1/jobs/{job.id}/report"
    body = {"state": "succeeded", "result": {"x": 1}}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 401
    bad = httpx.post(url, json={"state": "maybe"}, headers={"Authorization": "Bearer x"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "state"
    client.cancel(job.id)
    done = client.get(job.id)
    assert done.status.value == "cancelled" and done.result is None  # nothing a stranger sent was kept


def _active_reservation(client, gpu: str = "A100") -> dict:  # type: ignore[type-arg,no-untyped-def]
    out = client.reserve(gpu, duration_seconds=120, provider="sandbox")
    deadline = time.monotonic() + 30
    while (row := client.reservation(out["id"]))["state"] != "active":
        assert row["state"] in ("requested", "provisioning"), row
        assert time.monotonic() < deadline, row
        time.sleep(0.1)
    return row


def test_jobs_run_on_an_existing_reservation_without_renting_more(stack, client) -> None:
    from orchestrator.db.engine import session_scope
    from orchestrator.db.models import Reservation
    from orchestrator.sdk import ValidationError

    row = _active_reservation(client)
    rented_before = _count_reservations()
    jobs = [client.submit("command", {"command": f"echo GPUFLEET_RESULT '{{\"n\": {n}}}'; echo on $GPUFLEET_RESERVATION"},
                          reservation_id=row["id"]) for n in range(3)]
    done = [client.wait(j.id, timeout=60) for j in jobs]
    for n, job in enumerate(done):
        assert job.status.value == "succeeded", job.error
        assert job.result["n"] == n and f"on {row['label']}" in job.result["stdout"]
        assert job.provider == "sandbox" and job.reservation_id is None and str(job.use_reservation_id) == row["id"]
        assert job.cost == 0.0  # the reservation pays for its time
        assert any(f"on reservation {row['label']}" in e.reason for e in job.events)
    assert _count_reservations() == rented_before  # nothing new was rented for them

    with pytest.raises(ValidationError) as refused:
        client.submit("inference", {"model": "m", "prompt": "hi"}, reservation_id=row["id"])
    assert "spec.command" in str(refused.value)
    with pytest.raises(ValidationError) as unknown:
        client.submit("command", {"command": "true"}, reservation_id=str(uuid.uuid4()))
    assert "reservation_id" in str(unknown.value)

    # A job still running when the reservation ends fails with that reason, and the capacity is settled.
    slow = client.submit("command", {"command": "sleep 30"}, reservation_id=row["id"])
    deadline = time.monotonic() + 20
    while client.get(slow.id).status.value != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client.release_reservation(row["id"])
    ended = client.wait(slow.id, timeout=30)
    assert ended.status.value == "failed" and "ended before the job finished" in ended.error
    with session_scope() as s:
        settled = s.get(Reservation, uuid.UUID(row["id"]))
        assert settled is not None and settled.state == "released" and settled.cost > 0
    with pytest.raises(ValidationError):
        client.submit("command", {"command": "true"}, reservation_id=row["id"])


def test_agent_needs_the_reservation_token(stack, client) -> None:
    import httpx

    row = _active_reservation(client)
    try:
        url = f"{stack.url}/v1/reservations/{row['id']}/claim"
        assert httpx.post(url).status_code == 401
        assert httpx.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        client.release_reservation(row["id"])


def _count_reservations() -> int:
    from orchestrator.db.engine import session_scope
    from orchestrator.db.models import Reservation

    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(Reservation)) or 0)
