"""Warm pools of rented instances end to end: the beat's autoscaler rents members (standalone
reservations whose capacity runs our agent) from the queue, jobs placed on the pool run on them
through the agent, and the pool gives them back once idle — every member recorded and charged."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from .conftest import KEY_A, KEY_B, Stack, isolated_stack

PROVIDERS = """
providers:
  sandbox:
    time_scale: 0.5
    offers:
      - {offer_id: rtx4090-se, gpu: RTX 4090, gpu_memory_gb: 24, region: eu-se, price_per_hour: 0.39, capacity: 10,
         boot_seconds: 0.4}
  warm-4090:
    type: warm
    tenant: acme
    provider: sandbox
    gpu: [RTX 4090]
    max_instances: 2
    idle_seconds: 4
    cooldown_seconds: 1
    instance_seconds: 600
"""
POOL = {"gpu": ["RTX 4090"], "providers": ["warm-4090"]}


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with isolated_stack(tmp_path_factory.mktemp("warm"), 3, PROVIDERS,
                        {"GPUFLEET_AUTOSCALE_INTERVAL_SECONDS": "1", "GPUFLEET_WARM_CLAIM_SECONDS": "3"}) as running:
        yield running


def _members() -> list:  # type: ignore[type-arg]
    from orchestrator.db.engine import session_scope
    from orchestrator.db.models import Reservation

    with session_scope() as s:
        return list(s.scalars(select(Reservation).where(Reservation.request["pool"].as_string() == "warm-4090")
                              .order_by(Reservation.created_at)))


def test_the_pool_grows_from_the_queue_serves_jobs_and_shrinks_when_idle(warm: Stack) -> None:
    from orchestrator.sdk import Client

    with Client(warm.url, KEY_A) as client:
        assert _members() == []  # nothing rented before there is work
        jobs = [client.submit("command", {"command": f"sleep 0.5; echo GPUFLEET_RESULT '{{\"n\": {n}}}'"},
                              requirements=POOL) for n in range(3)]
        done = [client.wait(j.id, timeout=60) for j in jobs]
    for n, job in enumerate(done):
        assert job.status.value == "succeeded", job.error
        assert job.result["n"] == n and job.provider == "warm-4090" and job.cost == 0.0  # the members pay
    members = _members()
    # Three jobs queued, at most two members: the pool grew to its limit, and members served jobs in turn.
    assert len(members) == 2 and {m.provider for m in members} == {"sandbox"}
    assert {j.use_reservation_id for j in done} <= {m.id for m in members}
    assert all(m.price_per_hour == pytest.approx(0.39) and m.request["pool"] == "warm-4090" for m in members)
    # Idle past idle_seconds: the members are given back, and what they cost is settled on them.
    deadline = time.monotonic() + 30
    while any(m.state not in ("released", "failed") for m in members):
        assert time.monotonic() < deadline, [(m.label, m.state) for m in members]
        time.sleep(0.2)
        members = _members()
    assert all(m.state == "released" and m.cost > 0 for m in members)


def test_another_tenants_jobs_never_use_the_pool(warm: Stack) -> None:
    from orchestrator.sdk import Client

    with Client(warm.url, KEY_B) as other:
        job = other.wait(other.submit("command", {"command": "echo hi"}, requirements=POOL).id, timeout=30)
    assert job.status.value == "failed" and "warm-4090" in job.error
    assert job.use_reservation_id is None


def _wait_running(client, job_id, attempt: int):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 45
    # Running and bound: execute marks the job running before it binds it to a member.
    while (seen := client.get(job_id)).status.value != "running" or seen.attempt != attempt \
            or seen.use_reservation_id is None:
        assert not seen.done and time.monotonic() < deadline, (seen.status.value, seen.attempt, seen.error)
        time.sleep(0.1)
    return seen


def test_a_job_on_a_member_that_ends_runs_again_on_another(warm: Stack) -> None:
    from orchestrator.sdk import Client

    with Client(warm.url, KEY_A) as client:
        job = client.submit("command", {"command": "sleep 30"}, requirements=POOL, max_attempts=3)
        first = _wait_running(client, job.id, 1)
        assert first.provider == "warm-4090" and first.use_reservation_id is not None
        client.release_reservation(str(first.use_reservation_id))  # the member goes away mid-job
        second = _wait_running(client, job.id, 2)
        assert second.use_reservation_id not in (None, first.use_reservation_id)
        assert any("ended before the job finished; retrying elsewhere" in e.reason for e in second.events or [])
        client.cancel(job.id)


def test_a_member_stuck_on_a_cancelled_job_is_given_back_and_the_next_job_runs_elsewhere(warm: Stack) -> None:
    from orchestrator.sdk import Client

    with Client(warm.url, KEY_A) as client:
        for m in _members():  # start from an empty pool: the stuck member will be its only one
            if m.state in ("requested", "provisioning", "active"):
                client.release_reservation(str(m.id))
        deadline = time.monotonic() + 30
        while any(m.state not in ("released", "failed") for m in _members()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        stuck = client.submit("command", {"command": "sleep 25"}, requirements=POOL)
        member = _wait_running(client, stuck.id, 1).use_reservation_id
        deadline = time.monotonic() + 20
        while client.get(stuck.id).result is None and not _claimed(stuck.id):
            assert time.monotonic() < deadline, "the agent never took the job"
            time.sleep(0.1)
        client.cancel(stuck.id)  # its process goes on: the member's agent is busy with it
        job = client.submit("command", {"command": "echo next"}, requirements=POOL, max_attempts=3)
        done = client.wait(job.id, timeout=60)
        assert done.status.value == "succeeded", done.error
        assert done.use_reservation_id != member
        reasons = " ".join(e.reason for e in done.events or [])
        # The only member was the stuck one: the job was bound there first, then ran on a new member.
        assert done.attempt == 2 and "did not take the job within 3s" in reasons
        assert next(m for m in _members() if m.id == member).state in ("releasing", "released")


def _claimed(job_id) -> bool:  # type: ignore[no-untyped-def]
    from orchestrator.db.engine import session_scope
    from orchestrator.db.models import Job

    with session_scope() as s:
        return s.get(Job, job_id).claimed_at is not None  # type: ignore[union-attr]
