"""Nothing lost: a killed worker and a flushed broker still end every job exactly once."""

from __future__ import annotations

import signal
import time

from sqlalchemy import select

from orchestrator.db.engine import session_scope
from orchestrator.db.models import JobEvent
from orchestrator.domain import TERMINAL

from .conftest import wait_for_status


def _terminal_events(job_id) -> list[JobEvent]:  # type: ignore[no-untyped-def]
    with session_scope() as s:
        return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id,
                                                     JobEvent.to_status.in_([t.value for t in TERMINAL]))))


def test_worker_killed_mid_job_still_ends_exactly_once(client, stack) -> None:
    job = client.submit("command", {"command": "sleep 2; echo finished"})
    wait_for_status(client, job.id, "running")
    stack.kill_worker(signal.SIGKILL)
    time.sleep(0.5)
    stack.start_worker()
    done = client.wait(job.id, timeout=60)
    assert done.status.value == "succeeded", done.error
    assert done.result["stdout"] == "finished\n"  # the detached command survived its worker
    assert len(_terminal_events(job.id)) == 1
    # Replaying the finished job's messages changes nothing.
    from orchestrator.services import pipeline

    pipeline.poll(job.id, done.attempt)
    pipeline.execute(job.id, done.attempt)
    pipeline.dispatch(job.id, done.attempt)
    assert len(_terminal_events(job.id)) == 1
    assert client.get(job.id).status.value == "succeeded"


def test_worker_killed_during_placement_burst_loses_nothing(client, stack) -> None:
    batch = client.submit_batch([client.job_body("inference", {"model": "m-8b", "prompt": f"p{i}", "max_tokens": 4})
                                 for i in range(60)])
    time.sleep(0.3)
    stack.kill_worker(signal.SIGKILL)
    stack.start_worker()
    jobs = client.wait_all(batch.job_ids, timeout=120)
    assert {j.status.value for j in jobs} == {"succeeded"}
    for job in jobs:
        assert len(_terminal_events(job.id)) == 1


def test_broker_flushed_after_accepting_jobs_loses_none(client, stack, redis_client) -> None:
    stack.kill_worker(signal.SIGTERM)
    batch = client.submit_batch([client.job_body("command", {"command": ["true"]}) for _ in range(25)])
    single = client.submit("inference", {"model": "m-8b", "prompt": "hi"})
    assert redis_client.dbsize() > 0
    redis_client.flushdb()  # every dispatch message is gone, as after a Redis restart without persistence
    stack.start_worker()
    jobs = client.wait_all([*batch.job_ids, single.id], timeout=120)
    assert {j.status.value for j in jobs} == {"succeeded"}
    sweeps = [e for j in jobs[:3] for e in client.get(j.id).events if e.actor == "sweeper"] or None
    assert sweeps is None or all(e.to_status in ("queued", "placing") for e in sweeps)


def test_orphaned_lease_is_reaped_and_charged_to_its_job(client, stack) -> None:
    """An executor that died after renting but before recording the run leaves a labelled lease behind."""
    from providers.base import JobSpec, Requirements
    from providers.registry import get_providers

    done = client.wait(client.submit("training", {"base_model": "m", "dataset_uri": "d", "max_steps": 1},
                                     requirements={"gpu": ["A100"]}).id, timeout=30)
    assert done.status.value == "succeeded"
    sandbox = get_providers()["sandbox"]  # same state dir as the stack's workers
    offer = next(o for o in sandbox.offers(Requirements(), "training", {}) if o.offer_id == "a100-us")
    assert done.reservation_id is not None  # a released reservation: a second lease under its label is an orphan
    orphan = sandbox.reserve(offer, JobSpec(job_id=str(done.id), kind="training", attempt=done.attempt,
                                            spec={}, timeout_seconds=60, label=f"gpufleet-{done.reservation_id}"))
    assert orphan.external_id in {r.external_id for r in sandbox.owned()}
    deadline = time.monotonic() + 30
    while orphan.external_id in {r.external_id for r in sandbox.owned()}:
        assert time.monotonic() < deadline, "the orphaned lease was never reaped"
        time.sleep(0.2)
    # The reaper destroys first and records the charge right after: wait for the record.
    while True:
        job = client.get(done.id)
        reaped = [e for e in job.events if e.actor == "reaper"]
        if reaped:
            break
        assert time.monotonic() < deadline, "the reaped lease was never charged to its job"
        time.sleep(0.2)
    assert len(reaped) == 1 and orphan.external_id in reaped[0].reason
    assert job.cost > done.cost and job.status.value == "succeeded"
